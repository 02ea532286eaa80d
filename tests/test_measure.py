"""Measurement against the formulas: exact integers on tiny shapes, and failures that become records."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from formulas import activations as act
from formulas.compute import matmul_flops_per_step
from formulas.precision import optimizer_bytes_per_param
from harness.cli import main
from harness.measure import measure
from harness.runner import run_point
from harness.specbuild import build_spec

TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "max_positions": 64, "seq": 64, "batch": 2}
GPT_TINY = {"model": "gpt2", **TINY}
BERT_TINY = {"model": "bert-base-uncased", **TINY}


def run(settings: dict) -> tuple:
    spec = build_spec({"device": "cpu", "steps": 0, "warmup": 0, **settings})
    return spec, measure(spec)


def n_param_tensors(spec) -> int:
    from models.build import build_model

    with torch.device("meta"):
        model = build_model(
            spec.model.arch,
            impl=spec.measurement.impl,
            attention=spec.training.attention,
            recompute=spec.training.recompute,
        )
    return len(list(model.parameters()))


@pytest.mark.parametrize("model", [GPT_TINY, BERT_TINY], ids=["gpt", "bert"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_reference_activations_per_layer_match_formula(model, precision, recompute):
    spec, m = run({**model, "precision": precision, "recompute": recompute})
    e = 4 if precision == "fp32" else 2
    layer = m.activations_by_layer
    paper = act.layer_bytes(
        spec.model.arch, spec.training.seq, spec.training.batch, elem_bytes=e, mask_bytes=1, recompute=recompute
    )
    # The generalised Korthikanti formula, within 1% of every layer ...
    assert all(abs(x - paper) <= 0.01 * paper for x in layer), (layer, paper)
    # ... and exact once the norms' per-token statistics are counted (on CPU in the input dtype).
    exact = act.layer_bytes(
        spec.model.arch,
        spec.training.seq,
        spec.training.batch,
        elem_bytes=e,
        mask_bytes=1,
        recompute=recompute,
        stats_bytes=e,
    )
    assert layer == [exact] * spec.model.arch.n_layers


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_model_states_exact(precision, optimizer):
    spec, m = run({**GPT_TINY, "precision": precision, "optimizer": optimizer})
    p = spec.total_params
    wbytes = 4 if precision == "fp32" else 2
    mem = m.memory_bytes
    assert mem.weights == wbytes * p
    assert mem.gradients == wbytes * p
    # torch's AdamW also keeps a 0-dim fp32 `step` per parameter tensor; SGD's momentum is all it keeps.
    steps = 4 * n_param_tensors(spec) if optimizer == "adamw" else 0
    assert mem.optimizer == optimizer_bytes_per_param(optimizer, precision) * p + steps


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("model", [GPT_TINY, {**GPT_TINY, "dropout": 0.0}, BERT_TINY], ids=["gpt", "gpt-p0", "bert"])
def test_flops_counted_equal_exact_formula(model, recompute):
    spec, m = run({**model, "recompute": recompute})
    assert m.flops_counted == matmul_flops_per_step(spec.model.arch, spec.training.batch, spec.training.seq, recompute)


def test_fake_tensors_measure_the_same_bytes():
    _, real = run({**GPT_TINY, "recompute": "selective"})
    _, fake = run({**GPT_TINY, "recompute": "selective", "device": "meta"})
    for key in ("weights", "gradients", "optimizer", "activations", "graph_retained", "peak_allocated"):
        assert getattr(fake.memory_bytes, key) == getattr(real.memory_bytes, key), key
    # AdamW creates its fp32 `step` counters with torch.tensor(0.), which no dispatched op allocates: the
    # live tracker sees them under fake tensors only, until they are registered after the first step.
    gap = fake.memory_bytes.peak_allocated_first_step - real.memory_bytes.peak_allocated_first_step
    assert 0 <= gap <= 4 * n_param_tensors(build_spec(GPT_TINY))
    assert fake.activations_by_layer == real.activations_by_layer
    assert fake.step_ms is None and real.flops_counted == fake.flops_counted


def test_peak_bounds():
    _, m = run(GPT_TINY)
    mem = m.memory_bytes
    # The peak splits, exactly, into what each phase had allocated and still held at that moment.
    steady = m.peak_breakdown["steady"]
    assert sum(steady.values()) == mem.peak_allocated
    assert steady["weights"] == mem.weights and steady["optimizer"] == mem.optimizer
    persistent = mem.weights + mem.optimizer
    # Gradients (set to None between steps) are created in backward while activations are freed, so
    # the peak holds at least the larger of the two on top of weights and optimizer state ...
    assert mem.peak_allocated >= persistent + max(mem.activations, mem.gradients)
    # ... and, here, less than Transformer Math 101's sum, which counts both at once.
    assert mem.peak_allocated < persistent + mem.activations + mem.gradients
    # Live bytes the forward added: the saved storages, except the input ids and labels (saved by the
    # embedding and the loss, but allocated before the forward), plus the loss itself.
    assert mem.graph_retained == mem.activations - mem.inputs + 4


def test_inference_mode_kv_cache_and_overhead():
    settings = {"model": "llama-2-7b", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
                "vocab": 128, "seq": 32, "batch": 2, "mode": "inference", "impl": "hf"}  # fmt: skip
    spec, m = run(settings)
    from formulas import predict

    assert m.memory_bytes.kv_cache == predict(spec).inference.kv_cache  # 2·L·b·s·kv_width·4
    assert m.memory_bytes.optimizer is None  # inference builds no optimizer
    assert m.inference_overhead > 1.0


def test_timed_steps_produce_throughput():
    _, m = run({**GPT_TINY, "steps": 2, "warmup": 1})
    assert len(m.step_ms.all) == 2 and m.step_ms.min <= m.step_ms.median <= m.step_ms.max
    assert m.tflops.model > 0 and m.tokens_per_second > 0
    assert m.mfu is None  # no device peak on a CPU


def test_oom_becomes_a_record():
    # 200 000 sequences of 64 tokens: the first (B, a, s, s) score tensor alone is 13 GB, over the 3 GiB cap.
    spec = build_spec({**GPT_TINY, "batch": 200_000, "device": "cpu", "steps": 0, "warmup": 0})
    record = run_point(spec, max_memory_bytes=3 * 2**30, timeout=300)
    assert record.status == "oom", record.error
    assert record.measured.memory_bytes.weights > 0  # what was measured before the failure is kept
    assert record.environment.torch == torch.__version__
    assert "allocate" in record.error.message.lower() or "memory" in record.error.message.lower()


def test_timeout_becomes_a_record(monkeypatch):
    # A worker that never finishes (a stub: the protocol itself is not what is tested here).
    import harness.runner as runner

    monkeypatch.setattr(runner, "_worker_command", lambda result: ["/bin/sh", "-c", "sleep 60"])
    spec = build_spec({**GPT_TINY, "device": "cpu", "steps": 10_000, "warmup": 0})
    t0 = time.perf_counter()
    record = run_point(spec, timeout=0.5)
    assert time.perf_counter() - t0 < 10, "the worker's process group is killed at the limit"
    assert record.status == "timeout"
    assert "time limit" in record.error.message
    assert record.spec.measurement.steps == 10_000 and record.prediction("korthikanti").memory_bytes.total > 0


def test_crash_without_record_is_recorded(monkeypatch):
    # A worker that dies by a signal leaves no record; the runner writes one with status `killed`.
    spec = build_spec({**GPT_TINY, "device": "cpu"})
    import harness.runner as runner

    monkeypatch.setattr(runner, "_worker_command", lambda result: ["/bin/sh", "-c", "kill -9 $$"])
    record = run_point(spec, timeout=30)
    assert record.status == "killed" and "SIGKILL" in record.error.message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--tp", "2", "--gpus", "2", "--pp", "1", "--impl", "hf"], "no tensor-parallel plan"),
        (["--optimizer", "adam8bit"], "needs a CUDA device"),
        (["--impl", "hf", "--recompute", "selective"], "reference only"),
        (["--steps", "-1"], "non-negative"),
    ],
)
def test_measure_bad_input(capsys, argv, message):
    code = main(["measure", "--model", "gpt2", "--layers", "1", "--seq", "32", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_measure_params_only_is_an_error(capsys):
    assert main(["measure", "--params", "7B"]) == 2
    assert "needs an architecture" in capsys.readouterr().err


def test_measure_cli_json_and_out(tmp_path):
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "-m", "harness.cli", "measure", "--model", "gpt2", "--layers", "1", "--hidden", "64",
           "--heads", "4", "--seq", "32", "--batch", "1", "--precision", "fp32", "--device", "cpu", "--steps", "1",
           "--warmup", "0", "--format", "json", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Progress on stderr as the protocol goes, stdout left to the record.
    assert "tmath: building gpt2 (reference) on cpu" in proc.stderr and "tmath: timed step 1 of 1" in proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "ok"
    assert set(record) >= {"spec", "predicted", "measured", "environment", "status", "harness_version"}
    assert set(record["measured"]["memory_bytes"]) >= {
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "peak_allocated",
    }
    assert record["measured"]["step_ms"]["median"] > 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["spec_key"] == record["spec_key"]


@pytest.mark.gpu
def test_cuda_protocol():
    spec, m = run({**GPT_TINY, "device": "cuda", "precision": "bf16", "steps": 3, "warmup": 1})
    mem = m.memory_bytes
    assert mem.pre_model_allocated > 0  # the cuBLAS workspace, recorded apart
    assert mem.peak_allocated >= mem.weights + mem.gradients + mem.optimizer + mem.activations
    assert mem.peak_reserved >= mem.peak_allocated and mem.num_ooms == 0
    # CUDA LayerNorm keeps fp32 statistics; native_dropout bool masks: exact with stats_bytes=4.
    exact = act.layer_bytes(
        spec.model.arch, spec.training.seq, spec.training.batch, elem_bytes=2, mask_bytes=1, stats_bytes=4
    )
    assert m.activations_by_layer == [exact] * spec.model.arch.n_layers
    assert len(m.step_ms.all) == 3 and m.tflops.model > 0
    assert m.gpu is None or m.mfu > 0


def _independent_steady_peak(spec, *, under_flop_counter: bool = False) -> int:
    """The steady step's peak by a tracker of our own: the model, trainer and batches as `measure` makes
    them, one step to create the optimizer state, then a fresh live-bytes tracker over the second."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.measure import gc_frozen
    from harness.memtrack import LiveTensorTracker
    from harness.trainers.plain import PlainTrainer
    from models.build import build_model, make_batch

    torch.manual_seed(0)
    t = spec.training
    model = build_model(spec.model.arch, impl=spec.measurement.impl, recompute=t.recompute, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        make_batch(spec.model.arch, t.batch, t.seq, device="cpu", generator=generator, impl=spec.measurement.impl)
    ]
    trainer = PlainTrainer(model, spec, device_type="cpu")
    trainer.train_step(batches)
    with LiveTensorTracker() as tracker:
        tracker.track(*model.parameters(), *model.buffers(), *(v for b in batches for v in b.values()))
        tracker.track(*trainer.optimizer_tensors())
        with gc_frozen():
            tracker.reset_peak()
            if under_flop_counter:
                with FlopCounterMode(display=False):
                    trainer.train_step(batches)
            else:
                trainer.train_step(batches)
    return tracker.peak_bytes


@pytest.mark.parametrize("impl", ["reference", "hf"])
def test_full_recompute_peak_is_not_inflated_by_the_flop_counter(impl):
    """The steady step's peak equals an independent tracker's over the same step without FlopCounterMode;
    the counter's own bookkeeping (it keeps what checkpointing recomputes) would have added to it."""
    settings = {"model": "gpt2", "layers": 2, "hidden": 256, "heads": 4, "vocab": 512, "seq": 128, "batch": 2,
                "precision": "fp32", "recompute": "full", "impl": impl}  # fmt: skip
    spec, m = run(settings)
    independent = _independent_steady_peak(spec)
    assert m.memory_bytes.peak_allocated == independent
    assert _independent_steady_peak(spec, under_flop_counter=True) > independent
    assert m.flops_counted == matmul_flops_per_step(spec.model.arch, spec.training.batch, spec.training.seq, "full")
    assert m.peak_phase["steady"] in ("activations", "backward", "optimizer step")
    assert max(m.timeline.live_bytes) == m.memory_bytes.peak_allocated
