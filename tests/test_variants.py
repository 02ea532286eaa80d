"""`formulas.variants` against saved-tensor bytes: every departure from the paper named, every layer exact.

Each point builds the model on tiny shapes, runs one forward under `SavedTensorTracker` (the tracker
`harness.measure` uses for `activations_by_layer`; `test_tracker_helper_agrees_with_measure` checks that
they agree) and compares, to the byte, every layer and everything outside the layers with the variant's
formula. `meta` (fake tensors) is the matrix; real CPU points cover where fake tensors change what
transformers does.
"""

from __future__ import annotations

import contextlib

import pytest

from formulas import activations as act
from formulas import variants as V
from formulas.departures import CAUSES
from formulas.families import hf_family
from harness.measure import default_dtype, measure
from harness.records import Outcome, Record
from harness.specbuild import build_spec
from harness.trainers.plain import param_dtype
from models.build import build_model, make_batch
from tests.helpers import saved_by_block

SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 16, "batch": 2}
MODELS = {
    "gpt2": {"model": "gpt2", **SHAPE},
    "pythia": {"model": "pythia-160m", **SHAPE},
    "llama": {"model": "llama-2-7b", **SHAPE, "kv_heads": 2, "ffn_hidden": 96},  # grouped-query attention
    "bert": {"model": "bert-base-uncased", **SHAPE},
    # Llama's transformers code under other names (`formulas.families.code_family`): Qwen2 with q, k, v biases
    # and GQA; Mistral-Nemo with a head size set apart (4 heads of 32 on h = 64).
    "qwen2": {"model": "models/hub/qwen2-7b.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 96},
    # Mixtures of experts on Llama's attention (transformers' grouped_mm experts): Mixtral renormalises its top-k
    # weights and keeps them fp32; Qwen1.5-MoE has a gated shared expert and q, k, v biases.
    "mixtral": {"model": "models/hub/mixtral-8x7b.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 48},
    "qwen-moe": {"model": "models/hub/qwen1.5-moe-a2.7b.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 48},
    # QK-norm on Llama's code: Qwen3 per head (with its head size apart), OLMoE over all heads (and experts).
    "qwen3": {"model": "models/hub/qwen3-8b.json", **SHAPE, "kv_heads": 2, "head_dim": 24, "ffn_hidden": 96},
    "qwen3-moe": {"model": "models/hub/qwen3-30b-a3b.json", **SHAPE, "kv_heads": 2, "head_dim": 16, "ffn_hidden": 48},
    "olmoe": {"model": "models/hub/olmoe-1b-7b-0924.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 48},
    # Gemma: Llama's code with an fp32 (1 + weight) RMSNorm, GeGLU, tied embeddings, head size apart.
    "gemma": {"model": "models/hub/gemma-7b.json", **SHAPE, "kv_heads": 2, "head_dim": 32, "ffn_hidden": 96},
    # Phi-3: Llama's code with fused qkv_proj and gate_up_proj; multi-head and grouped-query.
    "phi3": {"model": "models/hub/phi-3-mini-4k.json", **SHAPE, "ffn_hidden": 96},
    "phi3-gqa": {"model": "models/hub/phi-3-mini-4k.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 96},
    "mistral-nemo": {
        "model": "models/hub/mistral-nemo-base-2407.json",
        **SHAPE,
        "kv_heads": 2,
        "head_dim": 32,
        "ffn_hidden": 96,
        "max_positions": 64,
    },
}


def saved_bytes(settings: dict) -> tuple:
    """(spec, bytes per layer, bytes outside the layers) of one forward, as `harness.measure` attributes them."""
    spec = build_spec({"steps": 0, "warmup": 0, **settings})
    dtype = param_dtype(spec.training.precision)
    fake = spec.measurement.device == "meta"
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    else:
        mode = contextlib.nullcontext()
    with mode:
        with default_dtype(dtype):
            model = build_model(
                spec.model.arch,
                impl=spec.measurement.impl,
                attention=spec.training.attention,
                recompute=spec.training.recompute,
                device="cpu",
                dtype=dtype,
            )
        batch = make_batch(
            spec.model.arch, spec.training.batch, spec.training.seq, device="cpu", impl=spec.measurement.impl
        )
        by_layer, outside = saved_by_block(model, spec, batch)
    return spec, by_layer, outside


def variant_of(spec) -> V.ActivationVariant:
    return V.activation_variant(
        spec.model.arch,
        impl=spec.measurement.impl,
        precision=spec.training.precision,
        attention=spec.training.attention,
        recompute=spec.training.recompute,
        device=spec.measurement.device,
    )


def check_exact(settings: dict) -> V.LayerAccount:
    spec, by_layer, outside = saved_bytes(settings)
    variant = variant_of(spec)
    account = V.layer_account(spec.model.arch, spec.training.seq, spec.training.batch, variant)
    assert by_layer == account.layers(spec.model.arch.n_layers), (by_layer, account)
    assert outside == V.outside_account(spec.model.arch, spec.training.seq, spec.training.batch, variant).total
    return account


def settings_of(point: dict, **more) -> dict:
    """A point names its model by a key of MODELS; the rest overrides the tiny settings."""
    return {**MODELS[point["model"]], **{k: v for k, v in point.items() if k != "model"}, **more}


def point_id(point: dict) -> str:
    return "-".join(str(v) for v in point.values())


MOE = ("mixtral", "qwen-moe", "qwen3-moe", "olmoe")
"""Built by transformers only (the reference models have no experts); on fake tensors in bf16 only (torch's
meta aten._grouped_mm takes bf16), fp32 on real CPU tensors (CPU_POINTS)."""

HF_POINTS = [
    {"model": m, "impl": "hf", "precision": p, "attention": a, "recompute": r}
    for m in MODELS
    for p in ("fp32", "bf16")
    for a in ("eager", "flash")
    for r in ("none", "full")
    if not (m in MOE and p == "fp32")
]
MIXED_POINTS = [
    *(
        {"model": m, "impl": "hf", "precision": "bf16-mixed", "attention": a}
        for m in MODELS
        for a in ("eager", "flash")
    ),
    *({"model": "gpt2", "impl": "reference", "precision": "bf16-mixed", "attention": a} for a in ("eager", "flash")),
]
REFERENCE_POINTS = [
    *(
        {"model": m, "impl": "reference", "precision": p, "attention": a, "recompute": "none"}
        for m in MODELS
        if m not in MOE
        for p in ("fp32", "bf16")
        for a in ("eager", "flash")
    ),
    *(
        {"model": m, "impl": "reference", "precision": "bf16", "attention": "flash", "recompute": r}
        for m in ("gpt2", "llama")
        for r in ("selective", "full")
    ),
]
DROPOUT_POINTS = [
    # The presets' Pythia and Llama have no dropout, GPT-2 and BERT have 0.1: the other side of each.
    *({"model": m, "dropout": 0.1, "attention": a} for m in ("pythia", "llama") for a in ("eager", "flash")),
    *({"model": m, "dropout": 0.0, "attention": "flash"} for m in ("gpt2", "bert")),
]


@pytest.mark.parametrize("point", HF_POINTS + MIXED_POINTS + REFERENCE_POINTS, ids=point_id)
def test_meta_layers_and_outside_exact(point):
    check_exact(settings_of(point, device="meta"))


@pytest.mark.parametrize("point", DROPOUT_POINTS, ids=point_id)
def test_dropout_paths_exact(point):
    check_exact(settings_of(point, impl="hf", precision="bf16", device="meta"))


CPU_POINTS = [
    # Real tensors where fake ones change transformers' path: SDPA decoders (no mask, GQA kernel), GPT-2's
    # checkpointed mask, and the CPU math fallback.
    {"model": "pythia", "precision": "fp32", "attention": "flash"},
    {"model": "llama", "precision": "bf16", "attention": "flash"},
    {"model": "gpt2", "precision": "fp32", "attention": "flash", "recompute": "full"},
    {"model": "gpt2", "precision": "bf16", "attention": "flash"},
    {"model": "llama", "precision": "fp32", "attention": "eager"},
    {"model": "qwen2", "precision": "bf16", "attention": "flash"},
    {"model": "mixtral", "precision": "fp32", "attention": "eager"},
    {"model": "mixtral", "precision": "bf16", "attention": "flash", "recompute": "full"},
    {"model": "qwen-moe", "precision": "fp32", "attention": "flash"},
    {"model": "qwen3", "precision": "bf16", "attention": "flash"},
    {"model": "gemma", "precision": "bf16", "attention": "flash"},
    {"model": "phi3", "precision": "fp32", "attention": "flash"},
    {"model": "phi3-gqa", "precision": "bf16", "attention": "flash"},
    {"model": "gemma", "precision": "fp32", "attention": "eager", "recompute": "full"},
    {"model": "qwen3-moe", "precision": "fp32", "attention": "eager"},
    {"model": "olmoe", "precision": "bf16", "attention": "flash"},
    {"model": "mistral-nemo", "precision": "fp32", "attention": "flash"},
    {"model": "mistral-nemo", "precision": "bf16", "attention": "eager"},
]


@pytest.mark.parametrize("point", CPU_POINTS, ids=point_id)
def test_real_cpu_exact(point):
    check_exact(settings_of(point, impl="hf", device="cpu"))


def test_fake_tensor_departures_are_the_only_meta_cpu_difference():
    """transformers treats fake tensors as tracing: an explicit causal mask, and `repeat_kv` instead of GQA."""
    settings = {**MODELS["llama"], "impl": "hf", "precision": "bf16", "attention": "flash"}
    _, meta, _ = saved_bytes({**settings, "device": "meta"})
    _, cpu, _ = saved_bytes({**settings, "device": "cpu"})
    spec = build_spec({**settings, "device": "meta"})
    s, b, h, kv = spec.training.seq, spec.training.batch, spec.model.arch.hidden, spec.model.arch.kv_width
    assert [x - y for x, y in zip(meta, cpu, strict=True)] == [2 * b * s * s + 2 * 2 * s * b * (h - kv)] * 2
    departures = V.layer_account(spec.model.arch, s, b, variant_of(spec)).departures
    assert departures["sdpa_fake_mask"] == 2 * b * s * s and departures["repeat_kv"] == 2 * 2 * s * b * (h - kv)


def test_tracker_helper_agrees_with_measure():
    settings = {**MODELS["pythia"], "impl": "hf", "precision": "bf16", "attention": "flash", "device": "meta"}
    _, by_layer, outside = saved_bytes(settings)
    measured = measure(build_spec({"steps": 0, "warmup": 0, **settings}))
    assert measured.activations_by_layer == by_layer
    assert measured.memory_bytes.activations_other == outside


# ---- the formulas alone (no model) ----

ARCHS = {name: build_spec({**settings, "device": "meta"}).model.arch for name, settings in MODELS.items()}


@pytest.mark.parametrize("name", list(ARCHS))
def test_reference_is_the_paper_plus_norm_statistics(name):
    arch = ARCHS[name]
    for device, precision in (("cuda", "bf16"), ("cpu", "fp32"), ("cpu", "bf16")):
        e = 4 if precision == "fp32" else 2
        got = V.implementation_layer_bytes(arch, 32, 2, impl="reference", precision=precision, device=device)
        stats = 4 if (device == "cuda" or arch.norm == "rmsnorm") else e
        assert got == act.layer_bytes(arch, 32, 2, elem_bytes=e, mask_bytes=1, stats_bytes=stats)


def test_paper_baseline_and_named_departures():
    account = V.implementation_account(ARCHS["gpt2"], 32, 2, impl="hf", precision="bf16", device="cpu")
    assert account.paper == act.layer_bytes(ARCHS["gpt2"], 32, 2, elem_bytes=2, mask_bytes=1)
    assert set(account.departures) == {"norm_stats", "dropout_mask_dtype", "gelu_new"}
    assert set(account.departures) | set(account.shared) <= set(CAUSES)
    # CUDA's F.dropout keeps bool masks: only the GeLU and the (fp32) statistics remain.
    cuda = V.implementation_account(ARCHS["gpt2"], 32, 2, impl="hf", precision="bf16", device="cuda")
    assert set(cuda.departures) == {"norm_stats", "gelu_new"}
    assert V.activation_variant(ARCHS["gpt2"], impl="hf", precision="bf16", device="cuda").unmeasured


def test_unmodelled_settings_raise():
    with pytest.raises(ValueError, match="autocast"):
        V.activation_variant(ARCHS["gpt2"], impl="hf", precision="bf16-mixed", device="cuda")
    with pytest.raises(ValueError, match="selective"):
        V.activation_variant(ARCHS["gpt2"], impl="hf", precision="bf16", recompute="selective", device="cpu")
    with pytest.raises(ValueError, match="device"):
        V.activation_variant(ARCHS["gpt2"], device="tpu")


def test_constants_match_the_model_builders():
    """The family rule the variants use is the model type that transformers builds, preset by preset, and an
    architecture the rule refuses is one that `models.hf` cannot build."""
    from dataclasses import replace

    from models import hf, presets

    assert hf.NEOX_ROTARY_PCT == V.NEOX_ROTARY_FRACTION
    checked = set()
    for arch in presets.PRESETS.values():
        family = hf_family(arch)
        assert hf.hf_config(arch).model_type == family
        checked.add(family)
    assert checked == {"gpt2", "gpt_neox", "llama", "bert"}
    odd = replace(presets.PRESETS["gpt2"], norm="rmsnorm")  # learned positions with RMSNorm: no such class
    with pytest.raises(ValueError, match="no transformers class"):
        hf_family(odd)
    with pytest.raises(ValueError, match="no transformers class"):
        hf.hf_config(odd)


def test_summary_for_records():
    spec = build_spec({**MODELS["llama"], "impl": "hf", "precision": "bf16", "attention": "flash", "device": "meta"})
    summary = V.implementation_summary(spec)
    account = V.layer_account(spec.model.arch, spec.training.seq, spec.training.batch, variant_of(spec))
    assert summary.per_layer == account.per_layer and summary.layers == account.layers(spec.model.arch.n_layers)
    assert summary.total == account.total(spec.model.arch.n_layers) + summary.outside.total
    assert V.implementation_summary(spec.replace(device="auto")) is None
    assert V.implementation_summary(spec.replace(device="cuda", precision="bf16-mixed")) is None


def test_records_carry_the_implementation_account():
    """A record puts the variant beside the paper's count, for the device the run was measured on."""
    from tests.helpers import make_record

    settings = {**MODELS["gpt2"], "impl": "hf", "precision": "bf16", "device": "meta", "steps": 0, "warmup": 0}
    spec = build_spec(settings)
    measured = measure(spec)
    record = Record.make(spec, Outcome(status="ok", measured=measured))
    impl = record.prediction("implementation")
    assert impl.device == "meta" and impl.layers == measured.activations_by_layer
    assert impl.total == measured.memory_bytes.activations
    assert make_record(spec.replace(device="auto"), status="error").prediction("implementation") is None


# ---- the families' blocks the reference models build (issue 12): parallel, sandwich, branch-post, partial
# rotary, OPT's position offset, an output-layer bias; each layer to the byte against the formula ----

FAMILY_REFERENCE = {
    "gpt-j": "models/hub/gpt-j-6b.json",  # parallel block, one shared norm, partial rotary, output bias
    "phi-2": "models/hub/phi-2.json",  # the same with biases everywhere and 0.4 of each head rotated
    "falcon-7b": "models/hub/falcon-7b.json",  # parallel, shared norm, multi-query
    "gemma-2": "models/hub/gemma-2-9b.json",  # sandwich norms, GeGLU, head size apart
    "opt": "models/hub/opt-1.3b.json",  # learned positions with an offset of 2, ReLU
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(FAMILY_REFERENCE))
def test_family_blocks_of_the_reference_models_exact(name, precision):
    kv = {"falcon-7b": 1}.get(name, 2 if name == "gemma-2" else 4)
    check_exact({"model": FAMILY_REFERENCE[name], **SHAPE, "kv_heads": kv, "impl": "reference", "precision": precision,
                 "attention": "flash", "device": "meta", "max_positions": 64})  # fmt: skip
