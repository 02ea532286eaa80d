"""Exit 0 when every timed ok run clears a TFLOP/s bar, else 1 listing the failures (`harness.check`)."""

from __future__ import annotations

from formulas.hardware import A100_REFERENCE_TFLOPS, TFLOPS_BAR_A100
from harness.check import METRICS, check_records
from harness.errors import UsageError
from harness.records import Record
from harness.results import load_results, run_label


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="results directory (or its runs.jsonl)")
    p.add_argument(
        "--min-tflops",
        type=float,
        default=TFLOPS_BAR_A100,
        help=f"bar in TFLOP/s per GPU (default {TFLOPS_BAR_A100:g}, Transformer Math 101's per-A100 bar)",
    )
    p.add_argument(
        "--scale-to-gpu",
        action="store_true",
        help=f"scale the bar by each run's GPU half-precision peak / {A100_REFERENCE_TFLOPS:g} (the A100's)",
    )
    p.add_argument("--metric", default="model", choices=METRICS, help="model TFLOP/s (default) or hardware TFLOP/s")


def _label(record: Record) -> str:
    return run_label(record.spec, device=record.measured.device)


def run(args) -> int:
    if not args.min_tflops > 0:
        raise UsageError(f"--min-tflops must be positive, got {args.min_tflops:g}")
    path, records = load_results(args.dir)
    result = check_records(records, args.min_tflops, scale_to_gpu=args.scale_to_gpu, metric=args.metric)
    scaled = f" × (GPU half-precision peak / {A100_REFERENCE_TFLOPS:g})" if args.scale_to_gpu else ""
    print(f"check {path}: {len(records)} runs, bar {args.min_tflops:g} {args.metric} TFLOP/s per GPU{scaled}")
    for v in result.verdicts:
        if v.checked:
            word, cmp = ("PASS", "≥") if v.passed else ("FAIL", "<")
            gpu = v.gpu or "no GPU"
            tflops = f"{v.tflops:8.2f}" if v.tflops >= 1 else f"{v.tflops:8.3g}"
            print(f"{word}  {tflops} {cmp} {v.bar:7.2f} TFLOP/s  [{gpu}]  {_label(v.record)}")
    for v in result.skipped:
        print(f"SKIP  {v.reason}: {_label(v.record)}")
    n_pass, n_fail, n_skip = len(result.passed), len(result.failed), len(result.skipped)
    if not result.passed and not result.failed:
        print(f"check: nothing to check ({n_skip} skipped): no timed ok run, so the check fails")
    else:
        print(f"check: {n_pass} passed, {n_fail} failed, {n_skip} skipped")
    return result.exit_code
