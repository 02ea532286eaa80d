"""Per-rank layout of a 3D-parallel run (dp × pp × tp) as torch's engines lay it out: shards, stages, and
the micro-batches each pipeline rank holds at once.

    shard_sizes(n, parts)                 DTensor `Shard(d)` / `torch.chunk`: ceil(n/parts) each, the last short
    stage_layers(L, stages)               blocks per pipeline stage, contiguous, the remainder to the first
    rank_stages(pp_rank, pp, v)           stages on a pipeline rank: pp_rank + k·pp (torch's looped placement)
    in_flight_chunks(schedule, ...)       stage forwards whose activations a rank holds at its peak

In-flight counts (units: one stage's activations for one micro-batch), from the schedules' orders in
torch.distributed.pipelining (`schedules.py`):

    gpipe                  M                 every forward before any backward
    1f1b                   min(M, pp − r)    warm-up of pp − 1 − r forwards, then one more before each backward
    interleaved-1f1b       min(M·v, (v − 1)·R + 2·(pp − 1 − r) + 1), R = M / ceil... (micro-batches per round)
    looped-bfs             M·v               every local stage's forwards, breadth first
    interleaved-zero-bubble as interleaved-1f1b (its warm-up; the weight-gradient split frees later)

On rank 0 with R = pp the interleaved count is pp·v + pp − 1 chunks of L/(pp·v) layers: pp micro-batches of
L/pp layers times Korthikanti et al.'s factor 1 + (pp − 1)/(pp·v) (arXiv:2205.05198, Section 4.2.3).
"""

from __future__ import annotations


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `n` split into `parts` as DTensor's `Shard` and `torch.chunk` split it: ceil(n/parts) each
    while enough remains (the last ones short, possibly empty)."""
    size = -(-n // parts)
    out = []
    remaining = n
    for _ in range(parts):
        take = min(size, max(remaining, 0))
        out.append(take)
        remaining -= take
    return out


def stage_layers(n_layers: int, stages: int) -> list[int]:
    """Blocks per pipeline stage: contiguous, as even as possible, the first stages taking the remainder."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"{stages} pipeline stages cannot split {n_layers} layers (a stage holds whole blocks)")
    base, extra = divmod(n_layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def stage_blocks(n_layers: int, stages: int, stage: int) -> range:
    """Block indices of one stage."""
    sizes = stage_layers(n_layers, stages)
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


def rank_stages(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """Stages a pipeline rank runs: pp_rank, pp_rank + pp, ... (torch's placement for looped schedules)."""
    return [pp_rank + k * pp for k in range(virtual)]


def microbatches_per_round(pp: int, microbatches: int) -> int:
    """torch's interleaved schedules run micro-batches in rounds of R = M / max(1, M // pp)."""
    rounds = max(1, microbatches // pp)
    return microbatches // rounds


def in_flight_chunks(schedule: str, pp: int, microbatches: int, pp_rank: int, virtual: int = 1) -> int:
    """Stage forwards (one stage, one micro-batch) whose saved tensors rank `pp_rank` holds at its peak."""
    M, v, r = microbatches, virtual, pp_rank
    if schedule == "gpipe":
        return M
    if schedule == "1f1b":
        return min(M, pp - r)
    if schedule == "looped-bfs":
        return M * v
    if schedule in ("interleaved-1f1b", "interleaved-zero-bubble"):
        warmup = (v - 1) * microbatches_per_round(pp, M) + 2 * (pp - 1 - r)
        return min(M * v, warmup + 1)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")
