"""Exact parameter counts.

The count is structural: every weight matrix, bias and norm vector of the architecture, with tied
matrices counted once (as `nn.Module.parameters()` deduplicates them). Transformer Math 101 uses
the total P in every model-state term ("bytes/param × No. params"); the Q&A seed's 4·L·C² is
the naive approximation (see `formulas.naive`).
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.architecture import Architecture


def norm_params(arch: Architecture) -> int:
    """One LayerNorm has a weight and a bias (2h); one RMSNorm only a weight (h)."""
    return 2 * arch.hidden if arch.norm == "layernorm" else arch.hidden


def attention_params(arch: Architecture) -> int:
    """Q (h×h), K and V (h×kv_width each, = h×h without GQA), output projection (h×h), biases."""
    h, kv = arch.hidden, arch.kv_width
    weights = h * h + 2 * h * kv + h * h
    biases = (h + 2 * kv + h) if arch.bias else 0
    return weights + biases


def mlp_params(arch: Architecture) -> int:
    """GeLU MLP: h×f and f×h (+ f + h biases). SwiGLU: gate and up h×f, down f×h (+ 2f + h biases)."""
    h, f = arch.hidden, arch.ffn_hidden
    if arch.mlp == "gelu":
        return 2 * h * f + ((f + h) if arch.bias else 0)
    return 3 * h * f + ((2 * f + h) if arch.bias else 0)


def layer_params(arch: Architecture) -> int:
    """One transformer block: attention + MLP + its two norms (pre-LN or post-LN alike)."""
    return attention_params(arch) + mlp_params(arch) + 2 * norm_params(arch)


def embedding_params(arch: Architecture) -> int:
    """Token table v×h, a learned position table max_positions×h, token types, and BERT's embedding norm."""
    h = arch.hidden
    total = arch.vocab * h + arch.type_vocab * h
    if arch.position == "learned":
        total += arch.max_positions * h
    if arch.family == "encoder":
        total += norm_params(arch)
    return total


def head_params(arch: Architecture) -> int:
    """Everything after the last block.

    Decoder: final norm, plus a v×h output matrix unless it is tied to the token embedding.
    Encoder: pooler (h×h + h), MLM head (dense h×h + h, norm, output bias v; its matrix is tied),
    next-sentence classifier (2h + 2).
    """
    h = arch.hidden
    if arch.family == "decoder":
        return norm_params(arch) + (0 if arch.tied_embeddings else arch.vocab * h)
    total = 0
    if arch.pooler:
        total += h * h + h
    if arch.mlm_head:
        total += h * h + h + norm_params(arch) + arch.vocab
        if not arch.tied_embeddings:
            total += arch.vocab * h
    if arch.nsp_head:
        total += 2 * h + 2
    return total


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by component; `total` is what `sum(p.numel() for p in model.parameters())` gives."""

    embedding: int
    layers: int
    head: int
    per_layer: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020's N: parameters outside the embedding tables."""
        return self.layers + self.head


def parameter_count(arch: Architecture) -> ParameterCount:
    per_layer = layer_params(arch)
    return ParameterCount(
        embedding=embedding_params(arch),
        layers=arch.n_layers * per_layer,
        head=head_params(arch),
        per_layer=per_layer,
    )


def matmul_params(arch: Architecture) -> int:
    """Parameters that multiply every token: 2 FLOPs each per token in the forward pass.

    Embedding lookups (position and token-type tables, an untied input table), biases and norm
    vectors do no multiply-accumulate; the token table does when it is tied to the output layer.
    BERT's pooler and next-sentence head see one token per sequence: `sequence_matmul_params`.
    """
    h, f, kv = arch.hidden, arch.ffn_hidden, arch.kv_width
    attn = 2 * h * h + 2 * h * kv
    mlp = (2 if arch.mlp == "gelu" else 3) * h * f
    total = arch.n_layers * (attn + mlp)
    if arch.family == "decoder":
        return total + arch.vocab * h
    if arch.mlm_head:
        total += h * h + arch.vocab * h
    return total


def sequence_matmul_params(arch: Architecture) -> int:
    """Matmul parameters applied once per sequence: BERT's pooler (h×h) and NSP classifier (h×2)."""
    return (arch.hidden**2 if arch.pooler else 0) + (2 * arch.hidden if arch.nsp_head else 0)


def largest_module_params(arch: Architecture) -> int:
    """Parameters of the largest single module (its own parameters, not its children's).

    ZeRO-3 gathers one module's full parameters at a time; DeepSpeed's estimator
    (`estimate_zero3_model_states_mem_needs_all_live`) sizes its buffer by this module.
    """
    h, f, kv = arch.hidden, arch.ffn_hidden, arch.kv_width
    b = arch.bias
    candidates = [
        arch.vocab * h,
        h * (h + 2 * kv) + ((h + 2 * kv) if b else 0),  # a fused QKV projection, the largest attention piece
        h * f + (f if b else 0),
        f * h + (h if b else 0),
    ]
    if arch.position == "learned":
        candidates.append(arch.max_positions * h)
    return max(candidates)


def pipeline_stage_params(arch: Architecture, pp: int) -> list[int]:
    """Parameters of each of `pp` pipeline stages: the layers split as evenly as possible (the first stages
    take one more when L is not a multiple of pp), the embedding on the first stage, the final norm and output
    layer on the last. A tied output layer is a copy of the embedding on the last stage (Megatron-LM keeps
    `word_embeddings` there and all-reduces their gradients; Narayanan et al. 2021, §4.1), so with pp > 1
    tied weights are held twice. Transformer Math 101's P / PP is the mean, not the stage that runs out."""
    if pp < 1 or pp > arch.n_layers:
        raise ValueError(f"pp must be between 1 and the {arch.n_layers} layers, got {pp!r}")
    per, extra = divmod(arch.n_layers, pp)
    stages = [(per + (1 if i < extra else 0)) * layer_params(arch) for i in range(pp)]
    stages[0] += embedding_params(arch)
    head = head_params(arch)
    if arch.tied_embeddings and pp > 1:
        head += arch.vocab * arch.hidden
    stages[-1] += head
    return stages
