"""The report's plots (matplotlib, Agg): measured vs predicted, the error by term and method, activations
against sequence length with the formula curves, and throughput against the bar."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from formulas.predict import predict
from formulas.spec import RunSpec
from harness.formatting import size
from harness.predictions import METHODS, TERM_TITLES, TERMS
from harness.records import Record
from harness.report.tables import Timed, mfu_text
from harness.results import run_label


def save_figure(fig, path: Path, unused=()) -> Path:
    """Blank the panels a grid did not use, then write the PNG (110 dpi) and free the figure."""
    for ax in unused:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_MARKERS = {"cuda": "o", "cpu": "s", "meta": "^"}


def _bytes_axis(ax, axis: str = "both") -> None:
    """Log axis ticks at powers of two, labelled in KiB/MiB/GiB."""
    for name in ("x", "y"):
        if axis not in (name, "both"):
            continue
        a = getattr(ax, f"{name}axis")
        a.set_major_locator(LogLocator(base=2, numticks=7))
        a.set_major_formatter(FuncFormatter(lambda v, _: size(v).replace(".00", "")))
        a.set_minor_formatter(NullFormatter())


def plot_measured_vs_predicted(errors, path: Path) -> Path | None:
    """One log-log panel per term: measured (x) against the Korthikanti prediction (y), with y = x."""
    k = errors[errors["method"] == "korthikanti"]
    terms = [t for t in TERMS if not k[k["term"] == t].empty]
    if not terms:
        return None
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
    return save_figure(fig, path, unused=list(axes.flat)[len(terms) :])


def plot_error_distribution(errors, path: Path) -> Path | None:
    """predicted / measured on a log axis, one box per method within each term; 0 drawn at the floor."""
    if errors.empty:
        return None
    terms = [t for t in TERMS if not errors[errors["term"] == t].empty]
    methods = [m.name for m in METHODS if not errors[errors["method"] == m.name].empty]
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
    return save_figure(fig, path)


def _formula_curves(base: RunSpec, seqs: list[int]) -> dict[str, list[float | None]]:
    """Per-layer activation bytes of the Korthikanti and naive formulas at each sequence length."""
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
            out[method].append(pred.activations / spec.model.arch.n_layers)
    return out


def plot_activations_vs_seq(df, records: list[Record], path: Path, max_panels: int = 6) -> Path | None:
    """Measured activation bytes per layer against s, each configuration with its formula curves."""
    ok = df[(df["status"] == "ok") & df["measured_activations_per_layer_bytes"].notna()]
    if ok.empty:
        return None
    specs = {r.spec_key: r.spec for r in records}
    groups: dict[str, list] = {}
    for _, r in ok.iterrows():
        spec = specs.get(r["spec_key"])
        if spec is None or spec.model.arch is None:
            continue
        groups.setdefault(run_label(spec, without=("seq",), device=r["device"]), []).append(
            (r["seq"], r["measured_activations_per_layer_bytes"], spec)
        )
    # Configurations measured at several lengths first: those show the curve's shape.
    chosen = sorted(groups.items(), key=lambda kv: (-len({s for s, _, _ in kv[1]}), kv[0]))[:max_panels]
    if not chosen:
        return None
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
    return save_figure(fig, path, unused=list(axes.flat)[len(chosen) :])


def plot_throughput(timed: list[Timed], path: Path, min_tflops: float) -> Path | None:
    """Model TFLOP/s per configuration (bars), each run's bar (red tick), MFU written beside it."""
    if not timed:
        return None
    labels = [t.label for t in timed]
    values = [t.tflops_model for t in timed]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.6))
    y = list(range(len(labels)))
    ax.barh(y, values, color="C0", alpha=0.8)
    drew = False
    for yi, t in zip(y, timed, strict=True):
        if t.verdict.checked:
            ax.plot([t.verdict.bar] * 2, [yi - 0.4, yi + 0.4], color="C3", lw=2, label=None if drew else "bar")
            drew = True
    for yi, t in zip(y, timed, strict=True):
        mfu = f" ({mfu_text(t.mfu)} MFU)" if t.mfu is not None else ""
        ax.text(t.tflops_model, yi, f" {t.tflops_model:.3g}" + mfu, va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("model TFLOP/s per GPU")
    note = f"bar: {min_tflops:g} TFLOP/s per A100, scaled by each GPU's half-precision peak"
    ax.set_title("Achieved throughput" + ("" if drew else " (no GPU runs: no bar)"), fontsize=10)
    if drew:
        ax.legend(fontsize=7, title=note, title_fontsize=7)
    return save_figure(fig, path)
