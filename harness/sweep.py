"""Run a sweep file: every point measured in its own subprocess, one record per point in runs.jsonl.

    tmath sweep sweeps/cpu-smoke.yaml                  # results/cpu-smoke/runs.jsonl
    tmath sweep sweeps/cpu-smoke.yaml --resume         # continue an interrupted sweep
    tmath sweep sweeps/a100-node.yaml --executor slurm --slurm-partition gpu

Sweep file (YAML). Every key of `defaults`, `grid`, `points` and `exclude` is a setting that
`harness.specbuild.build_spec` accepts: a RunSpec field (`batch`, `seq`, `precision`, `recompute`,
`zero`, `gpus`, `impl`, `device`, `mode`, `steps`, ...) or an architecture key (`layers`, `hidden`,
`heads`, `kv_heads`, `ffn_hidden`, `vocab`, ...). Hyphens in keys are read as underscores.

    name: cpu-smoke            # results go to results/<name>/ unless --out (default: the file's stem)
    description: ...           # free text
    defaults: {model: gpt2, layers: 2, seq: 128, batch: 2, precision: fp32, device: auto}
    grid:                      # cartesian product of the axes (in file order), each point merged over defaults
      recompute: [none, selective, full]
      impl: [reference, hf]
    exclude:                   # drop the grid points that match every key of one entry
      - {impl: hf, recompute: selective}
    points:                    # explicit points, merged over defaults, appended after the grid
      - {model: bert-base-uncased, layers: 2, seq: 128}
    timeout: 900               # seconds per point (--timeout wins; default 1800)
    max_memory: 8GiB           # host address-space cap per CPU/meta point (default 85% of RAM)

Rules, all checked before anything runs, each violation one line naming the file and the key or point:
- unknown top-level keys, unknown settings, a grid axis that is not a non-empty list, an `exclude`
  entry that matches no grid point (a typo would otherwise silently keep the points);
- every point is built with `build_spec` and checked for measurability on this machine
  (e.g. `device: cuda` without a GPU), so one invalid point stops the sweep before its first run;
- two points with the same spec key (`RunSpec.key()`) are an error, not silently merged: a sweep
  file that asks for the same run twice has a mistake in it.

Execution: one point at a time, each through `run_any` (a fresh `harness.worker` subprocess, or the
distributed launcher for multi-rank points). Every record is appended to `runs.jsonl` as soon as its
point finishes (flushed and fsynced, signals deferred during the write), tagged `spec.extra.sweep`.
OOM, timeout and crash records carry their status and stderr tail; the sweep goes on. Without
`--resume` an existing non-empty runs.jsonl is refused; with it, points whose spec key already has
a record are skipped (`--retry-failed` re-runs the non-ok ones; the newest record of a key is the
one reports use). SIGINT/SIGTERM kill the running worker's process group before the sweep exits
(status 130); a partial last line left by a hard kill is dropped on resume. One sweep process per
runs.jsonl (an advisory lock). `--dry-run` lists the expanded points with their recorded status.
`--executor slurm` sends the pending points to Slurm through submitit (one job per point) and
appends each record to the same runs.jsonl as its job completes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.record import STATUSES, append_jsonl, make_record, read_jsonl
from harness.specbuild import SETTING_KEYS, build_spec

FILE_KEYS = ("name", "description", "defaults", "grid", "points", "exclude", "timeout", "max_memory")
DEFAULT_TIMEOUT_S = 1800.0
RESULTS_DIR = Path("results")
RUNS_FILE = "runs.jsonl"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


@dataclass(frozen=True)
class Point:
    """One expanded point: where it came from in the file, its settings, and its validated spec."""

    origin: str
    """`grid point 3 (recompute=full, impl=hf)` or `points[2]`: how errors and listings name it."""
    settings: dict
    spec: RunSpec


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    points: tuple[Point, ...]
    description: str = ""
    timeout: float | None = None
    """Per-point time limit in seconds from the file (None: the CLI's or DEFAULT_TIMEOUT_S)."""
    max_memory_bytes: int | None = None
    """Address-space cap per CPU/meta worker from the file (None: `default_max_memory_bytes()`)."""


@dataclass
class SweepResult:
    out: Path
    """The runs.jsonl file."""
    total: int
    skipped: int
    ran: int = 0
    statuses: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Expansion and validation


def parse_size(text, where: str) -> int:
    """Bytes from `8GiB`, `512MiB`, `16GB` or a plain integer (bytes)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = _SIZE.fullmatch(str(text))
    if not m or isinstance(text, bool):
        raise UsageError(f"{where}: not a size: {text!r} (examples: 8GiB, 512MiB, 16GB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if value < 1:
        raise UsageError(f"{where}: size must be positive, got {text!r}")
    return int(value)


def _normalise(mapping, where: str) -> dict:
    """Setting keys with `_` for `-`, every key known to build_spec."""
    if not isinstance(mapping, dict):
        raise UsageError(f"{where} must be a mapping of settings, got {type(mapping).__name__}")
    out: dict = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in SETTING_KEYS:
            raise UsageError(
                f"{where}: unknown setting {key!r} (settings are RunSpec fields and layers/hidden/heads/...)"
            )
        if name in out:
            raise UsageError(f"{where}: setting {key!r} is given twice (with - and with _)")
        out[name] = value
    return out


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _grid_points(path: Path, defaults: dict, grid, exclude) -> list[tuple[str, dict]]:
    if grid is None:
        return []
    axes = _normalise(grid, f"{path}: grid")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    if exclude is None:
        exclude = []
    if not isinstance(exclude, list):
        raise UsageError(f"{path}: exclude must be a list of mappings, got {type(exclude).__name__}")
    rules = [_normalise(rule, f"{path}: exclude[{i}]") for i, rule in enumerate(exclude)]
    for i, rule in enumerate(rules):
        if not rule:
            raise UsageError(f"{path}: exclude[{i}] is empty (it would drop every grid point)")
    used = [False] * len(rules)
    points = []
    for n, combo in enumerate(itertools.product(*axes.values())):
        chosen = dict(zip(axes, combo, strict=True))
        settings = {**defaults, **chosen}
        hits = [i for i, rule in enumerate(rules) if all(k in settings and settings[k] == v for k, v in rule.items())]
        for i in hits:
            used[i] = True
        if not hits:
            points.append((f"grid point {n} ({_describe(chosen)})", settings))
    for i, rule in enumerate(rules):
        if not used[i]:
            raise UsageError(f"{path}: exclude[{i}] ({_describe(rule)}) matches no grid point")
    return points


def load_sweep(path: str | Path, *, check_device: bool = False, remote: bool = False) -> Sweep:
    """Read, expand and validate a sweep file; any problem is a one-line UsageError naming the file.

    check_device: also check that every point can be measured here (imports torch); `remote`
    checks it for a GPU node instead (Slurm: the device is on the compute node, not here).
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"sweep file not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read sweep file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a sweep file is a YAML mapping with keys {', '.join(FILE_KEYS)}")
    unknown = [str(k) for k in data if k not in FILE_KEYS]
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(FILE_KEYS)})")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{path}: name must be a plain directory name (letters, digits, . _ -), got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise UsageError(f"{path}: description must be text")
    timeout = data.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise UsageError(f"{path}: timeout must be a positive number of seconds, got {timeout!r}")
    max_memory = data.get("max_memory")
    max_memory_bytes = None if max_memory is None else parse_size(max_memory, f"{path}: max_memory")

    defaults = _normalise(data.get("defaults") or {}, f"{path}: defaults")
    raw = _grid_points(path, defaults, data.get("grid"), data.get("exclude"))
    if data.get("exclude") and data.get("grid") is None:
        raise UsageError(f"{path}: exclude applies to grid points, but the file has no grid")
    explicit = data.get("points") or []
    if not isinstance(explicit, list):
        raise UsageError(f"{path}: points must be a list of mappings, got {type(explicit).__name__}")
    for i, point in enumerate(explicit):
        raw.append((f"points[{i}]", {**defaults, **_normalise(point, f"{path}: points[{i}]")}))
    if not raw:
        raise UsageError(f"{path}: no points (give a grid, points, or both)")

    points: list[Point] = []
    seen: dict[str, str] = {}
    for origin, settings in raw:
        try:
            spec = build_spec(settings)
            user_extra = spec.extra if isinstance(spec.extra, dict) else {}
            spec = spec.replace(extra={**user_extra, "sweep": name})
        except UsageError as exc:
            raise UsageError(f"{path}: {origin}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{path}: {origin}: {str(exc).splitlines()[0]}") from None
        key = spec.key()
        if key in seen:
            raise UsageError(f"{path}: {origin} is the same run as {seen[key]} (spec key {key}): remove one")
        seen[key] = origin
        points.append(Point(origin, settings, spec))

    sweep = Sweep(name, path, tuple(points), description, timeout, max_memory_bytes)
    if check_device:
        check_points(sweep, remote=remote)
    return sweep


