"""The planner's step time: the data-parallel ring's bandwidth across nodes, eager attention's memory traffic, and
a fixed number of virtual stages the search does not try."""

from __future__ import annotations

import pytest

from formulas import plan as fp
from formulas.hardware import get_gpu
from harness.cli import main
from harness.plan.search import PlanRequest, plan
from models.presets import PRESETS


def test_a_ring_runs_at_the_nics_of_its_members_in_a_node():
    # Inside one node: the node's links.
    assert fp.ring_group_gbps(8, 0, 450.0, 50.0) == 450.0
    # Across nodes: one NIC per member in the node (NVIDIA/nccl#569, #687), no more than the node's links.
    assert fp.ring_group_gbps(1, 1, 450.0, 50.0) == 50.0
    assert fp.ring_group_gbps(4, 1, 450.0, 50.0) == 200.0
    assert fp.ring_group_gbps(8, 1, 300.0, 50.0) == 300.0


def _request(**kw) -> PlanRequest:
    base = {"arch": PRESETS["llama-2-13b"], "model": "llama-2-13b", "seq": 4096, "global_batch": 64,
            "gpu": "h100-sxm", "gpus": 16, "gpus_per_node": 8, "memory_bytes": 10**15, "walk": False,
            "efficiency": fp.EFFICIENCY}  # fmt: skip
    base.update(kw)
    return PlanRequest(**base)


def test_data_parallel_time_follows_the_members_per_node():
    # The same FSDP layout (t = 1, dp = 16) with the same NIC rate: 8 GPUs a node use 8 NICs, 2 a node use 2.
    # On a slow network the exposed gather/scatter time is the volume over that bandwidth: 4x apart.
    fixed = {"tp": 1, "pp": 1, "zero": 0, "fsdp": True, "recompute": "none", "micro_batch": 1}
    terms = {}
    for per_node in (8, 2):
        result = plan(_request(gpus_per_node=per_node, inter_node_gbps=0.01 * per_node, fixed=fixed), top=1)
        terms[per_node] = result.candidates[0].terms["data"]
    assert terms[2] / terms[8] == pytest.approx(4, rel=1e-3)


def test_eager_attention_traffic_by_hand():
    # Per score element, e = 2 and a 1-byte dropout mask: forward 4e + (2e + 1) = 13 B, backward 7e + (2e + 1)
    # = 19 B; recompute replays the forward (+13 B); without dropout 8 B and 14 B.
    assert fp.eager_attention_bytes(1, e=2, dropout=1, replays=0) == 32
    assert fp.eager_attention_bytes(1, e=2, dropout=1, replays=1) == 45
    assert fp.eager_attention_bytes(10, e=2, dropout=0, replays=0) == 220


@pytest.mark.parametrize("recompute,replays", [("none", 0), ("selective", 1), ("full", 1)])
def test_the_attention_term_is_eager_attentions_traffic(recompute, replays):
    arch = PRESETS["llama-2-13b"]
    fixed = {"tp": 2, "pp": 2, "zero": 1, "fsdp": False, "recompute": recompute, "micro_batch": 2,
             "schedule": "1f1b", "sequence_parallel": False}  # fmt: skip
    flash = plan(_request(fixed=fixed), top=1).candidates[0]
    eager = plan(_request(fixed=fixed, attention="eager"), top=1).candidates[0]
    assert flash.terms["attention"] == 0
    dp = 16 // (2 * 2)
    M, layers = 64 // (dp * 2), -(-arch.n_layers // 2)
    scores = 2 * (arch.n_heads / 2) * 4096**2
    per_layer = fp.eager_attention_bytes(scores, e=2, dropout=1 * (arch.dropout > 0), replays=replays)
    expected = layers * M * per_layer / (get_gpu("h100-sxm").memory_gbps * 1e9)
    assert eager.terms["attention"] == pytest.approx(expected)
    assert eager.step_seconds == pytest.approx(flash.step_seconds + expected)


def test_a_fixed_virtual_stage_count_the_search_does_not_try():
    fixed = {"tp": 1, "pp": 4, "virtual_stages": 3, "schedule": "interleaved-1f1b", "zero": 1, "fsdp": False,
             "recompute": "full", "micro_batch": 1}  # fmt: skip
    c = plan(_request(fixed=fixed), top=1).candidates[0]
    assert c.layout["virtual_stages"] == 3 and c.layout["schedule"] == "interleaved-1f1b"
    assert c.terms["bubble"] == pytest.approx(c.terms["compute"] * 3 / (3 * c.grad_accum))


