"""An architecture with a `model_type` as that transformers config: the inverse of `models.configs`.

`transformers_config(arch, common)` gives the config `models.hf` builds the model from; a field the class
cannot express (say, MLP biases on Qwen2) is a `ValueError` naming it, so that what is built always has the
parameters `formulas.params` counts (`tests/test_families.py`).
"""

from __future__ import annotations

from typing import Any

from formulas.architecture import Architecture

ACTS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "gelu": "gelu_new", "relu": "relu"}
"""The activation each family's config is given for our MLP kind."""


RESOLVED = {"qkv_bias": "has_qkv_bias", "out_bias": "has_out_bias", "mlp_bias": "has_mlp_bias",
            "norm_placement": "placement", "embed_dim": "token_width", "head_dim": "head_size"}  # fmt: skip
"""Fields that default from others, by the property that resolves them."""


def _expect(arch: Architecture, kind: str, **wanted: Any) -> None:
    for name, value in wanted.items():
        have = getattr(arch, RESOLVED.get(name, name))
        if have != value:
            raise ValueError(f"transformers {kind} has {name}={value!r}, the architecture {have!r}")


def _llama_like(arch: Architecture, kind: str, **extra: Any) -> dict:
    """The fields Llama's descendants share (GQA, head size, rotary, RMSNorm, gated MLP)."""
    _expect(arch, kind, position="rotary", family="decoder", parallel_attention=False, embed_dim=arch.hidden,
            head_bias=False, position_offset=0, final_norm=True)  # fmt: skip
    if kind not in MOE_BUILDS:
        _expect(arch, kind, experts=0, kv_lora_rank=0)
    if arch.mlp not in ("swiglu", "geglu"):
        raise ValueError(f"transformers {kind} has a gated MLP, the architecture {arch.mlp!r}")
    out = dict(
        num_hidden_layers=arch.n_layers, hidden_size=arch.hidden, num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_kv_heads, head_dim=arch.head_size, intermediate_size=arch.ffn_hidden,
        max_position_embeddings=arch.max_positions, hidden_act=ACTS[arch.mlp], attention_dropout=arch.dropout,
    )  # fmt: skip
    if arch.rotary_fraction != 1.0:
        out["partial_rotary_factor"] = arch.rotary_fraction
    out.update(extra)
    return out


def _biases(arch: Architecture, kind: str, qkv: bool, out: bool, mlp: bool) -> None:
    _expect(arch, kind, qkv_bias=qkv, out_bias=out, mlp_bias=mlp)


def _plain_norm(arch: Architecture, kind: str, **wanted: Any) -> None:
    _expect(arch, kind, norm="rmsnorm", qk_norm="none", norm_placement="pre", **wanted)


