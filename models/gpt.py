"""Reference GPT: a decoder-only transformer written to be read next to `formulas/`.

Layout after karpathy/nanoGPT `model.py` (pre-LN blocks, fused QKV, weight tying), generalised to the
`Architecture` knobs of GPT-NeoX and Llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention).

Every tensor autograd keeps for the backward pass is one term of `formulas.activations` (Korthikanti et al.
2022, arXiv:2205.05198, Section 4.1), so that measured saved bytes equal the formula on any device. Per
layer, with e bytes per activation and m per dropout-mask element:

    per token, h wide:    norm inputs 2e, attention input e, Q e, projection input e, MLP input e, masks 2m
    per token, kv wide:   K e, V e
    per token, f wide:    GeLU input and output 2e (SwiGLU: gate, up, silu(gate), product 4e)
    per score (eager):    softmax output e, dropout mask m, dropout output e

Flash attention saves a log-sum-exp per query and head instead of the scores (its output is the projection
input). Beyond the paper, each norm saves per-token statistics: LayerNorm its mean and 1/std (8·s·b bytes
in fp32; CPU keeps them in the input dtype), RMSNorm its fp32 1/rms (4·s·b bytes).

Choices that make that exact:
- dropout goes through `torch.native_dropout`, whose saved mask is 1-byte bool on CPU and CUDA
  (CPU `F.dropout` saves it in the input dtype: ATen Dropout.cpp fuses to native_dropout on CUDA only);
- RMSNorm is an autograd function that saves its input and the fp32 1/rms, as fused kernels do
  (`F.rms_norm` on CPU is composite and saves fp32 copies);
- grouped-query attention groups the query heads instead of repeating K and V;
- the causal mask and the rotary tables are buffers shared by all blocks (never saved per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from formulas.activations import ATTENTIONS, RECOMPUTES
from formulas.architecture import GATED_MLPS, Architecture, unmodelled_features

INIT_STD = 0.02
"""Weight init N(0, 0.02), as GPT-2 and nanoGPT (biases zero, norm weights one)."""

NORM_EPS = 1e-5
ROPE_BASE = 10000.0
"""RoPE base θ (Su et al. 2021, Section 3.4.2; GPT-NeoX and Llama 2)."""


def check_options(attention: str, recompute: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if recompute not in RECOMPUTES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTES)}, got {recompute!r}")


class Dropout(nn.Module):
    """Dropout through `torch.native_dropout`: the mask it saves is a 1-byte bool on every device.

    Korthikanti et al. count a 1-byte mask per dropout (the "2sbh" and "as²b" mask terms of Table 2);
    CPU `F.dropout` would save it in the input dtype (4 bytes in fp32). p = 0 stores nothing.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit tensors (as every fused norm kernel accumulates), the tensor's own dtype otherwise."""
    return torch.float32 if x.element_size() < 4 else x.dtype


