"""Reference and transformers models: exact parameter counts, recompute equivalence, attention variants.

CPU only, tiny shapes, fp32 (bf16 matmul backward is ~100x slower on CPUs without bf16 units, measured here).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from formulas.architecture import Architecture
from formulas.params import parameter_count
from models.bert import Bert
from models.build import build_model, make_batch, transformer_blocks
from models.gpt import GPT, Dropout, RMSNorm, SelfAttention
from models.hf import attn_implementation, build_hf, hf_config, hf_model_class
from models.presets import PRESETS

TINY = Architecture(n_layers=2, hidden=32, n_heads=4, vocab=96, max_positions=64, dropout=0.0)
TINY_BERT = dataclasses.replace(TINY, family="encoder", type_vocab=2, pooler=True, mlm_head=True, nsp_head=True)
LLAMA_LIKE = dataclasses.replace(
    TINY,
    n_kv_heads=2,
    ffn_hidden=48,
    position="rotary",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tied_embeddings=False,
)
NEOX_LIKE = dataclasses.replace(TINY, position="rotary", tied_embeddings=False)

GPT_VARIANTS = {
    "gpt2": TINY,
    "gqa": dataclasses.replace(TINY, n_kv_heads=2),
    "mqa": dataclasses.replace(TINY, n_kv_heads=1),
    "swiglu": dataclasses.replace(TINY, mlp="swiglu", ffn_hidden=48),
    "rmsnorm": dataclasses.replace(TINY, norm="rmsnorm"),
    "rotary": NEOX_LIKE,
    "no-positions": dataclasses.replace(TINY, position="none"),
    "untied": dataclasses.replace(TINY, tied_embeddings=False),
    "no-bias": dataclasses.replace(TINY, bias=False),
    "llama": LLAMA_LIKE,
}
BERT_VARIANTS = {
    "pretraining": TINY_BERT,
    "mlm-only": dataclasses.replace(TINY_BERT, pooler=False, nsp_head=False),
    "pooler-only": dataclasses.replace(TINY_BERT, mlm_head=False, nsp_head=False),
    "no-heads": dataclasses.replace(TINY_BERT, pooler=False, mlm_head=False, nsp_head=False),
    "pooler-mlm": dataclasses.replace(TINY_BERT, nsp_head=False),
    "untied": dataclasses.replace(TINY_BERT, tied_embeddings=False),
    "no-types-rmsnorm": dataclasses.replace(TINY_BERT, type_vocab=0, norm="rmsnorm", bias=False),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest on one intra-op thread, and a second core busy elsewhere cannot stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def loss_and_grads(model: torch.nn.Module, batch: dict, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    loss = model(**batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_parameter_count_equals_formula(name):
    # On `meta` nothing is allocated: even megatron-1t builds in under a second (measured 0.6 s).
    arch = PRESETS[name]
    cls, kwargs = hf_model_class(arch)
    with torch.device("meta"):
        model = cls._from_config(hf_config(arch), **kwargs)
    assert n_params(model) == parameter_count(arch).total


@pytest.mark.parametrize("name", list(GPT_VARIANTS))
def test_reference_gpt_parameter_count_equals_formula(name):
    arch = GPT_VARIANTS[name]
    assert n_params(GPT(arch, device="meta")) == parameter_count(arch).total


@pytest.mark.parametrize("name", list(BERT_VARIANTS))
def test_reference_bert_parameter_count_equals_formula(name):
    arch = BERT_VARIANTS[name]
    assert n_params(Bert(arch, device="meta")) == parameter_count(arch).total


def test_reference_presets_parameter_count_on_meta():
    for name in ("gpt2", "pythia-160m", "llama-3-8b", "bert-base-uncased"):
        arch = PRESETS[name]
        assert n_params(build_model(arch, device="meta")) == parameter_count(arch).total, name


# --- recomputation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    ("arch", "attention"),
    [(TINY, "eager"), (LLAMA_LIKE, "eager"), (LLAMA_LIKE, "flash"), (TINY_BERT, "eager")],
    ids=["gpt2-eager", "llama-eager", "llama-flash", "bert-eager"],
)
def test_recompute_modes_give_identical_loss_and_gradients(arch, attention, dropout):
    arch = dataclasses.replace(arch, dropout=dropout)
    batch = make_batch(arch, 2, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for recompute in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = build_model(arch, attention=attention, recompute=recompute)
        results[recompute] = loss_and_grads(model, batch, seed=2)
    loss, grads = results["none"]
    for recompute in ("selective", "full"):
        other_loss, other_grads = results[recompute]
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, msg=f"{recompute}: {name}")


def test_hf_full_recompute_gives_identical_loss_and_gradients():
    batch = make_batch(LLAMA_LIKE, 2, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for recompute in ("none", "full"):
        torch.manual_seed(0)
        results[recompute] = loss_and_grads(build_model(LLAMA_LIKE, impl="hf", recompute=recompute), batch)
    torch.testing.assert_close(results["full"][0], results["none"][0])
    for name, grad in results["none"][1].items():
        torch.testing.assert_close(results["full"][1][name], grad, msg=name)


# --- attention --------------------------------------------------------------------------------------


def naive_attention(q, k, v, *, causal: bool) -> torch.Tensor:
    """K and V repeated for every query head (HF `repeat_kv`), then softmax(QKᵀ/√d)·V."""
    g = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        T = q.size(2)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_equals_repeated_kv(n_kv_heads, causal):
    arch = dataclasses.replace(TINY, n_heads=4, n_kv_heads=n_kv_heads)
    future = torch.ones(64, 64, dtype=torch.bool).triu(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=gen)
    k = torch.randn(2, n_kv_heads, 16, 8, generator=gen)
    v = torch.randn(2, n_kv_heads, 16, 8, generator=gen)
    expected = naive_attention(q, k, v, causal=causal)
    for attention in ("eager", "flash"):
        attn = SelfAttention(arch, causal=causal, attention=attention, future=future)
        torch.testing.assert_close(attn.core(q, k, v), expected, msg=attention)


@pytest.mark.parametrize("arch", [TINY, LLAMA_LIKE, TINY_BERT], ids=["gpt2", "llama", "bert"])
def test_eager_and_flash_attention_give_the_same_loss(arch):
    batch = make_batch(arch, 2, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for attention in ("eager", "flash"):
        torch.manual_seed(0)
        losses.append(build_model(arch, attention=attention)(**batch))
    torch.testing.assert_close(losses[0], losses[1])


def test_hf_attention_implementations():
    assert attn_implementation("eager") == "eager"
    assert attn_implementation("flash", device="cpu", dtype=torch.bfloat16) == "sdpa"
    assert hf_config(TINY, "flash")._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        attn_implementation("xformers")


# --- building blocks --------------------------------------------------------------------------------


def test_rmsnorm_gradient_matches_finite_differences():
    norm = RMSNorm(6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_dropout_saves_a_one_byte_mask():
    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Dropout(0.1).train()(x)
    assert [t.dtype for t in saved] == [torch.bool]
    assert Dropout(0.1).eval()(x) is x


# --- build entry point -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "hf"])
@pytest.mark.parametrize(
    "arch",
    [TINY, NEOX_LIKE, LLAMA_LIKE, TINY_BERT, BERT_VARIANTS["mlm-only"], BERT_VARIANTS["pooler-only"]],
    ids=["gpt2", "neox", "llama", "bert", "bert-mlm", "bert-model"],
)
def test_build_forward_backward_and_blocks(arch, impl):
    torch.manual_seed(0)
    model = build_model(arch, impl=impl)
    assert model.training
    assert n_params(model) == parameter_count(arch).total
    loss = model(**make_batch(arch, 2, 8, impl=impl))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    blocks = transformer_blocks(model)
    assert len(blocks) == arch.n_layers
    assert all(model.get_submodule(name) is block for name, block in blocks)


@pytest.mark.parametrize("impl", ["reference", "hf"])
@pytest.mark.parametrize("arch", [TINY, LLAMA_LIKE, TINY_BERT], ids=["gpt2", "llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_tensor_build_forward_backward(arch, impl, dtype):
    with FakeTensorMode():
        model = build_model(arch, impl=impl, recompute="full", device="cpu", dtype=dtype)
        loss = model(**make_batch(arch, 2, 8, device="cpu", impl=impl))
        loss.backward()
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert all(p.grad is not None for p in model.parameters())


def test_make_batch_keys():
    assert set(make_batch(TINY, 2, 4)) == {"input_ids", "labels"}
    assert set(make_batch(TINY_BERT, 2, 4)) == {"input_ids", "token_type_ids", "labels", "next_sentence_label"}
    assert set(make_batch(BERT_VARIANTS["no-types-rmsnorm"], 2, 4)) == {"input_ids", "labels", "next_sentence_label"}
    assert make_batch(TINY_BERT, 3, 4)["next_sentence_label"].shape == (3,)
    with pytest.raises(ValueError, match="max_positions"):
        make_batch(TINY, 2, 65)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch",
    [
        dataclasses.replace(TINY, position="none"),
        dataclasses.replace(TINY, mlp="swiglu"),
        dataclasses.replace(TINY, n_kv_heads=2),
        dataclasses.replace(NEOX_LIKE, bias=False),
        dataclasses.replace(TINY_BERT, norm="rmsnorm"),
        dataclasses.replace(TINY_BERT, nsp_head=False),
        dataclasses.replace(TINY_BERT, type_vocab=0),
    ],
    ids=[
        "no-positions",
        "learned-swiglu",
        "gpt2-gqa",
        "neox-no-bias",
        "bert-rmsnorm",
        "bert-pooler-mlm",
        "bert-no-types",
    ],
)
def test_hf_config_rejects_unsupported_architectures(arch):
    with pytest.raises(ValueError, match=r"^no transformers class for") as info:
        hf_config(arch)
    assert "\n" not in str(info.value)
    assert "--impl reference" in str(info.value)


def test_bad_options_raise_value_errors():
    with pytest.raises(ValueError, match="selective recompute is implemented for --impl reference only"):
        build_hf(TINY, recompute="selective")
    with pytest.raises(ValueError, match="impl must be one of"):
        build_model(TINY, impl="megatron")
    with pytest.raises(ValueError, match="recompute must be one of"):
        GPT(TINY, recompute="partial")
    with pytest.raises(ValueError, match="family"):
        GPT(TINY_BERT)
    with pytest.raises(ValueError, match="even head dimension"):
        GPT(dataclasses.replace(TINY, hidden=36, n_heads=4, position="rotary"))
