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
    interleaved-1f1b       min(M·v, (v − 1)·R + 2·(pp − 1 − r) + 1), R the micro-batches per round
    looped-bfs             M·v               every local stage's forwards, breadth first
    interleaved-zero-bubble min(M·v, (v − 1)·R + pp)   every rank: a shorter warm-up, and saved tensors kept from
                                                    the input-gradient pass to the weight pass, r micro-batches later

On rank 0 with R = pp the interleaved count is pp·v + pp − 1 chunks of L/(pp·v) layers: pp micro-batches of
L/pp layers times Korthikanti et al.'s factor 1 + (pp − 1)/(pp·v) (arXiv:2205.05198, Section 4.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.architecture import GATED_MLPS, Architecture


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


def forward_stages(schedule: str, pp: int, microbatches: int, virtual: int, count: int) -> list[int]:
    """The local stage (0 … v − 1) of each of a rank's first `count` forwards: the stage forwards in flight at
    the end of its warm-up. Interleaved schedules run rounds of R micro-batches through each local stage in
    turn (forward i on local stage (i // R) mod v); looped BFS runs all M on a stage before the next."""
    if virtual == 1:
        return [0] * count
    if schedule == "looped-bfs":
        return [i // microbatches for i in range(count)]
    R = microbatches_per_round(pp, microbatches)
    return [(i // R) % virtual for i in range(count)]


def in_flight_chunks(schedule: str, pp: int, microbatches: int, pp_rank: int, virtual: int = 1) -> int:
    """Stage forwards (one stage, one micro-batch) whose saved tensors rank `pp_rank` holds at its peak."""
    M, v, r = microbatches, virtual, pp_rank
    if schedule == "gpipe":
        return M
    if schedule == "1f1b":
        return min(M, pp - r)
    if schedule == "looped-bfs":
        return M * v
    if schedule == "interleaved-zero-bubble":
        # torch's warm-up is (v − 1)·R + (pp − 1 − r) here, and each input-gradient pass keeps its micro-batch's
        # saved tensors until the weight pass, which rank r runs r micro-batches later: (v − 1)·R + pp on every
        # rank (measured: v 2 with M 4 and 8, v 3 with M 4 and 6; tests/test_pipeline.py).
        return min(M * v, (v - 1) * microbatches_per_round(pp, M) + pp)
    if schedule == "interleaved-1f1b":
        warmup = (v - 1) * microbatches_per_round(pp, M) + 2 * (pp - 1 - r)
        return min(M * v, warmup + 1)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


# --------------------------------------------------------------------------------------------------
# Parameters per rank: the reference GPT's tensors, split as harness.trainers.tensor and FSDP2 split them

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
"""How tensor parallelism splits a tensor: by output rows (dim 0; vocabulary rows for embeddings and head),
by input columns (dim 1), or not at all."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    split: str


def _norm_tensors(arch: Architecture, name: str) -> list[Tensor]:
    h = arch.hidden
    out = [] if arch.norm == "layernorm-noparam" else [Tensor(f"{name}.weight", (h,), REPLICATED)]
    return out + ([Tensor(f"{name}.bias", (h,), REPLICATED)] if arch.norm == "layernorm" else [])


def _linear(name: str, out_f: int, in_f: int, bias: bool, split: str) -> list[Tensor]:
    bias_split = REPLICATED if split == ROW else split  # a row-parallel bias is added once, after the sum
    out = [Tensor(f"{name}.weight", (out_f, in_f), split)]
    return out + ([Tensor(f"{name}.bias", (out_f,), bias_split)] if bias else [])


def block_tensors(arch: Architecture) -> list[Tensor]:
    """One reference block's parameters in `parameters()` order, with their tensor-parallel split."""
    h, f, q, kv = arch.hidden, arch.ffn_hidden, arch.q_width, arch.kv_width
    qb, ob, b = arch.has_qkv_bias, arch.has_out_bias, arch.has_mlp_bias
    out = _norm_tensors(arch, "ln_1")
    out += _linear("attn.qkv", q + 2 * kv, h, qb, COLUMN) + _linear("attn.proj", h, q, ob, ROW)
    if arch.qk_norm == "full":
        raise ValueError("QK-norm over all heads (OLMo-2) under tensor parallelism is not modelled")
    if arch.qk_norm == "head":  # one d-wide weight each, the same on every tensor-parallel rank
        out += [Tensor("attn.q_norm.weight", (arch.head_size,), REPLICATED)]
        out += [Tensor("attn.k_norm.weight", (arch.head_size,), REPLICATED)]
    out += [] if arch.shared_norm else _norm_tensors(arch, "ln_2")
    if arch.mlp in GATED_MLPS:
        out += _linear("mlp.gate", f, h, b, COLUMN) + _linear("mlp.up", f, h, b, COLUMN)
        out += _linear("mlp.down", h, f, b, ROW)
    else:
        out += _linear("mlp.fc", f, h, b, COLUMN) + _linear("mlp.proj", h, f, b, ROW)
    if arch.placement == "sandwich":  # Gemma-2's norms on the branch outputs, after the MLP
        out += _norm_tensors(arch, "ln_attn_out") + _norm_tensors(arch, "ln_mlp_out")
    return out


def hf_llama_block_tensors(arch: Architecture) -> list[Tensor]:
    """One transformers Llama block's parameters in `parameters()` order, split by its `base_model_tp_plan`
    (q, k, v, gate, up colwise; o, down rowwise; the RMSNorms replicated)."""
    h, f, q, kv = arch.hidden, arch.ffn_hidden, arch.q_width, arch.kv_width
    qb, ob, b = arch.has_qkv_bias, arch.has_out_bias, arch.has_mlp_bias
    out = _linear("q_proj", q, h, qb, COLUMN) + _linear("k_proj", kv, h, qb, COLUMN)
    out += _linear("v_proj", kv, h, qb, COLUMN) + _linear("o_proj", h, q, ob, ROW)
    out += (
        _linear("gate_proj", f, h, b, COLUMN) + _linear("up_proj", f, h, b, COLUMN) + _linear("down_proj", h, f, b, ROW)
    )
    return out + _norm_tensors(arch, "input_layernorm") + _norm_tensors(arch, "post_attention_layernorm")


def rank_tensors(
    arch: Architecture, *, blocks: int, embedding: bool, head: bool, head_copy: bool, impl: str = "reference"
) -> list[Tensor]:
    """The parameters of a rank holding `blocks` blocks, the input embeddings and/or the head, in order.
    `head_copy`: the head is tied to an embedding that another pipeline stage holds, so it is a copy.
    `impl="hf"`: transformers Llama's tensors (separate q, k, v), as its tensor-parallel plan splits them."""
    if impl == "hf":
        out = [Tensor("wte.weight", (arch.vocab, arch.hidden), VOCAB)] if embedding else []
        out += hf_llama_block_tensors(arch) * blocks
        if head:
            out += _norm_tensors(arch, "ln_f")
            if not arch.tied_embeddings or not embedding:
                out.append(Tensor("lm_head.weight", (arch.vocab, arch.hidden), VOCAB))
        return out
    h = arch.hidden
    out: list[Tensor] = []
    if embedding:
        out.append(Tensor("wte.weight", (arch.vocab, h), VOCAB))
        if arch.position == "learned":
            rows = arch.max_positions + arch.position_offset
            out.append(Tensor("wpe.weight", (rows, h), REPLICATED))  # Megatron replicates it
    out += block_tensors(arch) * blocks
    if head:
        out += _norm_tensors(arch, "ln_f")
        if not arch.tied_embeddings or head_copy or not embedding:
            out.append(Tensor("lm_head.weight", (arch.vocab, h), VOCAB))
        if arch.head_bias:
            out.append(Tensor("lm_head.bias", (arch.vocab,), VOCAB))
    return out


def tp_local_shape(t: Tensor, tp: int, tp_rank: int) -> tuple[int, ...]:
    """The local shard's shape on tensor-parallel rank `tp_rank` (DTensor `Shard(0)`/`Shard(1)`)."""
    if tp == 1 or t.split == REPLICATED:
        return t.shape
    dim = 1 if t.split == ROW else 0
    shape = list(t.shape)
    shape[dim] = shard_sizes(shape[dim], tp)[tp_rank]
    return tuple(shape)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fsdp_shard_rows(rows: int, dp: int) -> int:
    """FSDP2 pads dim 0 to a multiple of dp and gives each rank ceil(rows/dp) rows of storage
    (`FSDPParam._init_sharded_param`); the last ranks' padding is storage without parameters."""
    return -(-rows // dp)


@dataclass(frozen=True)
class LocalTensor:
    name: str
    elements: int
    """Parameter elements on this rank (its share, padding excluded)."""
    storage_elements: int
    """Elements of the storage holding the weights: FSDP2's padded shard, and DTensor's scatter of an uneven
    dim-0 split, whose short ranks keep their rows in a buffer of ceil(rows/t) (`distribute_tensor`)."""


def local_tensors(
    tensors: list[Tensor], *, tp: int, tp_rank: int, dp_shard: int = 1, dp_rank: int = 0
) -> list[LocalTensor]:
    """Each tensor's local elements after tensor parallelism and then FSDP2 over `dp_shard` ranks."""
    out = []
    for t in tensors:
        shape = tp_local_shape(t, tp, tp_rank)
        if dp_shard == 1:
            n = numel(shape)
            padded = n
            if tp > 1 and t.split in (COLUMN, VOCAB):
                padded = -(-t.shape[0] // tp) * numel(t.shape[1:])
            out.append(LocalTensor(t.name, n, padded))
            continue
        rest = numel(shape[1:])
        rows = shard_sizes(shape[0], dp_shard)[dp_rank]
        out.append(LocalTensor(t.name, rows * rest, fsdp_shard_rows(shape[0], dp_shard) * rest))
    return out
