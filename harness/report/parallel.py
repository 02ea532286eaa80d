"""The report's "3D parallel, per rank" section: every rank of each tensor/pipeline/FSDP2 run against its own
prediction (`formulas.ranks`, the record's `parallel` method), the worst rank per term, and the pipeline
schedules' in-flight micro-batches measured against the schedules' counts."""

from __future__ import annotations

import pandas as pd

from formulas import activations as act
from formulas.precision import activation_bytes_per_element
from formulas.variants import activation_variant
from harness.records import Record
from harness.results import run_label

TERMS = ("weights", "gradients", "optimizer", "activations", "activations_layers", "activations_in_flight", "peak")


def parallel_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.status == "ok" and r.prediction("parallel") is not None and r.measured.ranks]


def _measured(rank, term: str):
    mem = rank.measured.memory_bytes
    return mem.peak_allocated if term == "peak" else getattr(mem, term)


def _layout(r: Record) -> str:
    p = r.spec.parallel
    parts = [f"{k}{v}" for k, v in (("tp", p.tp), ("pp", p.pp), ("dp", p.dp)) if v > 1]
    if p.sequence_parallel:
        parts.append("sp")
    if p.pp > 1:
        parts.append(f"{p.pp_schedule} M{p.n_microbatches}" + (f" v{p.virtual_stages}" if p.virtual_stages > 1 else ""))
    if p.dp_shard == "fsdp2":
        parts.append("fsdp2" + ("" if p.reshard_after_forward else " no-reshard"))
    return " ".join(parts) + f" · {r.spec.training.precision}"


def _korthikanti_row(r: Record) -> int:
    """Korthikanti et al.'s Table 2 row at t (with or without sp), for the implementation's element and mask
    bytes and norm statistics: the textbook count the per-layer measurement is held against."""
    arch, t, p = r.spec.model.arch, r.spec.training, r.spec.parallel
    v = activation_variant(arch, impl="reference", precision=t.precision, attention=t.attention,
                           recompute=t.recompute, device=r.device)  # fmt: skip
    return act.layer_bytes(arch, t.seq, t.batch, elem_bytes=activation_bytes_per_element(t.precision),
                           mask_bytes=v.mask_bytes, recompute=t.recompute, attention=t.attention, tp=p.tp,
                           sequence_parallel=p.sequence_parallel, stats_bytes=v.stats_bytes)  # fmt: skip


def worst_table(records: list[Record]) -> pd.DataFrame:
    """Per run: the largest |measured / predicted − 1| over its ranks, per term; the per-layer activations
    against Korthikanti's t-row beside them."""
    rows = []
    for r in parallel_records(records):
        pred = {x.rank: x for x in r.prediction("parallel").ranks}
        row = {"run": run_label(r.spec, device=r.device), "layout": _layout(r), "ranks": len(r.measured.ranks)}
        for term in TERMS:
            errs = []
            for rank in r.measured.ranks:
                got, want = _measured(rank, term), getattr(pred[rank.rank], term)
                if got is not None and want:
                    errs.append(got / want - 1)
            row[term] = f"{max(errs, key=abs):+.3%}" if errs else "-"
        layers = r.measured.ranks[0].measured.activations_by_layer or []
        if layers:
            paper = _korthikanti_row(r)
            row["per layer vs Korthikanti"] = f"{layers[-1] / paper:.3f}"
            row["named"] = ", ".join(sorted({k for x in pred.values() for k in x.departures})) or "-"
        rows.append(row)
    return pd.DataFrame(rows)


def in_flight_table(records: list[Record]) -> pd.DataFrame:
    """Pipeline runs, per pipeline rank: stage forwards alive at once, measured vs the schedule's count, and
    the in-flight bytes against count × the rank's bytes per micro-batch."""
    rows = []
    for r in parallel_records(records):
        p = r.spec.parallel
        if p.pp == 1:
            continue
        pred = {x.rank: x for x in r.prediction("parallel").ranks}
        for rank in r.measured.ranks:
            if rank.measured.engine is None or rank.measured.engine.coords.get("tp", 0) != 0:
                continue
            x, account, mem = pred[rank.rank], rank.measured.engine, rank.measured.memory_bytes
            rows.append({
                "layout": _layout(r), "pp rank": x.coords["pp"], "stages": ",".join(map(str, x.stages)),
                "forwards in flight (measured)": account.in_flight_microbatches,
                "predicted": x.in_flight_microbatches,
                "in-flight bytes": mem.activations_in_flight,
                "predicted bytes": x.activations_in_flight,
                "ratio": f"{mem.activations_in_flight / x.activations_in_flight:.4f}"
                if mem.activations_in_flight and x.activations_in_flight else "-",
            })  # fmt: skip
    return pd.DataFrame(rows)


def section(doc, records: list[Record]) -> None:
    runs = parallel_records(records)
    if not runs:
        return
    doc.heading("3D parallel, per rank")
    doc.para(
        f"{len(runs)} runs on torch's engines (DTensor tensor/sequence parallel, torch.distributed.pipelining, "
        "FSDP2). Each rank is compared with its own prediction (`formulas/ranks.py`: DTensor's and FSDP2's "
        "shards, Korthikanti's t-rows, the schedule's in-flight micro-batches, a walk of the step's peak); a cell "
        "is the worst rank's measured / predicted − 1. The last columns hold the per-layer bytes against "
        "Korthikanti et al.'s Table 2 row at t, and the named departures the prediction includes."
    )
    doc.table(worst_table(records))
    flight = in_flight_table(records)
    if not flight.empty:
        doc.heading("Pipeline micro-batches in flight", 3)
        doc.para(
            "Per pipeline rank (its first tensor-parallel rank): the most (stage, micro-batch) forwards whose "
            "saved tensors were alive at once, measured by the trainer's saved-tensor ledger, against "
            "`formulas.parallel.in_flight_chunks` (GPipe M; 1F1B min(M, pp − r); interleaved (v − 1)·R + 2·(pp − 1 "
            "− r) + 1); and the most saved bytes alive at once against that count × the rank's bytes per micro-batch."
        )
        doc.table(flight)
