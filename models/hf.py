"""The same architectures as transformers models (random weights, nothing downloaded).

Four families cover the presets: GPT-2 (learned positions, LayerNorm, GeLU), GPT-NeoX/Pythia (rotary,
LayerNorm, GeLU, parallel residual), Llama (rotary, RMSNorm, SwiGLU, GQA) and BERT. The class follows
from the architecture's features, or from its `model_type` when it was read from a config.json (the other
families' configs are built in `models.hf_families`); anything else raises `ValueError`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from formulas.architecture import Architecture
from formulas.families import hf_family
from models.gpt import check_options
from models.hf_families import MODEL_CLASSES, transformers_config

NEOX_ROTARY_PCT = 0.25
"""Pythia and GPT-NeoX-20B rotate a quarter of each head (`rotary_pct` in their Hub configs)."""


def attn_implementation(attention: str, *, device=None, dtype=None) -> str:
    """transformers' `attn_implementation` for our `attention`.

    eager -> "eager" (scores written out). flash -> "flash_attention_2" where the `flash_attn` package
    is importable and the model is 16-bit on CUDA, else "sdpa" (`F.scaled_dot_product_attention`, which
    picks the flash or memory-efficient kernel on CUDA and falls back to the math path on CPU).
    """
    check_options(attention, "none")
    if attention == "eager":
        return "eager"
    device_type = torch.device(device).type if device is not None else torch.get_default_device().type
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda" and sixteen_bit and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def hf_config(arch: Architecture, attention: str = "eager", *, device=None, dtype=None) -> Any:
    """A transformers `PretrainedConfig` with the hyper-parameters of `arch` (raises `ValueError` if none fits)."""
    import transformers

    family = hf_family(arch)
    common: dict[str, Any] = {
        "vocab_size": arch.vocab,
        "tie_word_embeddings": arch.tied_embeddings,
        "attn_implementation": attn_implementation(attention, device=device, dtype=dtype),
        # Token ids of the published configs can exceed a tiny test vocabulary; training needs none.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": False,  # training: no KV cache
    }
    if family in MODEL_CLASSES or arch.model_type == "llama":
        return transformers_config(arch, common)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=arch.n_layers,
            n_embd=arch.hidden,
            n_head=arch.n_heads,
            n_inner=arch.ffn_hidden,
            n_positions=arch.max_positions,
            resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout,
            **common,
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            num_hidden_layers=arch.n_layers,
            hidden_size=arch.hidden,
            num_attention_heads=arch.n_heads,
            intermediate_size=arch.ffn_hidden,
            max_position_embeddings=arch.max_positions,
            hidden_act="gelu",
            # A preset's NeoX is Pythia's (parallel, a quarter rotated); a config's says so (`models.configs`).
            rotary_pct=NEOX_ROTARY_PCT if arch.model_type is None else arch.rotary_fraction,
            use_parallel_residual=arch.model_type is None or arch.parallel_attention,
            attention_bias=arch.has_qkv_bias,
            attention_dropout=arch.dropout,
            hidden_dropout=arch.dropout,
            **common,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=arch.n_layers,
            hidden_size=arch.hidden,
            num_attention_heads=arch.n_heads,
            num_key_value_heads=arch.n_kv_heads,
            intermediate_size=arch.ffn_hidden,
            max_position_embeddings=arch.max_positions,
            hidden_act="silu",
            attention_bias=arch.has_qkv_bias,
            mlp_bias=arch.has_mlp_bias,
            attention_dropout=arch.dropout,  # Llama has no residual dropout: only the attention scores drop
            **common,
        )
    return transformers.BertConfig(
        num_hidden_layers=arch.n_layers,
        hidden_size=arch.hidden,
        num_attention_heads=arch.n_heads,
        intermediate_size=arch.ffn_hidden,
        max_position_embeddings=arch.max_positions,
        type_vocab_size=arch.type_vocab,
        hidden_act="gelu",
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        **common,
    )


def hf_model_class(arch: Architecture) -> tuple[type, dict[str, Any]]:
    """The transformers class for `arch` and its extra constructor arguments."""
    import transformers

    family = hf_family(arch)
    if family in MODEL_CLASSES:
        return getattr(transformers, MODEL_CLASSES[family]), {}
    if family == "gpt2":
        return transformers.GPT2LMHeadModel, {}
    if family == "gpt_neox":
        return transformers.GPTNeoXForCausalLM, {}
    if family == "llama":
        return transformers.LlamaForCausalLM, {}
    if arch.mlm_head and arch.nsp_head:
        return transformers.BertForPreTraining, {}
    if arch.mlm_head:
        return transformers.BertForMaskedLM, {}
    return transformers.BertModel, {"add_pooling_layer": arch.pooler}


def instantiate_hf(arch: Architecture, attention: str = "eager", *, device=None, dtype=None) -> nn.Module:
    """The bare transformers model for `arch`, built directly on `device` in `dtype`, in train mode.

    The default dtype is set around the constructor (transformers' own `_from_config` does this), never
    `model.to(dtype)`: that fails on fake parameters ("Cannot swap t1 because it has weakref"). On `meta` nothing is allocated.
    """
    cls, kwargs = hf_model_class(arch)
    config = hf_config(arch, attention, device=device, dtype=dtype)
    with torch.device(device if device is not None else torch.get_default_device()):
        model = cls._from_config(config, dtype=dtype or torch.get_default_dtype(), **kwargs)
    if arch.family == "decoder":
        model.loss_type = "ForCausalLM"  # what transformers falls back to for GPT2LMHeadModel, minus its warning
    return model.train()


class HFLossModel(nn.Module):
    """A transformers model whose `forward(**batch)` returns the scalar training loss.

    Heads with labels return transformers' own loss (causal LM: labels shifted inside, fp32 logits;
    BERT pre-training and masked LM: cross-entropy on logits in the model dtype). A `BertModel` has no
    labelled head: its stand-in loss is the mean of the pooled output (or of the last hidden state),
    as in `models.bert.Bert`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        out = self.model(**batch)
        loss = getattr(out, "loss", None)
        if loss is not None:
            return loss
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state).float().mean()

    def prefill(self, input_ids: torch.Tensor):
        """Inference forward over a prompt: the logits and, for causal LMs, the KV cache (use_cache=True)."""
        if self.model.can_generate():
            return self.model(input_ids=input_ids, use_cache=True)
        return self.model(input_ids=input_ids)


def build_hf(
    arch: Architecture,
    *,
    attention: str = "eager",
    recompute: str = "none",
    device=None,
    dtype=None,
) -> HFLossModel:
    """The transformers model for `arch` wrapped in `HFLossModel`, in train mode.

    `recompute="full"` turns on transformers' activation checkpointing of every layer (non-reentrant);
    transformers has no selective (attention-core) recomputation.
    """
    check_options(attention, recompute)
    if recompute == "selective":
        raise ValueError("selective recompute is implemented for --impl reference only")
    model = instantiate_hf(arch, attention, device=device, dtype=dtype)
    if recompute == "full":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return HFLossModel(model).train()
