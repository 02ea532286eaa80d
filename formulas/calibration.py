"""Fitted overhead factors, applied to a prediction only when the user asks (`--calibration`).

`tmath calibrate` fits these from measured runs (harness/calibrate.py) and writes them as JSON;
this module only holds and applies them, so that the calculator stays free of torch.

    peak allocated  ≈ α · predicted total + β          (allocator temporaries, workspace)
    reserved        ≈ reserved_ratio · peak allocated  (caching-allocator fragmentation)
    device used     ≈ reserved + context_bytes          (CUDA context, NVML's view)
    achieved TFLOP/s = achieved_fraction[gpu] · dense peak
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from formulas import hardware
from formulas.inference import INFERENCE_OVERHEAD
from formulas.precision import compute_dtype


@dataclass(frozen=True)
class Calibration:
    peak_alpha: float = 1.0
    """Slope of measured peak allocated bytes against the predicted total."""
    peak_beta: float = 0.0
    """Intercept, bytes: a fixed overhead whatever the model."""
    reserved_ratio: float = 1.0
    """max_memory_reserved / max_memory_allocated."""
    context_bytes: float = 0.0
    """NVML used − reserved: memory outside PyTorch's allocator (CUDA context, libraries)."""
    inference_overhead: float = INFERENCE_OVERHEAD
    """Measured inference peak / weight bytes (Transformer Math 101's rule: 1.2)."""
    achieved_fraction: dict = field(default_factory=dict)
    """Achieved model TFLOP/s as a fraction of the dense peak of its dtype, by GPU name."""
    fit: dict = field(default_factory=dict)
    """Goodness of fit of each factor: r², number of runs, residuals."""
    source: str = ""
    """Where the factors came from (results directory, date)."""

    def __post_init__(self) -> None:
        if not self.peak_alpha > 0:
            raise ValueError(f"calibration peak_alpha must be positive, got {self.peak_alpha!r}")
        if not self.reserved_ratio >= 1.0:
            raise ValueError(f"calibration reserved_ratio must be >= 1, got {self.reserved_ratio!r}")
        for gpu, frac in self.achieved_fraction.items():
            if not 0 < frac <= 1:
                raise ValueError(f"calibration achieved_fraction[{gpu}] must be in (0, 1], got {frac!r}")

    def peak_bytes(self, predicted_total: int) -> int:
        return round(self.peak_alpha * predicted_total + self.peak_beta)

    def device_bytes(self, predicted_total: int) -> int:
        return round(self.peak_bytes(predicted_total) * self.reserved_ratio + self.context_bytes)

    def achieved_tflops(self, gpu: hardware.GPU, precision: str) -> tuple[float, str]:
        """Calibrated achieved TFLOP/s for `gpu`, or the rule of thumb when it was not measured."""
        dtype = compute_dtype(precision)
        peak = gpu.peak(dtype)
        frac = self.achieved_fraction.get(gpu.name)
        if frac is None or peak is None:
            tflops, source = hardware.default_tflops(gpu, precision)
            return tflops, f"{source} (calibration has no {gpu.name} runs)"
        return frac * peak, f"calibrated: {frac:.1%} of the {gpu.label} {dtype} peak ({self.source})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """The factors of a calibration.json; an unknown key or a value of the wrong type is a ValueError
        naming it (a factor that silently kept its default would label an uncalibrated verdict calibrated)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for name in _NUMBERS:
            if name in data and not _is_number(data[name]):
                raise ValueError(f"{name} must be a number, got {data[name]!r}")
        fractions = data.get("achieved_fraction", {})
        if not isinstance(fractions, dict) or not all(_is_number(v) for v in fractions.values()):
            raise ValueError(f"achieved_fraction must map GPU names to numbers, got {fractions!r}")
        if not isinstance(data.get("fit", {}), dict) or not isinstance(data.get("source", ""), str):
            raise ValueError("fit must be an object and source text")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"calibration file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"calibration file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"calibration file {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"calibration file {path}: {exc}") from None


_NUMBERS = ("peak_alpha", "peak_beta", "reserved_ratio", "context_bytes", "inference_overhead")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
