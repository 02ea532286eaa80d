"""Which transformers model type has exactly an architecture's parameters (the rule `models.hf` builds by).

Pure Python, so that `formulas.variants` and `models.hf` share one rule: four families cover the presets,
GPT-2 (learned positions, LayerNorm, GeLU), GPT-NeoX/Pythia (rotary, LayerNorm, GeLU, parallel residual),
Llama (rotary, RMSNorm, SwiGLU, GQA) and BERT; anything else is a `ValueError` naming the features.
"""

from __future__ import annotations

from formulas.architecture import Architecture

SUPPORTED = (
    "GPT-2 (decoder, learned positions, layernorm, gelu, biases, kv-heads = heads), "
    "GPT-NeoX (decoder, rotary, layernorm, gelu, biases, kv-heads = heads), "
    "Llama (decoder, rotary, rmsnorm, swiglu) and "
    "BERT (encoder, learned positions, layernorm, gelu, biases, kv-heads = heads, type_vocab >= 1, "
    "heads: pooler+mlm+nsp, mlm only, or no mlm and no nsp)"
)


def features(arch: Architecture) -> str:
    """The architecture's distinguishing features, for error messages."""
    kv = "" if arch.n_kv_heads == arch.n_heads else f", kv_heads={arch.n_kv_heads}"
    heads = ""
    if arch.family == "encoder":
        heads = f", pooler={arch.pooler}, mlm_head={arch.mlm_head}, nsp_head={arch.nsp_head}"
        heads += f", type_vocab={arch.type_vocab}"
    bias = "bias" if arch.bias else "no bias"
    return f"{arch.family}, {arch.position} positions, {arch.norm}, {arch.mlp}, {bias}{kv}{heads}"


def _bert_body(arch: Architecture) -> bool:
    """BertConfig has no knob for rotary, RMSNorm, SwiGLU, biases, GQA or a missing token-type table."""
    return (
        arch.position == "learned"
        and arch.norm == "layernorm"
        and arch.mlp == "gelu"
        and arch.bias
        and arch.n_kv_heads == arch.n_heads
        and arch.type_vocab >= 1
    )


def _bert_heads(arch: Architecture) -> bool:
    """BertForPreTraining (all three heads), BertForMaskedLM (MLM only) or BertModel (no MLM, no NSP)."""
    all_three = arch.pooler and arch.mlm_head and arch.nsp_head
    mlm_only = arch.mlm_head and not arch.pooler and not arch.nsp_head
    return all_three or mlm_only or not (arch.mlm_head or arch.nsp_head)


def hf_family(arch: Architecture) -> str:
    """`gpt2`, `gpt_neox`, `llama` or `bert`: the transformers model type that has exactly these parameters."""
    mha = arch.n_kv_heads == arch.n_heads
    if arch.family == "decoder":
        if arch.position == "learned" and arch.norm == "layernorm" and arch.mlp == "gelu" and arch.bias and mha:
            return "gpt2"
        if arch.position == "rotary" and arch.norm == "layernorm" and arch.mlp == "gelu" and arch.bias and mha:
            return "gpt_neox"
        if arch.position == "rotary" and arch.norm == "rmsnorm" and arch.mlp == "swiglu":
            return "llama"
    elif _bert_body(arch) and _bert_heads(arch):
        return "bert"
    raise ValueError(f"no transformers class for {features(arch)}; supported: {SUPPORTED}; or use --impl reference")
