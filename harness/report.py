"""Report a results directory: measured next to predicted, per term and per method, as Markdown and HTML.

    tmath report results/cpu-smoke                     # results/cpu-smoke/report/{report.md, report.html, *.png}
    tmath report results/a100-node --export parquet    # + report/runs.parquet, one flat row per run

Everything is computed from the records in runs.jsonl (the newest record of each spec key):
- an environment header (GPU, driver, CUDA, torch, transformers, deepspeed, git commit, harness
  version, hosts), read from the records, never from the machine that renders the report;
- measured vs predicted per term (weights, gradients, optimizer, activations, activations per
  layer, model states, peak allocated vs the predicted total; inference runs: peak vs the 1.2 rule),
  as a table and as log-log scatter plots with the y = x line;
- the error distribution (predicted / measured) by term and by method: Korthikanti et al. (the
  harness's formulas), the naive Q&A formula and its 4C-MLP correction, and DeepSpeed's estimator
  where a record carries it (ZeRO runs; it predicts model states only);
- activation bytes per layer against sequence length, with the formula curves;
- TFLOP/s and MFU per configuration against the bar (`harness.check`, scaled to each GPU);
- the failed runs (status, error) in their own table.
The HTML file is self-contained (plots embedded as base64 PNG); the PNGs also sit beside it.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import Counter
from pathlib import Path

from harness.errors import UsageError
from harness.record import read_jsonl

GIB, MIB, KIB = 2**30, 2**20, 2**10
RUNS_FILE = "runs.jsonl"
METHODS = ("korthikanti", "implementation", "naive", "naive-mlp4c", "deepspeed")
"""Prediction methods, and the column prefix of each in the flat table."""
PREFIX = {
    "korthikanti": "predicted",
    "implementation": "implementation",
    "naive": "naive",
    "naive-mlp4c": "naive_mlp4c",
    "deepspeed": "deepspeed",
}
TERMS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "activations_per_layer",
    "model_states",
    "host_model_states",
    "peak",
    "inference_peak",
)
"""Comparable terms: `measured_<term>_bytes` against `<method prefix>_<term>_bytes` (peak: the predicted total)."""
TERM_TITLES = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations (all saved)",
    "activations_per_layer": "activations per layer",
    "model_states": "model states (w + g + opt)",
    "host_model_states": "host memory (DeepSpeed offload)",
    "peak": "peak allocated vs predicted total",
    "inference_peak": "inference peak vs 1.2 × weights",
}


# --------------------------------------------------------------------------------------------------
# Reading records


def load_records(target: str | Path) -> tuple[Path, list[dict]]:
    """The newest record of each spec key from DIR/runs.jsonl (or a .jsonl path); one-line errors."""
    target = Path(target)
    path = target / RUNS_FILE if target.is_dir() else target
    if not path.exists():
        where = f"{target} has no {RUNS_FILE}" if target.is_dir() else f"no results at {target}"
        raise UsageError(f"{where} (run `tmath sweep` first)")
    records = latest_records(read_jsonl(path))
    if not records:
        raise UsageError(f"{path} holds no records")
    return path, records


def latest_records(records: list[dict]) -> list[dict]:
    """One record per spec key, the newest (a retried point supersedes its failure), in first-run order."""
    latest: dict[str, dict] = {}
    for i, r in enumerate(records):
        latest[r.get("spec_key") or f"#{i}"] = r  # a dict keeps the first position of a key
    return list(latest.values())


def get(data, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def num(value) -> float | None:
    """A finite number, else None (missing fields, strings, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def run_label(spec: dict, without: tuple[str, ...] = (), device: str | None = None) -> str:
    """A short configuration name: `gpt2 L2 fp32 rc=selective b2 s128 cpu` (`device`: the one measured)."""
    if not spec:
        return "?"
    arch = spec.get("arch") or {}
    parts = [str(spec.get("model", "?"))]
    if arch:
        parts.append(f"L{arch.get('n_layers')}")
        if arch.get("hidden") != _preset_hidden(spec.get("model")):
            parts.append(f"h{arch.get('hidden')}")
    if spec.get("impl", "reference") != "reference":
        parts.append(spec["impl"])
    if spec.get("mode") == "inference":
        parts.append("inference")
    parts.append(str(spec.get("precision")))
    if spec.get("optimizer", "adamw") != "adamw":
        parts.append(spec["optimizer"])
    if spec.get("recompute", "none") != "none":
        parts.append(f"rc={spec['recompute']}")
    if spec.get("attention", "eager") != "eager":
        parts.append(spec["attention"])
    if spec.get("zero"):
        parts.append(f"ZeRO-{spec['zero']}")
    for key, short in (("offload_optimizer", "off-opt"), ("offload_params", "off-param")):
        if spec.get(key, "none") != "none":
            parts.append(f"{short}={spec[key]}")
    if spec.get("gpus", 1) > 1:
        parts.append(f"×{spec['gpus']}")
    for key, short in (("tp", "tp"), ("pp", "pp")):
        if spec.get(key, 1) > 1:
            parts.append(f"{short}{spec[key]}")
    if "batch" not in without:
        parts.append(f"b{spec.get('batch')}")
    if "seq" not in without:
        parts.append(f"s{spec.get('seq')}")
    if spec.get("grad_accum", 1) > 1:
        parts.append(f"ga{spec['grad_accum']}")
    parts.append(str(device or spec.get("device")))
    return " ".join(parts)


def _preset_hidden(model) -> int | None:
    """The preset's width, to show `h` in labels only where a sweep narrowed the model."""
    from models.presets import PRESETS

    preset = PRESETS.get(str(model))
    return preset.hidden if preset is not None else None


def _estimator_bytes(record: dict) -> dict:
    """DeepSpeed's estimator, per rank, when the record has it: it sizes model states only."""
    mem = get(record, "predicted.deepspeed_estimator.memory_bytes") or {}
    if not isinstance(mem, dict):
        return {}
    out = {t: num(mem.get(t)) for t in ("weights", "gradients", "optimizer")}
    states = num(mem.get("model_states"))
    if states is None and all(out[t] is not None for t in ("weights", "gradients", "optimizer")):
        states = sum(out.values())
    if states is None:
        states = num(mem.get("gpu")) if num(mem.get("gpu")) is not None else num(mem.get("total"))
    out["model_states"] = states
    return out


def flat_row(record: dict) -> dict:
    """One record as one flat row: numbers stay numbers (bytes, ms, TFLOP/s), units in the names."""
    spec = record.get("spec") or {}
    arch = spec.get("arch") or {}
    m = record.get("measured") or {}
    mem = m.get("memory_bytes") or {}
    env = record.get("environment") or {}
    err = record.get("error") or {}
    n_layers = arch.get("n_layers")
    inference = spec.get("mode") == "inference"
    row = {
        "spec_key": record.get("spec_key"),
        "status": record.get("status"),
        "label": run_label(spec, device=m.get("device")),
        "sweep": get(spec, "extra.sweep"),
        "model": spec.get("model"),
        "family": arch.get("family"),
        "impl": spec.get("impl"),
        "device": m.get("device") or spec.get("device"),
        "mode": spec.get("mode"),
        "precision": spec.get("precision"),
        "optimizer": spec.get("optimizer"),
        "recompute": spec.get("recompute"),
        "attention": spec.get("attention"),
        "zero": spec.get("zero"),
        "gpus": spec.get("gpus"),
        "tp": spec.get("tp"),
        "pp": spec.get("pp"),
        "batch": spec.get("batch"),
        "seq": spec.get("seq"),
        "grad_accum": spec.get("grad_accum"),
        "layers": n_layers,
        "hidden": arch.get("hidden"),
        "heads": arch.get("n_heads"),
        "kv_heads": arch.get("n_kv_heads"),
        "vocab": arch.get("vocab"),
        "params": get(record, "predicted.params"),
    }
    # Measured terms.
    row["measured_weights_bytes"] = num(mem.get("weights"))
    row["measured_gradients_bytes"] = None if inference else num(mem.get("gradients"))
    row["measured_optimizer_bytes"] = None if inference else num(mem.get("optimizer"))
    row["measured_activations_bytes"] = None if inference else num(mem.get("activations"))
    layers_bytes = num(mem.get("activations_layers"))
    row["measured_activations_per_layer_bytes"] = (
        layers_bytes / n_layers if layers_bytes is not None and n_layers and not inference else None
    )
    parts = [row[f"measured_{t}_bytes"] for t in ("weights", "gradients", "optimizer")]
    row["measured_model_states_bytes"] = sum(parts) if all(p is not None for p in parts) else None
    offload = spec.get("offload_optimizer", "none") != "none" or spec.get("offload_params", "none") != "none"
    row["measured_host_model_states_bytes"] = num(mem.get("host_model_states")) if offload else None
    row["predicted_host_model_states_bytes"] = (
        num(get(record, "predicted.host_memory_bytes.total")) if offload and not inference else None
    )
    peak = num(mem.get("peak_allocated"))
    row["measured_peak_bytes"] = None if inference else peak
    row["measured_inference_peak_bytes"] = peak if inference else None
    for key in (
        "peak_allocated_first_step",
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
    ):
        row[f"measured_{key}" + ("" if key.startswith("num_") else "_bytes")] = num(mem.get(key))
    # Predicted terms, per method.
    sources = {
        "korthikanti": get(record, "predicted.memory_bytes") or {},
        "naive": get(record, "predicted.naive.memory_bytes") or {},
        "naive-mlp4c": get(record, "predicted.naive_mlp4c.memory_bytes") or {},
    }
    for method, pm in sources.items():
        p = PREFIX[method]
        for t in ("weights", "gradients", "optimizer", "activations"):
            row[f"{p}_{t}_bytes"] = num(pm.get(t)) if not (inference and t != "weights") else None
        w, g, o = (row[f"{p}_{t}_bytes"] for t in ("weights", "gradients", "optimizer"))
        row[f"{p}_model_states_bytes"] = w + g + o if None not in (w, g, o) else None
        row[f"{p}_peak_bytes"] = None if inference else num(pm.get("total"))
        if method == "korthikanti" and row[f"{p}_peak_bytes"] is not None and row["device"] == "cpu":
            # On a CPU run the offloaded states share the one memory that the live-bytes tracker sees.
            row[f"{p}_peak_bytes"] += row["predicted_host_model_states_bytes"] or 0
        acts = row[f"{p}_activations_bytes"]
        row[f"{p}_activations_per_layer_bytes"] = None
        if method == "korthikanti":
            row[f"{p}_activations_per_layer_bytes"] = (
                None if inference else num(get(record, "predicted.activation_bytes.per_layer"))
            )
        elif acts is not None and n_layers:
            # The naive formula is L times one layer's count, with nothing outside the layers.
            row[f"{p}_activations_per_layer_bytes"] = acts / n_layers
        row[f"{p}_inference_peak_bytes"] = None
    row["predicted_inference_peak_bytes"] = num(get(record, "predicted.inference.total")) if inference else None
    # formulas.variants: the activations of the implementation that ran (the paper plus named departures).
    impl = get(record, "predicted.implementation") or {}
    for t in TERMS:
        row[f"implementation_{t}_bytes"] = None
    if isinstance(impl, dict) and not inference:
        row["implementation_activations_bytes"] = num(impl.get("total"))
        layers = impl.get("layers") or []
        # The same mean over layers as the measured column (the first layer also keeps per-forward tables).
        row["implementation_activations_per_layer_bytes"] = sum(layers) / len(layers) if layers else None
    ds = _estimator_bytes(record)
    for t in TERMS:
        row[f"deepspeed_{t}_bytes"] = ds.get(t) if not inference else None
    # Time and throughput.
    step = m.get("step_ms") or {}
    row["step_ms_median"] = num(step.get("median")) if isinstance(step, dict) else None
    row["step_ms_min"] = num(step.get("min")) if isinstance(step, dict) else None
    row["step_ms_max"] = num(step.get("max")) if isinstance(step, dict) else None
    tflops = m.get("tflops") or {}
    for k in ("model", "hardware", "counted"):
        row[f"tflops_{k}"] = num(tflops.get(k)) if isinstance(tflops, dict) else None
    row["mfu"] = num(m.get("mfu"))
    row["hfu"] = num(m.get("hfu"))
    row["peak_tflops"] = num(m.get("peak_tflops"))
    row["gpu"] = m.get("gpu") or get(env, "gpu.name")
    row["tokens_per_second"] = num(m.get("tokens_per_second"))
    flops = m.get("flops") or {}
    row["flops_counted"] = num(flops.get("counted"))
    row["flops_formula_matmul"] = num(flops.get("formula_matmul"))
    row["flops_model_per_step"] = num(flops.get("model_per_step")) or num(get(record, "predicted.flops.per_step_model"))
    # Provenance.
    row["elapsed_s"] = num(record.get("elapsed_s"))
    row["error_type"] = err.get("type")
    tail = [
        line for line in str(err.get("stderr_tail") or err.get("traceback_tail") or "").splitlines() if line.strip()
    ]
    row["error_message"] = err.get("message") or (tail[-1].strip() if tail else None)
    row["hostname"] = env.get("hostname")
    row["timestamp_utc"] = env.get("timestamp_utc")
    row["torch"] = env.get("torch")
    row["git_commit"] = env.get("git_commit")
    row["harness_version"] = record.get("harness_version")
    return row


def frame(records: list[dict]):
    import pandas as pd

    return pd.DataFrame([flat_row(r) for r in records])


def error_frame(df):
    """Long table: one row per (run, term, method) with measured, predicted and predicted/measured."""
    import pandas as pd

    rows = []
    ok = df[df["status"] == "ok"]
    for term in TERMS:
        mcol = f"measured_{term}_bytes"
        for method in METHODS:
            pcol = f"{PREFIX[method]}_{term}_bytes"
            if pcol not in ok or mcol not in ok:
                continue
            for _, r in ok.iterrows():
                m, p = r[mcol], r[pcol]
                if m is None or p is None or _isnan(m) or _isnan(p) or m <= 0:
                    continue
                rows.append(
                    {
                        "term": term,
                        "method": method,
                        "label": r["label"],
                        "device": r["device"],
                        "measured": m,
                        "predicted": p,
                        "ratio": p / m,
                    }
                )
    return pd.DataFrame(rows, columns=["term", "method", "label", "device", "measured", "predicted", "ratio"])


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


# --------------------------------------------------------------------------------------------------
# Formatting


def fmt_bytes(value) -> str:
    if value is None or _isnan(value):
        return "-"
    v = float(value)
    for div, unit in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if abs(v) >= div:
            return f"{v / div:,.2f} {unit}"
    return f"{v:,.0f} B"


def fmt_num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or _isnan(value):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def fmt_sig(value, digits: int = 3) -> str:
    """Three significant digits: 0.000361 on a CPU, 132 on an A100."""
    if value is None or _isnan(value):
        return "-"
    return f"{value:,.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def _cell(measured, predicted) -> str:
    if measured is None or _isnan(measured):
        return "-"
    if predicted is None or _isnan(predicted):
        return f"{fmt_bytes(measured)} / -"
    ratio = f" ({measured / predicted:.3f})" if predicted else ""
    return f"{fmt_bytes(measured)} / {fmt_bytes(predicted)}{ratio}"


class Document:
    """Headings, paragraphs, tables (DataFrames) and images, rendered to Markdown and to HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, item in self.blocks:
            if kind == "h":
                level, text = item
                out += ["#" * level + " " + text, ""]
            elif kind == "p":
                out += [item, ""]
            elif kind == "table":
                out += [_markdown_table(item), ""]
            else:
                path, alt = item
                out += [f"![{alt}]({path.name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, item in self.blocks:
            if kind == "h":
                level, text = item
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "p":
                body.append(f"<p>{_inline(item)}</p>")
            elif kind == "table":
                body.append(item.to_html(index=False, border=0, classes="t", na_rep="-", escape=True))
            else:
                path, alt = item
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
                body.append(f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        return _HTML.format(title=html.escape(self.title), body="\n".join(body))


def _markdown_table(df) -> str:
    df = df.astype(object).where(df.notna(), "-")
    df = df.map(lambda v: str(v).replace("|", "\\|").replace("\n", " "))
    return df.to_markdown(index=False, disable_numparse=True)


def _inline(text: str) -> str:
    """Markdown `code` and **bold** as HTML, everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }}
