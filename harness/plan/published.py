"""Published training runs against the planner's step-time model: one efficiency fitted on half, tested on the rest.

    rows = load_rows("results/plan/published.csv")      # sources: results/plan/SOURCES.md
    fit = fit_efficiency(rows)                            # {"efficiency", "fit_rows", "held_out", ...}

Each row's own layout (dp, tp, pp, ZeRO/FSDP, sequence parallel, recompute, micro-batch, interleaving) is
scored by `harness.plan.search` with every axis fixed and memory unlimited (the runs ran), with its attention
kernel (eager for Megatron-LM before flash attention, with its default attention dropout), and its predicted
MFU compared with the published one; Narayanan et al. 2021 publish hardware TFLOP/s (recompute counted), so
their rows compare the predicted hardware TFLOP/s. Rows are split by alternation within each source (sorted by
row id): even rows fit, odd rows are held out. The efficiency minimises the fit half's median |relative
error| (a scan over 0.200-0.900 in steps of 0.001).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from formulas import hardware
from formulas.architecture import Architecture
from formulas.plan import SCHEDULES
from formulas.precision import compute_dtype
from harness.plan.search import PlanRequest, plan

HARDWARE_TFLOPS_SOURCES = ("narayanan-2021-table1",)
"""Sources whose throughput is hardware TFLOP/s per GPU (the recomputed forward counted), not MFU."""
ASSUMED_MICRO_BATCH = 1
"""Where a row does not print its micro-batch (Megatron-LM's H100 table): Megatron-LM's default, 1."""
LLAMA_LIKE = ("llama", "mistral", "mixtral", "nemotron", "qwen")


def _int(value: str, default: int | None = None) -> int | None:
    return int(float(value)) if value not in ("", None) else default


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def load_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as handle:
        rows = [dict(r) for r in csv.DictReader(handle)]
    return [r for r in rows if r.get("row_id")]


def row_arch(row: dict) -> Architecture:
    h = _int(row["hidden"])
    llama = any(k in row["model"].lower() for k in LLAMA_LIKE)
    return Architecture(
        n_layers=_int(row["layers"]), hidden=h, n_heads=_int(row["heads"]), n_kv_heads=_int(row["kv_heads"]),
        ffn_hidden=_int(row["ffn_hidden"], 4 * h), vocab=_int(row["vocab"], 51200),
        max_positions=max(_int(row["seq"]), 2048), position="rotary" if llama else "learned",
        norm="rmsnorm" if llama else "layernorm", bias=not llama, tied_embeddings=not llama,
        mlp="swiglu" if llama else "gelu", dropout=_float(row.get("dropout", "")) or 0.0,
    )  # fmt: skip


def row_request(row: dict, efficiency: float) -> PlanRequest:
    tp, pp = _int(row["tp"], 1), _int(row["pp"], 1)
    v = _int(row.get("virtual_stages"), 1) or 1
    zero = row.get("zero", "") or "0"
    fixed = {
        "tp": tp, "pp": pp, "zero": 0 if zero == "fsdp" else int(zero), "fsdp": zero == "fsdp",
        "sequence_parallel": str(row.get("sequence_parallel", "")).lower() == "true",
        "recompute": row.get("recompute") or "none", "micro_batch": _int(row["micro_batch"], ASSUMED_MICRO_BATCH),
        "virtual_stages": v, "offload": False,
        "schedule": "1f1b" if v == 1 else "interleaved-1f1b",
    }  # fmt: skip
    if pp == 1:
        fixed.pop("schedule")
    gpus = _int(row["gpus"])
    return PlanRequest(arch=row_arch(row), model=row["model"], seq=_int(row["seq"]), global_batch=_int(row["global_batch"]),
                       gpu=row["gpu"], gpus=gpus, gpus_per_node=min(8, gpus), fixed=fixed, efficiency=efficiency,
                       attention=row.get("attention") or "flash",
                       efficiency_source="fit", memory_bytes=10**18, max_micro_batch=10**9, walk=False)  # fmt: skip


def predicted(row: dict, efficiency: float) -> dict | None:
    """The row's predicted MFU and hardware TFLOP/s per GPU (None: the row lacks its layout, or the planner
    does not score it)."""
    needed = ("gpus", "layers", "hidden", "heads", "seq", "global_batch", "tp", "pp")
    if any(row.get(k) in ("", None) for k in needed):
        return None
    result = plan(row_request(row, efficiency), top=1)
    if not result.candidates:
        return None
    c = result.candidates[0]
    peak = hardware.get_gpu(row["gpu"]).peak(compute_dtype("bf16-mixed"))
    hw_tflops = c.terms["compute"] * efficiency * peak / c.step_seconds  # hardware FLOPs / step time / GPU
    return {"mfu": c.mfu, "hardware_tflops": hw_tflops, "step_seconds": c.step_seconds}


def _published(row: dict) -> tuple[str, float] | None:
    """The row's metric (the prediction's key) and its published value; None when it publishes neither."""
    if row["source"] in HARDWARE_TFLOPS_SOURCES and _float(row["published_tflops_per_gpu"]):
        return "hardware_tflops", _float(row["published_tflops_per_gpu"])
    if _float(row["published_mfu"]):
        return "mfu", _float(row["published_mfu"])
    return None


def _error(row: dict, p: dict | None) -> float | None:
    published = _published(row)
    if p is None or published is None:
        return None
    key, value = published
    return p[key] / value - 1


def row_error(row: dict, efficiency: float) -> float | None:
    """predicted / published − 1 in the row's metric (None when it cannot be scored)."""
    return _error(row, predicted(row, efficiency))


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Even rows of each source fit, odd rows are held out (each source sorted by row id)."""
    fit, held = [], []
    for source in sorted({r["source"] for r in rows}):
        own = sorted((r for r in rows if r["source"] == source), key=lambda r: r["row_id"])
        fit += own[0::2]
        held += own[1::2]
    return fit, held


def scored(rows: list[dict]) -> list[dict]:
    """The rows the model can score (Korthikanti's publish no layout)."""
    return [r for r in rows if row_error(r, 0.5) is not None]


def median_abs_error(efficiency: float, rows: list[dict]) -> float:
    return statistics.median(abs(row_error(r, efficiency)) for r in rows)


def best_efficiency(rows: list[dict]) -> float:
    """The efficiency that minimises the median |error| over `rows` (scored ones), 0.200-0.900 in steps of
    0.001. The error is monotone in the efficiency row by row: a coarse scan, then a fine one around its best."""
    grid = [round(0.2 + 0.001 * i, 3) for i in range(701)]
    coarse = min(grid[::20], key=lambda e: median_abs_error(e, rows))
    return min((e for e in grid if abs(e - coarse) <= 0.02), key=lambda e: median_abs_error(e, rows))


def fit_efficiency(rows: list[dict]) -> dict:
    fit_rows, _ = split(rows)
    best = best_efficiency(scored(fit_rows))
    per_row = []
    for r in rows:
        p = predicted(r, best)
        key, value = _published(r) or ("mfu", None)
        per_row.append({"row_id": r["row_id"], "source": r["source"], "model": r["model"], "gpu": r["gpu"],
                        "gpus": _int(r["gpus"]), "half": "fit" if r in fit_rows else "held out",
                        "metric": "hardware TFLOP/s" if key == "hardware_tflops" else "MFU", "published": value,
                        "predicted": None if p is None else p[key], "error": _error(r, p)})  # fmt: skip
    held = [x["error"] for x in per_row if x["half"] == "held out" and x["error"] is not None]
    fitted = [x["error"] for x in per_row if x["half"] == "fit" and x["error"] is not None]
    return {
        "efficiency": best, "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "fit_rows": len(fitted), "held_out_rows": len(held),
        "fit_median_abs_error": statistics.median(abs(e) for e in fitted),
        "held_out_median_abs_error": statistics.median(abs(e) for e in held),
        "held_out_max_abs_error": max(abs(e) for e in held), "rows": per_row,
        "schedules": list(SCHEDULES),
    }  # fmt: skip
