"""One line per run of each results directory: what a GPU check measured, on one screen.

    python3 scripts/run_table.py DIR [DIR ...]

For each DIR/runs.jsonl (the newest record of each spec key, in first-run order, as the reports take them):
the run, precision, attention, status, the measured peak (`measured.memory_bytes.peak_allocated`) against
the predicted one (`predicted.peak.bytes`) and their ratio, model TFLOP/s and MFU (`measured.tflops.model`,
`measured.mfu`), and the attention kernel that ran (`measured.attention_kernel`, '-' where a record has
none). Plain JSON on purpose: it reads records of any harness version, and a torn last line (a run killed at
the time limit) is skipped with a note. A directory without runs.jsonl is a line saying so; exit 2 only for
no arguments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30
COLUMNS = ("run", "precision", "attention", "status", "peak GiB", "pred GiB", "meas/pred", "TFLOP/s", "MFU", "kernel")


def _get(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def run_name(spec: dict) -> str:
    """`gpt2 hf rc=full b8 s1024` plus ZeRO, offload and a non-preset depth when they apply."""
    parts = [str(spec.get("model"))]
    layers = _get(spec, "arch.n_layers")
    if layers is not None:
        parts.append(f"L{layers}")
    if spec.get("impl") not in (None, "reference"):
        parts.append(str(spec["impl"]))
    if spec.get("recompute") not in (None, "none"):
        parts.append(f"rc={spec['recompute']}")
    if spec.get("zero"):
        parts.append(f"z{spec['zero']}")
    offload = [k for k in ("offload_optimizer", "offload_params") if spec.get(k) not in (None, "none")]
    if offload:
        parts.append("off=" + "+".join(k.removeprefix("offload_")[:3] for k in offload))
    parts.append(f"b{spec.get('batch')} s{spec.get('seq')}")
    if spec.get("compile"):
        parts.append("compiled")
    return " ".join(parts)


def read(path: Path) -> tuple[list[dict], list[str]]:
    """The newest record per spec key, and notes about lines that are not records."""
    latest: dict[str, dict] = {}
    notes = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path}:{n}: not a JSON line (a write cut off?): skipped")
            continue
        if isinstance(record, dict):
            latest[str(record.get("spec_key", n))] = record
    return list(latest.values()), notes


def _num(value, fmt: str) -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)


def row(record: dict) -> tuple[str, ...]:
    spec = record.get("spec") or {}
    peak = _get(record, "measured.memory_bytes.peak_allocated")
    predicted = _get(record, "predicted.peak.bytes")
    ratio = peak / predicted if isinstance(peak, int) and isinstance(predicted, int) and predicted else None
    measured = record.get("measured") or {}
    kernel = measured.get("attention_kernel") if isinstance(measured, dict) else None
    return (
        run_name(spec),
        str(spec.get("precision", "-")),
        str(spec.get("attention", "-")),
        str(record.get("status", "-")),
        _num(peak / GIB if isinstance(peak, int) else None, ".3g"),
        _num(predicted / GIB if isinstance(predicted, int) else None, ".3g"),
        _num(ratio, ".3f"),
        _num(_get(record, "measured.tflops.model"), ".3g"),
        _num(_get(record, "measured.mfu"), ".1%"),
        "-" if kernel in (None, "") else str(kernel),
    )


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    right = {4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(COLUMNS), *(line(r) for r in rows)]


def main(argv: list[str]) -> int:
    if not argv:
        print("run_table: usage: run_table.py DIR [DIR ...]", file=sys.stderr)
        return 2
    for arg in argv:
        target = Path(arg)
        path = target / "runs.jsonl" if target.is_dir() or not target.suffix else target
        if not path.is_file():
            print(f"{target}: no runs.jsonl (nothing ran)")
            continue
        records, notes = read(path)
        counts: dict[str, int] = {}
        for r in records:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no records"
        print(f"{target}: {len(records)} runs ({summary})")
        if records:
            print("\n".join("  " + line for line in table([row(r) for r in records])))
        for note in notes:
            print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
