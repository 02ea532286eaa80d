"""Exact parameter counts for every model family a config.json can name (issue 12, item 4).

Each case is a transformers config class with shapes away from its defaults (head size set apart, GQA, biases
apart, untied heads, ...). The config's `to_dict()` is what a config.json holds; `models.configs` reads it;
`formulas.params.parameter_count` must equal `sum(p.numel())` of the transformers model built from the same
config on the meta device (tied tensors counted once, as `parameters()` does), to 0 parameters. The same
architecture rebuilt by `models.hf` (the class `--impl hf` measures) must have the same count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from formulas.families import HF_TYPES, hf_family
from formulas.params import largest_module_params, parameter_count
from models import hf, presets
from models.configs import READERS, from_hf_config

SMALL = dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, vocab_size=1003)
"""Shapes no family defaults to: 3 layers, h 96, 6 heads (d 16), an odd vocabulary."""

CASES: dict[str, tuple[str, str, dict]] = {
    # name: (config class, model class, config fields)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=3, n_embd=96, n_head=6, vocab_size=1003, n_inner=200)),
    "gpt2-untied": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, tie_word_embeddings=False,
                                                          n_positions=300)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, intermediate_size=200)),
    "gpt_neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, use_parallel_residual=False,
                                                                          attention_bias=False, rotary_pct=0.5)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=3, n_embd=96, n_head=6, vocab_size=1003, rotary_dim=8)),
    "llama-head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=8,
                                                                intermediate_size=200)),
    "llama-biases-apart": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, intermediate_size=200, attention_bias=True,
                                                                    mlp_bias=False)),
    "llama-mlp-bias": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, intermediate_size=200, mlp_bias=True,
                                                                tie_word_embeddings=True)),
    "mistral-nemo-like": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=32,
                                                                       intermediate_size=200, sliding_window=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=3, intermediate_size=200,
                                                            tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=24,
                                                       intermediate_size=200)),
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, head_dim=16, intermediate_size=200,
                                                            num_key_value_heads=6, attention_bias=True, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, num_key_value_heads=1, head_dim=32,
                                                       intermediate_size=200)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=32,
                                                          intermediate_size=200, sliding_window=32)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(SMALL, intermediate_size=200, partial_rotary_factor=0.5)),
    "phi-qk_layernorm": ("PhiConfig", "PhiForCausalLM", dict(SMALL, intermediate_size=200, qk_layernorm=True,
                                                              num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200)),
    "falcon-7b-like": ("FalconConfig", "FalconForCausalLM", dict(SMALL)),
    "falcon-40b-like": ("FalconConfig", "FalconForCausalLM", dict(SMALL, new_decoder_architecture=True,
                                                                   num_kv_heads=2, ffn_hidden_size=200)),
    "falcon-sequential-bias": ("FalconConfig", "FalconForCausalLM", dict(SMALL, parallel_attn=False, bias=True,
                                                                          multi_query=False, alibi=True)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(SMALL, ffn_dim=200, max_position_embeddings=300)),
    "opt-350m-like": ("OPTConfig", "OPTForCausalLM", dict(SMALL, ffn_dim=200, word_embed_proj_dim=48,
                                                           do_layer_norm_before=False)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200)),
    # mixtures of experts (E experts, top-k, expert width, shared experts, dense layers)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200,
                                                             num_local_experts=5, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=200,
                                                                 num_experts=6, num_experts_per_tok=3,
                                                                 moe_intermediate_size=40,
                                                                 shared_expert_intermediate_size=120,
                                                                 decoder_sparse_step=2, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=24,
                                                                 intermediate_size=200, num_experts=6,
                                                                 num_experts_per_tok=2, moe_intermediate_size=40,
                                                                 mlp_only_layers=[1])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(SMALL, num_key_value_heads=2, intermediate_size=40,
                                                       num_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(SMALL, intermediate_size=200, n_routed_experts=6,
                                                                       num_experts_per_tok=2, moe_intermediate_size=40,
                                                                       n_shared_experts=2, first_k_dense_replace=1,
                                                                       q_lora_rank=32, kv_lora_rank=24,
                                                                       qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                                       v_head_dim=12, n_group=2, topk_group=1)),
    "deepseek_v3-no-q-latent": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                dict(SMALL, intermediate_size=200, n_routed_experts=4, num_experts_per_tok=1,
                                     moe_intermediate_size=40, n_shared_experts=1, first_k_dense_replace=2,
                                     q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                     v_head_dim=16, n_group=1, topk_group=1)),
    "bert": ("BertConfig", "BertForPreTraining", dict(SMALL, intermediate_size=200, type_vocab_size=3)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(SMALL, intermediate_size=200, type_vocab_size=1,
                                                             max_position_embeddings=130)),
}  # fmt: skip


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _config(name: str):
    config_cls, _, fields = CASES[name]
    # The families' default token ids (Phi-3's pad 32000) can exceed the small vocabulary; training needs none.
    return getattr(transformers, config_cls)(**fields, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _built(name: str) -> torch.nn.Module:
    _, model_cls, _ = CASES[name]
    with torch.device("meta"):
        return getattr(transformers, model_cls)(_config(name))


def test_every_family_has_a_case():
    covered = {_config(name).model_type for name in CASES}
    assert covered == set(READERS) == set(HF_TYPES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_json_parameter_count_is_exact(name):
    arch = from_hf_config(_config(name).to_dict(), f"{name}.json")
    assert parameter_count(arch).total - _numel(_built(name)) == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_built_model_has_the_counted_parameters(name):
    """The class `--impl hf` builds from the architecture (not from the config) has the same parameters."""
    arch = from_hf_config(_config(name).to_dict(), f"{name}.json")
    model = hf.instantiate_hf(arch, device="meta")
    assert type(model).__name__ == CASES[name][1]
    assert _numel(model) == parameter_count(arch).total
    assert hf_family(arch) == _config(name).model_type


@pytest.mark.parametrize(
    "name", ["qwen2", "gemma2", "phi", "opt-350m-like", "falcon-40b-like", "mixtral", "deepseek_v3"]
)
def test_largest_module_is_a_real_module(name):
    """ZeRO-3 gathers the largest module's own parameters: the formula names one that exists."""
    arch = from_hf_config(_config(name).to_dict(), f"{name}.json")
    sizes = {sum(p.numel() for p in m.parameters(recurse=False)) for m in _built(name).modules()}
    assert largest_module_params(arch) in sizes


