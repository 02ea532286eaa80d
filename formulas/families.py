"""Which transformers model type has exactly an architecture's parameters (the rule `models.hf` builds by).

Pure Python, so that `formulas.variants` and `models.hf` share one rule. An architecture read from a
config.json carries its `model_type` (`models.configs`), which is built as it is. A shape without one (a
preset, flags) is one of four families: GPT-2 (learned positions, LayerNorm, GeLU), GPT-NeoX/Pythia (rotary,
LayerNorm, GeLU, parallel residual), Llama (rotary, RMSNorm, SwiGLU, GQA) and BERT; anything else is a
`ValueError` naming the features.

`code_family` says whose saved tensors and parameter order the harness has measured for a transformers model:
Mistral's and Qwen2's modeling code is Llama's (and Gemma's and Phi-3's, less GemmaRMSNorm's fp32 products and
Phi-3's fused projections, named departures) (transformers' modular files inherit LlamaAttention, LlamaMLP
and LlamaRMSNorm; Qwen2 adds q, k and v biases, which change no saved tensor), measured to the byte in
`tests/test_variants.py`. The other families' transformers code is not measured yet: a ValueError.
"""

from __future__ import annotations

from formulas.architecture import Architecture

PLAIN_FIELDS: tuple[str, ...] = (
    "n_layers", "hidden", "n_heads", "vocab", "n_kv_heads", "ffn_hidden", "max_positions", "position", "norm",
    "bias", "tied_embeddings", "mlp", "family", "dropout", "type_vocab", "pooler", "mlm_head", "nsp_head",
)  # fmt: skip
"""The fields a preset's shape has; the families' fields beyond them need a model_type to be built."""

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


HF_TYPES: tuple[str, ...] = (
    "gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "falcon",
    "opt", "olmo", "olmo2", "bert", "roberta", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
)  # fmt: skip
"""transformers model types `models.hf` builds from an architecture."""

LLAMA_CODE: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "olmoe", "gemma", "phi3",
)  # fmt: skip
"""Model types whose transformers modeling code stores what Llama's stores (module doc); Mixtral's and
Qwen2-MoE's attention and norms are Llama's, their MoE block is counted by `formulas.activations.moe_mlp_bytes`."""


def code_family(arch: Architecture) -> str:
    """`gpt2`, `gpt_neox`, `llama` or `bert`: the measured transformers code behind `arch` (module doc)."""
    family = hf_family(arch)
    if family in LLAMA_CODE:
        return "llama"
    if family == "gpt_neox" and arch.model_type is not None:
        raise ValueError("transformers GPT-NeoX with a sequential block, a rotary share other than a quarter or "
                         "attention without biases is not measured yet (the Pythia presets are)")  # fmt: skip
    if family not in ("gpt2", "gpt_neox", "bert"):
        raise ValueError(f"transformers {family}: its saved tensors are not measured yet (measured: gpt2, gpt_neox, "
                         f"bert and Llama's code: {', '.join(LLAMA_CODE)}); its parameters are counted exactly")  # fmt: skip
    return family


def hf_family(arch: Architecture) -> str:
    """The transformers model type that has exactly these parameters: the config's own, or one of the four
    families for a shape without one."""
    if arch.model_type is not None:
        if arch.model_type not in HF_TYPES:
            raise ValueError(f"model_type {arch.model_type!r} is not built ({', '.join(HF_TYPES)})")
        return arch.model_type
    added = sorted(set(arch.to_dict()) - set(PLAIN_FIELDS))
    if added:
        raise ValueError(f"no transformers class for {features(arch)} with {', '.join(added)} and no model_type; "
                         f"set model_type ({', '.join(HF_TYPES)}) or use --impl reference")  # fmt: skip
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