class _RMSNormFunction(torch.autograd.Function):
    """y = w · x / rms(x), rms(x) = sqrt(mean(x²) + eps) (Zhang & Sennrich 2019, eq. 4).

    Saves only the input, the weight and the fp32 1/rms per token, like a fused kernel, so a norm
    stores e·sbh as the paper counts (plus 4 bytes per token).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_acc_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1), fp32 for 16-bit x
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        g = grad.to(acc)
        gw = g * weight.to(acc)  # dL/dx̂
        # dL/dx = (1/rms)·(dL/dx̂ − x̂·mean(dL/dx̂ · x̂)): the Jacobian of x/rms(x).
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        grad_w = (g * xhat.to(x.dtype).to(acc)).reshape(-1, x.size(-1)).sum(0)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): a weight of h and no bias."""

    def __init__(self, hidden: int, eps: float = NORM_EPS, *, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def make_norm(arch: Architecture, *, device=None, dtype=None) -> nn.Module:
    """LayerNorm (weight and bias, 2h) or RMSNorm (weight, h), as `formulas.params.norm_params` counts."""
    if arch.norm == "rmsnorm":
        return RMSNorm(arch.hidden, device=device, dtype=dtype)
    affine = arch.norm == "layernorm"  # OLMo's is non-parametric: the same saved input and statistics
    return nn.LayerNorm(arch.hidden, eps=NORM_EPS, elementwise_affine=affine, device=device, dtype=dtype)


def check_buildable(arch: Architecture) -> None:
    """The reference models build pre-LN GPT and post-LN BERT blocks; a family's other features are measured
    through transformers (`--impl hf`) or predicted only (`formulas.architecture.unmodelled_features`)."""
    missing = list(unmodelled_features(arch))
    if arch.moe:
        missing.append(f"mixture of experts ({arch.experts_per_token} of {arch.experts})")
    if arch.mla:
        missing.append("multi-head latent attention")
    if missing:
        raise ValueError(f"the reference models do not build {', '.join(missing)}: use --impl hf")


def causal_mask(positions: int, *, device=None) -> torch.Tensor:
    """(P, P) bool, True above the diagonal: the future positions a token must not attend to."""
    return torch.ones(positions, positions, dtype=torch.bool, device=device).triu(1)


def rotary_tables(head_dim: int, positions: int, *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE (Su et al. 2021, eq. 34) in the rotate-half layout of GPT-NeoX and Llama.

    Frequency i of the head dimension d is θ_i = base^(−2i/d); position p rotates pair i by p·θ_i.
    Computed in fp32, stored in the activation dtype. Returns two (P, hs) tables.
    """
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head dimension, got hidden/heads = {head_dim}")
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)  # (P, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, hs)
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x (B, T, n, hs) and tables (T, hs).

    Multiplying by a constant buffer saves only the buffer, so RoPE adds no activation bytes.
    """
    rot = cos.size(-1)
    if rot < x.size(-1):  # partial rotary (GPT-J, Phi-2): the first `rot` dims of each head turn, the rest pass
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hs): broadcast over heads
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with one fused QKV projection.

    Attention(Q, K, V) = softmax(QKᵀ/√d_k)·V (Vaswani et al. 2017, eq. 1). The core (scores, mask,
    softmax, dropout, ·V) is what Korthikanti et al.'s selective recomputation recomputes (Section 4.2).
    """

    def __init__(
        self,
        arch: Architecture,
        *,
        causal: bool,
        attention: str = "eager",
        recompute: str = "none",
        future: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_options(attention, recompute)
        h, q, kv = arch.hidden, arch.q_width, arch.kv_width
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, arch.n_kv_heads, arch.head_size
        self.causal, self.attention, self.recompute = causal, attention, recompute
        self.qkv = nn.Linear(h, q + 2 * kv, bias=arch.has_qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(q, h, bias=arch.has_out_bias, device=device, dtype=dtype)
        self.dropout_p = arch.dropout
        self.attn_dropout = Dropout(arch.dropout)
        self.resid_dropout = Dropout(arch.dropout)
        if attention == "eager" and causal:
            if future is None:
                raise ValueError("eager causal attention needs the causal mask buffer (`causal_mask`)")
            self.register_buffer("future", future, persistent=False)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm != "none":
            # QK-norm (Qwen3: RMSNorm over each head's d; OLMo-2: over all of Q's and K's width).
            per_head = arch.qk_norm == "head"
            q_w, k_w = (arch.head_size, arch.head_size) if per_head else (arch.q_width, arch.kv_width)
            self.q_norm = RMSNorm(q_w, device=device, dtype=dtype)
            self.k_norm = RMSNorm(k_w, device=device, dtype=dtype)
        self.rotary = rope is not None
        if rope is not None:
            self.register_buffer("cos", rope[0], persistent=False)
            self.register_buffer("sin", rope[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()  # batch, sequence (the hidden width is this rank's heads × head size)
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        if self.qk_norm == "full":
            # Each norm keeps its own (contiguous) input, not the fused QKV output the slice would pin.
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.rotary:
            q, k = apply_rotary(q, self.cos[:T], self.sin[:T]), apply_rotary(k, self.cos[:T], self.sin[:T])
        if self.rotary or self.qk_norm != "none":
            # q and k are new tensors now; copy v out of the fused QKV output too, or keeping v alive
            # for the backward pass would keep all of Q, K, V's storage (h + 2·kv) instead of V's.
            v = v.contiguous()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs) ×2
        if self.recompute == "selective" and torch.is_grad_enabled():
            # Korthikanti et al. Section 4.2: keep Q, K, V, recompute the a·s² part in the backward pass.
            y = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            y = self.core(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # re-assemble the heads: (B, T, a·d)
        return self.resid_dropout(self.proj(y))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√hs [+ causal mask]) · V: (B, nh, T, hs), (B, nkv, T, hs) ×2 -> (B, nh, T, hs)."""
        if self.attention == "flash":
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=self.causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        B, nh, T, hs = q.size()
        nkv = k.size(1)
        g = nh // nkv  # query heads per K/V head; query head i reads K/V head i // g (HF convention)
        # Group the g query heads of one K/V head along the sequence axis: one matmul serves them all and
        # K, V stay at kv_width, as the formula counts them (no repeat_interleave copies).
        q = q.reshape(B, nkv, g * T, hs)  # (B, nkv, g·T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nkv, g·T, T)
        att = att.view(B, nkv, g, T, T)
        if self.causal:
            att = att.masked_fill(self.future[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)  # saved: e·a·s²·b
        att = self.attn_dropout(att)  # saved: mask m·a·s²·b and output e·a·s²·b
        y = att.view(B, nkv, g * T, T) @ v  # (B, nkv, g·T, hs)
        return y.view(B, nh, T, hs)


class MLP(nn.Module):
    """GeLU: W2·gelu(W1·x) (h→f→h); ReLU the same with relu (OPT). SwiGLU: W_down·(silu(W_gate·x) ⊙ W_up·x),
    GeGLU with gelu for silu (Shazeer 2020, eqs. 5-6)."""

    def __init__(self, arch: Architecture, *, approximate: str = "tanh", device=None, dtype=None) -> None:
        super().__init__()
        h, f, b = arch.hidden, arch.ffn_hidden, arch.has_mlp_bias
        self.kind = arch.mlp
        self.gated = arch.mlp in GATED_MLPS  # gate, up, down (the tensor-parallel plan's keys follow it)
        self.approximate = approximate
        if self.gated:
            self.gate = nn.Linear(h, f, bias=b, device=device, dtype=dtype)
            self.up = nn.Linear(h, f, bias=b, device=device, dtype=dtype)
            self.down = nn.Linear(f, h, bias=b, device=device, dtype=dtype)
        else:
            self.fc = nn.Linear(h, f, bias=b, device=device, dtype=dtype)
            self.proj = nn.Linear(f, h, bias=b, device=device, dtype=dtype)
        self.dropout = Dropout(arch.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            x = self.down(F.silu(self.gate(x)) * self.up(x))  # saves gate, silu(gate), up, product: 4·e·sbf
        elif self.kind == "geglu":
            x = self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))  # the same four: 4·e·sbf
        elif self.kind == "relu":
            x = self.proj(F.relu(self.fc(x)))  # relu saves its output, the projection's input: 1·e·sbf
        else:
            x = self.proj(F.gelu(self.fc(x), approximate=self.approximate))  # saves gelu input, output: 2·e·sbf
        return self.dropout(x)


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2): x + attn(norm(x)), then x + mlp(norm(x)).

    `parallel_attention` (GPT-J, Falcon, Phi-2): x + attn(norm(x)) + mlp(norm'(x)), with one norm feeding both
    (`shared_norm`) or one each; `norm_placement` `sandwich` (Gemma-2) also norms each branch's output,
    `branch-post` (OLMo-2) norms only the branch outputs.
    """

    def __init__(
        self,
        arch: Architecture,
        *,
        attention: str = "eager",
        recompute: str = "none",
        future: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.recompute = recompute
        self.ln_1 = make_norm(arch, device=device, dtype=dtype)
        self.attn = SelfAttention(
            arch,
            causal=True,
            attention=attention,
            recompute=recompute,
            future=future,
            rope=rope,
            device=device,
            dtype=dtype,
        )
        self.ln_2 = None if arch.shared_norm else make_norm(arch, device=device, dtype=dtype)
        self.mlp = MLP(arch, approximate="tanh", device=device, dtype=dtype)
        self.parallel, self.placement = arch.parallel_attention, arch.placement
        if self.placement == "sandwich":
            self.ln_attn_out = make_norm(arch, device=device, dtype=dtype)
            self.ln_mlp_out = make_norm(arch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            # Full recomputation keeps only the block input (Korthikanti et al.: 2·s·b·h per layer). The
            # checkpoint sits inside forward so module hooks run once, not again during the recompute.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h) + self.mlp(h if self.ln_2 is None else self.ln_2(x))
        if self.placement == "branch-post":
            x = x + self.ln_1(self.attn(x))
            return x + self.ln_2(self.mlp(x))
        if self.placement == "sandwich":
            x = x + self.ln_attn_out(self.attn(self.ln_1(x)))
            return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for linear and embedding weights, zero biases (GPT-2; nanoGPT `_init_weights`)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)


class GPT(nn.Module):
    """Decoder-only transformer; `forward(input_ids, labels)` returns the mean cross-entropy over all positions.

    `labels` are scored as given, without a shift: the harness feeds random ids, and shifting would only
    drop one position per sequence from the logits the formula counts (4·s·b·v).

    `attention`: `eager` (scores written out, the paper's a·s² terms) or `flash`
    (`F.scaled_dot_product_attention`). `recompute`: `none`, `selective` (attention core) or `full`
    (every block). `device` and `dtype` go to every parameter and buffer as factory arguments, so the
    model can be built directly on `meta` or under `FakeTensorMode` without `.to()`.
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
        if arch.family != "decoder":
            raise ValueError(f"GPT builds decoder architectures, got family {arch.family!r} (use models.bert.Bert)")
        check_options(attention, recompute)
        check_buildable(arch)
        self.arch = arch
        factory = {"device": device, "dtype": dtype}
        h, P = arch.hidden, arch.max_positions
        self.wte = nn.Embedding(arch.vocab, h, **factory)
        # OPT's table has `position_offset` more rows, and position p reads row p + offset.
        self.wpe = nn.Embedding(P + arch.position_offset, h, **factory) if arch.position == "learned" else None
        if self.wpe is not None:
            off = arch.position_offset
            self.register_buffer("positions", torch.arange(off, P + off, device=device), persistent=False)
        self.drop = Dropout(arch.dropout)
        # One causal mask and one pair of rotary tables, shared by every block.
        future = causal_mask(P, device=device) if attention == "eager" else None
        rope = rotary_tables(arch.rotary_dims, P, **factory) if arch.position == "rotary" else None
        self.blocks = nn.ModuleList(
            Block(arch, attention=attention, recompute=recompute, future=future, rope=rope, **factory)
            for _ in range(arch.n_layers)
        )
        self.ln_f = make_norm(arch, **factory)
        self.lm_head = nn.Linear(h, arch.vocab, bias=arch.head_bias, **factory)  # GPT-J and Phi-2 have a bias
        self.apply(init_weights)
        if arch.tied_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.prefill(input_ids)  # (B, T, V)
        # fp32 logits for the loss whatever the model dtype (Megatron, transformers): 4·s·b·v bytes saved.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of every position: the inference forward over a prompt (no KV cache kept)."""
        seq = input_ids.size(1)
        if seq > self.arch.max_positions:
            raise ValueError(f"sequence length {seq} exceeds max_positions {self.arch.max_positions}")
        x = self.wte(input_ids)  # (B, T, h)
        if self.wpe is not None:
            x = x + self.wpe(self.positions[:seq])  # (T, h) broadcast over the batch
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
