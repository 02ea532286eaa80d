"""Check achieved TFLOP/s against a bar: exit 0 when every timed ok run clears it, else 1 listing failures.

    tmath check results/a100-node --min-tflops 115
    tmath check results/h100 --min-tflops 115 --scale-to-gpu     # 115 × (H100 bf16 peak / 312)

The bar is Transformer Math 101's: "If you are seeing below 115 TFLOP/s/A100 there is probably
something wrong with your model or hardware configuration". With --scale-to-gpu each run's bar is
min_tflops × (its GPU's dense half-precision peak / the A100's 312 TFLOP/s), the GPU read from the
record (`measured.gpu`, else `environment.gpu.name`). The throughput checked is model TFLOP/s
(6·P + attention FLOPs per token, recomputation not counted), or hardware TFLOP/s with --metric.

Runs that cannot be checked are listed as skipped: non-ok runs, runs that were not timed (fake
tensors on the meta device), and, when scaling, runs without a known GPU. A check that checked
nothing exits 1: a green result must mean that something cleared the bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formulas.hardware import A100_REFERENCE_TFLOPS, GPU, TFLOPS_BAR_A100, get_gpu, match_device_name, tflops_bar
from harness.errors import UsageError

METRICS = ("model", "hardware")


def record_gpu(record: dict) -> tuple[GPU | None, str | None]:
    """The accelerator a record ran on, from the harness's match or the device name: (GPU, raw name)."""
    measured = record.get("measured") or {}
    name = measured.get("gpu")
    if name:
        try:
            return get_gpu(name), name
        except ValueError:
            gpu = match_device_name(name)
            if gpu is not None:
                return gpu, name
    env_gpu = (record.get("environment") or {}).get("gpu") or {}
    raw = env_gpu.get("name") if isinstance(env_gpu, dict) else None
    if raw:
        return match_device_name(raw), raw
    return None, name


def measured_tflops(record: dict, metric: str = "model") -> float | None:
    value = ((record.get("measured") or {}).get("tflops") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Verdict:
    record: dict
    tflops: float | None
    bar: float | None
    gpu: str | None
    reason: str = ""
    """Why the run was skipped (empty when it was checked)."""

    @property
    def checked(self) -> bool:
        return not self.reason

    @property
    def passed(self) -> bool:
        return self.checked and self.tflops >= self.bar


def judge(record: dict, min_tflops: float, *, scale_to_gpu: bool = False, metric: str = "model") -> Verdict:
    """One run against the bar, or the reason it cannot be checked."""
    status = record.get("status")
    gpu, raw = record_gpu(record)
    label = gpu.name if gpu is not None else raw
    if status != "ok":
        return Verdict(record, None, None, label, f"status {status}")
    tflops = measured_tflops(record, metric)
    if tflops is None:
        device = (record.get("measured") or {}).get("device") or (record.get("spec") or {}).get("device")
        return Verdict(record, None, None, label, f"not timed (device {device})")
    if not scale_to_gpu:
        return Verdict(record, tflops, min_tflops, label)
    if gpu is None:
        why = f"GPU {raw!r} is not in formulas.hardware" if raw else "no GPU (cannot scale the bar)"
        return Verdict(record, tflops, None, label, why)
    return Verdict(record, tflops, tflops_bar(gpu, min_tflops), label)


@dataclass
class CheckResult:
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.checked and not v.passed]

    @property
    def passed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.passed]

    @property
    def skipped(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.checked]

    @property
    def exit_code(self) -> int:
        return 0 if self.passed and not self.failed else 1


def check_records(records: list[dict], min_tflops: float, *, scale_to_gpu: bool = False, metric: str = "model"):
    return CheckResult([judge(r, min_tflops, scale_to_gpu=scale_to_gpu, metric=metric) for r in records])


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


def _label(record: dict) -> str:
    from harness.report import run_label

    return run_label(record.get("spec") or {}, device=(record.get("measured") or {}).get("device"))


def run(args) -> int:
    from harness.report import load_records

    if not args.min_tflops > 0:
        raise UsageError(f"--min-tflops must be positive, got {args.min_tflops:g}")
    path, records = load_records(args.dir)
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