table.t th, table.t td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }}
table.t th {{ background: #f4f4f4; }}
table.t td:first-child, table.t th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #666; font-size: 0.85em; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
</style></head>
<body>
{body}
</body></html>
"""


# --------------------------------------------------------------------------------------------------
# Sections


def environment_table(records: list[dict]):
    """Field → the distinct values the records carry (several where runs came from several machines)."""
    import pandas as pd

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
        return lambda r: get(r, f"environment.{key}")

    fields = [
        ("GPU", lambda r: get(r, "environment.gpu.name") or ("none" if r.get("environment") else None)),
        (
            "GPU memory",
            lambda r: fmt_bytes(get(r, "environment.gpu.total_memory_bytes")) if get(r, "environment.gpu") else None,
        ),
        ("GPUs visible", env("gpu_count")),
        ("driver", env("gpu.nvml.driver")),
        ("CUDA", env("cuda")),
        ("torch", env("torch")),
        ("transformers", env("transformers")),
        ("deepspeed", env("deepspeed")),
        ("python", env("python")),
        ("CPU", env("cpu")),
        ("git commit", env("git_commit")),
        ("harness version", lambda r: r.get("harness_version")),
        ("hosts", env("hostname")),
        ("devices measured", lambda r: get(r, "measured.device") or get(r, "spec.device")),
    ]
    rows = [{"field": name, "value": values(fn)} for name, fn in fields]
    stamps = sorted(s for s in (get(r, "environment.timestamp_utc") for r in records) if s)
    if stamps:
        rows.append(
            {"field": "measured (UTC)", "value": f"{stamps[0]} – {stamps[-1]}" if len(stamps) > 1 else stamps[0]}
        )
    return pd.DataFrame(rows)


def terms_table(df):
    import pandas as pd

    ok = df[(df["status"] == "ok") & (df["mode"] != "inference")]
    rows = []
    for _, r in ok.iterrows():
        row = {"run": r["label"]}
        for term in ("weights", "gradients", "optimizer", "activations", "activations_per_layer", "peak"):
            row[TERM_TITLES[term] if term != "peak" else "peak / total"] = _cell(
                r[f"measured_{term}_bytes"], r[f"predicted_{term}_bytes"]
            )
        rows.append(row)
    return pd.DataFrame(rows)


def inference_table(df):
    import pandas as pd

    inf = df[(df["status"] == "ok") & (df["mode"] == "inference")]
    rows = []
    for _, r in inf.iterrows():
        w, peak = r["measured_weights_bytes"], r["measured_inference_peak_bytes"]
        rows.append(
            {
                "run": r["label"],
                "weights (measured / predicted)": _cell(w, r["predicted_weights_bytes"]),
                "peak (measured / 1.2 × weights + KV cache)": _cell(peak, r["predicted_inference_peak_bytes"]),
                "peak / weights": fmt_num(peak / w if w and peak is not None and not _isnan(peak) else None, 3),
            }
        )
    return pd.DataFrame(rows)


def error_summary(errors):
    """Term × method: median predicted/measured with its range and count."""
    import pandas as pd

    rows = []
    for term in TERMS:
        sub = errors[errors["term"] == term]
        if sub.empty:
            continue
        row = {"term": TERM_TITLES[term]}
        for method in METHODS:
            r = sub[sub["method"] == method]["ratio"]
            row[method] = "-" if r.empty else f"{r.median():.3f} [{r.min():.3f}–{r.max():.3f}] n={len(r)}"
        rows.append(row)
    return pd.DataFrame(rows)


def overhead_table(df):
    """CUDA allocator and context: what the formulas do not count, which `calibrate` fits."""
    import pandas as pd

    cuda = df[(df["status"] == "ok") & (df["device"] == "cuda")]
    rows = []
    for _, r in cuda.iterrows():
        alloc, res, nvml = r["measured_peak_bytes"], r["measured_peak_reserved_bytes"], r["measured_nvml_used_bytes"]
        if alloc is None or _isnan(alloc):
            alloc = r["measured_inference_peak_bytes"]
        rows.append(
            {
                "run": r["label"],
                "peak allocated": fmt_bytes(alloc),
                "peak reserved": fmt_bytes(res),
                "reserved / allocated": fmt_num(
                    res / alloc if alloc and res is not None and not _isnan(res) else None, 3
                ),
                "NVML used": fmt_bytes(nvml),
                "NVML − reserved": fmt_bytes(
                    nvml - res if None not in (nvml, res) and not (_isnan(nvml) or _isnan(res)) else None
                ),
                "alloc retries": fmt_num(r["measured_num_alloc_retries"], 0),
            }
        )
    return pd.DataFrame(rows)


def throughput_table(df, records: list[dict], min_tflops: float):
    import pandas as pd

    from harness.check import judge

    by_key = {r.get("spec_key"): r for r in records}
    rows = []
    for _, r in df[df["status"] == "ok"].iterrows():
        if r["tflops_model"] is None or _isnan(r["tflops_model"]):
            continue
        v = judge(by_key[r["spec_key"]], min_tflops, scale_to_gpu=True)
        rows.append(
            {
                "run": r["label"],
                "GPU": r["gpu"] or "-",
                "step ms (median [min–max])": f"{r['step_ms_median']:,.1f} [{r['step_ms_min']:,.1f}–{r['step_ms_max']:,.1f}]",
                "tokens/s": fmt_num(r["tokens_per_second"], 0),
                "model TFLOP/s": fmt_sig(r["tflops_model"]),
                "hardware TFLOP/s": fmt_sig(r["tflops_hardware"]),
                "MFU": fmt_num(r["mfu"] * 100 if r["mfu"] is not None and not _isnan(r["mfu"]) else None, 1, " %"),
                "bar": fmt_num(v.bar, 1) if v.checked else "-",
                "verdict": ("pass" if v.passed else "FAIL") if v.checked else v.reason,
            }
        )
    return pd.DataFrame(rows)


def failures_table(df):
    import pandas as pd

    bad = df[df["status"] != "ok"]
    rows = [
        {
            "run": r["label"],
            "status": r["status"],
            "error": r["error_type"] or "-",
            "message": str(r["error_message"])[:200] if isinstance(r["error_message"], str) else "-",
            "elapsed s": fmt_num(r["elapsed_s"], 1),
            "key": r["spec_key"],
        }
        for _, r in bad.iterrows()
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = {"cuda": "o", "cpu": "s", "meta": "^"}


def _bytes_axis(ax, axis: str = "both") -> None:
    """Log axis ticks at powers of two, labelled in KiB/MiB/GiB."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for name in ("x", "y"):
        if axis not in (name, "both"):
            continue
        a = getattr(ax, f"{name}axis")
        a.set_major_locator(LogLocator(base=2, numticks=7))
        a.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v).replace(".00", "")))
        a.set_minor_formatter(NullFormatter())


