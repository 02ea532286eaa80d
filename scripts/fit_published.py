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

from harness.plan.published import fit_efficiency, load_rows

ROWS = Path("results/plan/published.csv")
OUT = Path("results/plan/published-fit.json")


def main() -> int:
    fit = fit_efficiency(load_rows(ROWS))
    groups = collections.defaultdict(list)
    for row in fit["rows"]:
        if row["error"] is not None:
            groups[(row["source"], row["half"])].append(row["error"])
    fit["by_source"] = {f"{s} ({h})": {"rows": len(v), "median_error": statistics.median(v),
                                       "median_abs_error": statistics.median(abs(x) for x in v)}
                        for (s, h), v in sorted(groups.items())}  # fmt: skip
    fit["unscored"] = [r["row_id"] for r in fit["rows"] if r["error"] is None]
    OUT.write_text(json.dumps(fit, indent=2) + "\n")
    print(f"efficiency {fit['efficiency']:.3f}: fit median |error| {fit['fit_median_abs_error']:.1%} "
          f"({fit['fit_rows']} rows), held out {fit['held_out_median_abs_error']:.1%} ({fit['held_out_rows']} rows)")  # fmt: skip
    for name, g in fit["by_source"].items():
        print(
            f"  {name:40} {g['rows']:3} rows  median {g['median_error']:+.1%}  median |error| {g['median_abs_error']:.1%}"
        )
    print(f"  not scored (no layout published): {', '.join(fit['unscored'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
