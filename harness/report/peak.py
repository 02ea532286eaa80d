"""The report's "peak: predicted vs measured" section: the walked step peak (`formulas.peak`, the `peak` method
of each record, predicted before the run) against the measured steady-step peak, by configuration family and
by phase, and the live bytes over one step with the predicted phase levels drawn over them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from formulas.families import hf_family
from formulas.peak import PHASES, PeakPrediction
from harness.formatting import size
from harness.records import Record
from harness.report.plots import save_figure
from harness.results import run_label

TOLERANCES = (0.05, 0.10)
"""The bands the section counts runs within (the issue's targets: ±5% for ≥ 90% of runs, ±10% for all)."""


@dataclass(frozen=True)
class PeakRow:
    """One ok training run: its measured steady peak beside the walk's prediction."""

    record: Record
    predicted: PeakPrediction
    measured: int
    measured_phase: str | None

    @property
    def error(self) -> float:
        """predicted / measured − 1."""
        return self.predicted.bytes / self.measured - 1

    @property
    def phase_matches(self) -> bool:
        return self.predicted.phase == self.measured_phase

    @property
    def sum_error(self) -> float | None:
        """The sum of the terms (Transformer Math 101 + Korthikanti) against the same measured peak."""
        k = self.record.prediction("korthikanti")
        return k.memory_bytes.total / self.measured - 1 if k is not None and k.memory_bytes.total else None

    @property
    def family(self) -> str:
        spec = self.record.spec
        p = spec.parallel
        if p.zero or p.gpus > 1:
            return f"DeepSpeed ZeRO-{p.zero} ×{p.gpus}"
        arch = spec.model.arch
        try:
            name = hf_family(arch)
        except ValueError:
            name = arch.family
        return f"{name} {spec.measurement.impl}"

    @property
    def label(self) -> str:
        return run_label(self.record.spec, device=self.record.device)


def peak_rows(records: list[Record]) -> list[PeakRow]:
    """Ok training runs with a measured steady peak and a walked prediction (not the sum-of-terms fallback)."""
    rows = []
    for r in records:
        pred = r.prediction("peak")
        peak = r.measured.memory_bytes.peak_allocated if r.status == "ok" else None
        if r.spec.measurement.mode != "train" or not peak or pred is None or pred.phase == "none":
            continue
        rows.append(PeakRow(r, pred, peak, (r.measured.peak_phase or {}).get("steady")))
    return rows


def unwalked(records: list[Record]) -> list[tuple[str, str]]:
    """(run, why) for ok training runs whose peak was not walked (the sum of the terms stands in)."""
    out = []
    for r in records:
        pred = r.prediction("peak")
        if r.status == "ok" and r.spec.measurement.mode == "train" and pred is not None and pred.phase == "none":
            out.append((run_label(r.spec, device=r.device), "; ".join(pred.unmodelled)))
    return out


def _within(rows: list[PeakRow], tol: float) -> int:
    return sum(abs(r.error) <= tol for r in rows)


def summary_text(rows: list[PeakRow]) -> str:
    n = len(rows)
    bands = ", ".join(f"{_within(rows, t)}/{n} within ±{t:.0%}" for t in TOLERANCES)
    errors = [abs(r.error) for r in rows]
    sums = [abs(e) for e in (r.sum_error for r in rows) if e is not None]
    text = (
        f"{n} training runs: the predicted peak is {bands} of the measured peak (median |error| "
        f"{statistics.median(errors):.2%}, worst {max(errors):.2%}); the predicted phase is the measured phase for "
        f"{sum(r.phase_matches for r in rows)}/{n}."
    )
    if sums:
        text += f" The sum of the terms, against the same peaks: median |error| {statistics.median(sums):.1%}."
    return text


def family_table(rows: list[PeakRow]) -> pd.DataFrame:
    """Error by configuration family (model family and implementation, or the DeepSpeed engine)."""
    out = []
    for family in sorted({r.family for r in rows}):
        mine = [r for r in rows if r.family == family]
        errors = [r.error for r in mine]
        sums = [e for e in (r.sum_error for r in mine) if e is not None]
        out.append(
            {
                "family": family,
                "runs": len(mine),
                "median error": f"{statistics.median(errors):+.2%}",
                "worst |error|": f"{max(abs(e) for e in errors):.2%}",
                **{f"within ±{t:.0%}": f"{_within(mine, t)}/{len(mine)}" for t in TOLERANCES},
                "phase matches": f"{sum(r.phase_matches for r in mine)}/{len(mine)}",
                "sum of terms, median error": f"{statistics.median(sums):+.1%}" if sums else "-",
            }
        )
    return pd.DataFrame(out)


def phase_table(rows: list[PeakRow]) -> pd.DataFrame:
    """Predicted phase (rows) against measured phase (columns): run counts."""
    measured = sorted({r.measured_phase or "-" for r in rows}, key=lambda p: (p not in PHASES, p))
    out = []
    for phase in [p for p in PHASES if any(r.predicted.phase == p for r in rows)]:
        mine = [r for r in rows if r.predicted.phase == phase]
        out.append({"predicted \\ measured": phase, **{m: sum((r.measured_phase or "-") == m for r in mine)
                                                       for m in measured}})  # fmt: skip
    return pd.DataFrame(out)


def runs_table(rows: list[PeakRow]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "run": r.label,
                "measured peak": size(r.measured),
                "predicted peak": size(r.predicted.bytes),
                "error": f"{r.error:+.2%}",
                "measured phase": r.measured_phase or "-",
                "predicted (moment)": r.predicted.moment,
            }
            for r in rows
        ]
    )


