"""Activation memory: the bytes that the forward pass keeps for the backward pass.

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), Section 4 and Table 2, as quoted by Transformer Math 101:

    no recompute, tensor parallel t:  s·b·h·(10 + 24/t + 5·a·s/(h·t))   bytes per layer
    selective recompute:              s·b·h·(10 + 24/t)
    full recompute:                   2·s·b·h
    sequence parallel:                every term above divided by t
    embeddings, output layer, loss:   s·b·h·p/t (embedding dropout mask, p pipeline stages)
                                      + (4·s·b·h/t)·(1 + v/h)   (final norm, head input, fp32 logits)

The paper assumes 16-bit activations (e = 2 bytes), 1-byte dropout masks (m = 1), multi-head
attention (k, v as wide as q), a 4h GeLU MLP and no flash attention. Written per tensor, with e
and m free, one layer stores

    replicated over t:   attention input e + attention dropout mask m + MLP input e
                         + MLP dropout mask m + two norm inputs 2e              = (4e + 2m)·sbh
    split over t:        Q e·sbh + K, V e·sb·kv_width each + projection input e·sbh
                         (Q and the projection input a·d wide where the head size d is set apart)
                         + MLP inner (GeLU: input and output e·sbf each; ReLU: its output;
                           SwiGLU/GeGLU: gate, up, act(gate), product e·sbf each)
    scores (eager):      softmax output e + dropout mask m + dropout output e   = (2e + m)·a·s²·b

which is the paper's 34 + 5as/h for e = 2, m = 1, and 66 + 9as/h for fp32 with 4-byte masks.
Without dropout the masks vanish and the softmax output is stored once (e·a·s²·b).
Flash attention (FlashAttention, Dao et al. 2022, Algorithm 2) keeps no s×s matrix, only the fp32
log-sum-exp per query and head (4·a·s·b bytes); its output is the projection input counted above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from formulas.architecture import Architecture, unmodelled_features
from formulas.units import ceil_div

Recompute = Literal["none", "selective", "full"]
Attention = Literal["eager", "flash"]

RECOMPUTES: tuple[str, ...] = get_args(Recompute)
ATTENTIONS: tuple[str, ...] = get_args(Attention)

LOSS_LOGIT_BYTES = 4
"""The cross-entropy works on fp32 logits whatever the model dtype (Korthikanti et al.: 4·s·b·v)."""

INNER_TENSORS = {"gelu": 2, "relu": 1, "swiglu": 4, "geglu": 4}
"""f-wide tensors an MLP keeps: GeLU its input and output; ReLU its output (the projection's input too);
SwiGLU/GeGLU the gate, the up projection, act(gate) and the product."""

LSE_BYTES = 4
"""Flash attention's saved log-sum-exp is fp32 (FlashAttention-2, `softmax_lse`)."""


@dataclass(frozen=True)
class LayerActivations:
    """One transformer layer's stored activations for one micro-batch, split by how TP shards them."""

    replicated: int
    """Bytes every tensor-parallel rank keeps in full (divided by t only with sequence parallelism)."""
    sharded: int
    """Bytes split over the t tensor-parallel ranks (Q, K, V, projection input, MLP inner)."""
    scores: int
    """Bytes of the a·s² attention-score tensors (eager) or the log-sum-exp (flash); split over t."""

    def bytes(self, tp: int = 1, sequence_parallel: bool = False) -> int:
        rep = ceil_div(self.replicated, tp) if sequence_parallel else self.replicated
        return rep + ceil_div(self.sharded, tp) + ceil_div(self.scores, tp)


def layer_terms(
    arch: Architecture,
    seq: int,
    batch: int,
    *,
    elem_bytes: int = 2,
    mask_bytes: int = 1,
    recompute: str = "none",
    attention: str = "eager",
    stats_bytes: int = 0,
) -> LayerActivations:
    """Per-layer stored bytes, generalised from Korthikanti et al. 2022, Table 2 (see module doc).

    `stats_bytes` adds what the paper leaves out: each norm's per-token statistics, mean and
    1/std for LayerNorm, 1/rms for RMSNorm (4 bytes each on CUDA; CPU's LayerNorm keeps them in
    the input dtype). 0 (the default) is the paper; the reference models make it exact.
    """
    if recompute not in RECOMPUTES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTES)}, got {recompute!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    missing = unmodelled_features(arch)
    if missing:
        raise ValueError(f"activations of {', '.join(missing)} are not modelled yet (parameters and model states are)")
    e = elem_bytes
    s, b, h, a = seq, batch, arch.hidden, arch.n_heads
    sbh = s * b * h
    if recompute == "full":
        # Only the block input is stored; the paper's 2·s·b·h, split by t under sequence parallelism.
        return LayerActivations(replicated=e * sbh, sharded=0, scores=0)
    dropout = arch.dropout > 0
    m = mask_bytes if dropout else 0
    stats_per_norm = arch.norm_statistics
    # Norm inputs, attention input and MLP input (h wide): 2 + 1 + 1 in a pre-LN block; a parallel block's norms
    # read the one block input, and a shared norm's output is the MLP's input too; a sandwich also norms each
    # branch's output (formulas.architecture; models.gpt.Block).
    norm_inputs = 1 if arch.parallel_attention else (4 if arch.placement == "sandwich" else 2)
    mlp_input = 0 if arch.shared_norm else 1
    stats = arch.norms_per_layer * stats_per_norm * s * b * stats_bytes
    replicated = ((norm_inputs + 1 + mlp_input) * e + 2 * m) * sbh + stats
    inner = moe_mlp_bytes(arch, s * b, e) if arch.moe else INNER_TENSORS[arch.mlp] * e * s * b * arch.ffn_hidden
    # Q and the projection's input are a·d wide (= h unless the head size is set apart), K and V kv_width.
    sharded = 2 * e * s * b * arch.q_width + 2 * e * s * b * arch.kv_width + inner
    if arch.qk_norm != "none":
        # QK-norm (Qwen3, OLMo-2): each norm keeps its input, Q's and K's projections (e·sb·(a·d + kv_width)),
        # and its statistics per head ("head") or per token ("full").
        sharded += (
            e * s * b * (arch.q_width + arch.kv_width) + qk_norm_count(arch) * stats_per_norm * s * b * stats_bytes
        )
    if recompute == "selective":
        scores = 0  # the attention core is recomputed in the backward pass
    elif attention == "flash":
        scores = LSE_BYTES * a * s * b
    else:
        scores = ((2 * e + m) if dropout else e) * a * s * s * b
    return LayerActivations(replicated=replicated, sharded=sharded, scores=scores)


def qk_norm_count(arch: Architecture) -> int:
    """Norms per token of a QK-norm: one per query and key head (`head`), one for Q and one for K (`full`)."""
    return {"none": 0, "head": arch.n_heads + arch.n_kv_heads, "full": 2}[arch.qk_norm]


def moe_mlp_bytes(arch: Architecture, tokens: int, e: int) -> int:
    """What a dropless MoE layer keeps beyond its input, for `tokens` = s·b tokens routed to k experts each
    (T·k rows; no capacity factor, no dropped tokens), counted per tensor as transformers' grouped_mm experts
    keep them (`transformers.integrations.moe`; measured to the byte, tests/test_variants.py):

        router        its fp32 probabilities 4·T·E, the top-k expert ids 8·T·k; renormalised top-k weights
                      (`norm_topk_prob`, Mixtral) also the fp32 sum 4·T and the top-k values 4·T·k
        dispatch      three int64 indices over the T·k rows (the sort, its inverse, the tokens) and the int32
                      offsets of the E groups
        experts       each row's gathered input e·h, its gate and up e·2f_e, act(gate) and the product e·2f_e,
                      the down projection's output e·h and the row's routing weight e (fp32 in Mixtral:
                      `formulas.variants`)
        shared expert a dense gated MLP every token passes through, 4e·T·f_s; Qwen2-MoE's sigmoid gate output
                      e·T and the shared expert's output e·T·h it scales
    """
    h, E, k = arch.hidden, arch.experts, arch.experts_per_token
    T, rows = tokens, arch.expert_rows(tokens)  # T·k dropless; E·ceil(cf·T·k/E) under a capacity factor (predicted)
    router = 4 * T * E + INDEX_BYTES * T * k + ((4 * T + 4 * T * k) if arch.norm_topk_prob else 0)
    dispatch = 3 * INDEX_BYTES * rows + 4 * E
    experts = rows * (2 * e * h + 4 * e * arch.expert_width + e)
    shared = INNER_TENSORS[arch.mlp] * e * T * arch.shared_expert_ffn_hidden
    if arch.shared_expert_gate:
        shared += e * T + e * T * h
    return router + dispatch + experts + shared


INDEX_BYTES = 8
"""int64 indices (token ids, expert ids, gather indices)."""


def layer_bytes(
    arch: Architecture,
    seq: int,
    batch: int,
    *,
    elem_bytes: int = 2,
    mask_bytes: int = 1,
    recompute: str = "none",
    attention: str = "eager",
    tp: int = 1,
    sequence_parallel: bool = False,
    stats_bytes: int = 0,
) -> int:
    """Bytes one layer stores for one micro-batch on one tensor-parallel rank (Korthikanti Table 2)."""
    terms = layer_terms(
        arch,
        seq,
        batch,
        elem_bytes=elem_bytes,
        mask_bytes=mask_bytes,
        recompute=recompute,
        attention=attention,
        stats_bytes=stats_bytes,
    )
    return terms.bytes(tp, sequence_parallel)


def embedding_bytes(
    arch: Architecture, seq: int, batch: int, *, elem_bytes: int = 2, mask_bytes: int = 1, tp: int = 1
) -> int:
    """Input-embedding activations for one micro-batch.

    Decoder: the dropout mask after the embedding sum, s·b·h·m (Korthikanti et al.: s·b·h·p/t
    over p in-flight micro-batches). Encoder (BERT) also normalises the embedding sum: + e·s·b·h.
    """
    sbh = seq * batch * arch.hidden
    total = (mask_bytes if arch.dropout > 0 else 0) * sbh
    if arch.family == "encoder":
        total += elem_bytes * sbh
    return ceil_div(total, tp)


def output_bytes(arch: Architecture, seq: int, batch: int, *, elem_bytes: int = 2, tp: int = 1) -> int:
    """Output layer and loss activations for one micro-batch.

    Decoder (Korthikanti et al.: (4·s·b·h/t)·(1 + v/h) for e = 2): final-norm input e·sbh,
    output-projection input e·sbh, fp32 logits for the cross-entropy 4·s·b·v.
    Encoder (BERT): the last hidden state e·sbh, the MLM transform's GeLU input, norm input and
    decoder input (3e·sbh) and fp32 logits 4·s·b·v; the pooler's tanh output e·b·h and the
    next-sentence log-probabilities 4·b·2.
    """
    e, s, b, h, v = elem_bytes, seq, batch, arch.hidden, arch.vocab
    sbh = s * b * h
    if arch.family == "decoder":
        total = 2 * e * sbh + LOSS_LOGIT_BYTES * s * b * v
    else:
        total = e * sbh if (arch.mlm_head or arch.pooler) else 0
        if arch.mlm_head:
            total += 3 * e * sbh + LOSS_LOGIT_BYTES * s * b * v
        if arch.pooler:
            total += e * b * h
        if arch.nsp_head:
            total += LOSS_LOGIT_BYTES * b * 2
    return ceil_div(total, tp)


@dataclass(frozen=True)
class ActivationBreakdown:
    """Activation bytes on the busiest GPU, term by term."""

    per_layer: int
    """Bytes one layer stores for one micro-batch on this GPU."""
    layers: int
    """Layers on this GPU's pipeline stage: ceil(L / pp)."""
    in_flight: int
    """Micro-batches whose activations this stage holds at once (pp for the first 1F1B stage)."""
    embedding: int
    """Input-embedding bytes per micro-batch (0 when this stage holds no embedding)."""
    output: int
    """Output-layer and loss bytes (0 when this stage holds no output layer)."""
    stage: str
    """Which pipeline stage is the busiest: `only` (no pipeline), `first` or `last`."""
    DERIVED: ClassVar[tuple[str, ...]] = ("total",)
    """Properties written out beside the fields (a record keeps them; its reader checks them)."""

    @property
    def layers_total(self) -> int:
        return self.per_layer * self.layers * self.in_flight

    @property
    def total(self) -> int:
        return self.layers_total + self.embedding * self.in_flight + self.output


def activation_breakdown(
    arch: Architecture,
    seq: int,
    batch: int,
    *,
    elem_bytes: int = 2,
    mask_bytes: int = 1,
    recompute: str = "none",
    attention: str = "eager",
    tp: int = 1,
    sequence_parallel: bool = False,
    partition_activations: bool = False,
    pp: int = 1,
    in_flight: int | None = None,
) -> ActivationBreakdown:
    """Activations on the busiest GPU of a (tp, pp) layout.

    Pipeline parallelism (Korthikanti et al. Section 4.2.3, 1F1B schedule): stage i holds pp − i
    micro-batches of ceil(L/pp) layers, so the first stage holds pp of them plus the embedding, and
    the last holds one plus the output layer. ZeRO-R `partition_activations` splits the layer
    activations over the tensor-parallel ranks (Transformer Math 101: Activation Memory / TP size).
    """
    split_all = sequence_parallel or partition_activations
    per_layer = layer_bytes(
        arch,
        seq,
        batch,
        elem_bytes=elem_bytes,
        mask_bytes=mask_bytes,
        recompute=recompute,
        attention=attention,
        tp=tp,
        sequence_parallel=split_all,
    )
    # Embedding and output terms are split by t in the paper (sequence/vocab parallel).
    emb_tp = tp if split_all else 1
    emb = embedding_bytes(arch, seq, batch, elem_bytes=elem_bytes, mask_bytes=mask_bytes, tp=emb_tp)
    out = output_bytes(arch, seq, batch, elem_bytes=elem_bytes, tp=tp)
    layers = ceil_div(arch.n_layers, pp)
    if pp == 1:
        return ActivationBreakdown(per_layer, layers, 1, emb, out, "only")
    held = pp if in_flight is None else in_flight
    first = ActivationBreakdown(per_layer, layers, held, emb, 0, "first")
    last = ActivationBreakdown(per_layer, layers, 1, 0, out, "last")
    return first if first.total >= last.total else last
