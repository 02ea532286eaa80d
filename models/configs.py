"""transformers `config.json` → `Architecture`, for every decoder family people train and BERT/RoBERTa.

Imports no torch (`tmath predict` reads configs on any machine). Each reader takes the fields of its
transformers config class that change a parameter count or an activation, with that class's defaults
(transformers 5.x `configuration_<type>.py`); a field the reader cannot express is an error naming it
(`_refuse`), never a silent default. `tests/test_families.py` checks every reader against
`sum(p.numel())` of the transformers model built on the meta device from the same config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from formulas.architecture import Architecture

GELU_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python", "quick_gelu")
"""Activation names transformers maps to a GeLU (tanh or erf: the same parameters and saved tensors)."""

MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
"""Fields of a mixture-of-experts config: a family without a MoE reader refuses them (never a dense count)."""


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    """`cfg[key]`, the class default when absent or null (transformers reads null as its default)."""
    value = cfg.get(key)
    return default if value is None else value


def _need(cfg: dict, *keys: str) -> list:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise KeyError(missing[0])
    return [cfg[k] for k in keys]


def _refuse(path: str, kind: str, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{path}: {kind} config field {field}={value!r}: {why}")


def _mlp_of(path: str, kind: str, field: str, act: str, gated: bool) -> str:
    if act in ("silu", "swish"):
        return "swiglu" if gated else _refuse(path, kind, field, act, "an ungated SiLU MLP is not modelled")
    if act in GELU_ACTS:
        return "geglu" if gated else "gelu"
    if act == "relu" and not gated:
        return "relu"
    _refuse(path, kind, field, act, "this activation is not modelled (silu, gelu variants, relu)")
    return ""


def _llama_like(cfg: dict, path: str, kind: str, **fixed: Any) -> dict:
    """Llama's layout and its descendants (Mistral, Qwen2/3, Gemma, OLMo, Phi-3): GQA, rotary, gated MLP."""
    layers, hidden, heads, ffn, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads",
                                              "intermediate_size", "vocab_size")  # fmt: skip
    act_key = "hidden_activation" if cfg.get("hidden_activation") is not None else "hidden_act"
    out = dict(
        n_layers=layers, hidden=hidden, n_heads=heads, n_kv_heads=_get(cfg, "num_key_value_heads", heads),
        ffn_hidden=ffn, vocab=vocab, max_positions=_get(cfg, "max_position_embeddings", 4096), position="rotary",
        norm="rmsnorm", bias=False, tied_embeddings=_get(cfg, "tie_word_embeddings", False),
        mlp=_mlp_of(path, kind, act_key, _get(cfg, act_key, "silu"), gated=True),
        dropout=_get(cfg, "attention_dropout", 0.0), head_dim=cfg.get("head_dim"), model_type=kind,
        sliding_window=cfg.get("sliding_window") if _get(cfg, "use_sliding_window", True) else None,
        rotary_fraction=_get(cfg, "partial_rotary_factor", 1.0),
    )  # fmt: skip
    if _get(cfg, "attention_bias", False):
        out.update(qkv_bias=True, out_bias=True)
    out.update(fixed)
    return out


def _llama(cfg: dict, path: str) -> dict:
    out = _llama_like(cfg, path, cfg["model_type"])
    out["mlp_bias"] = bool(_get(cfg, "mlp_bias", False))
    return out


def _qwen2(cfg: dict, path: str) -> dict:
    # Qwen2Attention: q, k, v with biases, o without (no config field); the MLP has none.
    return _llama_like(cfg, path, "qwen2", qkv_bias=True, out_bias=False)


def _qwen3(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "qwen3", qk_norm="head")


def _gemma(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "gemma", tied_embeddings=_get(cfg, "tie_word_embeddings", True))


def _gemma2(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "gemma2", tied_embeddings=_get(cfg, "tie_word_embeddings", True),
                       norm_placement="sandwich")  # fmt: skip


def _olmo(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "olmo", norm="layernorm-noparam")


def _olmo2(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "olmo2", norm_placement="branch-post", qk_norm="full")


