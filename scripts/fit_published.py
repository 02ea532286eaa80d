"""Fit the planner's efficiency on half of the published runs and test it on the other half.

    .venv/bin/python scripts/fit_published.py     # writes results/plan/published-fit.json

The rows and their sources: results/plan/published.csv, results/plan/SOURCES.md; the method:
`harness.plan.published`. `formulas.plan.EFFICIENCY` is the value this writes (tests/test_plan.py checks).
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.plan.published import best_efficiency, fit_efficiency, load_rows, median_abs_error, scored, split

ROWS = Path("results/plan/published.csv")
OUT = Path("results/plan/published-fit.json")


def h100_over_a100(rows: list[dict]) -> list[dict]:
    """llm-foundry's H100 rows beside the A100 80GB row of the same model, sequence, micro-batch, recompute and
    GPU count: the ratio of their published MFU (each of its own GPU's peak)."""
    key = ("model", "seq", "micro_batch", "recompute", "gpus")
    a100 = {tuple(r[k] for k in key): r for r in rows if r["source"] == "llm-foundry-a100" and r["gpu"] == "a100-80gb"}
    pairs = []
    for r in rows:
        other = a100.get(tuple(r[k] for k in key)) if r["source"] == "llm-foundry-h100" else None
        if other is not None:
            pairs.append({"h100": r["row_id"], "a100": other["row_id"], "model": r["model"], "seq": int(r["seq"]),
                          "gpus": int(r["gpus"]), "recompute": r["recompute"],
                          "ratio": float(r["published_mfu"]) / float(other["published_mfu"])})  # fmt: skip
    return pairs


def held_out_floor(rows: list[dict]) -> dict:
    """The lowest held-out median |error| any single efficiency reaches, that efficiency chosen on the held-out
    half itself (0.400-0.799 in steps of 0.001). Not a prediction: the floor of the step-time model's shape, what
    no fit of its one constant can go below."""
    held = scored(split(rows)[1])
    best = min((median_abs_error(e / 1000, held), e / 1000) for e in range(400, 800))
    return {
        "efficiency": best[1],
        "held_out_median_abs_error": best[0],
        "note": held_out_floor.__doc__.replace("\n    ", " ").strip(),
    }


def swapped_halves(rows: list[dict]) -> dict:
    """The same method with the halves' roles swapped: the efficiency fitted on the held-out half (the same scan,
    0.200-0.900 in steps of 0.001, coarse then fine) and tested on the fit half, to show the result does not
    hang on which half fits."""
    fit, held = (scored(half) for half in split(rows))
    best = best_efficiency(held)
    return {"efficiency": best, "tested_rows": len(fit), "tested_median_abs_error": median_abs_error(best, fit),
            "note": swapped_halves.__doc__.replace("\n    ", " ").strip()}  # fmt: skip


def own_constants(rows: list[dict], key: str) -> dict:
    """A diagnostic beside the fit, not the planner's method: one efficiency per value of the row's `key`
    (its source: a software stack on a GPU; or its GPU), each fitted on the fit half of those rows (the same
    alternation within each source), and the held-out median |error| over all rows under their own group's
    constant. Per source, it measures how much of the miss lies between software stacks (a constant that
    `--efficiency` or a calibration supplies for the stack at hand) and how much within them; per GPU, whether
    the GPU alone would carry it."""
    rows = scored(rows)
    fits = {g: fit_efficiency([r for r in rows if r[key] == g]) for g in sorted({r[key] for r in rows})}
    held = [x for f in fits.values() for x in f["rows"] if x["half"] == "held out" and x["error"] is not None]
    by_source = {s: statistics.median(x["error"] for x in held if x["source"] == s)
                 for s in sorted({x["source"] for x in held})}  # fmt: skip
    return {
        "by": key,
        "efficiency": {g: f["efficiency"] for g, f in fits.items()},
        "held_out_rows": len(held),
        "held_out_median_abs_error": statistics.median(abs(x["error"]) for x in held),
        "held_out_median_error_by_source": by_source,
        "note": own_constants.__doc__.replace("\n    ", " ").strip(),
    }


def main() -> int:
    rows = load_rows(ROWS)
    fit = fit_efficiency(rows)
    groups = collections.defaultdict(list)
    for row in fit["rows"]:
        if row["error"] is not None:
            groups[(row["source"], row["half"])].append(row["error"])
    fit["by_source"] = {f"{s} ({h})": {"rows": len(v), "median_error": statistics.median(v),
                                       "median_abs_error": statistics.median(abs(x) for x in v)}
                        for (s, h), v in sorted(groups.items())}  # fmt: skip
    fit["unscored"] = [r["row_id"] for r in fit["rows"] if r["error"] is None]
    fit["h100_over_a100"] = h100_over_a100(rows)
    fit["held_out_floor"] = held_out_floor(rows)
    fit["swapped_halves"] = swapped_halves(rows)
    fit["own_constants"] = [own_constants(rows, key) for key in ("source", "gpu")]
    OUT.write_text(json.dumps(fit, indent=2) + "\n")
    print(f"efficiency {fit['efficiency']:.3f}: fit median |error| {fit['fit_median_abs_error']:.1%} "
          f"({fit['fit_rows']} rows), held out {fit['held_out_median_abs_error']:.1%} ({fit['held_out_rows']} rows)")  # fmt: skip
    for name, g in fit["by_source"].items():
        print(
            f"  {name:40} {g['rows']:3} rows  median {g['median_error']:+.1%}  median |error| {g['median_abs_error']:.1%}"
        )
    floor = fit["held_out_floor"]
    print(
        f"  floor: the best any one efficiency reaches on the held-out half, chosen on it: "
        f"{floor['held_out_median_abs_error']:.1%} at {floor['efficiency']:.3f}"
    )
    swap = fit["swapped_halves"]
    print(
        f"  halves swapped: efficiency {swap['efficiency']:.3f}, median |error| {swap['tested_median_abs_error']:.1%} "
        f"on the fit half ({swap['tested_rows']} rows)"
    )
    for own in fit["own_constants"]:
        print(
            f"  each {own['by']} its own efficiency (a diagnostic): held out {own['held_out_median_abs_error']:.1%} "
            f"({own['held_out_rows']} rows); " + ", ".join(f"{k} {v:.3f}" for k, v in own["efficiency"].items())
        )
        print(
            "    held-out median error by source: "
            + ", ".join(f"{k} {v:+.1%}" for k, v in own["held_out_median_error_by_source"].items())
        )
    print(f"  not scored (no layout published): {', '.join(fit['unscored'])}")
    short = [p["ratio"] for p in fit["h100_over_a100"] if p["seq"] <= 4096 and p["gpus"] == 8]
    print(f"  llm-foundry H100 / A100 80GB published MFU, same model, seq, micro-batch, recompute and GPUs: "
          f"{len(fit['h100_over_a100'])} pairs; on 8 GPUs at s <= 4096 {min(short):.3f}-{max(short):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
