"""What each rank of a DeepSpeed ZeRO engine holds, from the model's parameter tensors (pure Python).

Transformer Math 101 divides model states by the data-parallel degree N (`formulas.memory`). DeepSpeed
(0.19.8) holds something else, and this module counts it rank by rank from the parameter tensors in
`model.parameters()` order (`formulas.layouts.parameter_tensors`), which is the order DeepSpeed flattens them in:

ZeRO-1/2 (`runtime/zero/stage_1_and_2.py`, `DeepSpeedZeroOptimizer`)
    weights      e_w · P_pad            the parameters are views into one flat buffer of P_pad elements,
                                       P padded to a multiple of 2·N (`nccl_start_alignment_factor` · N)
    optimizer    (4 + s) · P_pad/N + 4  the fp32 master partition (`single_partition_of_fp32_groups`, a copy
                                       even of fp32 parameters: 12 B/param/N with AdamW, not 8), the
                                       optimizer's s bytes of state per element, AdamW's one `step`
    gradients    e_g · Σ n_i over the parameters overlapping the rank's partition: after backward,
                                       `grads_in_partition` holds the *whole* gradient of a parameter that
                                       straddles a partition boundary (`copy_grads_in_partition`), so a rank
                                       whose partition starts inside the embedding holds all of it
    bucket       e_g · reduce_bucket    the IPG bucket, during backward
ZeRO-3 (`runtime/zero/stage3.py`, `partition_parameters.py`)
    weights      e_w · Σ ceil(n_i/N)    each parameter's partition (`ds_tensor`), plus the whole of each
                 + e_w · Σ_pers n_i     persistent parameter (fewer than `stage3_param_persistence_threshold`
                                       elements), kept gathered on every rank
    gradients    e_g · Σ ceil(n_i/N)    `grad_partitions_flat_buffer`, held for the engine's life
    optimizer    (4 + s) · Σ ceil(n_i/N) + 4
    gathered     e_w · Σ_other n_i      parameters gathered for the forward: with DeepSpeed's default
                                       `stage3_max_live_parameters` (1e9) a smaller model stays gathered
                                       from its first module to the start of backward
    bucket       e_g · reduce_bucket    the IPG bucket, held for the engine's life

Measured exact on two gloo ranks (`results/peak`, `harness.zero.accounting` names each component).
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.units import ceil_div

STAGE3_LIVE_DEFAULT = 10**9
"""DeepSpeed's `stage3_max_live_parameters` and `stage3_max_reuse_distance` (elements). With them a model
under 1e9 parameters may stay gathered for a whole forward: ZeRO-3's live parameters are then most of the
model, not the largest layer that Transformer Math 101 and DeepSpeed's estimator assume. We keep the
defaults (what users run) and write them into the config, so that a --deepspeed-config can lower them."""

ALIGNMENT_FACTOR = 2
"""ZeRO-1/2 pads the flat parameter buffer to a multiple of this × N elements (`nccl_start_alignment_factor`)."""

MASTER_BYTES = 4
"""DeepSpeed's master partition is fp32, whatever the parameters' dtype."""

STEP_COUNTER_BYTES = 4
"""torch AdamW's fp32 `step`, one per parameter tensor: ZeRO's optimizer steps one flat tensor."""


ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
"""Without ZeRO (stage 0) DeepSpeed all-reduces the gradients at the end of backward in flat buckets of
`MEMORY_OPT_ALLREDUCE_SIZE` elements (`runtime/engine.py`, `allreduce_gradients`), not `reduce_bucket_size`."""


def allreduce_bucket_elements(tensors: list[int], per_bucket: int = ALLREDUCE_BUCKET_ELEMENTS) -> int:
    """The largest flat copy of DeepSpeed's stage-0 gradient all-reduce, in elements.

    `engine.allreduce_no_retain` walks the gradients in `model.parameters()` order, adds each to a bucket and
    flushes it (`flatten`, all-reduce, copy back) once the bucket holds more than `per_bucket` elements, and
    the remainder at the end: each flat copy lives beside every gradient. Below 5e8 elements that is one copy
    of all of them.
    """
    largest = current = 0
    for n in tensors:
        current += n
        if current > per_bucket:
            largest, current = max(largest, current), 0
    return max(largest, current)


@dataclass(frozen=True)
class BucketSizes:
    """ZeRO communication buffer sizes, in elements, scaled with the hidden size h.

    DeepSpeed's defaults (5e8-element reduce and all-gather buckets, `runtime/zero/config.py`) are
    sized for billion-parameter models: a 5e8-element fp32 bucket is 2 GB whatever the model. We use
    the rule transformers' DeepSpeed integration applies for "auto" (`integrations/deepspeed.py`,
    `HfTrainerDeepSpeedConfig.trainer_config_finalize`): reduce bucket h², prefetch bucket 0.9·h²,
    persistence threshold 10·h; the stage 1/2 all-gather bucket follows the reduce bucket.
    """

    reduce_bucket_elements: int
    """`reduce_bucket_size`: gradients reduced per collective (the IPG bucket)."""
    allgather_bucket_elements: int
    """`allgather_bucket_size` (stage 1/2): updated parameters all-gathered per collective."""
    prefetch_bucket_elements: int
    """`stage3_prefetch_bucket_size`: parameters ZeRO-3 fetches ahead of the module that needs them."""
    param_persistence_threshold: int
    """`stage3_param_persistence_threshold`: ZeRO-3 keeps parameters with fewer elements whole on every rank."""

    @classmethod
    def for_hidden(cls, hidden: int) -> BucketSizes:
        square = hidden * hidden
        return cls(
            reduce_bucket_elements=square,
            allgather_bucket_elements=square + square % 2,  # DeepSpeed asserts a multiple of 2
            prefetch_bucket_elements=int(0.9 * square),
            param_persistence_threshold=10 * hidden,
        )


@dataclass(frozen=True)
class RankStates:
    """What one rank of a ZeRO engine holds, in bytes."""

    rank: int
    weights: int
    gradients: int
    """After backward: the reduced gradients this rank keeps (stage 1/2: of every parameter overlapping its
    partition; stage 3: its flat gradient partition)."""
    optimizer: int
    """Optimizer state with the fp32 master partition."""
    partition_elements: int
    """The elements this rank's optimizer steps (its master partition)."""
    bucket: int
    """The IPG reduce bucket."""
    gathered: int = 0
    """ZeRO-3: the parameters gathered for the forward beyond what the rank holds (0 at stages 1-2)."""
    persistent_elements: int = 0