def _phi3(cfg: dict, path: str) -> dict:
    out = _llama_like(cfg, path, "phi3")
    out["dropout"] = max(_get(cfg, "resid_pdrop", 0.0), _get(cfg, "attention_dropout", 0.0))
    return out


def _phi(cfg: dict, path: str) -> dict:
    layers, hidden, heads, ffn, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads",
                                              "intermediate_size", "vocab_size")  # fmt: skip
    return dict(
        n_layers=layers, hidden=hidden, n_heads=heads, n_kv_heads=_get(cfg, "num_key_value_heads", heads),
        ffn_hidden=ffn, vocab=vocab, max_positions=_get(cfg, "max_position_embeddings", 2048), position="rotary",
        rotary_fraction=_get(cfg, "partial_rotary_factor", 0.5),
        mlp=_mlp_of(path, "phi", "hidden_act", _get(cfg, "hidden_act", "gelu_new"), gated=False),
        tied_embeddings=_get(cfg, "tie_word_embeddings", False), head_bias=True, parallel_attention=True,
        shared_norm=True, qk_norm="head" if _get(cfg, "qk_layernorm", False) else "none",
        dropout=max(_get(cfg, "resid_pdrop", 0.0), _get(cfg, "attention_dropout", 0.0)), model_type="phi",
    )  # fmt: skip


