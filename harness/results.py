"""Results files: runs.jsonl written one fsynced line per record, read back into typed Records.

- `append_record`: one JSON line, flushed and fsynced, signals held back so that an interrupt never tears
  it; when the file cannot be written (a full disk, a read-only directory) the record is written to a
  rescue file instead and the one-line error says where: a finished measurement is never lost.
- `read_records`: every record of a file, typed; a line that is not JSON, or not a record of the schema,
  is reported (file, line number, what is wrong) and skipped, never silently.
- `load_results`: a results directory's newest record per spec key, for report, calibrate and check.
- `exclusive`: one writer per results file (an advisory lock); `repair_torn_tail`: drop a half-written
  last line left by a hard kill.
- `run_label`: the short name of a configuration that tables and progress lines use.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.records import Record
from harness.schema import SchemaError
from models.presets import PRESETS

RUNS_FILE = "runs.jsonl"


# --------------------------------------------------------------------------------------------------
# Writing


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """Fail before any work when `path` cannot be appended to: a one-line UsageError naming the problem.

    Creates the missing parent directories (that is where the file will go); creates no file.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory (give a file, e.g. {path / RUNS_FILE})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create {path.parent} ({exc.strerror or exc})") from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise UsageError(f"{what} {path}: {target} is not writable")
    return path


def check_writable_dir(path: str | Path, what: str = "--out") -> Path:
    """The same for a directory that results or a report will be written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path}: is not writable")
    return path


def _write_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def rescue(record: Record, reason: str) -> Path:
    """Write a record that could not go where it belonged to a file of its own; return where it went."""
    line = json.dumps(record.to_dict(), separators=(",", ":"), allow_nan=False) + "\n"
    for folder in (Path(tempfile.gettempdir()), Path.cwd(), Path.home()):
        try:
            fd, name = tempfile.mkstemp(prefix=f"tmath-record-{record.spec_key}-", suffix=".jsonl", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            return Path(name)
        except OSError:
            continue
    print(line, file=sys.stderr, end="")  # nowhere to write: the record itself, on stderr, is the last resort
    raise UsageError(f"{reason}; no writable place for the record either: it is printed above on stderr")


def append_record(path: str | Path, record: Record) -> None:
    """Append one record as one line, flushed and fsynced, with SIGINT/SIGTERM held back during the write.

    A write that fails is a UsageError after the record is rescued (`rescue`), naming both files."""
    path = Path(path)
    line = json.dumps(record.to_dict(), separators=(",", ":"), allow_nan=False) + "\n"
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows, not the main thread)
        old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_line(path, line)
    except OSError as exc:
        reason = f"cannot write {path} ({exc.strerror or exc})"
        raise UsageError(f"{reason}; the record is in {rescue(record, reason)}") from None
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per skipped line: `FILE:LINE: what is wrong`."""
    torn_tail: bool = False
    """The last line has no newline and does not parse: a write cut short by a kill (repaired on --resume)."""


def read_records(path: str | Path) -> ReadResult:
    """Every complete record of a results file, typed, with what was skipped and why."""
    path = Path(path)
    out = ReadResult()
    if not path.exists():
        return out
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if last:
                out.torn_tail = True
                out.problems.append(f"{path}:{number}: a torn last line (an interrupted write), skipped")
            else:
                out.problems.append(f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno}), skipped")
            continue
        try:
            out.records.append(Record.from_dict(data))
        except SchemaError as exc:
            out.problems.append(f"{path}:{number}: not a record: {exc}, skipped")
    return out


def warn(problems: list[str]) -> None:
    for problem in problems:
        print(f"tmath: warning: {problem}", file=sys.stderr)


def latest_records(records: list[Record]) -> list[Record]:
    """One record per spec key, the newest (a retried point supersedes its failure), in first-run order."""
    latest: dict[str, Record] = {}
    for r in records:
        latest[r.spec_key] = r  # a dict keeps the first position of a key
    return list(latest.values())


def results_path(target: str | Path) -> Path:
    target = Path(target)
    return target / RUNS_FILE if target.is_dir() else target


def load_results(target: str | Path) -> tuple[Path, list[Record]]:
    """The newest record of each spec key from DIR/runs.jsonl (or a .jsonl path); skipped lines are warned
    about on stderr; no records at all is a one-line UsageError."""
    target = Path(target)
    path = results_path(target)
    if not path.exists():
        where = f"{target} has no {RUNS_FILE}" if target.is_dir() else f"no results at {target}"
        raise UsageError(f"{where} (run `tmath sweep` first)")
    read = read_records(path)
    records = latest_records(read.records)
    if not records:
        skipped = f" ({len(read.problems)} line(s) skipped; the first: {read.problems[0]})" if read.problems else ""
        raise UsageError(f"{path} holds no records{skipped}")
    warn(read.problems)
    return path, records


# --------------------------------------------------------------------------------------------------
# One writer, and a torn tail


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One sweep process per results file (an advisory lock on runs.jsonl itself): two writers would
    run every point twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        yield
        return
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another sweep is writing to {path} (it holds the file's lock)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def repair_torn_tail(path: Path) -> int:
    """Drop a partial last line (a kill mid-write) so the next record starts on its own line.

    Without this the next append would be glued to the fragment and both lines would be unreadable.
    Returns the number of bytes dropped.
    """
    if not path.exists():
        return 0
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Walk back to the last newline.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


# --------------------------------------------------------------------------------------------------
# Labels


def run_label(spec: RunSpec, without: tuple[str, ...] = (), device: str | None = None) -> str:
    """A short configuration name: `gpt2 L2 fp32 rc=selective b2 s128 cpu` (`device`: the one measured)."""
    arch, t, p, m = spec.model.arch, spec.training, spec.parallel, spec.measurement
    parts = [spec.model.name]
    if arch is not None:
        parts.append(f"L{arch.n_layers}")
        preset = PRESETS.get(spec.model.name)
        if arch.hidden != (preset.hidden if preset is not None else None):
            parts.append(f"h{arch.hidden}")
    if m.impl != "reference":
        parts.append(m.impl)
    if m.mode == "inference":
        parts.append("inference")
    parts.append(t.precision)
    if t.optimizer != "adamw":
        parts.append(t.optimizer)
    if t.finetune != "full":
        targets = "" if t.lora_targets is None else f" t={t.lora_targets.count(',') + 1}"
        dropout = f" p={t.lora_dropout:g}" if t.lora_dropout else ""
        parts.append(f"{t.finetune} r{t.lora_rank}{targets}{dropout}")
    if t.recompute != "none":
        parts.append(f"rc={t.recompute}")
    if t.attention != "eager":
        parts.append(t.attention)
    if p.zero:
        parts.append(f"ZeRO-{p.zero}")
    for value, short in ((p.offload_optimizer, "off-opt"), (p.offload_params, "off-param")):
        if value != "none":
            parts.append(f"{short}={value}")
    if p.gpus > 1:
        parts.append(f"×{p.gpus}")
    for value, short in ((p.tp, "tp"), (p.pp, "pp")):
        if value > 1:
            parts.append(f"{short}{value}")
    if "batch" not in without:
        parts.append(f"b{t.batch}")
    if "seq" not in without:
        parts.append(f"s{t.seq}")
    if t.grad_accum > 1:
        parts.append(f"ga{t.grad_accum}")
    if m.compile:
        parts.append("compiled")
    parts.append(str(device or m.device))
    return " ".join(parts)
