"""The shape of a transformer: the one description every formula reads.

Symbols follow Korthikanti et al. 2022 (arXiv:2205.05198, Table 1): L layers, h hidden size,
a attention heads, s sequence length, b micro-batch size, v vocabulary size, t tensor-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Literal, get_args

from formulas.settings import bounded, check_fields

Family = Literal["decoder", "encoder"]
Position = Literal["learned", "rotary", "none"]
Norm = Literal["layernorm", "rmsnorm", "layernorm-noparam"]
MLP = Literal["gelu", "swiglu", "geglu", "relu"]
QKNorm = Literal["none", "head", "full"]
NormPlacement = Literal["pre", "post", "branch-post", "sandwich"]

FAMILIES: tuple[str, ...] = get_args(Family)
POSITIONS: tuple[str, ...] = get_args(Position)
NORMS: tuple[str, ...] = get_args(Norm)
MLPS: tuple[str, ...] = get_args(MLP)
QK_NORMS: tuple[str, ...] = get_args(QKNorm)
NORM_PLACEMENTS: tuple[str, ...] = get_args(NormPlacement)
GATED_MLPS: tuple[str, ...] = ("swiglu", "geglu")
"""MLPs with three matrices (gate, up, down): Shazeer 2020, "GLU Variants Improve Transformer"."""

SHAPE_KEYS: tuple[str, ...] = (
    "layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "max_positions", "capacity_factor",
    "dropout", "position", "norm", "mlp", "family",
)  # fmt: skip
"""The fields a user sets by name (flags `--layers` ..., sweep keys): they override a preset's."""


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of a GPT-style decoder or BERT-style encoder.

    Every field that changes a parameter count or an activation is here, so that
    `formulas.params.parameter_count(arch)` equals `sum(p.numel() for p in model.parameters())`
    of the matching transformers model.
    """

    n_layers: int = bounded(key="layers", maximum=100_000)
    """L: number of transformer blocks."""
    hidden: int = bounded(maximum=10**7)
    """h: width of the residual stream."""
    n_heads: int = bounded(key="heads", maximum=100_000)
    """a: attention (query) heads; must divide `hidden`."""
    vocab: int = bounded(50257, maximum=10**8)
    """v: vocabulary size (rows of the token embedding)."""
    n_kv_heads: int | None = bounded(None, key="kv_heads", maximum=100_000)
    """Key/value heads: `n_heads` for multi-head, fewer for GQA, 1 for MQA. None means `n_heads`."""
    ffn_hidden: int | None = bounded(None, maximum=10**8)
    """Inner width of the MLP. None means 4·h, the GPT/BERT convention."""
    max_positions: int = bounded(2048, maximum=10**9)
    """Longest sequence the position embedding supports (rows of a learned position table)."""
    position: Position = "learned"
    """`learned` (GPT-2, BERT: a table of max_positions × h), `rotary` (no parameters) or `none`."""
    norm: Norm = "layernorm"
    """`layernorm` (weight and bias), `rmsnorm` (weight only) or `layernorm-noparam` (no parameters, OLMo)."""
    bias: bool = True
    """Whether the attention and MLP linear layers carry biases (GPT-2, Pythia, BERT yes; Llama no): the default
    of `qkv_bias`, `out_bias` and `mlp_bias`, which a config sets apart."""
    tied_embeddings: bool = True
    """Whether the output projection reuses the token-embedding matrix (GPT-2, BERT)."""
    mlp: MLP = "gelu"
    """`gelu` or `relu` (OPT): two matrices h→f→h. `swiglu` (Llama) or `geglu` (Gemma): three (gate, up, down)."""
    family: Family = "decoder"
    """`decoder` (GPT: causal, pre-LN, final norm, LM head) or `encoder` (BERT: bidirectional, post-LN)."""
    dropout: float = bounded(0.1, minimum=0.0)
    """Dropout probability of the attention scores and the residual branches; 0 stores no masks."""
    type_vocab: int = bounded(0, minimum=0)
    """Token-type (segment) embeddings: 2 for BERT, 0 for decoders."""
    pooler: bool = False
    """Encoder only: the h×h tanh pooler over the first token (BERT)."""
    mlm_head: bool = False
    """Encoder only: the masked-LM head (dense h×h, norm, decoder tied to the word embeddings, bias v)."""
    nsp_head: bool = False
    """Encoder only: the next-sentence classifier (h×2) on the pooled output."""
    # ---- fields of the model families beyond GPT-2/NeoX/Llama/BERT (issue 12); omitted from `to_dict`
    # when they hold what an older record meant, so that those records' spec keys do not change ----
    head_dim: int | None = bounded(None, maximum=100_000)
    """d: width of one attention head. None means h/a; Mistral-Nemo, Gemma and Qwen3 set their own."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections (Qwen2: yes, with none on the output). None: `bias`."""
    out_bias: bool | None = None
    """A bias on the attention output projection. None: `bias`."""
    mlp_bias: bool | None = None
    """Biases on the MLP's matrices (GPT-J and GPT-NeoX keep them when the attention has none). None: `bias`."""
    head_bias: bool = False
    """A bias on the (untied) output layer, v (GPT-J, Phi-2)."""
    qk_norm: QKNorm = "none"
    """Norms on queries and keys: `head` one of d per head (Qwen3, Phi-2's qk_layernorm), `full` one over all
    heads, a·d and kv_heads·d (OLMo-2)."""
    parallel_attention: bool = False
    """Attention and MLP both read the block input and are added to it together (GPT-J, Falcon, Phi-2; GPT-NeoX's
    `use_parallel_residual` where a config says so)."""
    shared_norm: bool = False
    """With `parallel_attention`: one norm feeds both branches (GPT-J, Phi-2, Falcon-7B), not one each."""
    norm_placement: NormPlacement | None = None
    """`pre` (GPT-2, Llama: before each branch), `post` (BERT, OPT-350m: after each residual add), `branch-post`
    (OLMo-2: on each branch's output) or `sandwich` (Gemma-2: before and after each branch, 4 norms). None:
    `pre` for a decoder, `post` for an encoder."""
    final_norm: bool = True
    """Decoder: a norm after the last block (OPT-350m's post-LN stack has none)."""
    position_offset: int = bounded(0, minimum=0, maximum=1_000)
    """Extra rows of a learned position table (OPT: 2, its padding offset)."""
    embed_dim: int | None = bounded(None, maximum=10**7)
    """Width of the token embedding when it differs from h, projected in and out without biases (OPT-350m's
    `word_embed_proj_dim`). None: h."""
    rotary_fraction: float = bounded(1.0, minimum=0.0)
    """The share of each head that rotary positions rotate (Phi-2 0.4, GPT-J 64/256); no parameters."""
    sliding_window: int | None = bounded(None, minimum=0)
    """Mistral/Gemma-2 sliding-window attention: noted only; a training step without a KV cache stores the same."""
    model_type: str | None = None
    """The transformers `model_type` the shape came from (config.json); `--impl hf` builds that class."""
    # ---- mixture of experts (Shazeer et al. 2017; Fedus et al. 2021): each MoE layer's MLP is `experts` MLPs
    # of `expert_ffn_hidden`, a router (h×E, no bias) picking `experts_per_token` of them per token, and
    # optionally shared experts every token passes through (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE) ----
    experts: int = bounded(0, minimum=0, maximum=100_000)
    """E: routed experts per MoE layer; 0 is a dense model."""
    experts_per_token: int = bounded(0, minimum=0, maximum=100_000)
    """k: routed experts each token is sent to (top-k)."""
    expert_ffn_hidden: int | None = bounded(None, maximum=10**8)
    """Inner width of one routed expert (`moe_intermediate_size`). None: `ffn_hidden` (Mixtral)."""
    shared_expert_ffn_hidden: int = bounded(0, minimum=0, maximum=10**8)
    """Inner width of the shared-expert MLP every token passes through (DeepSeek: n_shared × the expert width;
    Qwen2-MoE: `shared_expert_intermediate_size`); 0: none."""
    shared_expert_gate: bool = False
    """Qwen2-MoE: a sigmoid gate (h×1) on the shared expert's output."""
    capacity_factor: float | None = bounded(None, minimum=0.0)
    """Expert capacity (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021 §2.2): each expert takes
    ceil(cf·T·k/E) rows, padded, the rest dropped. None: dropless, as transformers' experts run (predicted only)."""
    norm_topk_prob: bool = False
    """The chosen experts' weights renormalised to sum to 1 (Mixtral always; Qwen-MoE's `norm_topk_prob`)."""
    dense_layers: tuple[int, ...] = ()
    """Layers whose MLP is a dense one of `ffn_hidden` in a MoE model (DeepSeek's first_k_dense_replace,
    Qwen-MoE's mlp_only_layers and decoder_sparse_step)."""
    # ---- multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, §2.1): K and V from a compressed latent ----
    kv_lora_rank: int = bounded(0, minimum=0, maximum=10**6)
    """d_c: width of the compressed K/V latent; 0 is ordinary attention."""
    q_lora_rank: int = bounded(0, minimum=0, maximum=10**6)
    """d_c': width of the compressed query latent; 0 projects queries directly."""
    qk_rope_head_dim: int = bounded(0, minimum=0, maximum=100_000)
    """d_h^R: the rotary part of each query/key head (the key's shared by all heads)."""
    qk_nope_head_dim: int = bounded(0, minimum=0, maximum=100_000)
    """d_h: the non-rotary part of each query/key head."""
    v_head_dim: int = bounded(0, minimum=0, maximum=100_000)
    """Width of each value head under MLA."""

    def __post_init__(self) -> None:
        if isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_fields(self)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        if self.head_dim is None and self.hidden % self.n_heads:
            raise ValueError(
                f"heads ({self.n_heads}) must divide hidden ({self.hidden}): "
                f"{self.hidden}/{self.n_heads} is not an integer head dimension (or set head_dim)"
            )
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.capacity_factor is not None and (not self.experts or self.capacity_factor <= 0):
            raise ValueError(
                f"capacity_factor {self.capacity_factor!r} needs a mixture of experts and a positive value"
            )
        if bool(self.experts) != bool(self.experts_per_token) or self.experts_per_token > self.experts:
            raise ValueError(f"a mixture of experts needs 1 <= experts_per_token <= experts, got {self.experts_per_token} "
                             f"of {self.experts}")  # fmt: skip
        if any(not 0 <= i < self.n_layers for i in self.dense_layers) or (self.dense_layers and not self.experts):
            raise ValueError(
                f"dense_layers {list(self.dense_layers)} must be layers of a MoE model (0..{self.n_layers - 1})"
            )
        if self.kv_lora_rank and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise ValueError("multi-head latent attention needs qk_rope_head_dim, qk_nope_head_dim and v_head_dim")
        if self.shared_norm and not self.parallel_attention:
            raise ValueError("shared_norm needs parallel_attention: one norm feeds both branches of a parallel block")
        if self.parallel_attention and self.placement != "pre":
            raise ValueError(f"parallel_attention is a pre-norm block; norm_placement {self.placement!r} is not")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"kv-heads ({self.n_kv_heads}) must divide heads ({self.n_heads}) for grouped-query attention"
            )
        if self.family == "decoder" and (self.pooler or self.mlm_head or self.nsp_head or self.type_vocab):
            raise ValueError("pooler, mlm_head, nsp_head and type_vocab apply to encoder (BERT) models only")
        if self.nsp_head and not self.pooler:
            raise ValueError("nsp_head needs pooler: the next-sentence classifier reads the pooled output")

    @property
    def head_size(self) -> int:
        """d: width of one attention head, `head_dim` where a config sets it, else h/a."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.n_heads

    @property
    def rotary_dims(self) -> int:
        """The dims of each head that RoPE turns: all of d (which must be even), or its `rotary_fraction`
        rounded down to even."""
        if self.rotary_fraction == 1.0:
            return self.head_size
        rot = int(self.head_size * self.rotary_fraction)
        return rot - rot % 2

    @property
    def q_width(self) -> int:
        """Width of the query projection and of the attention output: heads · d (= h unless d is set apart)."""
        return self.n_heads * self.head_size

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: kv_heads · d (= h without GQA)."""
        return self.n_kv_heads * self.head_size

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has routed experts."""
        return self.moe and index not in self.dense_layers

    @property
    def moe_layers(self) -> int:
        """Layers with routed experts."""
        return self.n_layers - len(self.dense_layers) if self.moe else 0

    def expert_rows(self, tokens: int) -> int:
        """Rows the routed experts of one MoE layer process for `tokens` tokens: T·k dropless, or E experts of
        ceil(cf·T·k/E) rows each (padded to capacity) under a capacity factor."""
        rows = tokens * self.experts_per_token
        if self.capacity_factor is None:
            return rows
        return self.experts * math.ceil(Fraction(str(self.capacity_factor)) * rows / self.experts)

    @property
    def expert_width(self) -> int:
        """Inner width of one routed expert."""
        return self.expert_ffn_hidden if self.expert_ffn_hidden is not None else self.ffn_hidden

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_out_bias(self) -> bool:
        return self.bias if self.out_bias is None else self.out_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @property
    def placement(self) -> str:
        """`norm_placement`, or its default: `pre` for a decoder, `post` for an encoder."""
        if self.norm_placement is not None:
            return self.norm_placement
        return "post" if self.family == "encoder" else "pre"

    @property
    def norm_statistics(self) -> int:
        """Per-token statistics each norm keeps: RMSNorm its 1/rms, LayerNorm (with or without parameters) its
        mean and 1/std."""
        return 1 if self.norm == "rmsnorm" else 2

    @property
    def norms_per_layer(self) -> int:
        """Norm modules in one block: 2 (one per branch), 1 (a parallel block's shared norm), 4 (sandwich)."""
        if self.placement == "sandwich":
            return 4
        return 1 if self.shared_norm else 2

    @property
    def token_width(self) -> int:
        """Width of the token embedding (and of a tied output layer): `embed_dim`, h unless projected."""
        return self.embed_dim if self.embed_dim is not None else self.hidden

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    def to_dict(self) -> dict:
        """Every field, less the families' fields left at their defaults (`ADDED_FIELDS`): a record of an older
        shape serialises, and so keys, as it did before they existed."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, default in ADDED_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture field(s): {', '.join(unknown)}")
        return cls(**data)


ADDED_FIELDS: dict[str, object] = {
    f.name: f.default for f in fields(Architecture)
    if f.name in ("head_dim", "qkv_bias", "out_bias", "mlp_bias", "head_bias", "qk_norm", "parallel_attention",
                  "shared_norm", "norm_placement", "final_norm", "position_offset", "embed_dim", "rotary_fraction",
                  "sliding_window", "model_type", "experts", "experts_per_token", "expert_ffn_hidden",
                  "shared_expert_ffn_hidden", "shared_expert_gate", "capacity_factor", "norm_topk_prob", "dense_layers", "kv_lora_rank", "q_lora_rank",
                  "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
}  # fmt: skip
"""The fields added for the model families (issue 12) and their defaults (what a record without them means)."""


def unmodelled_features(arch: Architecture) -> tuple[str, ...]:
    """The fields of `arch` that the reference models do not build, and so neither does the activation count
    (`formulas.activations` counts what they store, tensor by tensor): parameters and model states of such
    an architecture are exact, its activations are not predicted yet."""
    out = []
    if arch.qk_norm != "none" and arch.norm != "rmsnorm":
        out.append(f"QK-norm ({arch.qk_norm}) with {arch.norm}")
    if (arch.placement == "post") != (arch.family == "encoder"):
        out.append(f"norm placement {arch.placement} in a {arch.family}")
    if arch.token_width != arch.hidden:
        out.append(f"embedding width {arch.token_width} projected to {arch.hidden}")
    if not arch.final_norm:
        out.append("no final norm")
    if arch.moe and arch.dense_layers:
        out.append(f"dense and MoE layers mixed (dense: {', '.join(map(str, arch.dense_layers))})")
    if arch.mla:
        out.append("multi-head latent attention")
    return tuple(out)