def _gptj(cfg: dict, path: str) -> dict:
    layers, hidden, heads, vocab = _need(cfg, "n_layer", "n_embd", "n_head", "vocab_size")
    rotary = _get(cfg, "rotary_dim", None)
    return dict(
        n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, ffn_hidden=cfg.get("n_inner") or None,
        max_positions=_get(cfg, "n_positions", 2048), position="rotary",
        rotary_fraction=(rotary / (hidden // heads)) if rotary else 1.0,
        mlp=_mlp_of(path, "gptj", "activation_function", _get(cfg, "activation_function", "gelu_new"), gated=False),
        qkv_bias=False, out_bias=False, mlp_bias=True, head_bias=True, parallel_attention=True, shared_norm=True,
        tied_embeddings=_get(cfg, "tie_word_embeddings", False), dropout=_get(cfg, "resid_pdrop", 0.0),
        model_type="gptj",
    )  # fmt: skip


def _falcon(cfg: dict, path: str) -> dict:
    layers, hidden, heads, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    new = _get(cfg, "new_decoder_architecture", False)
    # Falcon-40B/180B name their K/V heads; Falcon-7B is multi-query, or multi-head without multi_query.
    kv = _get(cfg, "num_kv_heads", heads) if new else (1 if _get(cfg, "multi_query", True) else heads)
    parallel = new or _get(cfg, "parallel_attn", True)
    shared = parallel and not (new and _get(cfg, "num_ln_in_parallel_attn", 2) == 2)
    act = _get(cfg, "activation", "gelu")
    return dict(
        n_layers=layers, hidden=hidden, n_heads=heads, n_kv_heads=kv, vocab=vocab,
        ffn_hidden=_get(cfg, "ffn_hidden_size", 4 * hidden),
        max_positions=_get(cfg, "max_position_embeddings", 2048),
        position="none" if _get(cfg, "alibi", False) else "rotary", bias=_get(cfg, "bias", False),
        mlp=_mlp_of(path, "falcon", "activation", act, gated=False), parallel_attention=parallel,
        shared_norm=shared, tied_embeddings=_get(cfg, "tie_word_embeddings", True),
        dropout=max(_get(cfg, "hidden_dropout", 0.0), _get(cfg, "attention_dropout", 0.0)), model_type="falcon",
    )  # fmt: skip


def _opt(cfg: dict, path: str) -> dict:
    layers, hidden, heads, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    if not _get(cfg, "layer_norm_elementwise_affine", True):
        _refuse(path, "opt", "layer_norm_elementwise_affine", False, "OPT's norms without weights are not modelled")
    pre = _get(cfg, "do_layer_norm_before", True)
    embed = _get(cfg, "word_embed_proj_dim", hidden)
    return dict(
        n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, ffn_hidden=_get(cfg, "ffn_dim", 4 * hidden),
        max_positions=_get(cfg, "max_position_embeddings", 2048), position_offset=2,
        mlp=_mlp_of(path, "opt", "activation_function", _get(cfg, "activation_function", "relu"), gated=False),
        bias=_get(cfg, "enable_bias", True), norm_placement="pre" if pre else "post",
        final_norm=pre and not _get(cfg, "_remove_final_layer_norm", False), embed_dim=embed if embed != hidden else None,
        tied_embeddings=_get(cfg, "tie_word_embeddings", True), dropout=_get(cfg, "dropout", 0.1), model_type="opt",
    )  # fmt: skip


def _gpt2(cfg: dict, path: str) -> dict:
    layers, hidden, heads, vocab = _need(cfg, "n_layer", "n_embd", "n_head", "vocab_size")
    return dict(
        n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, ffn_hidden=cfg.get("n_inner") or None,
        max_positions=_get(cfg, "n_positions", 1024), tied_embeddings=_get(cfg, "tie_word_embeddings", True),
        dropout=_get(cfg, "resid_pdrop", 0.1),
        mlp=_mlp_of(path, "gpt2", "activation_function", _get(cfg, "activation_function", "gelu_new"), gated=False),
    )  # fmt: skip


def _gpt_neox(cfg: dict, path: str) -> dict:
    layers, hidden, heads, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    attention_bias = _get(cfg, "attention_bias", True)
    out = dict(
        n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, ffn_hidden=_get(cfg, "intermediate_size", None),
        max_positions=_get(cfg, "max_position_embeddings", 2048), position="rotary",
        tied_embeddings=_get(cfg, "tie_word_embeddings", False),
        dropout=max(_get(cfg, "hidden_dropout", 0.0), _get(cfg, "attention_dropout", 0.0)),
        mlp=_mlp_of(path, "gpt_neox", "hidden_act", _get(cfg, "hidden_act", "gelu"), gated=False),
    )  # fmt: skip
    if not attention_bias:  # GPT-NeoX's MLP keeps its biases
        out.update(qkv_bias=False, out_bias=False, mlp_bias=True)
    parallel = _get(cfg, "use_parallel_residual", True)
    rotary = _get(cfg, "rotary_pct", 0.25)
    if not parallel or rotary != 0.25 or not attention_bias:
        # What the presets (Pythia: parallel, a quarter rotated) leave implicit, a config states.
        out.update(model_type="gpt_neox", parallel_attention=parallel, rotary_fraction=rotary)
    return out


def _encoder(cfg: dict, path: str, kind: str) -> dict:
    """BERT as pre-trained (BertForPreTraining: pooler, MLM and next-sentence heads); RoBERTa as pre-trained
    (RobertaForMaskedLM: the MLM head only; its position table's padding offset is in max_position_embeddings)."""
    layers, hidden, heads, vocab = _need(cfg, "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    bert = kind == "bert"
    out = dict(
        n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, ffn_hidden=_get(cfg, "intermediate_size", None),
        max_positions=_get(cfg, "max_position_embeddings", 512), family="encoder",
        mlp=_mlp_of(path, kind, "hidden_act", _get(cfg, "hidden_act", "gelu"), gated=False),
        type_vocab=_get(cfg, "type_vocab_size", 2), dropout=_get(cfg, "hidden_dropout_prob", 0.1),
        pooler=bert, mlm_head=True, nsp_head=bert, tied_embeddings=_get(cfg, "tie_word_embeddings", True),
    )  # fmt: skip
    if not bert:
        out["model_type"] = kind
    return out


def _sparse_step(cfg: dict, layers: int, experts: int) -> tuple[int, ...]:
    """Qwen-MoE's dense layers: those in `mlp_only_layers` and those off every `decoder_sparse_step`-th
    (transformers Qwen2MoeDecoderLayer: sparse where (i + 1) % step == 0)."""
    step, only = _get(cfg, "decoder_sparse_step", 1), set(_get(cfg, "mlp_only_layers", []))
    return tuple(i for i in range(layers) if i in only or not (experts > 0 and (i + 1) % step == 0))


def _mixtral(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "mixtral", experts=_need(cfg, "num_local_experts")[0],
                       experts_per_token=_get(cfg, "num_experts_per_tok", 2), norm_topk_prob=True)  # fmt: skip


def _qwen_moe(cfg: dict, path: str, kind: str) -> dict:
    # Qwen3MoeConfig writes num_local_experts (num_experts is its constructor's alias); Qwen2-MoE num_experts.
    experts = _get(cfg, "num_experts", None) or _need(cfg, "num_local_experts")[0]
    fields = dict(experts=experts, experts_per_token=_get(cfg, "num_experts_per_tok", 2),
                  expert_ffn_hidden=_need(cfg, "moe_intermediate_size")[0],
                  dense_layers=_sparse_step(cfg, cfg["num_hidden_layers"], experts),
                  norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)))  # fmt: skip
    if kind == "qwen2_moe":
        shared = _get(cfg, "shared_expert_intermediate_size", 0)
        qkv = bool(_get(cfg, "qkv_bias", True))
        fields.update(shared_expert_ffn_hidden=shared, shared_expert_gate=shared > 0, qkv_bias=qkv, out_bias=False)
    else:
        fields["qk_norm"] = "head"
    return _llama_like(cfg, path, kind, **fields)


def _olmoe(cfg: dict, path: str) -> dict:
    return _llama_like(cfg, path, "olmoe", qk_norm="full", experts=_need(cfg, "num_experts")[0],
                       experts_per_token=_get(cfg, "num_experts_per_tok", 8),
                       norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)))  # fmt: skip