HUB = sorted(Path(__file__).parents[1].joinpath("models", "hub").glob("*.json"))


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.stem)
def test_hub_config_counts_match_transformers(path):
    """The published configs under models/hub/ at full size: our count is transformers' own, and the table
    in models/hub/SOURCES.md says so."""
    cfg = json.loads(path.read_text())
    arch = presets.load_config(path)
    config = transformers.AutoConfig.for_model(**cfg)
    auto = transformers.AutoModelForMaskedLM if arch.family == "encoder" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    total = parameter_count(arch).total
    assert total == _numel(model)
    row = next(line for line in SOURCES.splitlines() if line.startswith(f"| {path.name} |"))
    active = parameter_count(arch).active
    assert f"{total:,}" in row and (f"{active:,}" in row if arch.moe else "= total" in row)


SOURCES = Path(__file__).parents[1].joinpath("models", "hub", "SOURCES.md").read_text()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_active_parameters_leave_out_the_unchosen_experts(name):
    """Active = total − (E − k) routed experts in each MoE layer: counted from the built model's expert tensors."""
    arch = from_hf_config(_config(name).to_dict(), f"{name}.json")
    model = _built(name)
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if ".experts." in n) // arch.moe_layers
    moe_layers = sum(1 for n, _ in model.named_parameters() if n.endswith("experts.down_proj"))
    assert moe_layers == arch.moe_layers
    count = parameter_count(arch)
    assert count.total - count.active == moe_layers * (arch.experts - arch.experts_per_token) * per_expert


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.stem)
def test_reference_models_build_what_they_count(path):
    """Where the reference models build a family (`--impl reference`), their parameters are the formula's, tensor
    by tensor in `parameters()` order (`formulas.layouts`); where they do not, they say what they lack."""
    from formulas.architecture import unmodelled_features
    from formulas.layouts import parameter_tensors
    from models.build import build_model
    from models.gpt import check_buildable

    full = presets.load_config(path)
    arch = dataclasses.replace(full, n_layers=len(full.dense_layers) + 2)
    if unmodelled_features(arch) or arch.moe or arch.mla:
        with pytest.raises(ValueError, match="reference models do not build"):
            check_buildable(arch)
        return
    model = build_model(arch, impl="reference", device="meta")
    assert [p.numel() for p in model.parameters()] == parameter_tensors(arch, "reference")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(arch).total


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"num_experts_in_a_new_way": 4}, "num_experts_in_a_new_way are not read"),  # a field no reader knows
        ({"add_cross_attention": True}, "cross-attention"),
        ({"quantization_config": {"load_in_4bit": True}}, "quantised checkpoint"),
        ({"router_jitter_noise": 0.01}, "router jitter"),
    ],
)
def test_a_config_field_that_may_change_the_count_is_refused_by_name(extra, words):
    cfg = {**_config("mixtral").to_dict(), **extra}
    with pytest.raises(ValueError, match=words):
        from_hf_config(cfg, "mixtral.json")


def test_a_published_config_is_named_like_a_preset():
    assert presets.resolve("qwen2-7b") == presets.load_config(presets.HUB / "qwen2-7b.json")
    with pytest.raises(ValueError, match=r"published configs: .*mixtral-8x7b"):
        presets.resolve("no-such-model")
