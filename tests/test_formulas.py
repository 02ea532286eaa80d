"""The analytic model against hand-worked values from the papers, and its invariants.

Pure-formula tests: no torch is imported, so these also prove the calculator runs without it.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from formulas import Architecture, RunSpec, parameter_count, predict
from formulas import activations as act
from formulas.compute import chinchilla_tokens, matmul_flops_per_step, training_cost
from formulas.hardware import GPUS, get_gpu, match_device_name, tflops_bar
from formulas.inference import inference_memory, kv_cache_bytes
from formulas.memory import model_state_bytes
from formulas.naive import naive_activation_elements, naive_params
from formulas.params import pipeline_stage_params
from formulas.precision import optimizer_bytes_per_param
from models.presets import PRESETS

GPT3 = Architecture(n_layers=96, hidden=12288, n_heads=96, vocab=51200, max_positions=2048)


def test_formulas_import_no_torch():
    # A fresh interpreter: the calculator path (formulas + presets) must not pull torch in.
    import subprocess

    code = "import formulas, models.presets, sys; formulas.predict(formulas.RunSpec.build(arch=models.presets.PRESETS['gpt2'], seq=1024)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- Korthikanti et al. 2022, Table 2, per layer, GPT-3 175B shape (s=2048, b=1, h=12288, a=96) ----
SBH = 2048 * 1 * 12288  # 25,165,824


@pytest.mark.parametrize(
    ("recompute", "tp", "sp", "expected"),
    [
        ("none", 1, False, SBH * (34 + 5 * 96 * 2048 // 12288)),  # sbh(34 + 5as/h) = sbh·114
        ("none", 8, False, SBH * (10 + 24 // 8 + 5 * 96 * 2048 // (12288 * 8))),  # sbh(10 + 24/t + 5as/(ht)) = sbh·23
        ("selective", 8, False, SBH * (10 + 24 // 8)),  # sbh(10 + 24/t)
        ("none", 8, True, SBH * 114 // 8),  # sequence parallel: sbh/t·(34 + 5as/h)
        ("selective", 8, True, SBH * 34 // 8),  # sbh·34/t
        ("full", 1, False, 2 * SBH),  # 2sbh
        ("full", 8, True, 2 * SBH // 8),
    ],
)
def test_korthikanti_table2(recompute, tp, sp, expected):
    got = act.layer_bytes(GPT3, 2048, 1, elem_bytes=2, mask_bytes=1, recompute=recompute, tp=tp, sequence_parallel=sp)
    assert got == expected


def test_generalised_activation_coefficients():
    # fp32 with 4-byte masks: 16e + 2m = 72, 2e + m = 12; fp32 with bool masks: 66 and 9 (README, "The formulas and their sources").
    a = Architecture(n_layers=1, hidden=768, n_heads=12, vocab=100, max_positions=1024)
    s, b = 1024, 4
    sbh, as2b = s * b * 768, 12 * s * s * b
    assert act.layer_bytes(a, s, b, elem_bytes=4, mask_bytes=1) == 66 * sbh + 9 * as2b
    assert act.layer_bytes(a, s, b, elem_bytes=4, mask_bytes=4) == 72 * sbh + 12 * as2b
    # No dropout: no masks, and the softmax output is stored once.
    nodrop = replace(a, dropout=0.0)
    assert act.layer_bytes(nodrop, s, b, elem_bytes=2) == 32 * sbh + 2 * as2b
    # Flash keeps a fp32 log-sum-exp per head and query instead of the s×s scores.
    assert act.layer_bytes(a, s, b, elem_bytes=2, attention="flash") == 34 * sbh + 4 * 12 * s * b


def test_gqa_and_swiglu_terms():
    # Llama-2-70B layer: K and V are kv_width = 8·128 = 1024 wide; SwiGLU stores 4 tensors of width f.
    a = PRESETS["llama-2-70b"]
    s, b, h, f = 4096, 1, 8192, 28672
    e = 2
    expected_sharded = 2 * e * s * b * h + 2 * e * s * b * 1024 + 4 * e * s * b * f
    terms = act.layer_terms(a, s, b, elem_bytes=e, recompute="selective")
    assert terms.replicated == 4 * e * s * b * h  # no dropout: no masks
    assert terms.sharded == expected_sharded
    assert terms.scores == 0


def test_output_term_matches_paper():
    # Korthikanti et al.: output layer + loss = (4sbh/t)(1 + v/h) for 16-bit activations.
    s, b, h, v = 2048, 1, 12288, 51200
    for t in (1, 8):
        assert act.output_bytes(GPT3, s, b, elem_bytes=2, tp=t) == 4 * s * b * h * (h + v) // h // t


def test_pipeline_first_stage_holds_pp_microbatches():
    # Korthikanti et al. Section 4.2.3: first stage holds p micro-batches of L/p layers = L layers' worth.
    per_layer = act.layer_bytes(GPT3, 2048, 1)
    br = act.activation_breakdown(GPT3, 2048, 1, pp=8)
    assert br.stage == "first" and br.in_flight == 8 and br.layers == 12
    assert br.layers_total == per_layer * 96


# ---- Transformer Math 101: bytes per parameter ----
@pytest.mark.parametrize(
    ("precision", "optimizer", "total"),
    [
        ("bf16-mixed", "adamw", 16),  # 2 weights + 2 grads + 12 (master 4 + m 4 + v 4)
        ("fp16-mixed", "adamw", 16),
        ("fp32", "adamw", 16),  # 4 + 4 + 8, no master copy
        ("bf16-mixed", "adam8bit", 10),  # 2 + 2 + 6
        ("bf16-mixed", "sgd", 12),  # 2 + 2 + 8
        ("fp32", "sgd", 12),  # 4 + 4 + 4
        ("bf16", "adamw", 8),  # pure bf16: states in bf16
    ],
)
def test_bytes_per_param(precision, optimizer, total):
    states = model_state_bytes(1000, precision=precision, optimizer=optimizer)
    assert states.total == total * 1000


def test_zero_paper_figure1():
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    psi = 7_500_000_000
    totals = []
    for stage in range(4):
        s = model_state_bytes(psi, precision="bf16-mixed", optimizer="adamw", zero=stage, dp=64)
        totals.append(s.weights + s.gradients + s.optimizer)
    assert totals == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]


def test_zero3_live_params_only_when_sharded():
    one = model_state_bytes(10**6, precision="bf16-mixed", optimizer="adamw", zero=3, dp=1, largest_module_params=500)
    eight = model_state_bytes(10**6, precision="bf16-mixed", optimizer="adamw", zero=3, dp=8, largest_module_params=500)
    assert one.zero3_live_params == 0 and eight.zero3_live_params == 1000


def test_offload_moves_states_to_the_host():
    # ZeRO-Offload (Ren et al. 2021): master, m, v and an fp32 gradient partition on the host.
    p, n = 10**6, 4
    for stage in (1, 2, 3):
        s = model_state_bytes(p, precision="bf16-mixed", optimizer="adamw", zero=stage, dp=n, offload_optimizer=True)
        assert s.optimizer == 0 and s.host_optimizer == 12 * p // n and s.host_gradients == 4 * p // n
        assert s.gradients == (2 * p // n if stage == 3 else 0)  # DeepSpeed 0.19, measured (results/zero-cpu)
        assert s.weights == (2 * p // n if stage == 3 else 2 * p) and s.host_weights == 0
    infinity = model_state_bytes(
        p, precision="bf16-mixed", optimizer="adamw", zero=3, dp=n, offload_optimizer=True, offload_params=True
    )
    assert infinity.weights == 0 and infinity.host_weights == 2 * p // n
    assert infinity.host_total == (2 + 4 + 12) * p // n
    plain = model_state_bytes(p, precision="bf16-mixed", optimizer="adamw", zero=2, dp=n)
    assert plain.host_total == 0
    with pytest.raises(ValueError, match="stage 3"):
        model_state_bytes(p, precision="bf16-mixed", optimizer="adamw", zero=2, dp=n, offload_params=True)
    with pytest.raises(ValueError, match="stage 1"):
        model_state_bytes(p, precision="bf16-mixed", optimizer="adamw", zero=0, offload_optimizer=True)


def test_3d_parallel_shards():
    # Transformer Math 101: model / (PP × TP), optimizer / No. GPUs with ZeRO-1 over DP = GPUs/(PP·TP).
    n = parameter_count(GPT3).total
    shard = -(-n // 32)
    states = model_state_bytes(n, precision="bf16-mixed", optimizer="adamw", zero=1, dp=2, tp=8, pp=4)
    assert states.weights == 2 * shard
    assert states.gradients == 2 * shard
    assert states.optimizer == -(-12 * shard // 2)
    # predict charges the heaviest pipeline stage instead (the first: the embedding and 24 of the 96 layers).
    spec = RunSpec.build(arch=GPT3, model="megatron-175b", gpus=64, tp=8, pp=4, zero=1, seq=2048)
    p = predict(spec)
    heaviest = -(-max(pipeline_stage_params(GPT3, 4)) // 8)
    assert heaviest > shard
    assert (p.states.weights, p.states.gradients, p.states.optimizer) == (2 * heaviest, 2 * heaviest,
                                                                          -(-12 * heaviest // 2))  # fmt: skip


# ---- compute ----
def test_gpt3_training_compute():
    # GPT-3 paper Table D.1: 3.14e23 FLOPs = 3640 PF-days for 175B params on 300B tokens (C = 6PD).
    cost = training_cost(parameter_count(PRESETS["gpt3-175b"]).total, 300 * 10**9, gpus=1024, tflops_per_gpu=120)
    assert cost.flops == pytest.approx(3.14e23, rel=0.005)
    assert cost.pf_days == pytest.approx(3640, rel=0.005)
    assert cost.gpu_hours == pytest.approx(cost.flops / 120e12 / 3600, rel=1e-12)


def test_flops_per_token_attention_term():
    spec = RunSpec.build(arch=PRESETS["gpt2"], model="gpt2", seq=1024, batch=2)
    p = predict(spec)
    n = parameter_count(PRESETS["gpt2"]).total
    assert p.flops.per_token_model == 6 * n + 12 * 12 * 1024 * 768
    assert p.flops.per_step_model == p.flops.per_token_model * 2 * 1024
    full = predict(spec.replace(recompute="full"))
    assert full.flops.per_step_hardware == p.flops.per_step_model * 4 // 3  # one more forward: 8PD/6PD


def test_matmul_flops_hand_count():
    # 1 layer, h=4, a=1, f=16, v=10, s=3, b=1, decoder, tied: matmul params = 4h² + 2hf + vh = 64 + 128 + 40.
    a = Architecture(n_layers=1, hidden=4, n_heads=1, vocab=10, max_positions=3, dropout=0.0)
    fwd = 2 * (64 + 128 + 40) * 3 + 4 * 3 * 4 * 3  # params per token, + attention 4·s·h per token
    assert matmul_flops_per_step(a, 1, 3) == 3 * fwd
    # Checkpoint early stop: selective replays Q·Kᵀ (2·s·h per token) but not scores·V.
    assert matmul_flops_per_step(a, 1, 3, "selective") == 3 * fwd + 2 * 3 * 4 * 3
    # Full, pre-LN, no dropout: the block is replayed except its MLP output projection (h·f).
    assert matmul_flops_per_step(a, 1, 3, "full") == 3 * fwd + 2 * (64 + 64) * 3 + 4 * 3 * 4 * 3


def test_chinchilla():
    assert chinchilla_tokens(70 * 10**9) == 1_400 * 10**9


# ---- hardware ----
def test_tflops_bar_scaling():
    assert tflops_bar(get_gpu("a100-80gb")) == pytest.approx(115.0)
    assert tflops_bar(get_gpu("h100-sxm")) == pytest.approx(115 * 989.4 / 312)
    assert tflops_bar(get_gpu("v100")) == pytest.approx(115 * 125 / 312)  # no bf16: fp16 peak


def test_every_gpu_has_source_and_half_precision_peak():
    for g in GPUS.values():
        assert g.source.startswith("https://")
        assert g.half_precision_peak == g.peak_tflops.get("bf16", g.peak_tflops.get("fp16"))
        assert g.memory_bytes == int(g.memory_gib * 2**30)


@pytest.mark.parametrize(
    ("device", "name"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("Tesla V100-SXM2-32GB", "v100"),
    ],
)
def test_match_device_name(device, name):
    assert match_device_name(device).name == name


# ---- the naive baseline and inference ----
def test_naive_formula_hand_values():
    a = PRESETS["gpt2"]  # C = 768, N = 12, D = 64, L = 12
    assert naive_params(a) == 4 * 12 * 768**2 == 28_311_552
    assert naive_params(a, mlp4c=True) == 7 * 12 * 768**2
    assert naive_activation_elements(a, 1024, 1) == 12 * 12 * 1024 * (1024 + 128) == 169_869_312
    assert naive_activation_elements(a, 1024, 1, mlp4c=True) == 12 * 12 * 1024 * (1024 + 320)


def test_naive_underestimates_korthikanti():
    spec = RunSpec.build(arch=PRESETS["gpt2"], model="gpt2", seq=1024, batch=4)
    naive = predict(spec, method="naive")
    paper = predict(spec)
    assert naive.states.optimizer == 0
    assert naive.total < paper.total / 2  # the seed's answer misses the optimizer and most activations


def test_kv_cache_llama2_7b():
    # 2 · 32 layers · 4096 tokens · 4096 wide · 2 bytes = 2 GiB (0.5 MiB per token).
    assert kv_cache_bytes(PRESETS["llama-2-7b"], 1, 4096, 2) == 2 * 2**30
    inf = inference_memory(1000, 2, overhead_factor=1.2)
    assert inf.total == 2400


# ---- invariants ----
BASE = RunSpec.build(arch=PRESETS["gpt2-medium"], model="gpt2-medium", seq=512, batch=2, gpus=8)


@pytest.mark.parametrize("field", ["batch", "seq"])
def test_monotonic_in_batch_and_seq(field):
    totals = [predict(BASE.replace(**{field: v})).total for v in (1, 2, 4, 8, 16)]
    acts = [predict(BASE.replace(**{field: v})).activations for v in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == 5
    assert acts == sorted(acts)


@pytest.mark.parametrize("model", ["gpt2-xl", "llama-2-7b", "bert-large-uncased", "pythia-1b"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
def test_each_zero_stage_never_needs_more(model, precision):
    spec = RunSpec.build(arch=PRESETS[model], model=model, seq=512, gpus=8, precision=precision)
    totals = [predict(spec.replace(zero=z)).total for z in range(4)]
    assert totals == sorted(totals, reverse=True)


def test_recompute_and_flash_order():
    spec = BASE.replace(seq=1024)
    none, sel, full = (predict(spec.replace(recompute=r)).activations for r in ("none", "selective", "full"))
    assert none > sel > full
    assert predict(spec.replace(attention="flash")).activations < none


def test_tensor_and_sequence_parallel_reduce_activations():
    spec = RunSpec.build(arch=GPT3, model="gpt3", seq=2048, gpus=8)
    t1 = predict(spec).activations
    t8 = predict(spec.replace(tp=8)).activations
    t8sp = predict(spec.replace(tp=8, sequence_parallel=True)).activations
    assert t1 > t8 > t8sp


def test_params_only_prediction():
    p = predict(RunSpec.build(arch=None, params=7 * 10**9, gpus=8, zero=2))
    assert p.activations is None
    assert p.states.weights == 14 * 10**9
    assert p.states.gradients == 14 * 10**9 // 8
    assert p.total == p.states.total


def test_optimizer_table_is_complete():
    """Transformer Math 101's optimizer bytes per parameter, every optimizer × precision: mixed precision adds
    the 4-byte fp32 master copy; pure 16-bit keeps torch's states in the parameter dtype (no master)."""
    expected = {
        "adamw": {"fp32": 8, "fp16": 4, "bf16": 4, "fp16-mixed": 12, "bf16-mixed": 12},
        "adam8bit": {"fp32": 2, "fp16": 2, "bf16": 2, "fp16-mixed": 6, "bf16-mixed": 6},
        "sgd": {"fp32": 4, "fp16": 2, "bf16": 2, "fp16-mixed": 8, "bf16-mixed": 8},
    }
    table = {o: {p: optimizer_bytes_per_param(o, p) for p in expected[o]} for o in expected}
    assert table == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": None}, "give a model"),
        ({"gpus": 6, "tp": 4}, "multiple of tp"),
        ({"zero": 2, "pp": 2, "gpus": 2}, "forbids ZeRO-2/3"),
        ({"sequence_parallel": True}, "needs --tp > 1"),
        ({"seq": 4096}, "learned positions"),
        ({"tp": 5, "gpus": 5}, "must divide heads"),
        ({"zero": 4}, "zero must be one of"),
        ({"gpu": "tpu-v9"}, "unknown GPU"),
        ({"offload_params": "cpu", "zero": 2}, "needs ZeRO stage 3"),
        ({"batch": 0}, "batch must be a positive integer"),
    ],
)
def test_spec_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(**changes)


def test_architecture_validation():
    with pytest.raises(ValueError, match="must divide hidden"):
        Architecture(n_layers=2, hidden=100, n_heads=3)
    with pytest.raises(ValueError, match="must divide heads"):
        Architecture(n_layers=2, hidden=96, n_heads=12, n_kv_heads=5)
    with pytest.raises(ValueError, match="encoder"):
        Architecture(n_layers=2, hidden=96, n_heads=12, pooler=True)


def test_spec_roundtrip_and_key():
    spec = BASE.replace(zero=2, extra={"sweep": "x"})
    again = RunSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.key() == spec.key()
    assert spec.replace(extra={"sweep": "y"}).key() == spec.key()  # tags do not change identity
    assert spec.replace(batch=3).key() != spec.key()
