"""The shape of a transformer: the one description every formula reads.

Symbols follow Korthikanti et al. 2022 (arXiv:2205.05198, Table 1): L layers, h hidden size,
a attention heads, s sequence length, b micro-batch size, v vocabulary size, t tensor-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

from formulas.settings import bounded, check_fields

Family = Literal["decoder", "encoder"]
Position = Literal["learned", "rotary", "none"]
Norm = Literal["layernorm", "rmsnorm"]
MLP = Literal["gelu", "swiglu"]

FAMILIES: tuple[str, ...] = get_args(Family)
POSITIONS: tuple[str, ...] = get_args(Position)
NORMS: tuple[str, ...] = get_args(Norm)
MLPS: tuple[str, ...] = get_args(MLP)

SHAPE_KEYS: tuple[str, ...] = (
    "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "max_positions",
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
    """`layernorm` (weight and bias) or `rmsnorm` (weight only)."""
    bias: bool = True
    """Whether the attention and MLP linear layers carry biases (GPT-2, Pythia, BERT yes; Llama no)."""
    tied_embeddings: bool = True
    """Whether the output projection reuses the token-embedding matrix (GPT-2, BERT)."""
    mlp: MLP = "gelu"
    """`gelu`: two matrices h→f→h. `swiglu`: three matrices (gate, up, down), Llama."""
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

    def __post_init__(self) -> None:
        if isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_fields(self)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        if self.hidden % self.n_heads:
            raise ValueError(
                f"heads ({self.n_heads}) must divide hidden ({self.hidden}): "
                f"{self.hidden}/{self.n_heads} is not an integer head dimension"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"kv-heads ({self.n_kv_heads}) must divide heads ({self.n_heads}) for grouped-query attention"
            )
        if self.family == "decoder" and (self.pooler or self.mlm_head or self.nsp_head or self.type_vocab):
            raise ValueError("pooler, mlm_head, nsp_head and type_vocab apply to encoder (BERT) models only")
        if self.nsp_head and not self.pooler:
            raise ValueError("nsp_head needs pooler: the next-sentence classifier reads the pooled output")

    @property
    def head_dim(self) -> int:
        """h/a: width of one attention head."""
        return self.hidden // self.n_heads

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: kv_heads · head_dim (= h without GQA)."""
        return self.n_kv_heads * self.head_dim

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture field(s): {', '.join(unknown)}")
        return cls(**data)