def plot_measured_vs_predicted(errors, path: Path) -> Path | None:
    """One log-log panel per term: measured (x) against the Korthikanti prediction (y), with y = x."""
    k = errors[errors["method"] == "korthikanti"]
    terms = [t for t in TERMS if not k[k["term"] == t].empty]
    if not terms:
        return None
    plt = _pyplot()
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        sub = k[k["term"] == term]
        sub = sub[(sub["measured"] > 0) & (sub["predicted"] > 0)]
        for device, g in sub.groupby("device"):
            ax.scatter(g["measured"], g["predicted"], marker=_MARKERS.get(device, "o"), label=device, alpha=0.75)
        if not sub.empty:
            lo = min(sub["measured"].min(), sub["predicted"].min()) / 1.5
            hi = max(sub["measured"].max(), sub["predicted"].max()) * 1.5
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _bytes_axis(ax)
        ax.tick_params(labelsize=7)
        ax.set_title(TERM_TITLES[term], fontsize=10)
        ax.set_xlabel("measured", fontsize=8)
        ax.set_ylabel("predicted (1.2 × weights)" if term == "inference_peak" else "predicted (formulas)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_distribution(errors, path: Path) -> Path | None:
    """predicted / measured on a log axis, one box per method within each term; 0 drawn at the floor."""
    if errors.empty:
        return None
    plt = _pyplot()
    terms = [t for t in TERMS if not errors[errors["term"] == t].empty]
    methods = [m for m in METHODS if not errors[errors["method"] == m].empty]
    floor = 1e-2
    fig, ax = plt.subplots(figsize=(min(13, max(7, 0.55 * len(terms) * len(methods))), 5.2))
    width = 0.8 / len(methods)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, method in enumerate(methods):
        data, pos = [], []
        for i, term in enumerate(terms):
            r = errors[(errors["term"] == term) & (errors["method"] == method)]["ratio"]
            if r.empty:
                continue
            data.append(r.clip(lower=floor).to_numpy())
            pos.append(i + (j - (len(methods) - 1) / 2) * width)
        if not data:
            continue
        color = colors[j % len(colors)]
        ax.boxplot(
            data,
            positions=pos,
            widths=width * 0.9,
            patch_artist=True,
            boxprops={"facecolor": color, "alpha": 0.45},
            medianprops={"color": "k"},
            showfliers=False,
        )
        for p, d in zip(pos, data, strict=True):
            ax.scatter([p] * len(d), d, s=8, color=color, zorder=3)
        ax.plot([], [], color=color, lw=6, alpha=0.6, label=method)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(terms)))
    ax.set_xticklabels([TERM_TITLES[t] for t in terms], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"predicted / measured (1 = exact; terms not counted drawn at {floor:g})", fontsize=8)
    ax.set_title("Prediction error by term and method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _formula_curves(spec_dict: dict, seqs: list[int]) -> dict[str, list[float | None]]:
    """Per-layer activation bytes of the Korthikanti and naive formulas at each sequence length."""
    from formulas.predict import predict
    from formulas.spec import RunSpec

    base = RunSpec.from_dict(spec_dict)
    out: dict[str, list[float | None]] = {"korthikanti": [], "naive": [], "naive-mlp4c": []}
    for s in seqs:
        try:
            spec = base.replace(seq=int(s))
        except ValueError:
            for v in out.values():
                v.append(None)
            continue
        out["korthikanti"].append(predict(spec).activation_terms.per_layer)
        for method in ("naive", "naive-mlp4c"):
            pred = predict(spec, method=method)
            out[method].append(pred.activations / spec.arch.n_layers)
    return out


def plot_activations_vs_seq(df, records: list[dict], path: Path, max_panels: int = 6) -> Path | None:
    """Measured activation bytes per layer against s, each configuration with its formula curves."""
    import numpy as np

    ok = df[(df["status"] == "ok") & df["measured_activations_per_layer_bytes"].notna()]
    if ok.empty:
        return None
    specs = {r.get("spec_key"): r.get("spec") for r in records}
    groups: dict[str, list] = {}
    for _, r in ok.iterrows():
        spec = specs.get(r["spec_key"])
        if not spec or not spec.get("arch"):
            continue
        groups.setdefault(run_label(spec, without=("seq",), device=r["device"]), []).append(
            (r["seq"], r["measured_activations_per_layer_bytes"], spec)
        )
    # Configurations measured at several lengths first: those show the curve's shape.
    chosen = sorted(groups.items(), key=lambda kv: (-len({s for s, _, _ in kv[1]}), kv[0]))[:max_panels]
    if not chosen:
        return None
    plt = _pyplot()
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.9 * rows), squeeze=False)
    styles = {"korthikanti": ("C0", "-"), "naive": ("C3", ":"), "naive-mlp4c": ("C1", "--")}
    for ax, (label, pts) in zip(axes.flat, chosen, strict=False):
        seqs = sorted({int(s) for s, _, _ in pts})
        lo, hi = max(8, seqs[0] // 4), seqs[-1] * 2
        xs = sorted(set(np.unique(np.geomspace(lo, hi, 40).astype(int)).tolist()) | set(seqs))
        curves = _formula_curves(pts[0][2], xs)
        for method, ys in curves.items():
            xy = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
            if xy:
                color, ls = styles[method]
                ax.plot(*zip(*xy, strict=True), color=color, ls=ls, lw=1.2, label=f"{method} formula")
        ax.scatter([s for s, _, _ in pts], [m for _, m, _ in pts], color="k", zorder=3, label="measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _bytes_axis(ax, "y")
        ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("sequence length s", fontsize=8)
        ax.set_ylabel("activation bytes per layer", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(table_df, df, path: Path, min_tflops: float) -> Path | None:
    """Model TFLOP/s per configuration (bars), each run's bar (red tick), MFU written beside it."""
    timed = df[(df["status"] == "ok") & df["tflops_model"].notna()]
    if timed.empty:
        return None
    plt = _pyplot()
    labels = list(table_df["run"])
    values = [float(v) for v in timed["tflops_model"]]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.6))
    y = list(range(len(labels)))
    ax.barh(y, values, color="C0", alpha=0.8)
    bars = list(table_df["bar"])
    drew = False
    for yi, b in zip(y, bars, strict=True):
        if b != "-":
            ax.plot(
                [float(b.replace(",", ""))] * 2, [yi - 0.4, yi + 0.4], color="C3", lw=2, label=None if drew else "bar"
            )
            drew = True
    for yi, v, mfu in zip(y, values, list(table_df["MFU"]), strict=True):
        ax.text(v, yi, f" {v:.3g}" + (f" ({mfu} MFU)" if mfu != "-" else ""), va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("model TFLOP/s per GPU")
    note = f"bar: {min_tflops:g} TFLOP/s per A100, scaled by each GPU's half-precision peak"
    ax.set_title("Achieved throughput" + ("" if drew else " (no GPU runs: no bar)"), fontsize=10)
    if drew:
        ax.legend(fontsize=7, title=note, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The report


def build_report(
    target: str | Path,
    out_dir: str | Path | None = None,
    *,
    export: tuple[str, ...] = (),
    min_tflops: float | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html, the PNGs and the exports; return their paths by name."""
    from formulas.hardware import TFLOPS_BAR_A100

    min_tflops = TFLOPS_BAR_A100 if min_tflops is None else min_tflops
    path, records = load_records(target)
    out = Path(out_dir) if out_dir is not None else path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = frame(records)
    errors = error_frame(df)
    sweeps = sorted({s for s in df["sweep"].dropna()})
    name = ", ".join(sweeps) if sweeps else path.parent.name
    counts = df["status"].value_counts()
    written: dict[str, Path] = {}

    doc = Document(f"transformer-math report: {name}")
    doc.para(
        f"{len(df)} runs from `{path}` ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + "). Measured numbers sit next to the predictions of `formulas` (Transformer Math 101 for model "
        "states, Korthikanti et al. 2022 for activations); ratios are measured / predicted unless stated."
    )
    doc.heading("Environment")
    doc.table(environment_table(records))

    doc.heading("Measured vs predicted, per term (Korthikanti et al.)")
    terms = terms_table(df)
    if terms.empty:
        doc.para("No ok training runs.")
    else:
        doc.para(
            "Each cell: measured / predicted (measured ÷ predicted). Bytes per GPU; GiB = 2^30 bytes. On CPU runs "
            "with DeepSpeed offload the predicted total includes the offloaded terms: host and device are one memory."
        )
        doc.table(terms)
    png = plot_measured_vs_predicted(errors, out / "measured_vs_predicted.png")
    if png:
        written["measured_vs_predicted"] = png
        doc.image(png, "Measured (x) vs predicted (y) per term; the dashed line is y = x")
    inf = inference_table(df)
    if not inf.empty:
        doc.heading("Inference runs", 3)
        doc.table(inf)

    doc.heading("Prediction error by term and method")
    summary = error_summary(errors)
    if summary.empty:
        doc.para("No ok runs to compare.")
    else:
        doc.para(
            "predicted / measured: median [min–max] and the number of runs. `korthikanti`: the harness's "
            "formulas; `implementation`: the same plus the measured departures of the model and kernels that ran "
            "(`formulas/variants.py`, activations only); `naive`: the Q&A answer (4·L·C² params, no optimizer state, B·N·L·T·(T+2D) activations); "
            "`naive-mlp4c`: its 4C-MLP correction; `deepspeed`: DeepSpeed's ZeRO estimator (model states, ZeRO "
            "runs only)."
        )
        doc.table(summary)
    png = plot_error_distribution(errors, out / "error_by_term.png")
    if png:
        written["error_by_term"] = png
        doc.image(png, "predicted / measured by term and method (log scale; 1 is exact)")

    doc.heading("Activations against sequence length")
    png = plot_activations_vs_seq(df, records, out / "activations_vs_seq.png")
    if png:
        written["activations_vs_seq"] = png
        doc.para(
            "Measured bytes saved for backward per transformer layer (dots) and the per-layer formulas "
            "(lines) over s, for each configuration (up to six)."
        )
        doc.image(png, "Activation bytes per layer vs sequence length, measured and by formula")
    else:
        doc.para("No ok training runs with activation measurements.")

    doc.heading("Throughput")
    tp = throughput_table(df, records, min_tflops)
    if tp.empty:
        doc.para("No timed runs (fake-tensor runs on the meta device are not timed).")
    else:
        doc.para(
            f"Model TFLOP/s = (6·P + 12·L·s·h) FLOPs per token × tokens per step / median step time; the bar is "
            f"{min_tflops:g} TFLOP/s per A100 (Transformer Math 101) scaled by each GPU's half-precision peak "
            "(`tmath check --scale-to-gpu`). CPU runs have no bar and no MFU."
        )
        doc.table(tp)
        png = plot_throughput(tp, df, out / "throughput.png", min_tflops)
        if png:
            written["throughput"] = png
            doc.image(png, "Model TFLOP/s per configuration against the bar")

    oh = overhead_table(df)
    if not oh.empty:
        doc.heading("CUDA allocator and context overheads")
        doc.para("What the formulas do not count and `tmath calibrate` fits: reserved/allocated and NVML − reserved.")
        doc.table(oh)

    doc.heading("Failed runs")
    bad = failures_table(df)
    if bad.empty:
        doc.para("None: every run is ok.")
    else:
        doc.table(bad)

    methods = next((get(r, "measured.methods") for r in records if get(r, "measured.methods")), None)
    if isinstance(methods, dict):
        import pandas as pd

        doc.heading("How each term is measured")
        rows = [
            {"term": k, "method": "; ".join(f"{d}: {t}" for d, t in v.items()) if isinstance(v, dict) else str(v)}
            for k, v in methods.items()
        ]
        doc.table(pd.DataFrame(rows))

    md = out / "report.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    page = out / "report.html"
    page.write_text(doc.html(), encoding="utf-8")
    written["markdown"], written["html"] = md, page
    for fmt in export:
        target_file = out / f"runs.{fmt}"
        if fmt == "csv":
            df.to_csv(target_file, index=False)
        else:
            try:
                df.to_parquet(target_file, index=False)
            except ImportError as exc:
                raise UsageError(f"--export parquet needs pyarrow: pip install pyarrow ({exc})") from None
        written[fmt] = target_file
    return written


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="results directory (results/<sweep>) or a runs.jsonl file")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default DIR/report)")
    p.add_argument(
        "--export",
        action="append",
        default=[],
        choices=("csv", "parquet"),
        help="also write the flat table of every run (repeatable)",
    )
    p.add_argument("--min-tflops", type=float, help="TFLOP/s bar per A100 for the throughput table (default 115)")


def run(args) -> int:
    if args.min_tflops is not None and not args.min_tflops > 0:
        raise UsageError(f"--min-tflops must be positive, got {args.min_tflops:g}")
    written = build_report(args.dir, args.out, export=tuple(dict.fromkeys(args.export)), min_tflops=args.min_tflops)
    for name, path in written.items():
        print(f"{name:22} {path}")
    return 0
