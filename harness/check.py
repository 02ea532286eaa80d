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

from formulas.hardware import GPU, get_gpu, match_device_name, tflops_bar
from harness.records import Record

METRICS = ("model", "hardware")


def record_gpu(record: Record) -> tuple[GPU | None, str | None]:
    """The accelerator a record ran on, from the harness's match or the device name: (GPU, raw name)."""
    name = record.measured.gpu
    if name:
        try:
            return get_gpu(name), name
        except ValueError:
            gpu = match_device_name(name)
            if gpu is not None:
                return gpu, name
    env = record.environment
    raw = env.gpu.name if env is not None and env.gpu is not None else None
    if raw:
        return match_device_name(raw), raw
    return None, name


def measured_tflops(record: Record, metric: str = "model") -> float | None:
    tflops = record.measured.tflops
    return float(getattr(tflops, metric)) if tflops is not None else None


@dataclass(frozen=True)
class Verdict:
    record: Record
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


def judge(record: Record, min_tflops: float, *, scale_to_gpu: bool = False, metric: str = "model") -> Verdict:
    """One run against the bar, or the reason it cannot be checked."""
    status = record.status
    gpu, raw = record_gpu(record)
    label = gpu.name if gpu is not None else raw
    if status != "ok":
        return Verdict(record, None, None, label, f"status {status}")
    tflops = measured_tflops(record, metric)
    if tflops is None:
        device = record.device
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


def check_records(records: list[Record], min_tflops: float, *, scale_to_gpu: bool = False, metric: str = "model"):
    return CheckResult([judge(r, min_tflops, scale_to_gpu=scale_to_gpu, metric=metric) for r in records])
