"""LoRA (`--finetune lora`, peft) against the real thing: trainable parameters, model states and saved tensors.

Every assertion is exact on tiny CPU shapes: the adapter count against peft's own and `requires_grad` numel, the
model states against the measured storages, and every layer's saved bytes (and those outside the layers) against
`formulas.finetune` on top of the implementation's full fine-tuning account (`formulas.variants`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formulas import finetune as F
from formulas.families import code_family
from formulas.predict import predict
from formulas.spec import RunSpec
from formulas.variants import implementation_summary
from harness.cli import main
from harness.measure import default_dtype, lora_settings, measure
from harness.specbuild import build_spec
from harness.trainers.plain import PlainTrainer, param_dtype
from models.build import build_model, make_batch
from models.lora import trainable_parameters
from tests.helpers import saved_by_block

SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 16, "batch": 2}
MODELS = {
    "gpt2": {"model": "gpt2", **SHAPE},
    "llama": {"model": "llama-2-7b", **SHAPE, "kv_heads": 2, "ffn_hidden": 96},
    "qwen2": {"model": "models/hub/qwen2-7b.json", **SHAPE, "kv_heads": 2, "ffn_hidden": 96},
}
ALL = {
    "gpt2": "c_attn,attn.c_proj,c_fc,mlp.c_proj",
    "llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "qwen2": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
}
REPO = Path(__file__).resolve().parent.parent


def lora_spec(name: str, **settings) -> RunSpec:
    base = {"impl": "hf", "device": "cpu", "finetune": "lora", "lora_rank": 4, "steps": 0, "warmup": 0}
    return build_spec({**MODELS[name], **base, **settings})


def built(spec: RunSpec):
    dtype = param_dtype(spec.training.precision)
    with default_dtype(dtype):
        return build_model(spec.model.arch, impl="hf", attention=spec.training.attention,
                           recompute=spec.training.recompute, device="cpu", dtype=dtype, lora=lora_settings(spec))  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("targets", [None, "all", "v_proj"])
def test_trainable_parameters_are_peft_s(name, targets):
    if targets == "v_proj" and name == "gpt2":
        targets = "c_attn"
    spec = lora_spec(name, lora_targets=ALL[name] if targets == "all" else targets, precision="fp32")
    model = built(spec)
    arch = spec.model.arch
    counted = F.lora_params(arch, code_family(arch), 4, spec.training.lora_targets)
    trainable, total = model.model.get_nb_trainable_parameters()
    assert counted == trainable == trainable_parameters(model)
    assert total - trainable == spec.total_params  # the frozen base is the model the formulas count
    assert predict(spec).trainable_params == counted


def saved(spec: RunSpec) -> tuple[list[int], int]:
    """Bytes each block saves and those outside the blocks, in one forward (as `harness.measure` attributes them)."""
    model = built(spec)
    t = spec.training
    return saved_by_block(model, spec, make_batch(spec.model.arch, t.batch, t.seq, device="cpu", impl="hf"))


POINTS = [
    (name, precision, targets, dropout, recompute, attention)
    for name in ("gpt2", "llama")
    for precision in ("fp32", "bf16", "bf16-mixed")
    for targets, dropout in ((None, 0.0), ("all", 0.1))
    for recompute in ("none",)
    for attention in ("eager", "flash")
]
POINTS += [
    (*point, "eager")
    for point in [
        ("qwen2", "bf16-mixed", None, 0.0, "none"),
        ("qwen2", "fp32", "all", 0.0, "none"),
        ("gpt2", "fp32", None, 0.0, "full"),
        ("gpt2", "bf16-mixed", "all", 0.1, "full"),
        ("llama", "bf16-mixed", None, 0.0, "full"),
    ]
]


@pytest.mark.parametrize(("name", "precision", "targets", "dropout", "recompute", "attention"), POINTS)
def test_saved_tensors_to_the_byte(name, precision, targets, dropout, recompute, attention):
    spec = lora_spec(name, precision=precision, lora_targets=ALL[name] if targets == "all" else targets,
                     lora_dropout=dropout, recompute=recompute, attention=attention)  # fmt: skip
    layers, outside = saved(spec)
    pred = implementation_summary(spec, "cpu")
    assert layers == pred.layers
    assert outside == pred.outside.total


def test_frozen_base_saves_less_than_full_fine_tuning():
    """No weight gradient: the frozen MLP's inputs are not saved (torch saves for the gradients some input needs)."""
    spec = lora_spec("llama", precision="fp32")
    layers, _ = saved(spec)
    full = implementation_summary(build_spec({**MODELS["llama"], "impl": "hf", "device": "cpu", "precision": "fp32"}))
    assert layers[1] < full.layers[1]


