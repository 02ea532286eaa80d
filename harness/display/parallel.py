"""The per-rank table of a tensor/pipeline/FSDP2 run: each rank's measured terms against its own prediction
(`formulas.ranks`, the record's `parallel` method) and the textbook per-GPU formula, with the rank's place
in the mesh and what its engine allocated beyond the terms (`harness.trainers.account.ParallelAccount`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from harness.display import console
from harness.formatting import ratio, size
from harness.records import Record
from harness.trainers.account import ParallelAccount


def _where(coords: dict[str, int], stages: list[int]) -> str:
    text = " ".join(f"{k}{v}" for k, v in coords.items())
    return text + (f" stage {','.join(map(str, stages))}" if stages else "")


def print_parallel_ranks(record: Record, con: Console | None = None) -> None:
    con = con or console()
    spec, m = record.spec, record.measured
    predicted = record.prediction("parallel")
    formula = record.prediction("korthikanti").memory_bytes
    by_rank = {r.rank: r for r in predicted.ranks} if predicted is not None else {}
    p = spec.parallel
    table = Table(
        title=f"Per rank ({predicted.engine if predicted else ''}, {len(m.ranks)} ranks): measured vs predicted for "
        "the rank (formulas/ranks.py) vs the per-GPU textbook formula",
        title_justify="left",
    )
    for col in ("rank", "term", "measured", "predicted", "meas/pred", "textbook", "note"):
        table.add_column(col, justify="left" if col in ("term", "note") else "right")
    for rank in m.ranks:
        pr = by_rank.get(rank.rank)
        if rank.measured is None or rank.measured.memory_bytes.is_empty() or pr is None:
            table.add_row(str(rank.rank), f"[red]{rank.status}[/red]", *["-"] * 4, "no measurement")
            continue
        mem = rank.measured.memory_bytes
        account = rank.measured.engine if isinstance(rank.measured.engine, ParallelAccount) else None
        layers = rank.measured.activations_by_layer or []
        per_layer = sum(layers) / len(layers) if layers else None
        extra = "; ".join(
            f"{k.replace('_', ' ')} {size(v)}" for k, v in (account.named_bytes if account else {}).items() if v
        )
        rows = [
            (
                "parameters (elements)",
                account.parameter_elements if account else None,
                pr.parameter_elements,
                None,
                _where(pr.coords, pr.stages) + f", {pr.blocks} blocks",
            ),
            ("weights", mem.weights, pr.weights, formula.weights, ""),
            ("gradients", mem.gradients, pr.gradients, formula.gradients, ""),
            ("optimizer", mem.optimizer, pr.optimizer, formula.optimizer, "AdamW step counters included"),
            (
                "activations per layer",
                per_layer,
                pr.activations_layers / max(pr.blocks, 1),  # the mean, as measured: the first layer keeps shared tables
                None,
                ", ".join(f"{k} {size(v // max(pr.blocks, 1))}" for k, v in pr.departures.items()),
            ),
            (
                "activations, one micro-batch",
                mem.activations,
                pr.activations,
                None,
                f"its {pr.blocks} blocks {size(mem.activations_layers)} (predicted {size(pr.activations_layers)})",
            ),
        ]
        if p.pp > 1:
            counted = account.in_flight_microbatches if account else None
            rows.append(("activations in flight", mem.activations_in_flight, pr.activations_in_flight,
                         formula.activations, f"{counted} stage forwards at once (predicted {pr.in_flight_microbatches})"))  # fmt: skip
        freed = mem.peak_backend_freed
        late = f"; {size(freed)} of it freed after the peak by a process group's thread" if freed else ""
        rows.append(("peak allocated", mem.peak_allocated, pr.peak, formula.total, (extra or "steady step") + late))
        for i, (term, measured, pred, textbook, note) in enumerate(rows):
            fmt = (lambda v: f"{v:,}" if v is not None else "-") if term.startswith("parameters") else size
            table.add_row(str(rank.rank) if i == 0 else "", term, fmt(measured), fmt(pred), ratio(measured, pred),
                          size(textbook), note)  # fmt: skip
        table.add_section()
    con.print(table)
    if predicted is not None and predicted.unmodelled:
        con.print("Not modelled: " + "; ".join(predicted.unmodelled))
    notes = {n for r in m.ranks if r.measured is not None and isinstance(r.measured.engine, ParallelAccount)
             for n in r.measured.engine.notes}  # fmt: skip
    for n in sorted(notes):
        con.print(f"Named: {n}")
