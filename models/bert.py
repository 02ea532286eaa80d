"""Reference BERT: a bidirectional encoder with the pre-training heads, in the style of `models/gpt.py`.

Devlin et al. 2019 (arXiv:1810.04805): word + position + token-type embeddings, a norm and dropout;
post-LN blocks (Vaswani et al. 2017: LN(x + Sublayer(x))); a tanh pooler over the first token; the
masked-LM head (dense, GeLU, norm, decoder tied to the word embeddings with its own bias) and the
next-sentence classifier. The pieces are those of `models.gpt` (fused QKV attention without a mask,
`native_dropout`, the MLP with exact GeLU), so every saved tensor is one term of `formulas.activations`:
the post-LN block saves the same (4e + 2m)·sbh replicated bytes as the pre-LN one (attention input,
two norm inputs, MLP input, two masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from formulas.architecture import Architecture
from models.gpt import (
    MLP,
    Dropout,
    SelfAttention,
    check_buildable,
    check_options,
    init_weights,
    make_norm,
    rotary_tables,
)


class EncoderBlock(nn.Module):
    """Post-LN block (BERT): x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(
        self,
        arch: Architecture,
        *,
        attention: str = "eager",
        recompute: str = "none",
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.recompute = recompute
        self.attn = SelfAttention(
            arch, causal=False, attention=attention, recompute=recompute, rope=rope, device=device, dtype=dtype
        )
        self.ln_1 = make_norm(arch, device=device, dtype=dtype)
        self.mlp = MLP(arch, approximate="none", device=device, dtype=dtype)  # BERT's exact erf GeLU
        self.ln_2 = make_norm(arch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)  # keeps only the block input
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x))
        x = self.ln_2(x + self.mlp(x))
        return x


class Bert(nn.Module):
    """BERT encoder with the heads the architecture asks for; `forward(...)` returns the training loss.

    The loss is the masked-LM cross-entropy over every position (fp32 logits) plus the next-sentence
    cross-entropy. Outputs without a labelled head (a pooler without the NSP classifier, or no head at
    all) contribute their mean, so that backward reaches every parameter without saving a tensor.
    """

    def __init__(
        self,
        arch: Architecture,
        *,
        attention: str = "eager",
        recompute: str = "none",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if arch.family != "encoder":
            raise ValueError(f"Bert builds encoder architectures, got family {arch.family!r} (use models.gpt.GPT)")
        check_options(attention, recompute)
        check_buildable(arch)
        self.arch = arch
        factory = {"device": device, "dtype": dtype}
        h, P = arch.hidden, arch.max_positions
        self.word_embeddings = nn.Embedding(arch.vocab, h, **factory)
        self.position_embeddings = nn.Embedding(P, h, **factory) if arch.position == "learned" else None
        if self.position_embeddings is not None:
            self.register_buffer("positions", torch.arange(P, device=device), persistent=False)
        self.token_type_embeddings = nn.Embedding(arch.type_vocab, h, **factory) if arch.type_vocab else None
        self.ln_emb = make_norm(arch, **factory)
        self.drop = Dropout(arch.dropout)
        rope = rotary_tables(arch.rotary_dims, P, **factory) if arch.position == "rotary" else None
        self.blocks = nn.ModuleList(
            EncoderBlock(arch, attention=attention, recompute=recompute, rope=rope, **factory)
            for _ in range(arch.n_layers)
        )
        self.pooler = nn.Linear(h, h, **factory) if arch.pooler else None
        if arch.mlm_head:
            self.mlm_dense = nn.Linear(h, h, **factory)
            self.mlm_norm = make_norm(arch, **factory)
            self.mlm_decoder = nn.Linear(h, arch.vocab, **factory)  # its bias is the output bias v
        self.nsp = nn.Linear(h, 2, **factory) if arch.nsp_head else None
        self.apply(init_weights)
        if arch.mlm_head and arch.tied_embeddings:
            self.mlm_decoder.weight = self.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        arch = self.arch
        if arch.mlm_head and labels is None:
            raise ValueError("the masked-LM head needs `labels` (B, T)")
        if arch.nsp_head and next_sentence_label is None:
            raise ValueError("the next-sentence head needs `next_sentence_label` (B,)")
        x = self.encode(input_ids, token_type_ids)
        losses = []
        if arch.mlm_head:
            logits = self.mlm_logits(x)  # (B, T, V)
            losses.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1)))
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, h): the first ([CLS]) token
            if self.nsp is not None:
                nsp_logits = self.nsp(pooled)  # (B, 2)
                losses.append(F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1)))
            else:
                losses.append(pooled.float().mean())
        if not losses:
            losses.append(x.float().mean())
        return sum(losses[1:], losses[0])

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings and the encoder blocks: the last hidden state (B, T, h)."""
        seq = input_ids.size(1)
        if seq > self.arch.max_positions:
            raise ValueError(f"sequence length {seq} exceeds max_positions {self.arch.max_positions}")
        x = self.word_embeddings(input_ids)  # (B, T, h)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(self.positions[:seq])
        if self.token_type_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings(types)
        x = self.drop(self.ln_emb(x))  # saves the norm input e·sbh and the mask m·sbh
        for block in self.blocks:
            x = block(x)
        return x

    def mlm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits (B, T, V); saves x, the GeLU input, the norm input and the decoder input."""
        return self.mlm_decoder(self.mlm_norm(F.gelu(self.mlm_dense(x))))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inference forward: the MLM logits, or the last hidden state without an MLM head."""
        x = self.encode(input_ids)
        return self.mlm_logits(x) if self.arch.mlm_head else x