@pytest.mark.parametrize(
    ("name", "settings"),
    [("llama", {"precision": "bf16-mixed"}), ("gpt2", {"precision": "fp32", "recompute": "full"})],
)
def test_measured_states_and_activations(name, settings):
    spec = lora_spec(name, steps=1, warmup=1, **settings)
    m = measure(spec)
    pred = predict(spec)
    mem = m.memory_bytes
    assert (mem.weights, mem.gradients, mem.optimizer) == (
        pred.states.weights,
        pred.states.gradients,
        pred.states.optimizer,
    )
    assert mem.activations == implementation_summary(spec, "cpu").total


def test_adapters_are_fp32_with_no_master_copy():
    """peft's autocast_adapter_dtype keeps bf16-base adapters in fp32: AdamW holds m and v (8 B/param) and its
    step counters, no fp32 master copy of what is fp32 already."""
    spec = lora_spec("llama", precision="bf16-mixed")
    model = built(spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {str(p.dtype) for p in trainable} == {"torch.float32"}
    assert {str(p.dtype) for p in model.parameters() if not p.requires_grad} == {"torch.bfloat16"}
    trainer = PlainTrainer(model, spec, device_type="cpu")
    assert all(m is p for m, p in zip(trainer.optimizer.master, trainer.optimizer.params, strict=True))


def test_nf4_constants_follow_the_paper():
    """QLoRA §3: 4-bit codes, 8-bit absmax per 64 weights, an fp32 per 256 of those, and quantize_4bit's fp32 mean."""
    n = 4096 * 4096
    blocks = n // 64
    assert F.nf4_bytes(n) == n // 2 + blocks + 4 * (blocks // 256) + 4
    assert F.nf4_bytes(n, double_quant=False) == n // 2 + 4 * blocks
    # 0.5 B + 0.127 bits per parameter (the paper's 8/64 + 32/(64·256))
    assert F.nf4_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-6)


