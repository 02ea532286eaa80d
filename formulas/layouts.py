"""How each implementation lays out what it holds: its parameter tensors, its buffers, its input batch.

Parameter counts are the same for the reference models and transformers' (`formulas.params`, tested
against `sum(p.numel())`); how they are split into tensors is not, and the optimizer cares: torch's
AdamW keeps a 4-byte `step` counter per tensor, and its for-loop update makes temporaries the size of the
tensor it is updating, so the largest tensor sets the optimizer step's peak. Buffers (causal masks,
rotary tables, position ids) are the implementation's choice as well. Checked against the models built
on the meta device (`tests/test_peak.py`).

    reference   models/gpt.py, models/bert.py: fused QKV, an (P, P) bool causal mask for eager attention,
                rotary cos/sin tables of P × head_dim in the model dtype, int64 position ids
    hf          transformers: GPT-2's fused Conv1D c_attn, GPT-NeoX's fused query_key_value, Llama's and
                BERT's separate q, k, v; rotary inv_freq (and its original) of rot_dims/2 fp32 values;
                BERT's position_ids and token_type_ids buffers
"""

from __future__ import annotations

from formulas.architecture import Architecture
from formulas.families import hf_family

INDEX_BYTES = 8
"""Token ids, labels, position and token-type ids: int64."""
NEOX_ROTARY_FRACTION = 0.25
"""GPT-NeoX and Pythia rotate a quarter of each head (`rotary_pct`)."""


def _linear(out_features: int, in_features: int, bias: bool) -> list[int]:
    return [out_features * in_features] + ([out_features] if bias else [])


def _norm(arch: Architecture) -> list[int]:
    return [arch.hidden, arch.hidden] if arch.norm == "layernorm" else [arch.hidden]


def parameter_tensors(arch: Architecture, impl: str) -> list[int]:
    """The numel of every distinct parameter tensor of `impl`'s model (tied tensors once)."""
    h, f, kv, b = arch.hidden, arch.ffn_hidden, arch.kv_width, arch.bias
    separate_qkv = impl == "hf" and hf_family(arch) in ("llama", "bert")
    attention = (
        _linear(h, h, b) + _linear(kv, h, b) + _linear(kv, h, b) if separate_qkv else _linear(h + 2 * kv, h, b)
    ) + _linear(h, h, b)
    mlp = (
        _linear(f, h, b) + _linear(f, h, b) + _linear(h, f, b)
        if arch.mlp == "swiglu"
        else _linear(f, h, b) + _linear(h, f, b)
    )
    layer = _norm(arch) * 2 + attention + mlp
    out = layer * arch.n_layers
    out.append(arch.vocab * h)  # token embedding
    if arch.position == "learned":
        out.append(arch.max_positions * h)
    if arch.family == "decoder":
        out += _norm(arch)  # final norm
        if not arch.tied_embeddings:
            out.append(arch.vocab * h)  # lm_head (no bias)
        return out
    if arch.type_vocab:
        out.append(arch.type_vocab * h)
    out += _norm(arch)  # embedding norm
    if arch.pooler:
        out += _linear(h, h, True)
    if arch.mlm_head:
        out += _linear(h, h, True) + _norm(arch) + [arch.vocab]  # transform, norm, decoder bias (weight tied)
    if arch.nsp_head:
        out += _linear(2, h, True)
    return out


def buffer_bytes(arch: Architecture, impl: str, attention: str, elem_bytes: int) -> int:
    """Bytes of the model's buffers (not parameters, not saved activations)."""
    P = arch.max_positions
    if impl == "hf":
        family = hf_family(arch)
        if family == "bert":
            return 2 * INDEX_BYTES * P  # position_ids, token_type_ids
        if family == "gpt2":
            return 0
        rot = round(arch.head_dim * NEOX_ROTARY_FRACTION) if family == "gpt_neox" else arch.head_dim
        return 2 * 4 * (rot // 2)  # inv_freq and original_inv_freq, fp32
    out = INDEX_BYTES * P if arch.position == "learned" else 0
    if arch.family == "decoder":
        if attention == "eager":
            out += P * P  # the (P, P) bool causal mask
        if arch.position == "rotary":
            out += 2 * P * arch.head_dim * elem_bytes  # cos and sin
    return out


def input_bytes(arch: Architecture, batch: int, seq: int) -> int:
    """One micro-batch as `models.build.make_batch` makes it: int64 ids and the labels the loss needs."""
    tokens = batch * seq
    if arch.family == "decoder":
        return 2 * INDEX_BYTES * tokens  # input_ids, labels
    out = INDEX_BYTES * tokens
    if arch.type_vocab:
        out += INDEX_BYTES * tokens
    if arch.mlm_head:
        out += INDEX_BYTES * tokens
    if arch.nsp_head:
        out += INDEX_BYTES * batch
    return out
