"""Running a sweep: pending points, one record per point appended as it finishes, progress with ETA, resume.

Every point goes through `harness.launch.launch` (`harness.launch.launch` with the sweep's limits: a worker subprocess,
or the launcher for multi-rank points). Every record is appended to `runs.jsonl` as soon as its point
finishes (flushed and fsynced, signals held during the write), tagged `spec.extra.sweep`. OOM, timeout
and crash records carry their status and stderr tail; a failure of the harness itself becomes an `error`
record too; the sweep goes on. Without `--resume` an existing non-empty runs.jsonl is refused; with it,
points whose spec key already has a record are skipped (`--retry-failed` re-runs the non-ok ones; the newest
record of a key is the one reports use). SIGINT/SIGTERM kill the running worker's process group before the
sweep exits (status 130); a partial last line left by a hard kill is dropped on resume. One sweep process
per runs.jsonl (an advisory lock). The executor runs the pending points: `local` (here, one at a time,
`harness.sweep.local`) or `slurm` (one job per point through submitit, `harness.sweep.slurm`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.errors import UsageError
from harness.launch import Limits, launch
from harness.processes import terminate_as_interrupt
from harness.records import Record
from harness.results import RUNS_FILE, append_record, exclusive, read_records, repair_torn_tail, run_label, warn
from harness.sweep import local
from harness.sweep import slurm as slurm_executor
from harness.sweep.file import Point, Sweep

DEFAULT_TIMEOUT_S = 1800.0
RESULTS_DIR = Path("results")


@dataclass
class SweepResult:
    out: Path
    """The runs.jsonl file."""
    total: int
    skipped: int
    ran: int = 0
    statuses: dict = field(default_factory=dict)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SweepProgress:
    """A rich progress bar with ETA on a terminal, and one line per finished point everywhere."""

    def __init__(self, total: int, title: str, quiet: bool = False):
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

    def finish(self, record: Record, label: str) -> None:
        self.done += 1
        self.bar.update(self.task, advance=1, current="")
        spent = time.monotonic() - self.t0
        left = self.total - self.done
        eta = f"ETA {_clock(spent / self.done * left)}" if left else "done"
        status = record.status
        took = f"{record.elapsed_s:7.1f} s" if record.elapsed_s is not None else "      - s"
        colour = "green" if status == "ok" else "red"
        note = "  " + escape(str(record.error.message if record.error else "")[:100]) if status != "ok" else ""
        self.console.print(
            f"[{self.done}/{self.total}] [{colour}]{status:7}[/{colour}] {took}  {label}  ({eta}){note}",
            markup=True,
            soft_wrap=True,
        )


def default_out_dir(sweep: Sweep) -> Path:
    return RESULTS_DIR / sweep.name


def pending_points(sweep: Sweep, existing: list[Record], retry_failed: bool) -> list[Point]:
    """Points without a record (any status), or without an ok record when retrying failures."""
    done = {r.spec_key for r in existing if not retry_failed or r.status == "ok"}
    return [p for p in sweep.points if p.spec.key() not in done]


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    timeout: float | None = None,
    max_memory_bytes: int | None = None,
    runner: local.Measure | None = None,
    executor: str = "local",
    slurm: dict | None = None,
    quiet: bool = False,
) -> SweepResult:
    """Run every pending point of `sweep`, appending each record to `out_dir/runs.jsonl` as it finishes.

    runner: what measures a point (default `harness.launch.launch`); a raising runner's point is recorded
    as an `error`, like any failure of the harness. executor: `local` (one subprocess at a time, here) or `slurm` (submitit; `slurm` holds its options,
    `slurm["cluster"]` may name submitit's `local` or `debug` executors to run the same path without Slurm).
    """
    if retry_failed and not resume:
        raise UsageError("--retry-failed continues a sweep: give it with --resume")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(sweep)
    path = out_dir / RUNS_FILE
    limits = Limits(
        timeout_s=timeout if timeout is not None else (sweep.timeout or DEFAULT_TIMEOUT_S),
        max_memory_bytes=max_memory_bytes if max_memory_bytes is not None else sweep.max_memory_bytes,
    )
    measure = runner or launch
    if executor == "slurm":
        slurm_executor.check_submitit((slurm or {}).get("cluster") or "slurm")

    with exclusive(path):
        read = read_records(path)
        existing = read.records
        if (existing or read.problems) and not resume:
            raise UsageError(
                f"{path} already holds {len(existing)} record(s): pass --resume to continue that sweep, "
                "or --out another directory"
            )
        dropped = repair_torn_tail(path)
        warn([p for p in read.problems if not (read.torn_tail and p == read.problems[-1])])
        todo = pending_points(sweep, existing, retry_failed)
        result = SweepResult(out=path, total=len(sweep.points), skipped=len(sweep.points) - len(todo))
        progress = SweepProgress(len(todo), sweep.name, quiet=quiet)
        con = progress.console
        if dropped:
            con.print(f"{path}: dropped a torn last line ({dropped} bytes) left by an interrupted write")
        foreign = {r.spec_key for r in existing} - {p.spec.key() for p in sweep.points}
        if foreign:
            con.print(f"{path}: {len(foreign)} recorded run(s) are not points of {sweep.path} (kept as they are)")
        con.print(
            f"sweep {sweep.name}: {len(sweep.points)} points, {result.skipped} already recorded, "
            f"{len(todo)} to run → {path}",
            soft_wrap=True,
        )
        if not todo:
            return result

        def record_one(point: Point, record: Record) -> None:
            append_record(path, record)
            result.ran += 1
            result.statuses[record.status] = result.statuses.get(record.status, 0) + 1
            progress.finish(record, run_label(point.spec))

        with terminate_as_interrupt(), progress:
            if executor == "slurm":
                slurm_executor.run(todo, sweep, out_dir, limits, slurm or {}, progress, record_one)
            else:
                local.run(todo, limits, measure, progress, record_one, path)
    return result