def _stage12(tensors: list[int], dp: int, rank: int, e_w: int, e_g: int, state: int, bucket: int) -> RankStates:
    total = sum(tensors)
    padded = ceil_div(total, ALIGNMENT_FACTOR * dp) * ALIGNMENT_FACTOR * dp
    part = padded // dp
    start, end = part * rank, part * (rank + 1)
    overlapping, offset = 0, 0
    for n in tensors:
        if min(end, offset + n) > max(start, offset):
            overlapping += n
        offset += n
    return RankStates(
        rank=rank,
        weights=e_w * padded,
        gradients=e_g * overlapping,
        optimizer=(MASTER_BYTES + state) * part + STEP_COUNTER_BYTES,
        partition_elements=part,
        bucket=e_g * bucket,
    )


def _stage3(tensors: list[int], dp: int, rank: int, e_w: int, e_g: int, state: int, bucket: int,
            persistence: int) -> RankStates:  # fmt: skip
    parts = [ceil_div(n, dp) for n in tensors]
    persistent = [n for n in tensors if n < persistence]
    others = [n for n in tensors if n >= persistence]
    part = sum(parts)
    # A persistent parameter lives whole in an all-gather buffer of N·ceil(n/N) elements.
    whole = sum(dp * ceil_div(n, dp) for n in persistent)
    return RankStates(
        rank=rank,
        weights=e_w * (part + whole),
        gradients=e_g * part,
        optimizer=(MASTER_BYTES + state) * part + STEP_COUNTER_BYTES,
        partition_elements=part,
        bucket=e_g * bucket,
        gathered=e_w * sum(dp * ceil_div(n, dp) for n in others),
        persistent_elements=sum(persistent),
    )


def zero_ranks(
    tensors: list[int],
    *,
    stage: int,
    dp: int,
    weight_bytes: int,
    gradient_bytes: int,
    state_bytes: int,
    buckets: BucketSizes,
) -> list[RankStates]:
    """Every rank's holdings under ZeRO `stage` (1-3) over `dp` ranks. `state_bytes`: the optimizer's state
    per stepped element (AdamW 8, SGD with momentum 4, plain SGD 0), the fp32 master copy excluded."""
    if stage not in (1, 2, 3):
        raise ValueError(f"zero_ranks models stages 1-3, got {stage!r}")
    if stage == 3:
        return [_stage3(tensors, dp, r, weight_bytes, gradient_bytes, state_bytes, buckets.reduce_bucket_elements,
                        buckets.param_persistence_threshold) for r in range(dp)]  # fmt: skip
    return [
        _stage12(tensors, dp, r, weight_bytes, gradient_bytes, state_bytes, buckets.reduce_bucket_elements)
        for r in range(dp)
    ]