def test_qlora_is_predicted_not_measured(capsys):
    argv = ["predict", "--model", "models/hub/qwen2-7b.json", "--seq", "512", "--finetune", "qlora"]
    assert main(argv) == 0
    assert "trainable P" in capsys.readouterr().out
    assert main([*argv, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "predicted, not measured" in doc["sources"]["weights"]
    assert "predicted, not measured" in doc["sources"]["activations"]
    spec = build_spec({"model": "models/hub/qwen2-7b.json", "seq": 512, "finetune": "qlora"})
    lora = predict(spec.replace(finetune="lora"))
    q = predict(spec)
    arch = spec.model.arch
    nq = F.quantized_params(arch, "llama")
    adapters = q.trainable_params * 4
    nf4 = sum(F.nf4_bytes(lin.in_features * lin.out_features) for lin in F.block_linears(arch, "llama"))
    assert q.states.weights == arch.n_layers * nf4 + 2 * (spec.total_params - nq) + adapters
    assert q.states.weights < lora.states.weights / 2.5  # the untied 152k-token embeddings stay in bf16
    assert (q.states.gradients, q.states.optimizer) == (lora.states.gradients, lora.states.optimizer)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--finetune", "lora", "--lora-rank", "0"], "lora_rank must be a positive integer"),
        (["--lora-rank", "4"], "apply to --finetune lora or qlora"),
        (["--finetune", "lora", "--lora-targets", "q_proj"], "matches no linear of a gpt2 block"),
        (["--finetune", "lora", "--lora-dropout", "1.5"], "lora_dropout must be at most"),
        (["--finetune", "lora"], "give --impl hf"),
        (["--finetune", "lora", "--impl", "hf", "--zero", "1", "--gpus", "2"], "one replica"),
        (["--finetune", "lora", "--impl", "hf", "--device", "meta"], "fake tensors"),
        (["--finetune", "qlora", "--impl", "hf"], "predicted, not measured"),
    ],
)
def test_bad_input_is_one_line(flags, message, capsys):
    argv = ["measure", "--model", "gpt2", "--layers", "2", "--seq", "64", "--device", "cpu", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_predict_for_the_reference_impl_has_no_implementation_account(capsys):
    argv = ["predict", "--model", "gpt2", "--layers", "2", "--seq", "64", "--finetune", "lora", "--device", "cpu"]
    assert main([*argv, "--impl", "reference"]) == 0
    assert "as transformers saves them" not in capsys.readouterr().out
    assert main([*argv, "--impl", "hf"]) == 0
    assert "as transformers saves them" in capsys.readouterr().out


def test_unmodelled_family_and_params_only_are_one_line(capsys):
    assert main(["predict", "--model", "bert-base-uncased", "--finetune", "lora"]) == 2
    assert main(["predict", "--params", "7B", "--finetune", "lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not bert" in err[0] and "not --params" in err[1]


def test_committed_keys_do_not_change():
    """The new settings at their defaults stay out of the key (KEY_SINCE_SCHEMA_2): old records still resume."""
    line = (REPO / "results/reference/cpu-smoke/runs.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert RunSpec.from_dict(record["spec"]).key() == record["spec_key"]


@pytest.mark.parametrize("model", ["models/hub/qwen2-7b.json", "llama-2-7b", "gpt2"])
def test_full_size_adapter_count_is_peft_s(model):
    """At the published sizes (built on meta: shapes only): peft's trainable count is the formula's, and its total
    is the base's P plus the adapters."""
    import torch

    from models.hf import instantiate_hf

    spec = build_spec({"model": model, "finetune": "lora", "seq": 1024})
    arch = spec.model.arch
    family = code_family(arch)
    names = sorted({lin.path for lin in F.targeted(arch, family, None)})
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(instantiate_hf(arch, device="meta", dtype=torch.float32),
                                LoraConfig(r=8, target_modules=names, fan_in_fan_out=family == "gpt2"))  # fmt: skip
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == F.lora_params(arch, family, 8) == predict(spec).trainable_params
    assert total == spec.total_params + trainable


@pytest.mark.parametrize(("name", "targets"), [("llama", "v_proj"), ("gpt2", "attn.c_proj")])
def test_without_a_query_key_adapter_the_first_block_is_over_counted_and_says_so(name, targets):
    """Not modelled, measured: with q and k frozen in the first block its attention needs no gradient (and Llama's
    RoPE tables are then first kept by the second block). Every later block is exact; the total over-counts."""
    spec = lora_spec(name, precision="fp32", layers=3, lora_targets=targets)
    layers, outside = saved(spec)
    pred = implementation_summary(spec, "cpu")
    assert layers[2:] == pred.layers[2:] and outside == pred.outside.total
    assert sum(layers) < sum(pred.layers)
    assert any("query/key adapter" in note for note in pred.unmeasured)
    assert not any("query/key" in n for n in implementation_summary(lora_spec(name, precision="fp32")).unmeasured)


@pytest.mark.parametrize("model", ["gemma-7b", "phi-3-mini-4k", "qwen3-8b", "mixtral-8x7b"])
def test_lora_on_an_unmeasured_family_is_refused(capsys, model):
    """Llama's descendants that differ where LoRA reaches (fused projections, Gemma's norm, QK-norm, experts)."""
    assert main(["predict", "--model", model, "--seq", "512", "--finetune", "lora"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is measured on transformers gpt2, llama, mistral, qwen2" in err, err


def test_the_walked_peak_is_the_measured_peak():
    """LoRA's walked peak (`formulas.finetune_peak`) against every committed LoRA run (`results/finetune`, real CPU
    tensors): within 8 KB without recomputation, and at most 0.5% under with full recomputation (the re-forwarded
    top block is not walked); full fine-tuning's walk is exact on the same models."""

    lines = Path("results/finetune/runs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sum(r["spec"]["finetune"] == "lora" for r in records) >= 10
    for r in records:
        spec = RunSpec.from_dict(r["spec"])
        peak = predict(spec).peak
        measured = r["measured"]["memory_bytes"]["peak_allocated"]
        assert peak.phase in ("backward", "optimizer step") and "sum of the terms" not in peak.moment
        if spec.training.recompute == "full":
            assert -0.005 <= peak.bytes / measured - 1 <= 0
        else:
            assert abs(peak.bytes - measured) <= 8192, (spec.model.name, peak.bytes, measured)


def test_a_gpu_lora_peak_walks_the_papers_count_and_says_so():
    """On a GPU transformers' LoRA account is not measured: the walk takes the paper's count with the LoRA terms,
    and the backward start (the loss's two fp32 logit gradients) lifts the peak above the sum of the terms."""
    spec = build_spec(dict(model="models/hub/qwen2-7b.json", seq=2048, finetune="lora"))
    p = predict(spec)
    assert p.peak.moment.startswith("backward start")
    assert p.peak.bytes > p.states.weights + p.states.gradients + p.states.optimizer + p.activations
    assert any("the paper's count with the LoRA terms" in n for n in p.peak.unmodelled)
