"""The report's tables, each from the flat frame (`harness.report.frame`) or the records themselves."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from harness.check import Verdict, judge
from harness.formatting import number, significant, size
from harness.predictions import METHODS, TERM_TITLES, TERMS
from harness.records import Record
from harness.report.frame import isnan


def cell(measured, predicted) -> str:
    """`measured / predicted (ratio)`: a table cell."""
    if measured is None or isnan(measured):
        return "-"
    if predicted is None or isnan(predicted):
        return f"{size(measured)} / -"
    ratio = f" ({measured / predicted:.3f})" if predicted else ""
    return f"{size(measured)} / {size(predicted)}{ratio}"


def environment_table(records: list[Record]) -> pd.DataFrame:
    """Field → the distinct values the records carry (several where runs came from several machines)."""

    def values(fn) -> str:
        seen = Counter()
        for r in records:
            v = fn(r)
            if v not in (None, ""):
                seen[str(v)] += 1
        if not seen:
            return "-"
        if len(seen) == 1:
            return next(iter(seen))
        return ", ".join(f"{v} ({n})" for v, n in seen.most_common())

    def env(key):
        return lambda r: getattr(r.environment, key) if r.environment is not None else None

    def gpu(r):
        return r.environment.gpu if r.environment is not None else None

    fields = [
        ("GPU", lambda r: (gpu(r).name if gpu(r) else None) or ("none" if r.environment is not None else None)),
        ("GPU memory", lambda r: size(gpu(r).total_memory_bytes) if gpu(r) else None),
        ("GPUs visible", env("gpu_count")),
        ("driver", lambda r: (gpu(r).nvml or {}).get("driver") if gpu(r) else None),
        ("CUDA", env("cuda")),
        ("torch", env("torch")),
        ("transformers", env("transformers")),
        ("deepspeed", env("deepspeed")),
        ("python", env("python")),
        ("CPU", env("cpu")),
        ("git commit", env("git_commit")),
        ("harness version", lambda r: r.harness_version),
        ("hosts", env("hostname")),
        ("devices measured", lambda r: r.device),
    ]
    rows = [{"field": name, "value": values(fn)} for name, fn in fields]
    stamps = sorted(s for s in (env("timestamp_utc")(r) for r in records) if s)
    if stamps:
        rows.append(
            {"field": "measured (UTC)", "value": f"{stamps[0]} – {stamps[-1]}" if len(stamps) > 1 else stamps[0]}
        )
    return pd.DataFrame(rows)


def terms_table(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[(df["status"] == "ok") & (df["mode"] != "inference")]
    rows = []
    for _, r in ok.iterrows():
        row = {"run": r["label"]}
        for term in ("weights", "gradients", "optimizer", "activations", "activations_per_layer", "peak"):
            row[TERM_TITLES[term] if term != "peak" else "peak / total"] = cell(
                r[f"measured_{term}_bytes"], r[f"predicted_{term}_bytes"]
            )
        rows.append(row)
    return pd.DataFrame(rows)


def inference_table(df: pd.DataFrame) -> pd.DataFrame:
    inf = df[(df["status"] == "ok") & (df["mode"] == "inference")]
    rows = []
    for _, r in inf.iterrows():
        w, peak = r["measured_weights_bytes"], r["measured_inference_peak_bytes"]
        rows.append(
            {
                "run": r["label"],
                "weights (measured / predicted)": cell(w, r["predicted_weights_bytes"]),
                "peak (measured / 1.2 × weights + KV cache)": cell(peak, r["predicted_inference_peak_bytes"]),
                "peak / weights": number(peak / w if w and peak is not None and not isnan(peak) else None, 3),
            }
        )
    return pd.DataFrame(rows)


def error_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Term × method: median predicted/measured with its range and count."""
    rows = []
    for term in TERMS:
        sub = errors[errors["term"] == term]
        if sub.empty:
            continue
        row = {"term": TERM_TITLES[term]}
        for method in METHODS:
            r = sub[sub["method"] == method.name]["ratio"]
            row[method.name] = "-" if r.empty else f"{r.median():.3f} [{r.min():.3f}–{r.max():.3f}] n={len(r)}"
        rows.append(row)
    return pd.DataFrame(rows)


