"""Fit overhead factors from measured runs and write them as calibration.json for `tmath predict --calibration`.

    tmath calibrate results/a100-node                        # results/a100-node/calibration.json
    tmath predict --model llama-2-7b --calibration results/a100-node/calibration.json

Factors (the model of `formulas.calibration.Calibration`), each fitted by least squares (numpy):
- peak_alpha, peak_beta: measured peak allocated ≈ α · predicted total + β over the training runs
  (allocator temporaries, workspaces and whatever the formulas miss); r², residuals in bytes;
- reserved_ratio: peak reserved ≈ ratio · peak allocated, through the origin (caching-allocator
  fragmentation; CUDA runs only);
- context_bytes: NVML used − peak reserved, its mean (the CUDA context and libraries, outside
  PyTorch's allocator; CUDA runs with NVML only);
- inference_overhead: inference peak allocated ≈ k · measured weight bytes, through the origin,
  against Transformer Math 101's 1.2 (runs with `mode: inference`);
- achieved_fraction[gpu]: the median MFU (model TFLOP/s over the dense peak of the run's dtype)
  of each GPU's timed training runs.
CUDA runs are used whenever the results hold any; otherwise the ok runs of the devices present
(CPU and fake-tensor peaks from the exact tracker), and `source` and `fit` say so. A factor that
cannot be fitted keeps its default, and `fit[factor]` says why.
"""

from __future__ import annotations

import numpy as np

from formulas.calibration import Calibration
from harness.errors import UsageError
from harness.records import Record


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


def fit_line(x, y) -> tuple[float, float, dict]:
    """y ≈ α·x + β by least squares; a single distinct x fixes β = 0 (a ratio)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x.tolist())) >= 2:
        # Scale x and y to O(1) before solving: byte counts of 1e10 make the normal equations ill-conditioned.
        sx, sy = float(np.max(np.abs(x))) or 1.0, float(np.max(np.abs(y))) or 1.0
        a = np.column_stack([x / sx, np.ones_like(x)])
        (slope, intercept), *_ = np.linalg.lstsq(a, y / sy, rcond=None)
        alpha, beta, note = float(slope * sy / sx), float(intercept * sy), None
    else:
        alpha, beta, note = float(np.sum(x * y) / np.sum(x * x)), 0.0, "one distinct predicted total: β fixed at 0"
    fitted = alpha * x + beta
    stats = {"n": len(x), "r2": _r2(y, fitted), "residuals_bytes": _residuals(y - fitted, y)}
    if note:
        stats["note"] = note
    return alpha, beta, stats


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


def select_runs(records: list[Record], device: str | None = None) -> tuple[list[Record], str]:
    """The ok runs to fit: CUDA ones when any (or `device`'s), else every ok run; and a description."""
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        raise UsageError("no ok runs to calibrate from")

    def dev(r: Record) -> str:
        return r.device

    if device is not None:
        pool = [r for r in ok if dev(r) == device]
        if not pool:
            present = ", ".join(sorted({str(dev(r)) for r in ok}))
            raise UsageError(f"no ok {device} runs to calibrate from (devices present: {present})")
        return pool, f"{len(pool)} ok {device} runs (chosen with --device)"
    cuda = [r for r in ok if dev(r) == "cuda"]
    if cuda:
        return cuda, f"{len(cuda)} ok cuda runs"
    devices = ", ".join(sorted({str(dev(r)) for r in ok}))
    return ok, f"{len(ok)} ok {devices} runs (no CUDA runs: peaks from the exact CPU tracker, no allocator overheads)"


def calibrate(records: list[Record], source: str = "", device: str | None = None) -> Calibration:
    """The fitted `Calibration` of `records` (ok runs; CUDA ones when there are any)."""
    defaults = Calibration()
    pool, described = select_runs(records, device)
    train = [r for r in pool if r.spec.measurement.mode != "inference"]
    inference = [r for r in pool if r.spec.measurement.mode == "inference"]
    cuda = [r for r in pool if r.measured.device == "cuda"]
    fit: dict = {"runs": described}
    values: dict = {}

    # Peak allocated ≈ α · predicted total + β.
    pairs = [(float(r.prediction("korthikanti").memory_bytes.total), _mem(r, "peak_allocated")) for r in train]
    pairs = [(x, y) for x, y in pairs if x and y is not None and x > 0]
    if pairs:
        alpha, beta, stats = fit_line(*zip(*pairs, strict=True))
        if alpha > 0:
            values["peak_alpha"], values["peak_beta"] = alpha, beta
            fit["peak"] = {"model": "peak_allocated ≈ α·predicted_total + β", **stats}
        else:
            fit["peak"] = _default(f"fitted α = {alpha:.3g} is not positive", [defaults.peak_alpha, defaults.peak_beta])
    else:
        fit["peak"] = _default("no training runs with a measured peak", [defaults.peak_alpha, defaults.peak_beta])

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

    return Calibration(**values, fit=fit, source=f"{source}: {described}" if source else described)
