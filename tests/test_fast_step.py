"""The timed step's fast form (`--compile`) and the attention kernel a record says ran."""

from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness.kernels import attention_kernel
from harness.measure import measure
from harness.specbuild import build_spec
from harness.trainers.plain import PlainTrainer
from models.build import build_model, make_batch

TINY = {"model": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "max_positions": 64, "seq": 64,
        "batch": 2, "precision": "fp32", "device": "cpu"}  # fmt: skip


def _trainer(spec) -> tuple[PlainTrainer, list[dict]]:
    torch.manual_seed(0)
    model = build_model(spec.model.arch, impl="reference", attention=spec.training.attention,
                        recompute="none", device="cpu", dtype=torch.float32)  # fmt: skip
    batch = make_batch(spec.model.arch, 2, 64, device="cpu", generator=torch.Generator().manual_seed(0))
    return PlainTrainer(model, spec, device_type="cpu"), [batch]


@pytest.mark.slow
def test_compiled_fused_steps_train_as_the_eager_ones():
    """Two steps eager, against one eager step then compile() (inductor, fused AdamW) and one more: the same
    parameters, so that a compiled timing times the same training. With dropout: the compiled graph draws
    its masks from ATen's generator (`fallback_random`), the eager ones."""
    spec = build_spec({**TINY, "dropout": 0.1})
    eager, batches = _trainer(spec)
    fast, _ = _trainer(spec)
    for trainer in (eager, fast):
        torch.manual_seed(1)
        trainer.train_step(batches)
    assert fast.compile() == "torch.compile (inductor) of the model and its loss; fused AdamW"
    for trainer in (eager, fast):
        torch.manual_seed(2)
        trainer.train_step(batches)
    assert all(g["fused"] for g in fast.optimizer.param_groups)
    for a, b in zip(eager.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_times_the_compiled_step_and_measures_memory_eager():
    base = {**TINY, "steps": 2, "warmup": 1}
    eager = measure(build_spec(base))
    fast = measure(build_spec({**base, "compile": True}))
    assert eager.step_mode == "eager" and fast.step_mode.startswith("torch.compile")
    assert fast.compile_seconds > 0 and len(fast.step_ms.all) == 2
    for term in ("weights", "gradients", "optimizer", "activations", "peak_allocated", "peak_allocated_first_step"):
        assert getattr(fast.memory_bytes, term) == getattr(eager.memory_bytes, term), term
    assert fast.flops_counted == eager.flops_counted


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "meta"], "fake tensors"),
        (["--mode", "inference"], "training steps"),
        (["--zero", "1", "--gpus", "2"], "one process without ZeRO"),
    ],
)
def test_compile_refuses_what_it_cannot_time(capsys, flags, message):
    assert main(["measure", "--model", "gpt2", "--layers", "2", "--compile", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("attention", "dropout", "kernel"),
    [
        ("flash", 0.0, "flash (CPU)"),
        ("flash", 0.1, "math"),
        ("eager", 0.1, "eager"),
    ],
)
def test_the_record_names_the_attention_kernel_that_ran(attention, dropout, kernel):
    """On the CPU, SDPA's flash kernel takes no dropout: with dropout it falls back to the math composite."""
    m = measure(build_spec({**TINY, "attention": attention, "dropout": dropout, "steps": 0, "warmup": 0}))
    assert m.attention_kernel == kernel


def test_kernel_names_from_the_ops_seen():
    assert attention_kernel({"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"},
                            "flash") == "flash"  # fmt: skip
    assert attention_kernel({"_scaled_dot_product_cudnn_attention"}, "flash") == "cuDNN"
    assert attention_kernel({"_scaled_dot_product_efficient_attention_backward"}, "flash") == "memory-efficient"
    assert attention_kernel(set(), "eager") == "eager" and attention_kernel(set(), "flash") == "math"
