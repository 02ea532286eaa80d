"""Fit overhead factors from measured runs and write them as calibration.json (`harness.calibrate`)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from formulas.calibration import Calibration
from harness.calibrate import calibrate
from harness.errors import UsageError
from harness.formatting import error_percent, gib
from harness.results import check_writable, load_results


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="results directory (or its runs.jsonl)")
    p.add_argument("--out", metavar="FILE", help="where to write the JSON (default DIR/calibration.json)")
    p.add_argument(
        "--device", choices=("cuda", "cpu", "meta"), help="fit only this device's runs (default: CUDA when present)"
    )


def peak_lines(cal: Calibration) -> list[str]:
    """One line per device kind: its ratios, or why it got none, with leave-one-out beside uncalibrated."""
    lines = []
    for device, entry in cal.fit.get("peak_ratio", {}).items():
        check = ""
        if "loo_median_abs_error" in entry:
            check = (
                f"; |error| median {error_percent(entry['uncalibrated_median_abs_error'])} uncalibrated, "
                f"{error_percent(entry['loo_median_abs_error'])} leave-one-out (worst {error_percent(entry['uncalibrated_max_abs_error'])}"
                f" → {error_percent(entry['loo_max_abs_error'])})"
            )
        if device in cal.peak_ratio:
            ratios = ", ".join(f"{phase} {ratio:.4f}" for phase, ratio in cal.peak_ratio[device].items())
            lines.append(f"  peak allocated / predicted peak on {device}: {ratios}  (n {entry['n']}{check})")
        else:
            lines.append(f"  peak on {device}: no ratio, {entry['refused']}  (n {entry['n']}{check})")
    if not lines:
        lines.append("  peak: no training run with a walked peak prediction")
    return lines


def run(args) -> int:
    path, records = load_results(args.dir)
    out = check_writable(Path(args.out) if args.out else path.parent / "calibration.json")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    cal = calibrate(records, source=f"{path.parent} ({stamp})", device=args.device)
    try:
        out.write_text(json.dumps(cal.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    Calibration.load(out)  # what `tmath predict --calibration` will read

    def r2(name):
        v = cal.fit.get(name, {}).get("r2")
        return "" if v is None else f", r² {v:.4f}"

    def fitted(name, text):
        f = cal.fit.get(name, {})
        if "kept_default" in f:
            return f"{text}  (default: {f['reason']})"
        return f"{text}  (n {f.get('n')}{r2(name)})"

    print(f"calibration from {cal.source}")
    for line in peak_lines(cal):
        print(line)
    print(fitted("reserved_ratio", f"  reserved / allocated = {cal.reserved_ratio:.4f}"))
    context = "published CUDA context and cuBLAS workspaces" if cal.context_bytes is None else (
        f"{gib(cal.context_bytes, 3)} GiB")  # fmt: skip
    print(fitted("context_bytes", f"  context (NVML − reserved) = {context}"))
    print(fitted("inference_overhead", f"  inference peak / weights = {cal.inference_overhead:.3f} (rule: 1.2)"))
    if cal.achieved_fraction:
        for gpu, frac in cal.achieved_fraction.items():
            print(f"  achieved fraction of peak on {gpu} = {frac:.1%} (n {cal.fit['achieved_fraction'][gpu]['n']})")
    else:
        print(f"  achieved fraction of peak: none ({cal.fit['achieved_fraction']['reason']})")
    print(f"wrote {out}  (use: tmath predict ... --calibration {out})")
    return 0