def check_points(sweep: Sweep, *, remote: bool = False) -> None:
    """What the harness cannot measure (no CUDA here, tensor parallelism, ...), before any run."""
    from harness.measure import check_measurable, resolve_device

    for point in sweep.points:
        spec = point.spec
        try:
            if remote:
                device = "cuda" if spec.device in ("auto", "cuda") else spec.device
            else:
                device = resolve_device(spec.device)
            check_measurable(spec, device)
        except (UsageError, ValueError) as exc:
            raise UsageError(f"{sweep.path}: {point.origin}: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------------
# Running one point


def is_multi_rank(spec: RunSpec) -> bool:
    """Points that need several processes (the launcher): more than one GPU, or a ZeRO engine."""
    return spec.gpus > 1 or spec.zero > 0


def _error_record(spec: RunSpec, kind: str, message: str, status: str = "error", **extra) -> dict:
    return make_record(spec, measured={}, status=status, error={"type": kind, "message": message, **extra})


def run_any(
    spec: RunSpec,
    *,
    timeout: float | None = None,
    max_memory_bytes: int | None = None,
    argv: list[str] | None = None,
) -> dict:
    """The record of one point, whatever happens: single-process points through `harness.runner`,
    multi-rank points through `harness.distributed`. A failure of the harness itself becomes an
    `error` record too, so that one bad point never ends a sweep."""
    import traceback

    try:
        if is_multi_rank(spec):
            try:
                from harness.distributed import run_distributed
            except ImportError as exc:
                return _error_record(
                    spec,
                    "ImportError",
                    f"multi-rank point (gpus={spec.gpus}, zero={spec.zero}) needs harness.distributed: {exc}",
                )
            return run_distributed(spec, timeout=timeout)
        from harness.runner import run_point

        return run_point(spec, timeout=timeout, argv=argv, max_memory_bytes=max_memory_bytes)
    except Exception as exc:
        return _error_record(
            spec,
            type(exc).__name__,
            f"the harness failed to run the point: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}",
            traceback_tail=traceback.format_exc()[-4000:],
        )


def _submitit_job(spec_dict: dict, timeout: float | None, max_memory_bytes: int | None) -> dict:
    """Body of one Slurm job (runs on the compute node): the point's record."""
    return run_any(RunSpec.from_dict(spec_dict), timeout=timeout, max_memory_bytes=max_memory_bytes)


# --------------------------------------------------------------------------------------------------
# Results file, signals, progress


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
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


def append_record(path: Path, record: dict) -> None:
    """append_jsonl with SIGINT/SIGTERM held back, so that an interrupt never tears a line."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows)
        append_jsonl(path, record)
        return
    try:
        append_jsonl(path, record)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) ends the sweep the way Ctrl-C does: through KeyboardInterrupt."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def short_label(spec: dict) -> str:
    from harness.report import run_label

    return run_label(spec)


class _Progress:
    """A rich progress bar with ETA on a terminal, and one line per finished point everywhere."""

    def __init__(self, total: int, title: str, quiet: bool = False):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True, highlight=False, quiet=quiet, soft_wrap=True)
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[current]}"),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task(title, total=total, current="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def start(self, label: str) -> None:
        self.bar.update(self.task, current=label)

    def finish(self, record: dict, label: str) -> None:
        self.done += 1
        self.bar.update(self.task, advance=1, current="")
        spent = time.monotonic() - self.t0
        left = self.total - self.done
        eta = f"ETA {_clock(spent / self.done * left)}" if left else "done"
        status = record.get("status", "?")
        elapsed = record.get("elapsed_s")
        took = f"{elapsed:7.1f} s" if isinstance(elapsed, (int, float)) else "      - s"
        colour = "green" if status == "ok" else "red"
        note = ""
        if status != "ok":
            from rich.markup import escape

            note = "  " + escape(str((record.get("error") or {}).get("message") or "")[:100])
        self.console.print(
            f"[{self.done}/{self.total}] [{colour}]{status:7}[/{colour}] {took}  {label}  ({eta}){note}",
            markup=True,
            soft_wrap=True,
        )


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------------
# The sweep


def default_out_dir(sweep: Sweep) -> Path:
    return RESULTS_DIR / sweep.name


def pending_points(sweep: Sweep, existing: list[dict], retry_failed: bool) -> list[Point]:
    """Points without a record (any status), or without an ok record when retrying failures."""
    done = {r.get("spec_key") for r in existing if not retry_failed or r.get("status") == "ok"}
    return [p for p in sweep.points if p.spec.key() not in done]


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    timeout: float | None = None,
    max_memory_bytes: int | None = None,
    runner: Callable[..., dict] | None = None,
    executor: str = "local",
    slurm: dict | None = None,
    quiet: bool = False,
) -> SweepResult:
    """Run every pending point of `sweep`, appending each record to `out_dir/runs.jsonl` as it finishes.

    runner: `run_any`'s signature (spec, timeout=, max_memory_bytes=) -> record; injectable for tests.
    executor: `local` (one subprocess at a time, here) or `slurm` (submitit; `slurm` holds its options,
    `slurm["cluster"]` may name submitit's `local` or `debug` executors to run the same path without Slurm).
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(sweep)
    path = out_dir / RUNS_FILE
    timeout = timeout if timeout is not None else (sweep.timeout or DEFAULT_TIMEOUT_S)
    if max_memory_bytes is None:
        from harness.runner import default_max_memory_bytes

        max_memory_bytes = sweep.max_memory_bytes or default_max_memory_bytes()
    runner = runner or run_any
    if executor == "slurm":
        _check_submitit((slurm or {}).get("cluster") or "slurm")

    with _exclusive(path):
        existing = read_jsonl(path)
        if existing and not resume:
            raise UsageError(
                f"{path} already holds {len(existing)} record(s): pass --resume to continue that sweep, "
                "or --out another directory"
            )
        dropped = repair_torn_tail(path)
        todo = pending_points(sweep, existing, retry_failed)
        result = SweepResult(out=path, total=len(sweep.points), skipped=len(sweep.points) - len(todo))
        progress = _Progress(len(todo), sweep.name, quiet=quiet)
        con = progress.console
        if dropped:
            con.print(f"{path}: dropped a torn last line ({dropped} bytes) left by an interrupted write")
        foreign = {r.get("spec_key") for r in existing} - {p.spec.key() for p in sweep.points}
        if foreign:
            con.print(f"{path}: {len(foreign)} recorded run(s) are not points of {sweep.path} (kept as they are)")
        con.print(
            f"sweep {sweep.name}: {len(sweep.points)} points, {result.skipped} already recorded, "
            f"{len(todo)} to run → {path}",
            soft_wrap=True,
        )
        if not todo:
            return result

        def record_one(point: Point, record: dict) -> None:
            append_record(path, record)
            result.ran += 1
            status = record.get("status", "error")
            result.statuses[status] = result.statuses.get(status, 0) + 1
            progress.finish(record, short_label(point.spec.to_dict()))

        with _terminate_as_interrupt(), progress:
            if executor == "slurm":
                _run_submitit(todo, sweep, out_dir, timeout, max_memory_bytes, slurm or {}, progress, record_one)
            else:
                try:
                    for point in todo:
                        progress.start(short_label(point.spec.to_dict()))
                        record = runner(point.spec, timeout=timeout, max_memory_bytes=max_memory_bytes)
                        record_one(point, record)
                except KeyboardInterrupt:
                    # The runner has already killed the running worker's process group.
                    con.print(
                        f"interrupted: {result.ran} of {len(todo)} points recorded in {path}; continue with --resume",
                        soft_wrap=True,
                    )
                    raise
    return result


def _job_failure_record(spec: RunSpec, job, exc: BaseException) -> dict:
    """A record for a Slurm job that returned no record (time limit, node failure, cancellation)."""
    state = ""
    with contextlib.suppress(Exception):
        state = str(job.state).upper()
    status = "timeout" if "TIMEOUT" in state else "oom" if "OUT_OF_MEMORY" in state else "killed"
    text = str(exc).strip()
    return _error_record(
        spec,
        type(exc).__name__,
        f"job {job.job_id} ended without a record (state {state or 'unknown'}): {text.splitlines()[0] if text else ''}",
        status=status,
        stderr_tail=text[-4000:],
    )


def _check_submitit(cluster: str) -> None:
    """Fail before anything is written when the jobs could not be submitted."""
    import shutil

    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError("--executor slurm needs submitit: pip install submitit") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: sbatch is not on PATH (run the sweep from a Slurm login node)")


def _run_submitit(todo, sweep, out_dir, timeout, max_memory_bytes, options, progress, record_one) -> None:
    """One submitit job per point, grouped by GPU count; records appended here as jobs complete."""
    import submitit

    cluster = options.get("cluster") or "slurm"
    executor = submitit.AutoExecutor(folder=out_dir / "submitit" / "%j", cluster=cluster)
    minutes = options.get("time_min") or math.ceil(timeout / 60) + 10
    base = {"timeout_min": int(minutes), "name": f"tmath-{sweep.name}"}
    if options.get("cpus_per_task"):
        base["cpus_per_task"] = options["cpus_per_task"]
    slurm_only = {
        "slurm_partition": options.get("partition"),
        "slurm_account": options.get("account"),
        "slurm_array_parallelism": options.get("parallelism"),
    }
    if cluster == "slurm":
        base.update({k: v for k, v in slurm_only.items() if v is not None})

    jobs = []
    groups: dict[int, list[Point]] = {}
    for point in todo:
        gpus = point.spec.gpus if point.spec.device in ("auto", "cuda") and cluster == "slurm" else 0
        groups.setdefault(gpus, []).append(point)
    try:
        for gpus, points in groups.items():
            executor.update_parameters(**base, gpus_per_node=gpus, tasks_per_node=1, nodes=1)
            with executor.batch():
                submitted = [
                    (p, executor.submit(_submitit_job, p.spec.to_dict(), timeout, max_memory_bytes)) for p in points
                ]
            jobs += submitted
        progress.console.print(f"submitted {len(jobs)} job(s) to {cluster}; logs in {out_dir / 'submitit'}")
        waiting = list(jobs)
        while waiting:
            still = []
            for point, job in waiting:
                if not job.done():
                    still.append((point, job))
                    continue
                try:
                    record = job.result()
                except Exception as exc:
                    record = _job_failure_record(point.spec, job, exc)
                if not isinstance(record, dict) or "status" not in record:
                    record = _error_record(
                        point.spec, "TypeError", f"job {job.job_id} returned {type(record).__name__}"
                    )
                record_one(point, record)
            waiting = still
            if waiting:
                time.sleep(options.get("poll_s", 5.0))
    except KeyboardInterrupt:
        left = [job for _, job in jobs if not job.done()]
        for job in left:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        progress.console.print(f"interrupted: cancelled {len(left)} job(s); continue with --resume")
        raise


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="sweep file (sweeps/*.yaml)")
    p.add_argument("--out", metavar="DIR", help="results directory (default results/<name>)")
    p.add_argument("--resume", action="store_true", help="skip points that already have a record in DIR")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run the non-ok points again")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per point (default: the file's, else 1800)")
    p.add_argument(
        "--max-memory", metavar="SIZE", help="host address-space cap per CPU/meta point, e.g. 8GiB (default: file's)"
    )
    p.add_argument("--dry-run", action="store_true", help="list the expanded points and their status; run nothing")
    p.add_argument("--strict", action="store_true", help="exit 1 when any point of the sweep has no ok record")
    p.add_argument("--executor", default="local", choices=("local", "slurm"), help="run here, or as Slurm jobs")
    s = p.add_argument_group("slurm (with --executor slurm; jobs go through submitit)")
    s.add_argument("--slurm-partition", help="partition")
    s.add_argument("--slurm-account", help="account")
    s.add_argument("--slurm-time", type=int, metavar="MIN", help="job time limit in minutes (default timeout + 10)")
    s.add_argument("--slurm-cpus-per-task", type=int, metavar="N", help="CPUs per job")
    s.add_argument("--slurm-parallelism", type=int, metavar="N", help="jobs of the sweep running at once")
    s.add_argument("--slurm-poll", type=float, default=5.0, metavar="S", help="seconds between job polls (default 5)")


