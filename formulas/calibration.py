"""Fitted overhead factors, applied to a prediction only when the user asks (`--calibration`).

`tmath calibrate` fits these from measured runs (harness/calibrate.py) and writes them as JSON;
this module only holds and applies them, so that the calculator stays free of torch.

    peak allocated  ≈ peak_ratio[device][phase] · predicted peak   (a relative correction, per device kind
                                                                   and per the phase the peak is in)
    reserved        ≈ reserved_ratio · peak allocated              (caching-allocator fragmentation, CUDA)
    device used     ≈ reserved + context_bytes                     (CUDA context and libraries, NVML's view)
    achieved TFLOP/s = achieved_fraction[gpu] · dense peak

Ratios, not a byte intercept: an intercept fitted on large runs swamps every small one. Runs of different
device kinds (cuda, cpu, meta) are fitted apart and a ratio applies only to predictions for its own kind.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from formulas import hardware
from formulas.inference import INFERENCE_OVERHEAD
from formulas.precision import compute_dtype

ALL_PHASES = "all"
"""The ratio of a device kind that applies whatever the phase (used when a phase has no ratio of its own)."""


@dataclass(frozen=True)
class Calibration:
    peak_ratio: dict = field(default_factory=dict)
    """device kind → phase (or `all`) → measured / predicted peak."""
    reserved_ratio: float = 1.0
    """max_memory_reserved / max_memory_allocated (CUDA runs)."""
    context_bytes: float | None = None
    """NVML used − reserved (CUDA runs): replaces the published CUDA context and cuBLAS workspaces."""
    inference_overhead: float = INFERENCE_OVERHEAD
    """Measured inference peak / weight bytes (Transformer Math 101's rule: 1.2)."""
    achieved_fraction: dict = field(default_factory=dict)
    """Achieved model TFLOP/s as a fraction of the dense peak of its dtype, by GPU name."""
    fit: dict = field(default_factory=dict)
    """How each factor was fitted: runs, leave-one-out error against the uncalibrated error, ranges."""
    source: str = ""
    """Where the factors came from (results directory, date)."""

    def __post_init__(self) -> None:
        for device, ratios in self.peak_ratio.items():
            for phase, ratio in ratios.items():
                if not ratio > 0:
                    raise ValueError(f"calibration peak_ratio[{device}][{phase}] must be positive, got {ratio!r}")
        if not self.reserved_ratio >= 1.0:
            raise ValueError(f"calibration reserved_ratio must be >= 1, got {self.reserved_ratio!r}")
        for gpu, frac in self.achieved_fraction.items():
            if not 0 < frac <= 1:
                raise ValueError(f"calibration achieved_fraction[{gpu}] must be in (0, 1], got {frac!r}")

    def ratio(self, device: str, phase: str) -> float | None:
        """The fitted peak ratio for a prediction on `device` whose peak is in `phase`, or None."""
        ratios = self.peak_ratio.get(device) or {}
        return ratios.get(phase, ratios.get(ALL_PHASES))

    def peak_bytes(self, peak: int, device: str, phase: str) -> int | None:
        ratio = self.ratio(device, phase)
        return None if ratio is None else round(ratio * peak)

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
        if "peak_alpha" in data or "peak_beta" in data:
            raise ValueError("peak_alpha/peak_beta are harness 1's byte fit: run `tmath calibrate` again for ratios")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for name in _NUMBERS:
            if name in data and not _is_number(data[name]):
                raise ValueError(f"{name} must be a number, got {data[name]!r}")
        if data.get("context_bytes") is not None and not _is_number(data["context_bytes"]):
            raise ValueError(f"context_bytes must be a number, got {data['context_bytes']!r}")
        ratios = data.get("peak_ratio", {})
        if not isinstance(ratios, dict) or not all(
            isinstance(v, dict) and all(_is_number(r) for r in v.values()) for v in ratios.values()
        ):
            raise ValueError(f"peak_ratio must map device kinds to phases to numbers, got {ratios!r}")
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


_NUMBERS = ("reserved_ratio", "inference_overhead")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
