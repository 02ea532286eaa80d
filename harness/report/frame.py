"""Records as one flat row each (numbers stay numbers, units in the names), and the long error table.

`flat_row(record)` is what `tmath report --export csv|parquet` writes and what every table and plot of the
report reads: the measured terms (`measured_<term>_bytes`), each prediction method's terms
(`<method column>_<term>_bytes`, from the registry in `harness.predictions`), timing, throughput and
provenance. `error_frame` turns it into one row per (run, term, method) with predicted / measured.
"""

from __future__ import annotations

import math

import pandas as pd

from harness.predictions import METHODS, TERMS
from harness.records import Record
from harness.results import run_label

_MEASURED_EXTRAS = (
    "peak_allocated_first_step",
    "peak_allocated_compiled",
    "peak_reserved",
    "peak_active",
    "nvml_used",
    "pre_model_allocated",
    "pre_model_reserved",
    "nvml_used_before_model",
    "num_alloc_retries",
    "num_ooms",
    "buffers",
    "inputs",
)


def isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _measured_terms(record: Record) -> dict:
    spec, mem = record.spec, record.measured.memory_bytes
    inference = spec.measurement.mode == "inference"
    n_layers = spec.model.arch.n_layers if spec.model.arch is not None else None
    out = {"weights": mem.weights}
    for term in ("gradients", "optimizer", "activations"):
        out[term] = None if inference else getattr(mem, term)
    layers = mem.activations_layers
    out["activations_per_layer"] = layers / n_layers if layers is not None and n_layers and not inference else None
    parts = [out["weights"], out["gradients"], out["optimizer"]]
    out["model_states"] = sum(parts) if all(p is not None for p in parts) else None
    offload = spec.parallel.offload_optimizer != "none" or spec.parallel.offload_params != "none"
    out["host_model_states"] = mem.host_model_states if offload else None
    out["peak"] = None if inference else mem.peak_allocated
    out["inference_peak"] = mem.peak_allocated if inference else None
    return out


def flat_row(record: Record) -> dict:
    """One record as one flat row: numbers stay numbers (bytes, ms, TFLOP/s), units in the names."""
    spec, m, env, err = record.spec, record.measured, record.environment, record.error
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    formula = record.prediction("korthikanti")
    row = {
        "spec_key": record.spec_key,
        "status": record.status,
        "label": run_label(spec, device=m.device),
        "sweep": spec.extra.get("sweep"),
        "model": spec.model.name,
        "family": arch.family if arch is not None else None,
        "impl": spec.measurement.impl,
        "device": record.device,
        "mode": spec.measurement.mode,
        "precision": t.precision,
        "optimizer": t.optimizer,
        "recompute": t.recompute,
        "attention": t.attention,
        "zero": p.zero,
        "gpus": p.gpus,
        "tp": p.tp,
        "pp": p.pp,
        "batch": t.batch,
        "seq": t.seq,
        "grad_accum": t.grad_accum,
        "layers": arch.n_layers if arch is not None else None,
        "hidden": arch.hidden if arch is not None else None,
        "heads": arch.n_heads if arch is not None else None,
        "kv_heads": arch.n_kv_heads if arch is not None else None,
        "vocab": arch.vocab if arch is not None else None,
        "params": formula.params if formula is not None else None,
    }
    for term, value in _measured_terms(record).items():
        row[f"measured_{term}_bytes"] = value
    for key in _MEASURED_EXTRAS:
        row[f"measured_{key}" + ("" if key.startswith("num_") else "_bytes")] = getattr(m.memory_bytes, key)
    for method in METHODS:
        terms = record.terms(method)
        for term in TERMS:
            row[f"{method.column}_{term}_bytes"] = getattr(terms, term)
    # Time and throughput.
    row["step_ms_median"] = m.step_ms.median if m.step_ms is not None else None
    row["step_ms_min"] = m.step_ms.min if m.step_ms is not None else None
    row["step_ms_max"] = m.step_ms.max if m.step_ms is not None else None
    for k in ("model", "hardware", "counted"):
        row[f"tflops_{k}"] = getattr(m.tflops, k) if m.tflops is not None else None
    row["mfu"], row["hfu"], row["peak_tflops"] = m.mfu, m.hfu, m.peak_tflops
    row["gpu"] = m.gpu or (env.gpu.name if env is not None and env.gpu is not None else None)
    row["tokens_per_second"] = m.tokens_per_second
    row["step_mode"], row["attention_kernel"] = m.step_mode, m.attention_kernel
    flops = formula.flops if formula is not None else None
    row["flops_counted"] = m.flops_counted
    row["flops_formula_matmul"] = flops.per_step_matmul if flops is not None else None
    inference = spec.measurement.mode == "inference"
    row["flops_model_per_step"] = (
        None if flops is None else flops.per_step_forward if inference else flops.per_step_model
    )
    # Provenance.
    row["elapsed_s"] = record.elapsed_s
    row["error_type"] = err.type if err is not None else None
    tail = [
        line for line in str((err.stderr_tail or err.traceback_tail or "") if err else "").splitlines() if line.strip()
    ]
    row["error_message"] = (err.message if err is not None else None) or (tail[-1].strip() if tail else None)
    row["hostname"] = env.hostname if env is not None else None
    row["timestamp_utc"] = env.timestamp_utc if env is not None else None
    row["torch"] = env.torch if env is not None else None
    row["git_commit"] = env.git_commit if env is not None else None
    row["harness_version"] = record.harness_version
    return row


def frame(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame([flat_row(r) for r in records])


def error_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (run, term, method) with measured, predicted and predicted/measured."""
    rows = []
    ok = df[df["status"] == "ok"]
    for term in TERMS:
        mcol = f"measured_{term}_bytes"
        for method in METHODS:
            pcol = f"{method.column}_{term}_bytes"
            if pcol not in ok or mcol not in ok:
                continue
            for _, r in ok.iterrows():
                m, p = r[mcol], r[pcol]
                if m is None or p is None or isnan(m) or isnan(p) or m <= 0:
                    continue
                rows.append(
                    {
                        "term": term,
                        "method": method.name,
                        "label": r["label"],
                        "device": r["device"],
                        "measured": m,
                        "predicted": p,
                        "ratio": p / m,
                    }
                )
    return pd.DataFrame(rows, columns=["term", "method", "label", "device", "measured", "predicted", "ratio"])
