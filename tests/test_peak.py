"""The predicted step peak (`formulas.peak`) against the exact live-bytes tracker, and what the walk stands on:
each implementation's parameter tensors in order, its buffers and inputs (`formulas.layouts`), and what each
rank of a ZeRO engine holds (`formulas.zero`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from formulas.layouts import buffer_bytes, input_bytes, parameter_tensors
from formulas.params import embedding_params, head_params, layer_params, pipeline_stage_params
from formulas.peak import PHASES
from formulas.predict import predict
from formulas.zero import BucketSizes, allreduce_bucket_elements, zero_ranks
from harness.cli import main
from harness.measure import measure
from harness.specbuild import build_spec
from models.build import build_model, make_batch
from models.presets import resolve

TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "max_positions": 128, "seq": 64, "batch": 2}
FAMILIES = {
    "gpt2": {"model": "gpt2"},
    "pythia": {"model": "pythia-160m"},
    "llama-gqa": {"model": "llama-2-7b", "kv_heads": 2, "ffn_hidden": 172},
    "bert": {"model": "bert-base-uncased"},
}


def arch_of(family: str):
    spec = build_spec({**FAMILIES[family], **TINY})
    return spec.model.arch


@pytest.mark.parametrize("impl", ["reference", "hf"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_tensors_are_the_models_in_order(family, impl):
    arch = arch_of(family)
    model = build_model(arch, impl=impl, device="meta", dtype=torch.float32)
    assert parameter_tensors(arch, impl) == [p.numel() for p in model.parameters()]


@pytest.mark.parametrize("attention", ["eager", "flash"])
@pytest.mark.parametrize("impl", ["reference", "hf"])
@pytest.mark.parametrize("family", FAMILIES)
def test_buffers_and_inputs_are_the_models(family, impl, attention):
    arch = arch_of(family)
    model = build_model(arch, impl=impl, attention=attention, device="meta", dtype=torch.bfloat16)
    assert buffer_bytes(arch, impl, attention, 2) == sum(b.numel() * b.element_size() for b in model.buffers())
    batch = make_batch(arch, 3, 16, device="meta", impl=impl)
    assert input_bytes(arch, 3, 16) == sum(t.numel() * t.element_size() for t in batch.values())


def test_a_modern_preset_is_laid_out_too():
    """Llama-3-8B: 128k vocabulary, untied head, GQA: the largest tensors are the embedding and the head."""
    arch = dataclasses.replace(resolve("llama-3-8b"), n_layers=1)
    tensors = parameter_tensors(arch, "hf")
    assert tensors[0] == tensors[-1] == 128256 * 4096
    model = build_model(arch, impl="hf", device="meta", dtype=torch.bfloat16)
    assert tensors == [p.numel() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------
# The walk against the tracker (real CPU tensors, one steady step each)

CASES = {
    "gpt2 fp32": {"model": "gpt2"},
    "gpt2 fp32 full recompute": {"model": "gpt2", "recompute": "full"},
    "gpt2 bf16-mixed (optimizer step)": {"model": "gpt2", "precision": "bf16-mixed", "seq": 16},
    "gpt2 hf bf16": {"model": "gpt2", "impl": "hf", "precision": "bf16"},
    "gpt2 sgd, 2 micro-batches": {"model": "gpt2", "optimizer": "sgd", "grad_accum": 2},
    "pythia hf flash": {"model": "pythia-160m", "impl": "hf", "attention": "flash"},
    "llama-gqa hf": {**FAMILIES["llama-gqa"], "impl": "hf"},
    "bert hf": {"model": "bert-base-uncased", "impl": "hf"},
}


@pytest.mark.parametrize("case", CASES)
def test_the_predicted_peak_is_the_measured_one(case):
    spec = build_spec({**TINY, "device": "cpu", "steps": 0, "warmup": 0, **CASES[case]})
    measured = measure(spec)
    peak = predict(spec).peak
    assert peak.phase in PHASES
    assert peak.bytes == pytest.approx(measured.memory_bytes.peak_allocated, rel=0.02), peak.moment
    assert peak.phase == measured.peak_phase["steady"], peak.moment
    # Model states the walk holds are the measured ones, to the byte.
    mem = measured.memory_bytes
    assert (peak.states["weights"], peak.states["gradients"], peak.states["optimizer"]) == (
        mem.weights,
        mem.gradients,
        mem.optimizer,
    )


def test_the_walk_follows_the_device_and_the_implementation():
    base = {"model": "gpt2", "layers": 2, "seq": 1024, "batch": 4, "precision": "bf16-mixed"}
    cuda, cpu = (predict(build_spec({**base, "device": d})).peak for d in ("cuda", "cpu"))
    # On a GPU, fused AdamW has no per-tensor temporaries; the CPU's for-loop AdamW has two of the largest.
    assert cuda.phases[-1].bytes < cpu.phases[-1].bytes
    assert any("fused AdamW" in note for note in cuda.unmodelled)
    ref, hf = (predict(build_spec({**base, "impl": impl})).peak for impl in ("reference", "hf"))
    assert ref.bytes != hf.bytes and "hf model" in hf.basis


def test_what_the_walk_does_not_model_falls_back_to_the_sum_and_says_why():
    spec = build_spec({"model": "gpt2", "seq": 512, "tp": 2, "gpus": 2})
    peak = predict(spec).peak
    assert peak.phase == "none" and "per-rank prediction" in peak.unmodelled[0]
    spec = build_spec({"model": "gpt2", "seq": 512, "zero": 2, "gpus": 2, "offload_optimizer": "cpu"})
    assert "ZeRO-Offload" in predict(spec).peak.unmodelled[0]


# --------------------------------------------------------------------------------------------------
# ZeRO's holdings, by hand


def test_zero_ranks_stage_1_and_2_partition_the_flat_buffer():
    # Two parameters of 10 and 6 elements over 2 ranks: 16 elements (a multiple of 2·N), partitions of 8.
    # Rank 0's partition [0, 8) lies in the first parameter: it keeps that whole gradient (10 elements);
    # rank 1's [8, 16) overlaps both: it keeps both (16).
    buckets = BucketSizes(reduce_bucket_elements=5, allgather_bucket_elements=6, prefetch_bucket_elements=4,
                          param_persistence_threshold=7)  # fmt: skip
    r0, r1 = zero_ranks([10, 6], stage=2, dp=2, weight_bytes=4, gradient_bytes=4, state_bytes=8, buckets=buckets)
    assert (r0.weights, r0.gradients, r1.gradients) == (64, 40, 64)
    assert r0.optimizer == r1.optimizer == 12 * 8 + 4  # fp32 master + m + v for 8 elements, one `step`
    assert r0.bucket == 20 and r0.gathered == 0
    # 15 elements pad to 16.
    (r0,) = zero_ranks([15], stage=1, dp=1, weight_bytes=2, gradient_bytes=2, state_bytes=4, buckets=buckets)
    assert (r0.weights, r0.partition_elements, r0.optimizer) == (32, 16, 8 * 16 + 4)


def test_zero_ranks_stage_3_partitions_each_parameter():
    buckets = BucketSizes(5, 6, 4, param_persistence_threshold=7)
    # ceil(11/2) + ceil(6/2) = 9 elements each; the 6-element parameter is persistent: whole on every rank.
    r0, _ = zero_ranks([11, 6], stage=3, dp=2, weight_bytes=2, gradient_bytes=2, state_bytes=8, buckets=buckets)
    assert r0.partition_elements == 9 and r0.persistent_elements == 6
    assert r0.weights == 2 * (9 + 6) and r0.gradients == 2 * 9 and r0.optimizer == 12 * 9 + 4
    assert r0.gathered == 2 * 12  # the 11-element parameter gathered into 2 × 6 elements
    with pytest.raises(ValueError, match="stages 1-3"):
        zero_ranks([1], stage=0, dp=2, weight_bytes=2, gradient_bytes=2, state_bytes=8, buckets=buckets)


def test_stage_0_all_reduces_in_deepspeeds_flat_buckets():
    """`engine.allreduce_no_retain`: a bucket is flushed once it holds more than the limit; the rest at the end."""
    assert allreduce_bucket_elements([3, 4, 5]) == 12  # under 5e8 elements: one flat copy of every gradient
    assert allreduce_bucket_elements([3, 4, 5, 1], per_bucket=6) == 7  # [3, 4] flushed at 7 > 6, then [5, 1]
    assert allreduce_bucket_elements([2, 2, 9], per_bucket=3) == 9  # [2, 2] flushed at 4, then [9] alone
    assert allreduce_bucket_elements([]) == 0


# --------------------------------------------------------------------------------------------------
# predict: the peak is the headline


def test_predict_json_carries_the_peak_and_what_the_verdict_weighs(capsys):
    argv = ["predict", "--model", "gpt2", "--seq", "1024", "--batch", "4", "--format", "json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    peak = out["peak"]
    assert out["memory_bytes"]["peak"] == peak["bytes"] and peak["phase"] in PHASES
    assert sum(peak["breakdown"].values()) == peak["bytes"]
    assert set(peak["phases"]) == set(PHASES) and max(p["bytes"] for p in peak["phases"].values()) == peak["bytes"]
    hw = out["hardware"]
    assert hw["device_need_bytes"] == peak["bytes"] + sum(hw["overheads"].values())
    assert hw["headroom_bytes"] == hw["memory_bytes"] - hw["device_need_bytes"]
    assert out["memory_bytes"]["total"] != peak["bytes"], "the sum of the terms keeps its own meaning"
    # On the CPU there are no fixed overheads, and the walk is for the CPU's kernels.
    assert main([*argv, "--device", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert cpu["device"] == "cpu" and cpu["hardware"]["overheads"] == {}
    assert cpu["hardware"]["device_need_bytes"] == cpu["peak"]["bytes"]


def test_predict_table_shows_the_sum_and_the_peak(capsys):
    assert main(["predict", "--model", "gpt2", "--seq", "1024", "--impl", "hf"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "at the peak" in out and "CUDA context" in out


# --------------------------------------------------------------------------------------------------
# Engine-aware model states beyond ZeRO


def test_pipeline_parallel_charges_the_heaviest_stage():
    arch = resolve("gpt2")  # 12 layers, tied embedding
    stages = pipeline_stage_params(arch, 4)
    layer = layer_params(arch)
    assert stages[0] == 3 * layer + embedding_params(arch)
    assert stages[-1] == 3 * layer + head_params(arch) + arch.vocab * arch.hidden  # the tied copy
    assert stages[1] == stages[2] == 3 * layer
    # 13 layers over 4 stages: 4, 3, 3, 3.
    assert pipeline_stage_params(dataclasses.replace(arch, n_layers=13), 4)[0] == 4 * layer + embedding_params(arch)
    spec = build_spec({"model": "gpt2", "seq": 1024, "gpus": 8, "pp": 4, "tp": 2, "precision": "bf16-mixed"})
    pred = predict(spec)
    heaviest = -(-max(stages) // 2)
    assert pred.states.weights == 2 * heaviest and pred.states.optimizer == 12 * heaviest
    assert pred.states.weights > 2 * spec.total_params // 8, "above Transformer Math 101's P / (TP · PP)"
    assert "heaviest of 4 pipeline stages" in pred.sources["weights"]
    with pytest.raises(ValueError, match="pp must be between 1 and the 12 layers"):
        pipeline_stage_params(arch, 13)


def test_fp32_main_gradients_take_four_bytes_and_no_master_copy_of_them():
    base = {"model": "gpt2", "layers": 2, "seq": 128, "batch": 1, "precision": "bf16-mixed", "device": "cpu"}
    auto, fp32 = (predict(build_spec({**base, "grad_dtype": g})) for g in ("auto", "fp32"))
    p = auto.exact_params
    assert (auto.states.gradients, fp32.states.gradients) == (2 * p, 4 * p)
    assert "fp32 main gradients" in fp32.sources["gradients"]
    steps = [{ph.phase: ph for ph in pred.peak.phases}["optimizer step"].breakdown for pred in (auto, fp32)]
    assert steps[0]["optimizer step"] - steps[1]["optimizer step"] == 4 * p  # no fp32 copies to make
    assert any("fp32 main gradients" in note for note in fp32.peak.unmodelled)


def test_deepspeed_steps_torch_adamw_for_loop_on_the_cpu_and_foreach_on_cuda():
    base = {"model": "gpt2", "layers": 2, "seq": 128, "batch": 1, "precision": "bf16-mixed", "zero": 2, "gpus": 2}
    steps = {}
    for device in ("cpu", "cuda"):
        peak = predict(build_spec({**base, "device": device})).peak
        steps[device] = {ph.phase: ph for ph in peak.phases}["optimizer step"].breakdown["optimizer step"]
    part = -(-predict(build_spec(base)).exact_params // 4) * 2  # P padded to 2·N, over N = 2 ranks
    # The fp32 gradient partition (4·p) plus for-loop AdamW's two fp32 temporaries, or foreach's one.
    assert (steps["cpu"], steps["cuda"]) == (4 * part + 8 * part, 4 * part + 4 * part)
