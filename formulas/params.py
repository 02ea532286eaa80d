"""Exact parameter counts.

The count is structural: every weight matrix, bias and norm vector of the architecture, with tied
matrices counted once (as `nn.Module.parameters()` deduplicates them). Transformer Math 101 uses
the total P in every model-state term ("bytes/param × No. params"); the Q&A seed's 4·L·C² is
the naive approximation (see `formulas.naive`).
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.architecture import GATED_MLPS, Architecture


def norm_params(arch: Architecture, width: int | None = None) -> int:
    """One norm over `width` (h by default): LayerNorm a weight and a bias (2·width), RMSNorm a weight (width),
    OLMo's non-parametric LayerNorm nothing."""
    width = arch.hidden if width is None else width
    return {"layernorm": 2 * width, "rmsnorm": width, "layernorm-noparam": 0}[arch.norm]


def qk_norm_params(arch: Architecture) -> int:
    """QK-norm: one norm of d for the queries and one for the keys (`head`: Qwen3, Phi-2's qk_layernorm), or one
    over all query heads and one over all key heads (`full`: OLMo-2)."""
    if arch.qk_norm == "head":
        return 2 * norm_params(arch, arch.head_size)
    if arch.qk_norm == "full":
        return norm_params(arch, arch.q_width) + norm_params(arch, arch.kv_width)
    return 0


def mla_params(arch: Architecture) -> int:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, §2.1; transformers DeepseekV3Attention):
    queries h×d_c' → RMSNorm(d_c') → d_c'×a·(d_h + d_h^R) (or h×a·(d_h + d_h^R) without a query latent);
    keys and values h×(d_c + d_h^R) → RMSNorm(d_c) → d_c×a·(d_h + d_v); output a·d_v×h; no biases."""
    h, a, rq, rkv = arch.hidden, arch.n_heads, arch.q_lora_rank, arch.kv_lora_rank
    qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
    query = (h * rq + rq + rq * a * qk) if rq else h * a * qk
    kv = h * (rkv + arch.qk_rope_head_dim) + rkv + rkv * a * (arch.qk_nope_head_dim + arch.v_head_dim)
    return query + kv + a * arch.v_head_dim * h


def attention_params(arch: Architecture) -> int:
    """Q (h×a·d), K and V (h×kv_width each; = h×h without GQA and with d = h/a), output projection (a·d×h),
    their biases (`qkv_bias`, `out_bias`) and QK-norm; or multi-head latent attention (`mla_params`)."""
    if arch.mla:
        return mla_params(arch)
    h, q, kv = arch.hidden, arch.q_width, arch.kv_width
    weights = h * q + 2 * h * kv + q * h
    biases = (q + 2 * kv if arch.has_qkv_bias else 0) + (h if arch.has_out_bias else 0)
    return weights + biases + qk_norm_params(arch)


def mlp_params(arch: Architecture) -> int:
    """GeLU/ReLU MLP: h×f and f×h (+ f + h biases). SwiGLU/GeGLU: gate and up h×f, down f×h (+ 2f + h biases)."""
    h, f = arch.hidden, arch.ffn_hidden
    if arch.mlp in GATED_MLPS:
        return 3 * h * f + ((2 * f + h) if arch.has_mlp_bias else 0)
    return 2 * h * f + ((f + h) if arch.has_mlp_bias else 0)


def _gated(arch: Architecture) -> int:
    return 3 if arch.mlp in GATED_MLPS else 2


def expert_params(arch: Architecture) -> int:
    """One routed expert: the MLP's two or three matrices at the expert width, no biases (Mixtral, Qwen-MoE,
    OLMoE, DeepSeek: transformers keeps them as (E, 2f, h) and (E, h, f) tensors)."""
    return _gated(arch) * arch.hidden * arch.expert_width


def shared_expert_params(arch: Architecture) -> int:
    """The shared-expert MLP (no biases) and Qwen2-MoE's h×1 gate on it."""
    h = arch.hidden
    return _gated(arch) * h * arch.shared_expert_ffn_hidden + (h if arch.shared_expert_gate else 0)


def routed_expert_params(arch: Architecture) -> int:
    """All routed experts of all MoE layers: what expert parallelism splits."""
    return arch.moe_layers * arch.experts * expert_params(arch)


def moe_mlp_params(arch: Architecture) -> int:
    """One MoE layer's MLP: the router h×E, E routed experts and the shared expert."""
    return arch.hidden * arch.experts + arch.experts * expert_params(arch) + shared_expert_params(arch)


def layer_params(arch: Architecture, index: int = 0) -> int:
    """Block `index`: attention + MLP (a MoE layer's experts where it has them) + its norms (two; one shared by
    a parallel block; four sandwiched)."""
    mlp = moe_mlp_params(arch) if arch.is_moe_layer(index) else mlp_params(arch)
    return attention_params(arch) + mlp + arch.norms_per_layer * norm_params(arch)


def layers_params(arch: Architecture, indices: range | None = None) -> int:
    """The blocks `indices` (all by default)."""
    indices = range(arch.n_layers) if indices is None else indices
    if not arch.moe:
        return len(indices) * layer_params(arch)
    return sum(layer_params(arch, i) for i in indices)