def timeline_runs(rows: list[PeakRow], limit: int = 4) -> list[PeakRow]:
    """Up to `limit` runs with a timeline, one per kind of peak (the predicted moment; ZeRO apart), the
    largest run of each kind."""
    chosen: dict[str, PeakRow] = {}
    for r in sorted(rows, key=lambda r: -r.measured):
        timeline = r.record.measured.timeline
        if timeline is None or not timeline.live_bytes:
            continue
        key = r.predicted.moment.split(", rank")[0] + (" (ZeRO)" if r.family.startswith("DeepSpeed") else "")
        chosen.setdefault(key, r)
    return list(chosen.values())[:limit]


def plot_timelines(rows: list[PeakRow], path: Path) -> Path | None:
    """Live bytes over the steady step (the tracker's timeline, coloured by phase) with each phase's predicted
    peak drawn as a level across that phase, and the sum of the terms dotted."""
    chosen = timeline_runs(rows)
    if not chosen:
        return None
    colours = {"activations": "tab:blue", "backward": "tab:orange", "optimizer step": "tab:green"}
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9.5, 2.9 * len(chosen)), squeeze=False)
    for ax, row in zip(axes.flat, chosen, strict=True):
        timeline = row.record.measured.timeline
        unit, scale = ("GiB", 2**30) if max(timeline.live_bytes) >= 2**30 else ("MiB", 2**20)
        gib = [b / scale for b in timeline.live_bytes]
        x = range(len(gib))
        ax.plot(x, gib, color="0.6", lw=0.8, zorder=1)
        for phase, colour in colours.items():
            idx = [i for i, p in enumerate(timeline.phase) if p == phase]
            if not idx:
                continue
            ax.scatter(idx, [gib[i] for i in idx], s=4, color=colour, label=f"measured, {phase}", zorder=2)
            level = next((p.bytes for p in row.predicted.phases if p.phase == phase), None)
            if level is not None:
                ax.hlines(level / scale, min(idx), max(idx), colors=colour, linestyles="--", lw=1.4, zorder=3)
        k = row.record.prediction("korthikanti")
        if k is not None and k.memory_bytes.total:
            ax.axhline(k.memory_bytes.total / scale, color="k", ls=":", lw=1, label="sum of the terms")
        ax.set_title(f"{row.label}: predicted {size(row.predicted.bytes)} ({row.predicted.phase}), measured "
                     f"{size(row.measured)} ({row.error:+.2%})", fontsize=8.5)  # fmt: skip
        ax.set_ylabel(f"live {unit}")
        ax.set_xlabel("op (downsampled) over one steady step; dashed: each phase's predicted peak")
        ax.legend(fontsize=6.5, loc="best", ncol=2)
    return save_figure(fig, path)
