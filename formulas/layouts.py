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

from formulas.architecture import GATED_MLPS, Architecture
from formulas.families import code_family

INDEX_BYTES = 8
"""Token ids, labels, position and token-type ids: int64."""
NEOX_ROTARY_FRACTION = 0.25
"""GPT-NeoX and Pythia rotate a quarter of each head (`rotary_pct`)."""


def _linear(out_features: int, in_features: int, bias: bool) -> list[int]:
    return [out_features * in_features] + ([out_features] if bias else [])


def _norm(arch: Architecture) -> list[int]:
    return {"layernorm": [arch.hidden, arch.hidden], "rmsnorm": [arch.hidden], "layernorm-noparam": []}[arch.norm]


def parameter_tensors(arch: Architecture, impl: str) -> list[int]:
    """The numel of every distinct parameter tensor of `impl`'s model (tied tensors once), in the order of
    `model.parameters()`: the order DeepSpeed flattens them in, so that partition boundaries fall where they do."""
    h, f, q, kv = arch.hidden, arch.ffn_hidden, arch.q_width, arch.kv_width
    qb, ob, mb = arch.has_qkv_bias, arch.has_out_bias, arch.has_mlp_bias
    family = code_family(arch) if impl == "hf" else None
    norm = _norm(arch)
    phi3 = family == "llama" and arch.model_type == "phi3"  # fused qkv_proj and gate_up_proj
    if family in ("llama", "bert") and not phi3:
        qkv = _linear(q, h, qb) + _linear(kv, h, qb) + _linear(kv, h, qb)
    else:
        qkv = _linear(q + 2 * kv, h, qb)
    attention = _linear(h, q, ob) + qkv if phi3 else qkv + _linear(h, q, ob)  # Phi-3 registers o_proj first
    if arch.qk_norm != "none":  # q_norm and k_norm after the output projection (reference, Qwen3, OLMoE)
        attention += [arch.head_size, arch.head_size] if arch.qk_norm == "head" else [q, kv]
    up = _linear(f, h, mb) * (2 if arch.mlp in GATED_MLPS else 1)  # (gate,) up
    up = _linear(2 * f, h, mb) if phi3 else up
    mlp = up + _linear(h, f, mb)
    if arch.moe:
        if impl != "hf" or arch.dense_layers:
            raise ValueError("a mixture of experts' parameter tensors are laid out for transformers' all-MoE "
                             "models only (--impl hf, no dense layers)")  # fmt: skip
        # router (E, h), experts' gate_up_proj (E, 2f, h) and down_proj (E, h, f), the shared expert's gate, up,
        # down and Qwen2-MoE's (1, h) gate on it: transformers MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock.
        fe, fs = arch.expert_width, arch.shared_expert_ffn_hidden
        mlp = [arch.experts * h, arch.experts * 2 * fe * h, arch.experts * h * fe]
        mlp += ([fs * h, fs * h, h * fs] if fs else []) + ([h] if arch.shared_expert_gate else [])
    if arch.family == "decoder":
        if family == "llama":
            layer = attention + mlp + norm + norm  # q, k, v, o, gate, up, down, input and post-attention norms
        elif family == "gpt_neox":
            layer = norm + norm + attention + mlp  # both norms first
        else:  # the reference block: ln_1, attention, ln_2 (none when shared), MLP, a sandwich's two more
            layer = norm + attention + ([] if arch.shared_norm else norm) + mlp
            layer += norm + norm if arch.placement == "sandwich" else []
        positions = (arch.max_positions + arch.position_offset) * h
        out = [arch.vocab * h] + ([positions] if arch.position == "learned" else [])
        out += layer * arch.n_layers + norm
        out += [] if arch.tied_embeddings else [arch.vocab * h]  # lm_head
        return out + ([arch.vocab] if arch.head_bias else [])  # its bias (GPT-J, Phi-2)
    out = [arch.vocab * h] + ([arch.max_positions * h] if arch.position == "learned" else [])
    out += ([arch.type_vocab * h] if arch.type_vocab else []) + norm  # embedding norm
    out += (attention + norm + mlp + norm) * arch.n_layers
    if arch.pooler:
        out += _linear(h, h, True)
    if arch.mlm_head:
        transform = _linear(h, h, True) + norm
        out += [arch.vocab, *transform] if family == "bert" else [*transform, arch.vocab]  # decoder bias (tied)
    if arch.nsp_head:
        out += _linear(2, h, True)
    return out


def buffer_bytes(arch: Architecture, impl: str, attention: str, elem_bytes: int) -> int:
    """Bytes of the model's buffers (not parameters, not saved activations)."""
    P = arch.max_positions
    if impl == "hf":
        family = code_family(arch)
        if family == "bert":
            return 2 * INDEX_BYTES * P  # position_ids, token_type_ids
        if family == "gpt2":
            return 0
        rot = round(arch.head_size * NEOX_ROTARY_FRACTION) if family == "gpt_neox" else arch.head_size
        return 2 * 4 * (rot // 2)  # inv_freq and original_inv_freq, fp32
    out = INDEX_BYTES * P if arch.position == "learned" else 0
    if arch.family == "decoder":
        if attention == "eager":
            out += P * P  # the (P, P) bool causal mask
        if arch.position == "rotary":
            out += 2 * P * arch.rotary_dims * elem_bytes  # cos and sin
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
