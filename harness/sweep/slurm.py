"""The Slurm executor: one submitit job per pending point, grouped by GPU count; each record appended to
the sweep's runs.jsonl here, as its job completes. submitit's `local` and `debug` clusters run the same path
without Slurm (tests)."""

from __future__ import annotations

import contextlib
import math
import shutil
import time

from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.launch import Limits
from harness.records import Record, RunError
from harness.schema import SchemaError
from harness.sweep.local import guarded


def check_submitit(cluster: str) -> None:
    """Fail before anything is written when the jobs could not be submitted."""
    try:
        import submitit  # noqa: F401  (an optional dependency: only Slurm sweeps need it)
    except ImportError:
        raise UsageError("--executor slurm needs submitit: pip install submitit") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: sbatch is not on PATH (run the sweep from a Slurm login node)")


def job(spec_dict: dict, timeout_s: float | None, max_memory_bytes: int | None) -> dict:
    """Body of one Slurm job (runs on the compute node): the point's record, as JSON."""
    limits = Limits(timeout_s=timeout_s, max_memory_bytes=max_memory_bytes)
    return guarded(RunSpec.from_dict(spec_dict), limits).to_dict()


def _failure(spec: RunSpec, job, exc: BaseException) -> Record:
    """A record for a Slurm job that returned no record (time limit, node failure, cancellation)."""
    state = ""
    with contextlib.suppress(Exception):
        state = str(job.state).upper()
    status = "timeout" if "TIMEOUT" in state else "oom" if "OUT_OF_MEMORY" in state else "killed"
    text = str(exc).strip()
    message = f"job {job.job_id} ended without a record (state {state or 'unknown'}): "
    message += text.splitlines()[0] if text else ""
    return Record.failed(spec, status, RunError(type=type(exc).__name__, message=message, stderr_tail=text[-4000:]))


def _result(point, job) -> Record:
    try:
        data = job.result()
    except Exception as exc:
        return _failure(point.spec, job, exc)
    try:
        return Record.from_dict(data)
    except SchemaError as exc:
        error = RunError(type="SchemaError", message=f"job {job.job_id} returned no record: {exc}")
        return Record.failed(point.spec, "error", error)


def run(todo, sweep, out_dir, limits: Limits, options: dict, progress, record_one) -> None:
    """Submit every pending point, then poll; `record_one(point, record)` as each job completes."""
    import submitit  # optional: imported only once a Slurm sweep runs (check_submitit said it is there)

    cluster = options.get("cluster") or "slurm"
    executor = submitit.AutoExecutor(folder=out_dir / "submitit" / "%j", cluster=cluster)
    minutes = options.get("time_min") or math.ceil(limits.timeout_s / 60) + 10
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
    groups: dict[int, list] = {}
    for point in todo:
        on_gpus = point.spec.measurement.device in ("auto", "cuda") and cluster == "slurm"
        groups.setdefault(point.spec.parallel.gpus if on_gpus else 0, []).append(point)
    try:
        for gpus, points in groups.items():
            executor.update_parameters(**base, gpus_per_node=gpus, tasks_per_node=1, nodes=1)
            with executor.batch():
                submitted = [
                    (p, executor.submit(job, p.spec.to_dict(), limits.timeout_s, limits.max_memory_bytes))
                    for p in points
                ]
            jobs += submitted
        progress.console.print(f"submitted {len(jobs)} job(s) to {cluster}; logs in {out_dir / 'submitit'}")
        waiting = list(jobs)
        while waiting:
            still = []
            for point, handle in waiting:
                if not handle.done():
                    still.append((point, handle))
                    continue
                record_one(point, _result(point, handle))
            waiting = still
            if waiting:
                time.sleep(options.get("poll_s", 5.0))
    except KeyboardInterrupt:
        left = [handle for _, handle in jobs if not handle.done()]
        for handle in left:
            with contextlib.suppress(Exception):
                handle.cancel(check=False)
        progress.console.print(f"interrupted: cancelled {len(left)} job(s); continue with --resume")
        raise
