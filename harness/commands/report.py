"""Markdown and HTML report with plots from a results directory (`harness.report`)."""

from __future__ import annotations

from harness.errors import UsageError
from harness.report.build import build_report


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="results directory (results/<sweep>) or a runs.jsonl file")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default DIR/report)")
    p.add_argument(
        "--export",
        action="append",
        default=[],
        choices=("csv", "parquet"),
        help="also write the flat table of every run (repeatable)",
    )
    p.add_argument("--min-tflops", type=float, help="TFLOP/s bar per A100 for the throughput table (default 115)")


def run(args) -> int:
    if args.min_tflops is not None and not args.min_tflops > 0:
        raise UsageError(f"--min-tflops must be positive, got {args.min_tflops:g}")
    written = build_report(args.dir, args.out, export=tuple(dict.fromkeys(args.export)), min_tflops=args.min_tflops)
    for name, path in written.items():
        print(f"{name:22} {path}")
    return 0