def transformers_config(arch: Architecture, common: dict) -> Any:
    """The transformers config of `arch.model_type` with `arch`'s shape and `common`'s settings."""
    import transformers

    kind = arch.model_type
    if kind in ("llama", "mistral"):
        _plain_norm(arch, kind)
        _expect(arch, kind, qkv_bias=arch.has_out_bias)
        cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
        extra = {"attention_bias": arch.has_qkv_bias, "mlp_bias": arch.has_mlp_bias} if kind == "llama" else {}
        if kind == "mistral":
            _biases(arch, kind, False, False, False)
            extra["sliding_window"] = arch.sliding_window
        return cls(**_llama_like(arch, kind, **extra), **common)
    if kind == "qwen2":
        _plain_norm(arch, kind)
        _biases(arch, kind, True, False, False)
        return transformers.Qwen2Config(**_llama_like(arch, kind), **common)
    if kind == "qwen3":
        _expect(arch, kind, norm="rmsnorm", qk_norm="head", norm_placement="pre", mlp_bias=False,
                out_bias=arch.has_qkv_bias)  # fmt: skip
        return transformers.Qwen3Config(**_llama_like(arch, kind, attention_bias=arch.has_qkv_bias), **common)
    if kind in ("gemma", "gemma2"):
        placement = "sandwich" if kind == "gemma2" else "pre"
        _expect(arch, kind, norm="rmsnorm", qk_norm="none", norm_placement=placement, mlp_bias=False,
                out_bias=arch.has_qkv_bias)  # fmt: skip
        fields = _llama_like(arch, kind, attention_bias=arch.has_qkv_bias)
        if kind == "gemma2":
            fields["hidden_activation"] = fields.pop("hidden_act")
        cls = transformers.GemmaConfig if kind == "gemma" else transformers.Gemma2Config
        return cls(**fields, **common)
    if kind in ("olmo", "olmo2"):
        norm, placement, qk = (
            ("layernorm-noparam", "pre", "none") if kind == "olmo" else ("rmsnorm", "branch-post", "full")
        )
        _expect(arch, kind, norm=norm, norm_placement=placement, qk_norm=qk, mlp_bias=False, out_bias=arch.has_qkv_bias)
        cls = transformers.OlmoConfig if kind == "olmo" else transformers.Olmo2Config
        return cls(**_llama_like(arch, kind, attention_bias=arch.has_qkv_bias), **common)
    if kind == "phi3":
        _plain_norm(arch, kind)
        _biases(arch, kind, False, False, False)
        fields = _llama_like(arch, kind, resid_pdrop=arch.dropout, embd_pdrop=arch.dropout)
        fields.pop("head_dim")  # Phi-3 derives it from hidden and heads
        _expect(arch, kind, head_dim=arch.hidden // arch.n_heads)
        return transformers.Phi3Config(**fields, **common)
    if kind == "phi":
        _expect(arch, kind, norm="layernorm", position="rotary", parallel_attention=True, shared_norm=True,
                head_bias=True, norm_placement="pre", head_dim=arch.hidden // arch.n_heads)  # fmt: skip
        _biases(arch, kind, True, True, True)
        return transformers.PhiConfig(
            num_hidden_layers=arch.n_layers, hidden_size=arch.hidden, num_attention_heads=arch.n_heads,
            num_key_value_heads=arch.n_kv_heads, intermediate_size=arch.ffn_hidden,
            max_position_embeddings=arch.max_positions, hidden_act=ACTS[arch.mlp],
            partial_rotary_factor=arch.rotary_fraction, qk_layernorm=arch.qk_norm == "head",
            resid_pdrop=arch.dropout, embd_pdrop=arch.dropout, attention_dropout=arch.dropout, **common,
        )  # fmt: skip
    if kind == "gptj":
        _expect(arch, kind, norm="layernorm", position="rotary", parallel_attention=True, shared_norm=True,
                head_bias=True, qk_norm="none", n_kv_heads=arch.n_heads)  # fmt: skip
        _biases(arch, kind, False, False, True)
        return transformers.GPTJConfig(
            n_layer=arch.n_layers, n_embd=arch.hidden, n_head=arch.n_heads, n_inner=arch.ffn_hidden,
            n_positions=arch.max_positions, rotary_dim=round(arch.head_size * arch.rotary_fraction),
            activation_function=ACTS[arch.mlp], resid_pdrop=arch.dropout, embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout, **common,
        )  # fmt: skip
    if kind == "falcon":
        _expect(arch, kind, norm="layernorm", qk_norm="none", head_bias=False, norm_placement="pre")
        _biases(arch, kind, arch.bias, arch.bias, arch.bias)
        two_norms = arch.parallel_attention and not arch.shared_norm
        grouped = arch.n_kv_heads not in (1, arch.n_heads)
        new = two_norms or grouped
        return transformers.FalconConfig(
            num_hidden_layers=arch.n_layers, hidden_size=arch.hidden, num_attention_heads=arch.n_heads,
            num_kv_heads=arch.n_kv_heads, multi_query=arch.n_kv_heads == 1, new_decoder_architecture=new,
            num_ln_in_parallel_attn=2 if two_norms else 1, parallel_attn=arch.parallel_attention, bias=arch.bias,
            ffn_hidden_size=arch.ffn_hidden, max_position_embeddings=arch.max_positions,
            alibi=arch.position == "none", activation=arch.mlp, hidden_dropout=arch.dropout,
            attention_dropout=arch.dropout, **common,
        )  # fmt: skip
    if kind == "opt":
        _expect(arch, kind, norm="layernorm", position="learned", position_offset=2, qk_norm="none",
                parallel_attention=False, head_bias=False, final_norm=arch.placement == "pre")  # fmt: skip
        _biases(arch, kind, arch.bias, arch.bias, arch.bias)
        return transformers.OPTConfig(
            num_hidden_layers=arch.n_layers, hidden_size=arch.hidden, num_attention_heads=arch.n_heads,
            ffn_dim=arch.ffn_hidden, max_position_embeddings=arch.max_positions, enable_bias=arch.bias,
            do_layer_norm_before=arch.placement == "pre", word_embed_proj_dim=arch.token_width,
            activation_function=ACTS[arch.mlp], dropout=arch.dropout, attention_dropout=arch.dropout, **common,
        )  # fmt: skip
    if kind == "roberta":
        _expect(arch, kind, family="encoder", pooler=False, mlm_head=True, nsp_head=False, norm="layernorm")
        return transformers.RobertaConfig(
            num_hidden_layers=arch.n_layers, hidden_size=arch.hidden, num_attention_heads=arch.n_heads,
            intermediate_size=arch.ffn_hidden, max_position_embeddings=arch.max_positions,
            type_vocab_size=arch.type_vocab, hidden_dropout_prob=arch.dropout,
            attention_probs_dropout_prob=arch.dropout, **common,
        )  # fmt: skip
    if kind in MOE_BUILDS:
        return _moe_config(arch, kind, common)
    raise ValueError(f"model_type {kind!r}: no transformers config is built for it here")


MOE_BUILDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def _sparse_fields(arch: Architecture) -> dict:
    """Qwen-MoE's layer pattern as mlp_only_layers (decoder_sparse_step 1)."""
    return {"decoder_sparse_step": 1, "mlp_only_layers": list(arch.dense_layers)}


def _moe_config(arch: Architecture, kind: str, common: dict) -> Any:
    import transformers

    _expect(arch, kind, norm="rmsnorm", norm_placement="pre", mlp_bias=False, capacity_factor=None)
    k = arch.experts_per_token
    if kind == "mixtral":
        _expect(arch, kind, qk_norm="none", qkv_bias=False, out_bias=False, expert_ffn_hidden=None,
                shared_expert_ffn_hidden=0, dense_layers=(), kv_lora_rank=0, norm_topk_prob=True)  # fmt: skip
        fields = _llama_like(arch, kind, num_local_experts=arch.experts, num_experts_per_tok=k,
                             sliding_window=arch.sliding_window)  # fmt: skip
        return transformers.MixtralConfig(**fields, **common)
    if kind in ("qwen2_moe", "qwen3_moe"):
        qwen2 = kind == "qwen2_moe"
        _expect(arch, kind, qk_norm="none" if qwen2 else "head", kv_lora_rank=0,
                shared_expert_gate=qwen2 and arch.shared_expert_ffn_hidden > 0)  # fmt: skip
        extra = {"num_experts": arch.experts, "num_experts_per_tok": k, "moe_intermediate_size": arch.expert_width,
                 "norm_topk_prob": arch.norm_topk_prob, **_sparse_fields(arch)}  # fmt: skip
        if qwen2:
            _expect(arch, kind, out_bias=False)
            extra.update(shared_expert_intermediate_size=arch.shared_expert_ffn_hidden, qkv_bias=arch.has_qkv_bias)
            return transformers.Qwen2MoeConfig(**_llama_like(arch, kind, **extra), **common)
        _expect(arch, kind, shared_expert_ffn_hidden=0, out_bias=arch.has_qkv_bias)
        extra["attention_bias"] = arch.has_qkv_bias
        return transformers.Qwen3MoeConfig(**_llama_like(arch, kind, **extra), **common)
    if kind == "olmoe":
        _expect(arch, kind, qk_norm="full", expert_ffn_hidden=None, shared_expert_ffn_hidden=0, dense_layers=(),
                kv_lora_rank=0, out_bias=arch.has_qkv_bias)  # fmt: skip
        fields = _llama_like(arch, kind, num_experts=arch.experts, num_experts_per_tok=k,
                             attention_bias=arch.has_qkv_bias, norm_topk_prob=arch.norm_topk_prob)  # fmt: skip
        return transformers.OlmoeConfig(**fields, **common)
    # deepseek_v3: multi-head latent attention, shared experts, the first layers dense
    _expect(arch, kind, qk_norm="none", qkv_bias=False, out_bias=False,
            dense_layers=tuple(range(len(arch.dense_layers))))  # fmt: skip
    if not arch.mla or arch.shared_expert_ffn_hidden % arch.expert_width:
        raise ValueError(
            "transformers deepseek_v3 has latent attention and shared experts a multiple of the expert width"
        )
    fields = _llama_like(arch, kind, n_routed_experts=arch.experts, num_experts_per_tok=k,
                         moe_intermediate_size=arch.expert_width,
                         n_shared_experts=arch.shared_expert_ffn_hidden // arch.expert_width,
                         first_k_dense_replace=len(arch.dense_layers), kv_lora_rank=arch.kv_lora_rank,
                         q_lora_rank=arch.q_lora_rank or None, qk_rope_head_dim=arch.qk_rope_head_dim,
                         qk_nope_head_dim=arch.qk_nope_head_dim, v_head_dim=arch.v_head_dim, n_group=1, topk_group=1)  # fmt: skip
    fields.pop("head_dim")  # DeepSeek-V3 derives its own (the rotary part)
    return transformers.DeepseekV3Config(**fields, **common)


MODEL_CLASSES: dict[str, str] = {
    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
    "gptj": "GPTJForCausalLM", "falcon": "FalconForCausalLM", "opt": "OPTForCausalLM", "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM", "roberta": "RobertaForMaskedLM", "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}  # fmt: skip
"""The transformers class each family is trained as (a causal LM; RoBERTa masked LM)."""
