"""Run a sweep file: every point measured in its own subprocess, records to results/<sweep>/runs.jsonl."""

from __future__ import annotations

from pathlib import Path

from formulas.predict import predict
from harness.display import console
from harness.errors import UsageError
from harness.formatting import gib
from harness.launch import Limits
from harness.records import STATUSES
from harness.results import RUNS_FILE, check_writable_dir, latest_records, read_records, run_label
from harness.sweep.file import Sweep, load_sweep, parse_size
from harness.sweep.run import default_out_dir, run_sweep


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
    s.add_argument("--slurm-poll", type=float, metavar="S", help="seconds between job polls (default 5)")


def _dry_run(sweep: Sweep, out_dir: Path) -> int:
    existing = {r.spec_key: r.status for r in read_records(out_dir / RUNS_FILE).records}
    con = console()
    con.print(f"[bold]{sweep.name}[/bold] ({sweep.path}): {len(sweep.points)} points → {out_dir / RUNS_FILE}")
    if sweep.description:
        con.print(sweep.description.strip())
    for i, point in enumerate(sweep.points):
        spec = point.spec
        total = predict(spec).total
        status = existing.get(spec.key(), "-")
        con.print(f"{i:4d}  {spec.key()}  {status:7}  {gib(total):>9} GiB  {run_label(spec)}", highlight=False)
    return 0


def _check_options(args) -> None:
    """Every option that does not fit is a one-line error before the sweep file is even read."""
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed continues a sweep: give it with --resume")
    for flag, value in (
        ("--slurm-time", args.slurm_time),
        ("--slurm-cpus-per-task", args.slurm_cpus_per_task),
        ("--slurm-parallelism", args.slurm_parallelism),
        ("--slurm-poll", args.slurm_poll),
    ):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be positive, got {value:g}")
    slurm_given = any(getattr(args, k) is not None for k in ("slurm_partition", "slurm_account", "slurm_time",
                                                             "slurm_cpus_per_task", "slurm_parallelism"))  # fmt: skip
    if slurm_given and args.executor != "slurm":
        raise UsageError("the --slurm-* options apply with --executor slurm")


def run(args) -> int:
    _check_options(args)
    limits = Limits(
        timeout_s=args.timeout,
        max_memory_bytes=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
    )
    slurm = args.executor == "slurm"
    sweep = load_sweep(args.file, check_device=not args.dry_run, remote=slurm)
    out_dir = Path(args.out) if args.out else default_out_dir(sweep)
    if args.dry_run:
        return _dry_run(sweep, out_dir)
    check_writable_dir(out_dir)
    options = {
        "partition": args.slurm_partition,
        "account": args.slurm_account,
        "time_min": args.slurm_time,
        "cpus_per_task": args.slurm_cpus_per_task,
        "parallelism": args.slurm_parallelism,
        "poll_s": args.slurm_poll if args.slurm_poll is not None else 5.0,
    }
    result = run_sweep(
        sweep,
        out_dir,
        resume=args.resume,
        retry_failed=args.retry_failed,
        timeout=limits.timeout_s,
        max_memory_bytes=limits.max_memory_bytes,
        executor=args.executor,
        slurm=options,
    )
    latest = {r.spec_key: r.status for r in latest_records(read_records(result.out).records)}
    keys = [p.spec.key() for p in sweep.points]
    counts = {s: sum(1 for k in keys if latest.get(k) == s) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"{sweep.name}: {len(keys)} points ({summary}); ran {result.ran} now → {result.out}")
    if args.strict and counts.get("ok", 0) < len(keys):
        return 1
    return 0
