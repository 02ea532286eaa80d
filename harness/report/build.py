"""Build the report of a results directory: report.md, a self-contained report.html, the PNGs, the exports."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from formulas.hardware import TFLOPS_BAR_A100
from harness.errors import UsageError
from harness.predictions import METHODS
from harness.report.document import Document
from harness.report.finetune import section as finetune_section
from harness.report.frame import error_frame, frame
from harness.report.parallel import section as parallel_section
from harness.report.peak import family_table, peak_rows, phase_table, plot_timelines, runs_table, summary_text, unwalked
from harness.report.plots import (
    plot_activations_vs_seq,
    plot_error_distribution,
    plot_measured_vs_predicted,
    plot_throughput,
)
from harness.report.tables import (
    environment_table,
    error_summary,
    failures_table,
    inference_table,
    overhead_table,
    terms_table,
    throughput_table,
    timed_runs,
)
from harness.results import check_writable_dir, load_results


def build_report(
    target: str | Path,
    out_dir: str | Path | None = None,
    *,
    export: tuple[str, ...] = (),
    min_tflops: float | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html, the PNGs and the exports; return their paths by name."""
    min_tflops = TFLOPS_BAR_A100 if min_tflops is None else min_tflops
    path, records = load_results(target)
    out = check_writable_dir(Path(out_dir) if out_dir is not None else path.parent / "report")
    df = frame(records)
    errors = error_frame(df)
    sweeps = sorted({s for s in df["sweep"].dropna()})
    name = ", ".join(sweeps) if sweeps else path.parent.name
    counts = df["status"].value_counts()

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
    doc.table_or(
        terms_table(df),
        "No ok training runs.",
        "Each cell: measured / predicted (measured ÷ predicted). Bytes per GPU; GiB = 2^30 bytes. On CPU runs "
        "with DeepSpeed offload the predicted total includes the offloaded terms: host and device are one memory.",
    )
    doc.figure(
        plot_measured_vs_predicted(errors, out / "measured_vs_predicted.png"),
        "Measured (x) vs predicted (y) per term; the dashed line is y = x",
    )
    inf = inference_table(df)
    if not inf.empty:
        doc.heading("Inference runs", 3)
        doc.table(inf)

    doc.heading("Prediction error by term and method")
    doc.table_or(
        error_summary(errors),
        "No ok runs to compare.",
        "predicted / measured: median [min–max] and the number of runs. "
        + "; ".join(f"`{m.name}`: {m.description}" for m in METHODS)
        + ".",
    )
    doc.figure(
        plot_error_distribution(errors, out / "error_by_term.png"),
        "predicted / measured by term and method (log scale; 1 is exact)",
    )

    peaks = peak_rows(records)
    if peaks:
        doc.heading("peak: predicted vs measured")
        doc.para(
            summary_text(peaks)
            + " The prediction is `formulas/peak.py`'s walk of the step (recorded as the `peak` method before the "
            "run, uncalibrated), for the implementation, device and engine that ran; the measurement is the exact "
            "live-bytes tracker's peak over the steady step (CUDA: max_memory_allocated), of the rank that peaked "
            "highest."
        )
        doc.heading("By configuration family", 3)
        doc.table(family_table(peaks))
        doc.heading("The phase that peaked", 3)
        doc.para("Runs by predicted phase (rows) and measured phase (columns).")
        doc.table(phase_table(peaks))
        doc.figure(
            plot_timelines(peaks, out / "peak_timeline.png"),
            "Live bytes over one steady step with the predicted phase levels",
            "Live bytes after each op of the steady step (downsampled to 400 points, each the largest of its "
            "stretch), coloured by phase; the dashed level over each phase is its predicted peak, the dotted line "
            "the sum of the terms.",
        )
        doc.heading("Every run", 3)
        doc.table(runs_table(peaks))
        missing = unwalked(records)
        if missing:
            doc.para(
                "Not walked (the sum of the terms stands in, and says why): "
                + "; ".join(f"{label}: {why}" for label, why in missing)
                + "."
            )

    parallel_section(doc, records)
    finetune_section(doc, records)

    doc.heading("Activations against sequence length")
    shown = doc.figure(
        plot_activations_vs_seq(df, records, out / "activations_vs_seq.png"),
        "Activation bytes per layer vs sequence length, measured and by formula",
        "Measured bytes saved for backward per transformer layer (dots) and the per-layer formulas "
        "(lines) over s, for each configuration (up to six).",
    )
    if not shown:
        doc.para("No ok training runs with activation measurements.")

    doc.heading("Throughput")
    timed = timed_runs(df, records, min_tflops)
    if not timed:
        doc.para("No timed runs (fake-tensor runs on the meta device are not timed).")
    else:
        doc.para(
            f"Model TFLOP/s = (6·P + 12·L·s·h) FLOPs per token × tokens per step / median step time; the bar is "
            f"{min_tflops:g} TFLOP/s per A100 (Transformer Math 101) scaled by each GPU's half-precision peak "
            "(`tmath check --scale-to-gpu`). CPU runs have no bar and no MFU."
        )
        doc.table(throughput_table(timed))
        doc.figure(
            plot_throughput(timed, out / "throughput.png", min_tflops),
            "Model TFLOP/s per configuration against the bar",
        )

    oh = overhead_table(df)
    if not oh.empty:
        doc.heading("CUDA allocator and context overheads")
        doc.para("What the formulas do not count and `tmath calibrate` fits: reserved/allocated and NVML − reserved.")
        doc.table(oh)

    doc.heading("Failed runs")
    doc.table_or(failures_table(df), "None: every run is ok.")

    methods = next((r.measured.methods for r in records if r.measured.methods), None)
    if methods:
        doc.heading("How each term is measured")
        rows = [
            {"term": k, "method": "; ".join(f"{d}: {t}" for d, t in v.items()) if isinstance(v, dict) else str(v)}
            for k, v in methods.items()
        ]
        doc.table(pd.DataFrame(rows))

    written: dict[str, Path] = {png.stem: png for png in doc.images}
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
