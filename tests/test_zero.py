"""ZeRO through DeepSpeed on CPU: two gloo ranks per stage, every model-state byte accounted for.

Per rank, against the formulas (Transformer Math 101: stage 1 shards the optimizer state, stage 2 also the
gradients, stage 3 also the weights), each difference is a measured, named term: the fp32 master copy
DeepSpeed keeps even for fp32 parameters, the whole gradients of parameters straddling a partition
boundary, persistent ZeRO-3 parameters, partition padding. Nothing is left unaccounted: the live-storage
total minus everything walked in the engine is zero on every snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

import pytest

from formulas.params import largest_module_params
from formulas.precision import optimizer_bytes_per_param, weight_bytes_per_param
from harness import distributed
from harness.cli import main
from harness.distributed import gather, run_distributed
from harness.predictions import BY_NAME, predict_all
from harness.records import Outcome, RankResult, Record
from harness.specbuild import build_spec
from harness.zero.config import BucketSizes, deep_merge, deepspeed_available, deepspeed_config, effective_config

needs_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="needs DeepSpeed (pip install deepspeed)")

TINY = {"model": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "max_positions": 64, "seq": 32}
# h = 65 with 5 heads makes odd-sized parameters, so that ZeRO-3's per-parameter partitions need padding.
ODD = {**TINY, "hidden": 65, "heads": 5}
RUN = {"batch": 2, "device": "cpu", "steps": 0, "warmup": 0, "gpus": 2}


def spec_of(**settings):
    return build_spec({**TINY, **RUN, "precision": "fp32", **settings})


def ranks_ok(record: Record) -> list[RankResult]:
    assert record.status == "ok", record.error
    ranks = record.measured.ranks
    assert [r.rank for r in ranks] == [0, 1] and all(r.status == "ok" for r in ranks)
    return ranks


def assert_accounted(rank: RankResult) -> None:
    """Live bytes = everything walked in the engine, on every snapshot (after the communication threads
    have released the last collective's tensors: `settle_ms`)."""
    for name, snap in rank.measured.engine.snapshots.items():
        assert snap.residual_bytes == 0, (name, snap.residual_bytes, snap.residual_by_phase)


def held(rank: RankResult, snapshot: str, term: str, word: str) -> int:
    return sum(h.nbytes for h in rank.measured.engine.snapshots[snapshot].held if h.term == term and word in h.name)


def param_sizes(spec) -> list[int]:
    import torch

    from models.build import build_model

    with torch.device("meta"):
        return [p.numel() for p in build_model(spec.model.arch).parameters()]


def n_param_tensors(spec) -> int:
    return len(param_sizes(spec))


@pytest.fixture(scope="module")
def records():
    """One two-rank run per case, shared by the tests below (each ~10-15 s on two cores)."""
    return {}


def record_of(records: dict, name: str, **settings) -> Record:
    if name not in records:
        records[name] = run_distributed(spec_of(**settings), timeout=600)
    return records[name]


# --------------------------------------------------------------------------------------------------
# Two ranks, stages 0-3 (fp32) and ZeRO-3 in bf16-mixed


@pytest.mark.slow
@needs_deepspeed
def test_stage0_replicates_everything(records):
    spec = spec_of(zero=0)
    record = record_of(records, "z0", zero=0)
    p = spec.total_params
    for rank in ranks_ok(record):
        mem = rank.measured.memory_bytes
        assert mem.weights == 4 * p and mem.gradients == 4 * p
        # torch's AdamW: m and v (8 B/param) and a 4-byte `step` per parameter tensor.
        assert mem.optimizer == optimizer_bytes_per_param("adamw", "fp32") * p + 4 * n_param_tensors(spec)
        assert_accounted(rank)
    assert record.prediction("deepspeed") is None


@pytest.mark.slow
@needs_deepspeed
def test_stage1_shards_optimizer_state(records):
    """With two micro-batches per step: DeepSpeed steps nothing between them (`engine.step()` counts)."""
    spec = spec_of(zero=1, grad_accum=2)
    record = record_of(records, "z1", zero=1, grad_accum=2)
    p = spec.total_params
    for rank in ranks_ok(record):
        mem, ex = rank.measured.memory_bytes, rank.measured.engine.explained_bytes
        partition = ex.partition_elements
        assert partition == -(-p // 2)
        master = held(rank, "steady", "optimizer", "master")
        assert master == 4 * partition  # DeepSpeed's fp32 master partition, kept for fp32 parameters too
        # The rest is AdamW's m and v for the partition: total/2 (+ one 4-byte step).
        assert mem.optimizer - master == pytest.approx(8 * p / 2, rel=0.05)
        assert mem.optimizer - master - 4 == 8 * partition
        # Gradients are whole until the end of backward, then only the partition's (and boundary params') stay.
        assert ex.gradients_before_reduction_bytes == 4 * p
        assert mem.gradients - ex.gradients_boundary_parameter_bytes == 4 * partition
        assert mem.weights == 4 * p + ex.weights_alignment_padding_bytes
        assert_accounted(rank)


@pytest.mark.slow
@needs_deepspeed
def test_stage2_from_the_cli_shards_gradients(records, capsys):
    """The Done-when command on a tiny model: `tmath measure ... --zero 2 --gpus 2 --device cpu`."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, **RUN}.items()]
    argv = ["measure", *flags, "--precision", "fp32", "--zero", "2"]
    assert main([*argv, "--format", "json"]) == 0
    record = Record.from_dict(json.loads(capsys.readouterr().out))
    records["z2"] = record
    spec = spec_of(zero=2)
    p = spec.total_params
    maxima = {}
    for rank in ranks_ok(record):
        mem, ex = rank.measured.memory_bytes, rank.measured.engine.explained_bytes
        partition = ex.partition_elements
        boundary = ex.gradients_boundary_parameter_bytes
        assert mem.gradients - boundary == 4 * partition  # total/2, plus the named boundary parameters
        assert mem.optimizer - held(rank, "steady", "optimizer", "master") - 4 == 8 * partition
        assert ex.reduce_bucket_bytes_max == 4 * BucketSizes.for_hidden(64).reduce_bucket_elements
        assert_accounted(rank)
        for key, value in dataclasses.asdict(mem).items():
            if isinstance(value, int):
                maxima[key] = max(maxima.get(key, value), value)
    assert record.measured.memory_bytes.gradients == maxima["gradients"]
    assert "maximum over ranks" in record.measured.methods["memory_bytes"]
    estimate = record.prediction("deepspeed")
    assert estimate.function == "estimate_zero2_model_states_mem_needs"
    assert estimate.memory_bytes.gpu == 2 * p + int(18 * p / 2)

    from harness.display.measurement import print_measurement

    print_measurement(record)
    out = capsys.readouterr().out
    assert "Model states per rank (ZeRO-2, 2 ranks)" in out and "boundary params" in out


@pytest.mark.slow
@needs_deepspeed
def test_stage3_shards_weights_with_padding_and_persistent_params(records):
    spec = build_spec({**ODD, **RUN, "precision": "fp32", "zero": 3})
    record = record_of(records, "z3-odd", **{**ODD, "zero": 3})
    p = spec.total_params
    sizes = param_sizes(spec)
    odd = sum(n % 2 for n in sizes)
    assert odd > 0  # h = 65: odd-sized parameters, whose halves need a padding element
    partition = 4 * sum(-(-n // 2) for n in sizes)  # ZeRO-3 splits each parameter: ceil(numel/2) per rank
    real = 0
    for rank in ranks_ok(record):
        mem, ex = rank.measured.memory_bytes, rank.measured.engine.explained_bytes
        padding, persistent = ex.weights_partition_padding_bytes, ex.weights_persistent_parameter_bytes
        assert held(rank, "steady", "weights", "ds_tensor") == partition
        assert padding == (4 * odd if rank.rank == 1 else 0)  # the last rank's halves are the short ones
        real += partition - padding
        assert persistent > 0  # biases and norms under the 10·h-element persistence threshold stay whole
        # The gathered persistent parameters live in all-gather buffers of 2·ceil(numel/2) elements.
        assert ex.weights_gather_padding_bytes == 4 * sum(n % 2 for n in sizes if n < 10 * 65)
        assert mem.weights == partition + persistent + ex.weights_gather_padding_bytes
        assert mem.weights - persistent - padding == pytest.approx(4 * p / 2, rel=0.05)
        assert mem.gradients == partition
        assert mem.optimizer - held(rank, "steady", "optimizer", "master") - 4 == 8 * partition // 4
        # Gathered parameters: at least the largest module, at most the whole model (max_live_parameters).
        assert 4 * largest_module_params(spec.model.arch) <= mem.zero3_live_params <= 4 * p
        assert_accounted(rank)
    assert real == 4 * p  # the partitions hold every parameter exactly once
    estimate = record.prediction("deepspeed")
    assert estimate.function == "estimate_zero3_model_states_mem_needs"
    assert estimate.terms["zero3_live_params"] == 4 * largest_module_params(spec.model.arch)


@pytest.mark.slow
@needs_deepspeed
def test_activations_do_not_depend_on_the_stage(records):
    """ZeRO shards model states only; ZeRO-3's gathered parameters must not be counted as activations."""
    from harness.measure import measure

    by_stage = {
        "z0": ranks_ok(record_of(records, "z0", zero=0))[0].measured.memory_bytes.activations,
        "z1": ranks_ok(record_of(records, "z1", zero=1, grad_accum=2))[0].measured.memory_bytes.activations,
    }
    assert len(set(by_stage.values())) == 1, by_stage
    plain = measure(build_spec({**ODD, **RUN, "gpus": 1, "precision": "fp32"}))  # one process, no DeepSpeed
    z3 = record_of(records, "z3-odd", **{**ODD, "zero": 3})
    assert {r.measured.memory_bytes.activations for r in ranks_ok(z3)} == {plain.memory_bytes.activations}


@pytest.mark.slow
@needs_deepspeed
def test_stage3_live_params_are_the_largest_module_only_without_reuse(tmp_path):
    """DeepSpeed's stage3_max_live_parameters / max_reuse_distance (1e9 by default) keep a small model gathered
    through the forward; at 0 (and no prefetch) ZeRO-3 holds one module at a time: the formula's live term."""
    user = tmp_path / "ds.json"
    no_reuse = {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
    user.write_text(json.dumps({"zero_optimization": no_reuse}))
    spec = spec_of(zero=3, deepspeed_config=str(user))
    record = run_distributed(spec, timeout=600)
    h = spec.model.arch.hidden
    for rank in ranks_ok(record):
        assert rank.measured.engine.config["zero_optimization"]["stage3_max_live_parameters"] == 0
        # The MLP's h×4h weight; its bias is below the persistence threshold and stays whole anyway.
        assert rank.measured.memory_bytes.zero3_live_params == 4 * h * 4 * h
        assert (
            rank.measured.memory_bytes.zero3_live_params
            <= record.prediction("korthikanti").memory_bytes.zero3_live_params
        )
        assert_accounted(rank)


@pytest.mark.slow
@needs_deepspeed
def test_stage3_bf16_mixed():
    spec = spec_of(zero=3, precision="bf16-mixed")
    record = run_distributed(spec, timeout=600)
    p = spec.total_params
    assert weight_bytes_per_param("bf16-mixed") == 2
    for rank in ranks_ok(record):
        mem, ex = rank.measured.memory_bytes, rank.measured.engine.explained_bytes
        assert mem.weights - ex.weights_persistent_parameter_bytes == 2 * p // 2
        assert mem.gradients == 2 * p // 2
        # Mixed precision: the fp32 master is the formula's too (12 B/param = master + m + v), so no named extra.
        assert mem.optimizer == pytest.approx(optimizer_bytes_per_param("adamw", "bf16-mixed") * p / 2, rel=0.05)
        assert rank.measured.engine.optimizer_class == "DeepSpeedZeroOptimizer_Stage3"
        assert_accounted(rank)


@pytest.mark.slow
@needs_deepspeed
def test_offload_measures_device_and_host():
    spec = spec_of(zero=3, offload_optimizer="cpu", offload_params="cpu")
    record = run_distributed(spec, timeout=600)
    p = spec.total_params
    for rank in ranks_ok(record):
        host = rank.measured.engine.host_bytes
        # Master, m, v (12 B/param over 2 ranks) and the parameter partitions live in host memory.
        assert host["optimizer"] == pytest.approx(12 * p / 2, rel=0.05)
        assert host["weights"] == pytest.approx(4 * p / 2, rel=0.05)
        assert rank.measured.memory_bytes.optimizer == 0
        assert rank.measured.memory_bytes.host_model_states >= host["optimizer"] + host["weights"]
        # The formulas' host terms (ZeRO-Offload / ZeRO-Infinity) against the measured ones. The optimizer
        # is checked above: DeepSpeed keeps an fp32 master copy of fp32 parameters too (12 B/param, not 8).
        predicted_host = record.prediction("korthikanti").host_memory_bytes
        for term in ("weights", "gradients"):
            assert host[term] == pytest.approx(getattr(predicted_host, term), rel=0.05), term
        assert rank.measured.memory_bytes.gradients == pytest.approx(
            record.prediction("korthikanti").memory_bytes.gradients, rel=0.05
        )
        assert_accounted(rank)
    assert record.prediction("deepspeed").args["cpu_offload_params"] is True


@pytest.mark.slow
@needs_deepspeed
def test_the_deepspeed_launcher_runs_the_same_ranks(records):
    """`--launcher deepspeed` (the multi-node path, here on one node) measures what torchrun measures."""
    record = run_distributed(spec_of(zero=1, grad_accum=2), timeout=600, launcher="deepspeed")
    assert record.measured.launcher == "deepspeed"
    reference = record_of(records, "z1", zero=1, grad_accum=2)
    for rank, expected in zip(ranks_ok(record), ranks_ok(reference), strict=True):
        for term in ("weights", "gradients", "optimizer", "activations"):
            assert getattr(rank.measured.memory_bytes, term) == getattr(expected.measured.memory_bytes, term), term
        assert_accounted(rank)


@pytest.mark.slow
@needs_deepspeed
def test_a_deepspeed_error_on_the_ranks_becomes_a_record(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 999}))  # inconsistent with micro-batch × accumulation × ranks
    record = run_distributed(spec_of(zero=1, deepspeed_config=str(bad)), timeout=600)
    assert record.status == "error"
    assert record.error.message.startswith("rank ")
    assert [r.status for r in record.measured.ranks] == ["error", "error"]


# --------------------------------------------------------------------------------------------------
# Ranks that hang or die: a record, never a hang


def _fake_ranks(monkeypatch, code: str) -> None:
    monkeypatch.setattr(distributed, "rank_command", lambda rank_dir: [sys.executable, "-c", code, str(rank_dir)])


def test_timed_out_ranks_are_killed_and_recorded(monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    code = f"import os, time; open(os.path.join({str(pids)!r}, os.environ['RANK']), 'w').write(str(os.getpid())); time.sleep(600)"
    _fake_ranks(monkeypatch, code)
    t0 = time.perf_counter()
    record = run_distributed(spec_of(zero=2), timeout=8)
    assert time.perf_counter() - t0 < 60
    assert record.status == "timeout" and "time limit" in record.error.message
    assert [r.status for r in record.measured.ranks] == ["timeout", "timeout"]
    time.sleep(0.5)
    for pid_file in pids.iterdir():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_a_killed_rank_becomes_a_record(monkeypatch):
    code = (
        "import os, signal, time\nif os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(600)"
    )
    _fake_ranks(monkeypatch, code)
    record = run_distributed(spec_of(zero=2), timeout=120)
    assert record.status == "killed"
    assert "rank 1" in " ".join(record.error.ranks or [record.error.message])
    assert len(record.measured.ranks) == 2


def test_gather_takes_the_worst_status_and_per_term_maxima():
    spec = spec_of(zero=2)

    def rank(status, weights, message=None):
        error = {"type": "X", "message": message} if message else None
        return Outcome.from_dict(
            {"status": status, "error": error, "measured": {"memory_bytes": {"weights": weights}, "device": "cpu"}}
        )

    record = gather(spec, [rank("error", 10, "broken pipe"), rank("oom", 7, "out of memory"), None], launcher="torchrun",
                    timed_out=False, timeout=None, returncode=1, stderr="tail", elapsed_s=1.0)  # fmt: skip
    assert record.status == "oom" and record.error.message == "rank 1: out of memory"
    assert record.measured.memory_bytes.weights == 10
    assert [r.status for r in record.measured.ranks] == ["error", "oom", "killed"]
    assert record.error.stderr_tail == "tail"


def test_gather_takes_the_peak_phase_of_the_rank_that_peaked_highest():
    spec = spec_of(zero=2)

    def rank(peak, phase):
        return Outcome.from_dict({"status": "ok", "measured": {
            "device": "cpu", "memory_bytes": {"weights": 1, "peak_allocated": peak},
            "peak_phase": {"steady": phase}, "peak_breakdown": {"steady": {phase: peak}},
            "timeline": {"live_bytes": [0, peak], "phase": ["activations", phase]}}})  # fmt: skip

    record = gather(spec, [rank(100, "optimizer step"), rank(120, "backward")], launcher="torchrun",
                    timed_out=False, timeout=None, returncode=0, stderr="", elapsed_s=1.0)  # fmt: skip
    m = record.measured
    assert m.memory_bytes.peak_allocated == 120 and m.peak_phase["steady"] == "backward"
    assert m.peak_breakdown["steady"] == {"backward": 120} and m.timeline.live_bytes == [0, 120]
    assert "highest peak" in m.methods["peak_phase"]


# --------------------------------------------------------------------------------------------------
# Configuration, estimator, one-line errors (no engine)


def test_generated_config_follows_the_spec():
    spec = spec_of(zero=3, precision="bf16-mixed", grad_accum=4, batch=3, offload_optimizer="cpu")
    cfg = deepspeed_config(spec)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # nothing compiles fused_adam or cpu_adam
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 64 * 64
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64) and z["stage3_param_persistence_threshold"] == 640
    assert z["offload_optimizer"]["device"] == "cpu" and "offload_param" not in z
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "bf16" not in deepspeed_config(spec_of(zero=1))
    assert deepspeed_config(spec_of(zero=1, optimizer="sgd"))["zero_allow_untested_optimizer"] is True


def test_user_config_is_deep_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "gradient_clipping": 1.0}))
    cfg = effective_config(spec_of(zero=2, deepspeed_config=str(user)))
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 123
    assert cfg["zero_optimization"]["stage"] == 2  # kept from the generated config
    assert cfg["gradient_clipping"] == 1.0
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": [1]}) == {"a": {"b": 1, "c": 3}, "d": [1]}