def _deepseek_v3(cfg: dict, path: str) -> dict:
    if _get(cfg, "attention_bias", False):
        _refuse(path, "deepseek_v3", "attention_bias", True, "biases on multi-head latent attention are not modelled")
    heads = _need(cfg, "num_attention_heads")[0]
    experts, moe_width = _need(cfg, "n_routed_experts", "moe_intermediate_size")
    return _llama_like(
        cfg, path, "deepseek_v3", n_kv_heads=heads, head_dim=None, experts=experts,
        experts_per_token=_get(cfg, "num_experts_per_tok", 8), expert_ffn_hidden=moe_width,
        shared_expert_ffn_hidden=_get(cfg, "n_shared_experts", 1) * moe_width,
        dense_layers=tuple(range(_get(cfg, "first_k_dense_replace", 3))),
        kv_lora_rank=_need(cfg, "kv_lora_rank")[0], q_lora_rank=_get(cfg, "q_lora_rank", 0),
        qk_rope_head_dim=_need(cfg, "qk_rope_head_dim")[0], qk_nope_head_dim=_need(cfg, "qk_nope_head_dim")[0],
        v_head_dim=_need(cfg, "v_head_dim")[0],
    )  # fmt: skip


READERS: dict[str, Callable[[dict, str], dict]] = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gptj": _gptj,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi": _phi,
    "phi3": _phi3,
    "falcon": _falcon,
    "opt": _opt,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "bert": lambda cfg, path: _encoder(cfg, path, "bert"),
    "roberta": lambda cfg, path: _encoder(cfg, path, "roberta"),
    "mixtral": _mixtral,
    "qwen2_moe": lambda cfg, path: _qwen_moe(cfg, path, "qwen2_moe"),
    "qwen3_moe": lambda cfg, path: _qwen_moe(cfg, path, "qwen3_moe"),
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}
"""model_type → reader of its config.json fields."""