def overhead_table(df: pd.DataFrame) -> pd.DataFrame:
    """CUDA allocator and context: what the formulas do not count, which `calibrate` fits."""
    cuda = df[(df["status"] == "ok") & (df["device"] == "cuda")]
    rows = []
    for _, r in cuda.iterrows():
        alloc, res, nvml = r["measured_peak_bytes"], r["measured_peak_reserved_bytes"], r["measured_nvml_used_bytes"]
        if alloc is None or isnan(alloc):
            alloc = r["measured_inference_peak_bytes"]
        rows.append(
            {
                "run": r["label"],
                "peak allocated": size(alloc),
                "peak reserved": size(res),
                "reserved / allocated": number(
                    res / alloc if alloc and res is not None and not isnan(res) else None, 3
                ),
                "NVML used": size(nvml),
                "NVML − reserved": size(
                    nvml - res if None not in (nvml, res) and not (isnan(nvml) or isnan(res)) else None
                ),
                "alloc retries": number(r["measured_num_alloc_retries"], 0),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Timed:
    """One timed ok run against the TFLOP/s bar: the numbers the throughput table and plot show."""

    row: dict
    """Its flat row (`harness.report.frame.flat_row`)."""
    mfu: float | None
    verdict: Verdict

    @property
    def label(self) -> str:
        return self.row["label"]

    @property
    def tflops_model(self) -> float:
        return float(self.row["tflops_model"])


def timed_runs(df: pd.DataFrame, records: list[Record], min_tflops: float) -> list[Timed]:
    """The timed ok runs, each judged against the bar scaled to its GPU (`harness.check.judge`)."""
    by_key = {r.spec_key: r for r in records}
    out = []
    for _, r in df[df["status"] == "ok"].iterrows():
        if r["tflops_model"] is None or isnan(r["tflops_model"]):
            continue
        mfu = None if r["mfu"] is None or isnan(r["mfu"]) else float(r["mfu"])
        out.append(Timed(r.to_dict(), mfu, judge(by_key[r["spec_key"]], min_tflops, scale_to_gpu=True)))
    return out


def mfu_text(mfu: float | None) -> str:
    return number(mfu * 100 if mfu is not None else None, 1, " %")


def throughput_table(timed: list[Timed]) -> pd.DataFrame:
    rows = []
    for t in timed:
        r, v = t.row, t.verdict
        rows.append(
            {
                "run": r["label"],
                "GPU": r["gpu"] or "-",
                "step ms (median [min–max])": f"{r['step_ms_median']:,.1f} [{r['step_ms_min']:,.1f}–{r['step_ms_max']:,.1f}]",
                "tokens/s": number(r["tokens_per_second"], 0),
                "model TFLOP/s": significant(r["tflops_model"]),
                "hardware TFLOP/s": significant(r["tflops_hardware"]),
                "MFU": mfu_text(t.mfu),
                "bar": number(v.bar, 1) if v.checked else "-",
                "verdict": ("pass" if v.passed else "FAIL") if v.checked else v.reason,
            }
        )
    return pd.DataFrame(rows)


def failures_table(df: pd.DataFrame) -> pd.DataFrame:
    bad = df[df["status"] != "ok"]
    rows = [
        {
            "run": r["label"],
            "status": r["status"],
            "error": r["error_type"] or "-",
            "message": str(r["error_message"])[:200] if isinstance(r["error_message"], str) else "-",
            "elapsed s": number(r["elapsed_s"], 1),
            "key": r["spec_key"],
        }
        for _, r in bad.iterrows()
    ]
    return pd.DataFrame(rows)
