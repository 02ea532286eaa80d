"""The engine walks behind the planner's shortlist: where `formulas.peak` or `formulas.ranks` walks a layout's
step, the candidate's peak and its largest micro-batch are the walk's, not the array screen's.

    engine_walk(request, layout, micro_batch, grad_accum) -> (peak bytes | None, basis)

Walked: one process (the plain trainer's step walk), DeepSpeed ZeRO over data parallel alone without
gradient accumulation (its rank-by-rank walk), and torch's tensor-parallel and pipeline engines
(`formulas.ranks`: within 1% of gloo measurements, an upper bound for interleaved schedules; FSDP2 inside
pipeline stages -2.2% to +4.2%). Not walked, and left to the screen (`formulas.plan`), which says so: FSDP2
without a pipeline (its walk misses the moments inside a block's
backward, and on fake tensors the screen lands within 0.2% of the 13B measurements), DeepSpeed with
accumulation or over a tensor/pipeline mesh.
"""

from __future__ import annotations

from formulas.predict import predict
from formulas.ranks import parallel_prediction
from formulas.spec import RunSpec

SCREEN = "formulas.plan (no engine walk for this layout)"


def candidate_spec(request, layout: dict, micro_batch: int, grad_accum: int, device: str | None = None) -> RunSpec:
    """The RunSpec `tmath measure` would run for a layout at a micro-batch."""
    pp = layout["pp"]
    settings = dict(
        arch=request.arch, model=request.model, seq=request.seq, batch=micro_batch, precision=request.precision,
        optimizer=request.optimizer, attention=request.attention, recompute=layout["recompute"],
        zero=layout["zero"], gpus=request.gpus, tp=layout["tp"], pp=pp,
        sequence_parallel=layout["sequence_parallel"], dp_shard="fsdp2" if layout["fsdp"] else "none",
        offload_optimizer=layout["offload"], gpu=request.gpu, device=device or request.device, steps=0, warmup=0,
        nodes=request.gpus // request.gpus_per_node if request.gpus % request.gpus_per_node == 0 else 1,
    )  # fmt: skip
    if pp > 1:
        settings.update(pp_schedule=layout["schedule"], microbatches=grad_accum,
                        virtual_stages=layout["virtual_stages"])  # fmt: skip
    else:
        settings["grad_accum"] = grad_accum
    return RunSpec.build(**settings)


def walk_spec(spec: RunSpec, *, fsdp: bool = False) -> tuple[int | None, str, int]:
    """The engine walk's peak for a spec, its basis and the busiest rank (None where no walk models it; FSDP2's
    walk only when asked, as `--verify` shows it beside the measurement)."""
    p = spec.parallel
    if (p.dp_shard == "fsdp2" and p.pp == 1 and not fsdp) or (p.zero and (p.tp > 1 or p.pp > 1)):
        return None, SCREEN, 0
    if p.tp > 1 or p.pp > 1 or p.dp_shard == "fsdp2":
        ranks = parallel_prediction(spec, spec.measurement.device, first_replica=True)
        if ranks is None:
            return None, SCREEN, 0
        busiest = ranks.busiest
        return busiest.peak, f"formulas.ranks: {busiest.peak_basis}", busiest.rank
    peak = predict(spec).peak
    if peak.phase == "none":
        return None, SCREEN, 0
    return peak.bytes, f"formulas.peak: {peak.moment}", 0


def one_replica(spec: RunSpec) -> RunSpec:
    """Tensor/pipeline parallel over unsharded data-parallel replicas as one replica (gpus = t·pp): every
    replica's ranks hold what its own do, less the data-parallel all-reduce's buckets. Other specs as they are."""
    p = spec.parallel
    if p.dp > 1 and not p.zero and p.dp_shard != "fsdp2" and (p.tp > 1 or p.pp > 1):
        return spec.replace(gpus=p.tp * p.pp, nodes=1)
    return spec


def engine_walk(request, layout: dict, micro_batch: int, grad_accum: int) -> tuple[int | None, str]:
    """The walk's peak of a layout's busiest rank (`one_replica` of it)."""
    try:
        spec = one_replica(candidate_spec(request, layout, micro_batch, grad_accum))
    except ValueError as exc:
        return None, f"no engine walk: {str(exc).splitlines()[0]}"
    peak, basis, _ = walk_spec(spec)
    return peak, basis