GENERIC = frozenset({
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id", "decoder_start_token_id",
    "use_cache", "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "initializer_range", "init_std",
    "initializer_factor", "rope_theta", "rope_scaling", "rope_parameters", "rope_interleave", "rms_norm_eps",
    "layer_norm_eps", "layer_norm_epsilon", "attn_implementation", "_attn_implementation_autoset", "pretraining_tp",
    "max_window_layers", "use_sliding_window", "sliding_window", "layer_types", "classifier_dropout",
    "is_decoder", "tie_encoder_decoder", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "use_bidirectional_attention",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "original_max_position_embeddings",
    "clip_qkv", "output_router_logits", "router_aux_loss_coef", "n_group", "topk_group", "routed_scaling_factor",
    "topk_method", "scoring_func", "aux_loss_alpha", "seq_aux", "qk_head_dim", "moe_layer_freq", "layerdrop",
    "attention_probs_dropout_prob", "hidden_dropout_prob", "position_embedding_type", "rotary_emb_base",
    "num_nextn_predict_layers", "ep_size",
})  # fmt: skip
"""Fields that change no parameter and no stored tensor a training step keeps: token ids, initialisation, RoPE's
base and scaling, norm epsilons, attention masks' kinds (sliding windows, softcaps), router losses and routing
scores, dropout probabilities the readers take where they matter. DeepSeek-V3's `num_nextn_predict_layers`
is a multi-token-prediction module transformers does not build (models/hub/SOURCES.md)."""

REFUSED = {
    "add_cross_attention": "cross-attention blocks are not modelled",
    "reorder_and_upcast_attn": "GPT-2's fp32 reordered attention stores other tensors",
    "router_jitter_noise": "router jitter multiplies the hidden states in training: not modelled",
    "quantization_config": "a quantised checkpoint's weights are not 16-bit (see --finetune qlora)",
}
"""Fields whose non-default values change what is counted and are not modelled: a one-line error names them."""


class _Read(dict):
    """The config with the keys the reader looked at recorded (so that the rest can be checked)."""

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def from_hf_config(cfg: dict, path: str) -> Architecture:
    """Map a transformers `config.json` to an Architecture; one-line `ValueError`s name what does not fit: an
    unknown model type, a field no reader knows (it might change a parameter count: never a silent default),
    a field whose value is not modelled (`REFUSED`)."""
    kind = cfg.get("model_type")
    reader = READERS.get(kind)
    if reader is None:
        raise ValueError(f"{path}: model_type {kind!r} is not supported ({', '.join(READERS)})")
    for field, why in REFUSED.items():
        if cfg.get(field):
            raise ValueError(f"{path}: {kind} config field {field}={cfg[field]!r}: {why}")
    moe = [k for k in MOE_FIELDS if cfg.get(k)]
    if moe and kind not in MOE_TYPES:
        raise ValueError(f"{path}: {kind} config has mixture-of-experts field {moe[0]}={cfg[moe[0]]!r}: its "
                         f"experts are read for {', '.join(MOE_TYPES)} only")  # fmt: skip
    seen = _Read(cfg)
    try:
        fields = reader(seen, path)
        unknown = sorted(set(cfg) - seen.read - GENERIC - set(REFUSED) - CONSIDERED.get(kind, frozenset()))
        if unknown:
            raise ValueError(f"{path}: {kind} config field(s) {', '.join(unknown)} are not read: they may change the "
                             "parameter count (remove them, or report the field)")  # fmt: skip
        return Architecture(**fields)
    except KeyError as missing:
        raise ValueError(f"{path}: {kind} config is missing {missing}") from None
    except TypeError as exc:
        raise ValueError(f"{path}: malformed {kind} config ({exc})") from None
    except ValueError as exc:
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: {exc}") from None


MOE_TYPES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
"""The mixture-of-experts families whose experts, router and shared experts are read."""


CONSIDERED: dict[str, frozenset[str]] = {
    "falcon": frozenset({"multi_query", "num_kv_heads", "num_ln_in_parallel_attn", "parallel_attn"}),
    "opt": frozenset({"_remove_final_layer_norm"}),
    "qwen2_moe": frozenset({"num_local_experts"}),
    "qwen3_moe": frozenset({"num_experts"}),
    "mixtral": frozenset({"norm_topk_prob"}),
    "gemma": frozenset({"hidden_act", "hidden_activation"}),  # hidden_activation wins where both are set
    "gemma2": frozenset({"hidden_act", "hidden_activation"}),
    "deepseek_v3": frozenset({"norm_topk_prob"}),
}
"""Fields a reader reads only on some paths (Falcon's multi-query or grouped K/V): known, not unread."""
