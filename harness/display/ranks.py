"""The per-rank table of a multi-rank run: measured vs the formula vs DeepSpeed's estimator, with what
explains each difference (read from the rank's engine account, `harness.zero.account.ZeroAccount`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from harness.display import console
from harness.formatting import ratio, size
from harness.records import RankResult, Record
from harness.zero.account import ZeroAccount


def rank_notes(rank: RankResult, precision: str) -> dict[str, str]:
    """What explains each term's difference from the formula, from the rank's measured account."""
    zero = rank.measured.engine if rank.measured is not None else None
    notes: dict[str, list[str]] = {k: [] for k in ("weights", "gradients", "optimizer", "live", "extras", "host")}
    if not isinstance(zero, ZeroAccount):
        return {k: "" for k in notes}
    ex = zero.explained_bytes
    notes["host"] = [f"{term} {size(nbytes)}" for term, nbytes in zero.host_bytes.items() if nbytes]
    if ex.weights_alignment_padding_bytes:
        notes["weights"].append(f"alignment padding {size(ex.weights_alignment_padding_bytes)}")
    if ex.weights_persistent_parameter_bytes:
        threshold = zero.buckets.param_persistence_threshold
        notes["weights"].append(
            f"persistent params {size(ex.weights_persistent_parameter_bytes)} (< {threshold} elements, whole)"
        )
    if ex.weights_gather_padding_bytes:
        notes["weights"].append(f"all-gather padding {size(ex.weights_gather_padding_bytes)}")
    if ex.weights_partition_padding_bytes:
        notes["weights"].append(f"partition padding {size(ex.weights_partition_padding_bytes)}")
    if ex.gradients_boundary_parameter_bytes:
        notes["gradients"].append(f"boundary params {size(ex.gradients_boundary_parameter_bytes)}")
    after_backward, steady = zero.snapshots.get("after_backward"), zero.snapshots.get("steady")
    for h in after_backward.held_in("gradients") if after_backward is not None else []:
        if "padding" in h.name:
            notes["gradients"].append(f"padding {size(h.nbytes)}")
    if ex.gradients_before_reduction_bytes is not None:
        notes["gradients"].append(f"full {size(ex.gradients_before_reduction_bytes)} until reduced at backward end")
    if precision == "fp32" and steady is not None:
        master = sum(h.nbytes for h in steady.held_in("optimizer") if "master" in h.name)
        if master:
            notes["optimizer"].append(f"fp32 master {size(master)} (kept for fp32 params too)")
    if ex.zero3_gathered_forward_max_bytes is not None:
        z = zero.config.get("zero_optimization") or {}
        notes["live"].append(
            f"gathered at a forward (backward max {size(ex.zero3_gathered_backward_max_bytes)}); "
            f"stage3_max_live_parameters {z.get('stage3_max_live_parameters', 10**9):.3g}, "
            f"max_reuse_distance {z.get('stage3_max_reuse_distance', 10**9):.3g}"
        )
    for h in steady.held_in("extras") if steady is not None else []:
        notes["extras"].append(f"{h.name} {size(h.nbytes)}")
    if ex.reduce_bucket_bytes_max:
        notes["extras"].append(f"IPG bucket during backward {size(ex.reduce_bucket_bytes_max)}")
    return {k: "; ".join(v) for k, v in notes.items()}


def print_ranks(record: Record, con: Console | None = None) -> None:
    """Per rank × term: measured, the formula, DeepSpeed's estimator, and what explains the differences."""
    con = con or console()
    spec, m = record.spec, record.measured
    formula = record.prediction("korthikanti")
    pmem = formula.memory_bytes
    est = record.prediction("deepspeed")
    est_terms = est.terms if est is not None else {}
    est_name = est.function if est is not None else "no DeepSpeed estimator below stage 2"
    table = Table(
        title=f"Model states per rank (ZeRO-{spec.parallel.zero}, {m.world_size or len(m.ranks)} ranks): "
        f"measured vs formula vs DeepSpeed's {est_name}",
        title_justify="left",
    )
    for col in ("rank", "term", "measured", "formula", "meas/formula", "DeepSpeed", "meas/DS", "named differences"):
        table.add_column(col, justify="left" if col in ("term", "named differences") else "right")
    for rank in m.ranks:
        if rank.measured is None or rank.measured.memory_bytes.is_empty():
            table.add_row(str(rank.rank), f"[red]{rank.status}[/red]", *["-"] * 5, "no measurement")
            continue
        mem = rank.measured.memory_bytes
        notes = rank_notes(rank, spec.training.precision)
        live_formula = pmem.zero3_live_params or 0
        states = sum(
            getattr(mem, k) or 0 for k in ("weights", "gradients", "optimizer", "zero3_live_params", "zero_extras")
        )
        formula_states = sum(getattr(pmem, k) or 0 for k in ("weights", "gradients", "optimizer")) + live_formula
        rows = [
            (term, getattr(mem, term), getattr(pmem, term), est_terms.get(term), notes[term])
            for term in ("weights", "gradients", "optimizer")
        ]
        if spec.parallel.zero == 3:
            rows.append(("zero-3 live params", mem.zero3_live_params, live_formula,
                         est_terms.get("zero3_live_params"), notes["live"]))  # fmt: skip
        rows.append(("ZeRO buffers (extras)", mem.zero_extras, None, None, notes["extras"]))
        rows.append(("model states", states, formula_states, est.memory_bytes.gpu if est is not None else None,
                     "sum of the rows above; DeepSpeed: its per-GPU total"))  # fmt: skip
        offload = spec.parallel.offload_optimizer != "none" or spec.parallel.offload_params != "none"
        if mem.host_model_states or offload:
            host_formula = formula.host_memory_bytes.total if formula.host_memory_bytes is not None else None
            rows.append(("host (offloaded)", mem.host_model_states, host_formula,
                         est.memory_bytes.cpu if est is not None else None,
                         notes["host"] or "DeepSpeed: per-node CPU estimate"))  # fmt: skip
        rows.append(("activations", mem.activations, pmem.activations, None, ""))
        rows.append(("peak allocated", mem.peak_allocated, pmem.total, None, "steady step"))
        for i, (term, measured, predicted, ds, note) in enumerate(rows):
            table.add_row(str(rank.rank) if i == 0 else "", term, size(measured), size(predicted),
                          ratio(measured, predicted), size(ds), ratio(measured, ds), note)  # fmt: skip
        table.add_section()
    con.print(table)
    accounts = [(r.rank, r.measured.engine) for r in m.ranks if r.measured is not None]
    accounts = [(n, z) for n, z in accounts if isinstance(z, ZeroAccount)]
    if not accounts:
        return
    zero = accounts[0][1]
    b = zero.buckets
    con.print(
        f"DeepSpeed {zero.optimizer_class} over {zero.base_optimizer_class}; buckets (elements): "
        f"reduce {b.reduce_bucket_elements}, all-gather {b.allgather_bucket_elements}"
        + (
            f", prefetch {b.prefetch_bucket_elements}, persistence threshold {b.param_persistence_threshold}"
            if spec.parallel.zero == 3
            else ""
        )
        + f"; overlap_comm {b.overlap_comm}"
    )
    parts = []
    for n, account in accounts:
        shown = []
        for name, snap in account.snapshots.items():
            phases = ", ".join(f"{c} {size(v)}" for c, v in snap.residual_by_phase.items() if v)
            shown.append(f"{name} {size(snap.residual_bytes)}" + (f" ({phases})" if phases else ""))
        parts.append(f"rank {n}: " + ", ".join(shown))
    con.print("Unaccounted (live bytes − everything walked in the engine): " + "; ".join(parts))
