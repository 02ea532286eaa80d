"""Fit overhead factors from measured runs and write them as calibration.json for `tmath predict --calibration`.

    tmath calibrate results/a100-node                        # results/a100-node/calibration.json
    tmath predict --model llama-2-7b --calibration results/a100-node/calibration.json

Factors (the model of `formulas.calibration.Calibration`):
- peak_ratio[device][phase]: measured peak allocated / the predicted peak (`formulas.peak`, recomputed with
  today's formulas for the device each run ran on), the median over the runs of one device kind whose
  predicted peak is in that phase (at least `MIN_PHASE_RUNS` of them), else over all runs of that kind
  (`all`). Device kinds (cuda, cpu, meta) are never pooled. Each ratio is validated leave-one-out: every run
  is predicted with the ratio fitted without it, and a device kind whose leave-one-out median |error| is not
  below its uncalibrated median |error| gets no ratio (`fit` says why): a calibration never makes a
  prediction worse.
- reserved_ratio: peak reserved ≈ ratio · peak allocated, through the origin (caching-allocator
  fragmentation; CUDA runs only);
- context_bytes: NVML used − peak reserved, its mean (the CUDA context and libraries, outside
  PyTorch's allocator; CUDA runs with NVML only);
- inference_overhead: inference peak allocated ≈ k · measured weight bytes, through the origin,
  against Transformer Math 101's 1.2 (runs with `mode: inference`);
- achieved_fraction[gpu]: the median MFU (model TFLOP/s over the dense peak of the run's dtype)
  of each GPU's timed training runs.
A factor that cannot be fitted keeps its default, and `fit[factor]` says why.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from formulas.calibration import ALL_PHASES, Calibration
from harness.errors import UsageError
from harness.formatting import error_percent
from harness.predictions import BY_NAME
from harness.records import Record
from harness.results import run_label

MIN_PHASE_RUNS = 3
"""Runs of one device kind and phase needed for a ratio of its own (else the device kind's `all`)."""


@dataclass(frozen=True)
class PeakPair:
    """One run's measured peak beside today's predicted peak for it."""

    label: str
    device: str
    phase: str
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted


def peak_pairs(records: list[Record]) -> list[PeakPair]:
    """Every ok training run with a measured peak and a walked prediction (not the sum-of-terms fallback)."""
    out = []
    for r in records:
        if r.status != "ok" or r.spec.measurement.mode != "train" or not r.measured.memory_bytes.peak_allocated:
            continue
        peak = BY_NAME["peak"].predict(r.spec, r.device)
        if peak is None or peak.phase == "none" or peak.bytes <= 0:
            continue
        out.append(PeakPair(run_label(r.spec, device=r.device), r.device, peak.phase, peak.bytes,
                            r.measured.memory_bytes.peak_allocated))  # fmt: skip
    return out


def fit_ratios(pairs: list[PeakPair]) -> dict[str, float]:
    """phase (and `all`) → the median ratio, for one device kind's pairs."""
    if not pairs:
        return {}
    out = {ALL_PHASES: statistics.median(p.ratio for p in pairs)}
    for phase in sorted({p.phase for p in pairs}):
        chosen = [p.ratio for p in pairs if p.phase == phase]
        if len(chosen) >= MIN_PHASE_RUNS:
            out[phase] = statistics.median(chosen)
    return out


def _applied(ratios: dict[str, float], pair: PeakPair) -> float | None:
    return ratios.get(pair.phase, ratios.get(ALL_PHASES))


def leave_one_out(pairs: list[PeakPair]) -> dict:
    """|error| of each run uncalibrated and with the ratio fitted without it (one device kind)."""
    plain, loo = [], []
    for i, pair in enumerate(pairs):
        plain.append(abs(pair.predicted / pair.measured - 1))
        ratio = _applied(fit_ratios(pairs[:i] + pairs[i + 1 :]), pair)
        loo.append(abs((ratio if ratio is not None else 1.0) * pair.predicted / pair.measured - 1))
    return {
        "n": len(pairs),
        "uncalibrated_median_abs_error": statistics.median(plain),
        "uncalibrated_max_abs_error": max(plain),
        "loo_median_abs_error": statistics.median(loo),
        "loo_max_abs_error": max(loo),
    }


def calibrate_peaks(records: list[Record]) -> tuple[dict, dict]:
    """(peak_ratio, fit): a ratio per device kind and phase where leave-one-out says it helps."""
    ratios: dict = {}
    fit: dict = {}
    pairs = peak_pairs(records)
    for device in sorted({p.device for p in pairs}):
        mine = [p for p in pairs if p.device == device]
        fitted = fit_ratios(mine)
        check = leave_one_out(mine) if len(mine) >= 2 else {"n": len(mine)}
        entry = {
            "ratios": fitted,
            **check,
            "phases": {ph: sum(p.phase == ph for p in mine) for ph in sorted({p.phase for p in mine})},
        }
        if len(mine) < 2:
            entry["refused"] = "one run: nothing to validate a ratio against"
        elif check["loo_median_abs_error"] >= check["uncalibrated_median_abs_error"]:
            entry["refused"] = (
                f"leave-one-out median |error| {error_percent(check['loo_median_abs_error'])} is not below the uncalibrated "
                f"{error_percent(check['uncalibrated_median_abs_error'])}: no ratio (a calibration must not make things worse)"
            )
        else:
            ratios[device] = fitted
        fit[device] = entry
    return ratios, fit


def _mem(record: Record, key: str) -> float | None:
    value = getattr(record.measured.memory_bytes, key)
    return float(value) if value is not None else None


def _residuals(res, y) -> dict:
    res = np.asarray(res, dtype=float)
    y = np.asarray(y, dtype=float)
    rel = np.abs(res) / np.where(y != 0, np.abs(y), np.nan)
    return {
        "rms": float(np.sqrt(np.mean(res**2))),
        "max_abs": float(np.max(np.abs(res))),
        "median_abs": float(np.median(np.abs(res))),
        "max_abs_relative": float(np.nanmax(rel)) if np.isfinite(rel).any() else None,
    }


def _r2(y, predicted) -> float | None:
    """1 − SS_res / SS_tot (None when y is constant: r² is undefined)."""
    y, predicted = np.asarray(y, dtype=float), np.asarray(predicted, dtype=float)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0:
        return None
    return 1.0 - float(np.sum((y - predicted) ** 2)) / ss_tot


def fit_ratio(x, y) -> tuple[float, dict]:
    """y ≈ k·x through the origin: k = Σxy / Σx²."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    k = float(np.sum(x * y) / np.sum(x * x))
    ratios = y / x
    stats = {
        "n": len(x),
        "r2": _r2(y, k * x),
        "residuals_bytes": _residuals(y - k * x, y),
        "ratio_min": float(ratios.min()),
        "ratio_median": float(np.median(ratios)),
        "ratio_max": float(ratios.max()),
    }
    return k, stats


def _default(reason: str, value) -> dict:
    return {"n": 0, "kept_default": value, "reason": reason}


def calibrate(records: list[Record], source: str = "", device: str | None = None) -> Calibration:
    """The fitted `Calibration` of `records` (ok runs; only `device`'s when given). A UsageError when nothing
    can be fitted, or when every peak ratio would make predictions worse and nothing else is fitted."""
    defaults = Calibration()
    pool = [r for r in records if r.status == "ok" and (device is None or r.device == device)]
    if not pool:
        present = ", ".join(sorted({r.device for r in records if r.status == "ok"})) or "none"
        what = f"ok {device} runs" if device else "ok runs"
        raise UsageError(f"no {what} to calibrate from (ok runs' devices: {present})")
    kinds = ", ".join(f"{sum(r.device == d for r in pool)} {d}" for d in sorted({r.device for r in pool}))
    described = f"{len(pool)} ok runs ({kinds}; device kinds fitted apart)"
    train = [r for r in pool if r.spec.measurement.mode != "inference"]
    inference = [r for r in pool if r.spec.measurement.mode == "inference"]
    cuda = [r for r in pool if r.measured.device == "cuda"]
    fit: dict = {"runs": described}
    values: dict = {}

    # Peak allocated ≈ ratio[device][phase] · predicted peak, kept only where leave-one-out says it helps.
    ratios, fit["peak_ratio"] = calibrate_peaks(train)
    if ratios:
        values["peak_ratio"] = ratios

    # Reserved ≈ ratio · allocated (CUDA's caching allocator).
    pairs = [(_mem(r, "peak_allocated"), _mem(r, "peak_reserved")) for r in cuda]
    pairs = [(x, y) for x, y in pairs if x and y is not None and x > 0]
    if pairs:
        ratio, stats = fit_ratio(*zip(*pairs, strict=True))
        if ratio < 1.0:
            stats["note"] = f"fitted {ratio:.6f} < 1 (reserved never undercuts allocated): clamped to 1"
            ratio = 1.0
        values["reserved_ratio"] = ratio
        fit["reserved_ratio"] = {"model": "peak_reserved ≈ ratio·peak_allocated", **stats}
    else:
        fit["reserved_ratio"] = _default("no CUDA runs with allocator statistics", defaults.reserved_ratio)

    # Context: NVML used − reserved (what lives outside PyTorch's allocator).
    gaps = [(_mem(r, "nvml_used"), _mem(r, "peak_reserved")) for r in cuda]
    gaps = [u - res for u, res in gaps if u is not None and res is not None]
    if gaps:
        g = np.asarray(gaps, dtype=float)
        values["context_bytes"] = float(g.mean())
        fit["context_bytes"] = {
            "model": "nvml_used − peak_reserved (mean)",
            "n": len(gaps),
            "r2": None,
            "residuals_bytes": _residuals(g - g.mean(), g),
            "min": float(g.min()),
            "max": float(g.max()),
        }
    else:
        fit["context_bytes"] = _default("no CUDA runs with NVML memory readings", defaults.context_bytes)

    # Inference: peak ≈ k · weights, against the 1.2 rule.
    pairs = [(_mem(r, "weights"), _mem(r, "peak_allocated")) for r in inference]
    pairs = [(x, y) for x, y in pairs if x and y is not None and x > 0]
    if pairs:
        k, stats = fit_ratio(*zip(*pairs, strict=True))
        values["inference_overhead"] = k
        fit["inference_overhead"] = {
            "model": "inference peak_allocated ≈ k·weights (Transformer Math 101: 1.2)",
            **stats,
        }
    else:
        fit["inference_overhead"] = _default("no inference runs (mode: inference)", defaults.inference_overhead)

    # Achieved fraction of peak TFLOP/s, per GPU: the median MFU of training steps (what `predict` times).
    by_gpu: dict[str, list[float]] = {}
    for r in train:
        mfu, gpu = r.measured.mfu, r.measured.gpu
        if mfu is not None and gpu and 0 < mfu <= 1:
            by_gpu.setdefault(gpu, []).append(mfu)
    fractions = {gpu: float(np.median(v)) for gpu, v in sorted(by_gpu.items())}
    if fractions:
        values["achieved_fraction"] = fractions
        fit["achieved_fraction"] = {
            gpu: {"n": len(v), "median": fractions[gpu], "min": float(min(v)), "max": float(max(v))}
            for gpu, v in sorted(by_gpu.items())
        }
    else:
        fit["achieved_fraction"] = _default("no timed GPU runs with an MFU", {})

    if not values:
        checked = "; ".join(f"{d}: {e.get('refused', 'no ratio')}" for d, e in fit["peak_ratio"].items())
        raise UsageError(f"nothing to calibrate: {checked or 'no training run with a walked peak prediction'}")
    return Calibration(**values, fit=fit, source=f"{source}: {described}" if source else described)