def embedding_params(arch: Architecture) -> int:
    """Token table v×E (E = `embed_dim`, h unless projected) with OPT's projection to h (E×h, no bias), a learned
    position table (max_positions + offset)×h, token types, and BERT's embedding norm."""
    h, E = arch.hidden, arch.token_width
    total = arch.vocab * E + arch.type_vocab * h + (E * h if h != E else 0)
    if arch.position == "learned":
        total += (arch.max_positions + arch.position_offset) * h
    if arch.family == "encoder":
        total += norm_params(arch)
    return total


def head_params(arch: Architecture) -> int:
    """Everything after the last block.

    Decoder: final norm (unless `final_norm` is off), OPT's projection back to E (h×E), a v×E output matrix
    unless it is tied to the token embedding, and its bias (GPT-J, Phi-2).
    Encoder: pooler (h×h + h), MLM head (dense h×h + h, norm, output bias v; its matrix is tied),
    next-sentence classifier (2h + 2).
    """
    h, E = arch.hidden, arch.token_width
    if arch.family == "decoder":
        total = (norm_params(arch) if arch.final_norm else 0) + (h * E if h != E else 0)
        return total + (0 if arch.tied_embeddings else arch.vocab * E) + (arch.vocab if arch.head_bias else 0)
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
    """One block's parameters (the larger of the first and the last block in a MoE model with dense layers)."""
    inactive: int = 0
    """Routed-expert parameters a token does not pass through: (E − k) experts in every MoE layer."""

    @property
    def active(self) -> int:
        """Parameters each token passes through (a MoE model's "active" count; = total when dense)."""
        return self.total - self.inactive

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020's N: parameters outside the embedding tables."""
        return self.layers + self.head


def parameter_count(arch: Architecture) -> ParameterCount:
    per_layer = max(layer_params(arch, i) for i in (0, arch.n_layers - 1))
    inactive = arch.moe_layers * (arch.experts - arch.experts_per_token) * expert_params(arch)
    return ParameterCount(
        embedding=embedding_params(arch),
        layers=layers_params(arch),
        head=head_params(arch),
        per_layer=per_layer,
        inactive=inactive,
    )


def block_matmul_params(arch: Architecture, index: int = 0) -> int:
    """One block's matmul parameters per token: Q, K, V, output projection (MLA: its projections, the norms
    excepted) and the MLP's two or three matrices; in a MoE layer the router, the k experts a token is sent
    to and the shared expert (Fedus et al. 2021: FLOPs follow the active parameters)."""
    h, q, kv, f = arch.hidden, arch.q_width, arch.kv_width, arch.ffn_hidden
    attention = mla_params(arch) - arch.q_lora_rank - arch.kv_lora_rank if arch.mla else 2 * h * q + 2 * h * kv
    if not arch.is_moe_layer(index):
        return attention + _gated(arch) * h * f
    routed = arch.experts_per_token * expert_params(arch)
    return attention + h * arch.experts + routed + shared_expert_params(arch)


def blocks_matmul_params(arch: Architecture) -> int:
    """Every block's matmul parameters per token (`block_matmul_params`), dense and MoE layers alike."""
    if not arch.moe:
        return arch.n_layers * block_matmul_params(arch)
    return sum(block_matmul_params(arch, i) for i in range(arch.n_layers))


def matmul_params(arch: Architecture) -> int:
    """Parameters that multiply every token: 2 FLOPs each per token in the forward pass.

    Embedding lookups (position and token-type tables, an untied input table), biases and norm
    vectors do no multiply-accumulate; the token table does when it is tied to the output layer, and OPT's
    projections in and out of the embedding width do.
    BERT's pooler and next-sentence head see one token per sequence: `sequence_matmul_params`.
    """
    h, E = arch.hidden, arch.token_width
    total = blocks_matmul_params(arch) + (2 * E * h if h != E else 0)
    if arch.family == "decoder":
        return total + arch.vocab * E
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
    h, f, q, kv = arch.hidden, arch.ffn_hidden, arch.q_width, arch.kv_width
    mb = arch.has_mlp_bias
    candidates = [
        arch.vocab * arch.token_width + (arch.vocab if arch.head_bias else 0),
        h * (q + 2 * kv)
        + ((q + 2 * kv) if arch.has_qkv_bias else 0),  # a fused QKV projection, the largest attention piece
        q * h + (h if arch.has_out_bias else 0),
        h * f + (f if mb else 0),
        f * h + (h if mb else 0),
    ]
    if arch.moe:
        candidates.append(arch.experts * expert_params(arch))  # transformers' experts module: (E, 2f, h) + (E, h, f)
    if arch.model_type == "phi3":
        candidates.append(2 * h * f)  # Phi-3's fused gate_up_proj (no bias)
    if arch.position == "learned":
        candidates.append((arch.max_positions + arch.position_offset) * h)
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
    sizes = [per + (1 if i < extra else 0) for i in range(pp)]
    starts = [sum(sizes[:i]) for i in range(pp)]
    stages = [layers_params(arch, range(start, start + n)) for start, n in zip(starts, sizes, strict=True)]
    stages[0] += embedding_params(arch)
    head = head_params(arch)
    if arch.tied_embeddings and pp > 1:
        head += arch.vocab * arch.token_width
    stages[-1] += head
    return stages