def test_virtual_stages_must_be_positive(capsys):
    args = ["plan", "--model", "llama-2-13b", "--seq", "4096", "--global-batch", "512", "--gpu", "h100-sxm",
            "--gpus", "64", "--virtual-stages", "0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--virtual-stages must be positive" in err and len(err.splitlines()) == 1


def test_optimizer_step_bytes_by_hand():
    # Fused AdamW in mixed precision: reads the fp32 master, gradient and two moments, writes the master and the
    # moments: 2·4 + 4 + 2·8 = 28 B. DeepSpeed: torch's foreach AdamW's eight passes (80 B) and its two casts (12 B).
    assert fp.optimizer_step_bytes(master=4, gradient=4, state=8, foreach_adamw=0, casts=0) == 28
    assert fp.optimizer_step_bytes(master=4, gradient=4, state=8, foreach_adamw=1, casts=1) == 92
    # SGD with momentum, single pass: 2·4 + 4 + 2·4.
    assert fp.optimizer_step_bytes(master=4, gradient=4, state=4, foreach_adamw=0, casts=0) == 20


@pytest.mark.parametrize(
    "zero,fsdp,per_element,sharded",
    [(0, False, 28, False), (1, False, 92, True), (3, False, 92, True), (0, True, 28, True)],
)
def test_the_optimizer_term_is_the_stepped_elements_traffic(zero, fsdp, per_element, sharded):
    arch = PRESETS["llama-2-13b"]
    fixed = {"tp": 2, "pp": 1, "zero": zero, "fsdp": fsdp, "recompute": "full", "micro_batch": 1,
             "sequence_parallel": False}  # fmt: skip
    c = plan(_request(fixed=fixed), top=1).candidates[0]
    from formulas.params import pipeline_stage_params

    stepped = -(-pipeline_stage_params(arch, 1)[0] // 2)  # per tensor-parallel rank
    dp = 16 // 2
    if sharded:
        stepped = -(-stepped // dp)
    assert c.terms["optimizer"] == pytest.approx(stepped * per_element / (get_gpu("h100-sxm").memory_gbps * 1e9))
    assert c.step_seconds == pytest.approx(sum(c.terms.values()))


def test_offload_leaves_the_step_to_the_host():
    fixed = {"tp": 1, "pp": 1, "zero": 2, "fsdp": False, "recompute": "full", "micro_batch": 1, "offload": True}
    c = plan(_request(fixed=fixed), top=1).candidates[0]
    assert c.terms["optimizer"] == 0 and c.terms["offload"] > 0


@pytest.mark.parametrize("model,dropout", [("gpt2", 0.0), ("gpt2", 0.1), ("llama-2-7b", 0.0)])
def test_full_recompute_costs_what_the_flop_counter_counts(model, dropout):
    # The compute term's replayed forward under full recompute is what torch's non-reentrant checkpoint
    # replays, which `matmul_flops_per_step` counts to the FLOP (tests/test_measure.py checks it against
    # FlopCounterMode): without dropout a pre-LN block's MLP output projection is not replayed (early stop),
    # with dropout it is; the embedding and the output layer never are.
    from dataclasses import replace

    from formulas.compute import attention_flops_per_token, matmul_flops_per_step
    from formulas.params import blocks_matmul_params
    from harness.plan.search import _tables

    arch = replace(PRESETS[model], dropout=dropout)
    seq = 1024
    req = PlanRequest(arch=arch, model=model, seq=seq, global_batch=8, gpu="h100-sxm", gpus=8, gpus_per_node=8,
                      efficiency=0.5)  # fmt: skip
    hw = _tables(req, [1], [1])["hw"]  # hardware FLOPs per token: none, selective, full
    counted = (matmul_flops_per_step(arch, 1, seq, "full") - matmul_flops_per_step(arch, 1, seq)) / seq
    assert hw[2] - hw[0] == pytest.approx(counted, rel=1e-12)
    whole_blocks = 2 * blocks_matmul_params(arch) + attention_flops_per_token(arch, seq)
    skipped = 2 * arch.n_layers * arch.ffn_hidden * arch.hidden if dropout == 0 else 0
    assert hw[2] - hw[0] == whole_blocks - skipped