def _dry_run(sweep: Sweep, out_dir: Path) -> int:
    from formulas.predict import predict
    from harness.display import console, gib

    existing = {r.get("spec_key"): r.get("status") for r in read_jsonl(out_dir / RUNS_FILE)}
    con = console()
    con.print(f"[bold]{sweep.name}[/bold] ({sweep.path}): {len(sweep.points)} points → {out_dir / RUNS_FILE}")
    if sweep.description:
        con.print(sweep.description.strip())
    for i, point in enumerate(sweep.points):
        spec = point.spec
        total = predict(spec).total
        status = existing.get(spec.key(), "-")
        con.print(
            f"{i:4d}  {spec.key()}  {status:7}  {gib(total):>9} GiB  {short_label(spec.to_dict())}", highlight=False
        )
    return 0


def run(args) -> int:
    slurm = args.executor == "slurm"
    sweep = load_sweep(args.file, check_device=not args.dry_run, remote=slurm)
    out_dir = Path(args.out) if args.out else default_out_dir(sweep)
    if args.dry_run:
        return _dry_run(sweep, out_dir)
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed continues a sweep: give it with --resume")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    max_memory = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    options = {
        "partition": args.slurm_partition,
        "account": args.slurm_account,
        "time_min": args.slurm_time,
        "cpus_per_task": args.slurm_cpus_per_task,
        "parallelism": args.slurm_parallelism,
        "poll_s": args.slurm_poll,
    }
    result = run_sweep(
        sweep,
        out_dir,
        resume=args.resume,
        retry_failed=args.retry_failed,
        timeout=args.timeout,
        max_memory_bytes=max_memory,
        executor=args.executor,
        slurm=options,
    )
    latest: dict[str, str] = {}
    for r in read_jsonl(result.out):
        latest[r.get("spec_key")] = r.get("status")
    keys = [p.spec.key() for p in sweep.points]
    counts = {s: sum(1 for k in keys if latest.get(k) == s) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"{sweep.name}: {len(keys)} points ({summary}); ran {result.ran} now → {result.out}")
    if args.strict and counts.get("ok", 0) < len(keys):
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    from harness.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