@needs_deepspeed
def test_estimator_columns_in_the_prediction():
    p = spec_of(zero=2).total_params
    z2 = predict_all(spec_of(zero=2), "cpu")["deepspeed"]
    assert z2.memory_bytes.gpu == 2 * p + int(18 * p / 2) and z2.args["num_gpus_per_node"] == 2
    assert z2.terms["weights"] == 2 * p
    z3 = predict_all(spec_of(zero=3), "cpu")["deepspeed"]
    assert z3.memory_bytes.gpu > 0 and z3.memory_bytes.cpu >= 0 and z3.args["zero_init"] is False
    assert "deepspeed" in predict_all(spec_of(zero=1), "cpu")  # stage 1: None (no DeepSpeed estimator)
    assert predict_all(spec_of(zero=1), "cpu")["deepspeed"] is None
    assert predict_all(spec_of(zero=0), "cpu")["deepspeed"] is None


MEASURE = ["measure", "--model", "gpt2", "--layers", "1", "--hidden", "64", "--heads", "4", "--seq", "32",
           "--device", "cpu", "--gpus", "2"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--zero", "2", "--offload-params", "cpu"], "needs ZeRO stage 3"),
        (["--zero", "0", "--offload-optimizer", "cpu"], "needs a ZeRO stage"),
        (["--zero", "2", "--precision", "fp16-mixed"], "needs CUDA"),
        (["--zero", "2", "--precision", "bf16"], "fp32 master copy"),
        (["--zero", "2", "--mode", "inference"], "training only"),
        (["--zero", "2", "--device", "meta"], "DeepSpeed runs one process per rank"),
        (["--zero", "2", "--deepspeed-config", "/nonexistent/ds.json"], "no such file"),
        (["--zero", "2", "--hostfile", "/nonexistent/hosts"], "cannot read it"),
    ],
)
def test_one_line_errors(capsys, argv, message):
    assert main([*MEASURE, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_malformed_user_config_is_one_line(capsys, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{'zero_optimization': }")
    assert main([*MEASURE, "--zero", "2", "--deepspeed-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err


def test_deepspeed_missing_is_one_line(capsys, monkeypatch):
    import harness.zero.config
    import harness.zero.estimator

    monkeypatch.setattr(harness.zero.config, "deepspeed_available", lambda: False)
    monkeypatch.setattr(harness.zero.estimator, "deepspeed_available", lambda: False)
    assert main([*MEASURE, "--zero", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DeepSpeed, which is not installed" in err
    assert harness.zero.estimator.deepspeed_estimate(spec_of(zero=2)) is None


def test_calculator_path_never_imports_deepspeed():
    import subprocess

    code = (
        "import sys; from harness.cli import main; main(['predict', '--model', 'gpt2', '--zero', '3', '--gpus', '8', "
        "'--format', 'json']); assert 'deepspeed' not in sys.modules and 'torch' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_hostfile_parsing(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nworker-1 slots=8\n\nworker-2 slots=8  # second\n")
    assert distributed.hostfile_nodes(str(hosts)) == [("worker-1", 8), ("worker-2", 8)]
    cmd = distributed.launch_command("deepspeed", 8, 29500, tmp_path, hostfile=str(hosts), nodes=2)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and "--hostfile" in cmd and "--no_python" in cmd
    assert "--no_local_rank" in cmd  # else the launcher puts --local_rank=N before the command's own arguments


def test_user_config_may_not_contradict_the_flags(capsys, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert main([*MEASURE, "--zero", "2", "--deepspeed-config", str(user)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero_optimization.stage = 3 contradicts" in err and "--zero" in err


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    ("name", "settings"),
    [("z0", {"zero": 0}), ("z2", {"zero": 2}), ("z3-odd", {**ODD, "zero": 3})],
)
def test_the_walk_predicts_each_ranks_states_and_the_highest_peak(records, name, settings):
    """`formulas.peak` walks the DeepSpeed step rank by rank (`formulas.zero`): the model states it holds are
    the per-rank maxima measured, and its peak is the highest rank's, in the same phase."""
    record = record_of(records, name, **settings)
    ranks_ok(record)
    peak = BY_NAME["peak"].predict(record.spec, record.device)
    mem = record.measured.memory_bytes
    assert peak.phase != "none", peak.unmodelled
    assert (peak.states["weights"], peak.states["gradients"], peak.states["optimizer"]) == (
        mem.weights,
        mem.gradients,
        mem.optimizer,
    )
    phase, breakdown = record.measured.peak_phase["steady"], record.measured.peak_breakdown["steady"]
    late = breakdown.get("backward", 0) if phase == "optimizer step" else 0
    if late:
        # The named race (`peak.unmodelled`): gloo's worker thread let go of the last gradient bucket after
        # the optimizer step had begun. What backward left alive is at most one flat bucket of gradients.
        assert any("freed late" in note for note in peak.unmodelled)
        assert late <= mem.gradients + 4, breakdown
        step = next(p for p in peak.phases if p.phase == "optimizer step")
        assert 0.97 * peak.bytes <= mem.peak_allocated <= 1.03 * (step.bytes + late), (peak.moment, breakdown)
    else:
        assert phase == peak.phase, (phase, peak.moment)
        assert peak.bytes == pytest.approx(mem.peak_allocated, rel=0.03), (peak.moment, breakdown)  # a toy
