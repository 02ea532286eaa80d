"""Terminal tables (rich): a prediction (`prediction`), a measurement (`measurement`), its ranks (`ranks`).

Numbers stay integers until here (`harness.formatting`); GiB = 2**30 bytes.
"""

from __future__ import annotations

import shutil

from rich.console import Console

from formulas.spec import RunSpec
from harness.formatting import human


def console() -> Console:
    """A console that does not squeeze tables when stdout is a pipe or a file."""
    width = shutil.get_terminal_size((140, 40)).columns
    return Console(width=max(width, 140), soft_wrap=False, highlight=False)


def run_title(spec: RunSpec) -> str:
    """One line naming the configuration: model, precision, optimizer, layout, shape."""
    parts = [spec.model.name if spec.model.arch is not None else f"{human(spec.model.params)} params"]
    parts.append(spec.training.precision)
    parts.append(spec.training.optimizer)
    layout = f"ZeRO-{spec.parallel.zero}" if spec.parallel.zero else "no ZeRO"
    layout += f", {spec.parallel.gpus} GPU{'s' if spec.parallel.gpus > 1 else ''} (dp {spec.parallel.dp}"
    layout += f", tp {spec.parallel.tp}" if spec.parallel.tp > 1 else ""
    layout += f", pp {spec.parallel.pp}" if spec.parallel.pp > 1 else ""
    parts.append(layout + ")")
    if spec.model.arch is not None:
        parts.append(f"b={spec.training.batch} s={spec.training.seq}")
        parts.append(f"recompute {spec.training.recompute}, {spec.training.attention} attention")
    return " · ".join(parts)
