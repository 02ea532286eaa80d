"""`tmath predict`: the README's example, the JSON contract, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_example_table(capsys):
    code, out, err = run(
        capsys, "predict", "--model", "gpt2-xl", "--seq", "1024", "--batch", "8",
        "--precision", "bf16-mixed", "--zero", "1", "--gpus", "8",
    )  # fmt: skip
    assert code == 0, err
    for term in ("weights", "gradients", "optimizer", "activations", "total", "Transformer Math 101", "Korthikanti"):
        assert term in out
    assert "fits" in out


def test_json_contract(capsys):
    code, out, _ = run(
        capsys, "predict", "--model", "gpt2-xl", "--seq", "1024", "--batch", "8",
        "--precision", "bf16-mixed", "--zero", "1", "--gpus", "8", "--format", "json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["params"] == 1_557_611_200
    mem = data["memory_bytes"]
    assert set(mem) >= {"weights", "gradients", "optimizer", "activations", "total"}
    assert all(isinstance(v, int) for v in mem.values())
    assert mem["total"] == mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"]
    assert mem["optimizer"] == 12 * 1_557_611_200 // 8
    assert set(data["flops"]) >= {"per_step_model", "per_step_hardware", "training_total"}
    assert set(data["training"]) >= {"gpu_hours", "pf_days", "days"}
    assert data["training"]["tokens"] == 20 * 1_557_611_200
    assert data["hardware"]["fits"] in (True, False)


def test_shape_flags_and_overrides(capsys):
    code, out, _ = run(capsys, "predict", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "100",
                       "--seq", "32", "--format", "json")  # fmt: skip
    assert code == 0
    p = json.loads(out)["params"]
    # 100·64 + 2048·64 (learned positions) + 2·(4·64² + 4·64 + 2·64·256 + 256 + 64 + 4·64) + 2·64
    assert p == 100 * 64 + 2048 * 64 + 2 * (4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 4 * 64) + 2 * 64
    code, out, _ = run(capsys, "predict", "--model", "llama-2-7b", "--layers", "2", "--seq", "128", "--format", "json")
    assert code == 0 and json.loads(out)["spec"]["arch"]["n_layers"] == 2


def test_params_only(capsys):
    code, out, _ = run(capsys, "predict", "--params", "7B", "--gpus", "8", "--zero", "3", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["params"] == 7 * 10**9 and data["memory_bytes"]["activations"] is None


def test_config_json_path(tmp_path, capsys):
    cfg = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = run(capsys, "predict", "--model", str(path), "--seq", "1024", "--format", "json")
    assert code == 0 and json.loads(out)["params"] == 124_439_808
    code, out, _ = run(capsys, "predict", "--model", str(tmp_path), "--seq", "1024", "--format", "json")
    assert code == 0 and json.loads(out)["params"] == 124_439_808


def test_naive_method(capsys):
    code, out, _ = run(capsys, "predict", "--model", "gpt2", "--seq", "1024", "--method", "naive", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["params"] == 4 * 12 * 768**2 and data["memory_bytes"]["optimizer"] == 0


def test_calibration_applied(tmp_path, capsys):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"peak_ratio": {"cuda": {"all": 1.1}}, "reserved_ratio": 1.05, "context_bytes": 5e8,
                               "achieved_fraction": {"a100-80gb": 0.5}, "source": "test"}))  # fmt: skip
    code, out, _ = run(
        capsys, "predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(cal), "--format", "json"
    )
    data = json.loads(out)
    assert code == 0
    assert data["calibration"]["peak_allocated_bytes"] == round(1.1 * data["memory_bytes"]["peak"])
    assert data["training"]["tflops_per_gpu"] == pytest.approx(0.5 * 312)
    assert data["training"]["tflops_source"].startswith("calibrated")
    code, out, _ = run(capsys, "predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(cal))
    assert "calibrated peak" in out


BAD_INPUTS = [
    (["predict", "--model", "gpt5-ultra"], "unknown model"),
    (["predict", "--layers", "2", "--hidden", "100", "--heads", "3"], "must divide hidden"),
    (["predict", "--model", "gpt2", "--seq", "512", "--zero", "2", "--pp", "2", "--gpus", "2"], "forbids ZeRO-2/3"),
    (["predict", "--model", "gpt2", "--seq", "512", "--gpus", "6", "--tp", "4"], "multiple of tp"),
    (["predict", "--model", "gpt2", "--seq", "4096"], "learned positions"),
    (["predict", "--model", "gpt2", "--seq", "512", "--gpu", "tpu"], "unknown GPU"),
    (["predict", "--model", "gpt2", "--seq", "512", "--gpu", "v100"], "no bf16 units"),
    (["predict", "--model", "gpt2", "--seq", "512", "--precision", "fp8"], "invalid choice"),
    (["predict", "--model", "gpt2", "--seq", "512", "--zero", "5"], "invalid choice"),
    (["predict", "--params", "seven"], "not a count"),
    (["predict", "--layers", "2"], "missing --hidden, --heads"),
    (["predict", "--model", "gpt2", "--params", "7B"], "--params replaces"),
    (["predict", "--model", "/nonexistent/config.json"], "not found"),
    (
        ["predict", "--model", "gpt2", "--seq", "512", "--calibration", "/nonexistent.json"],
        "calibration file not found",
    ),
    (["predict", "--model", "gpt2", "--seq", "512", "--sequence-parallel"], "needs --tp > 1"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a[:4]) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tmath: error:") and message in lines[0]


def test_malformed_config_json(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "predict", "--model", str(bad))
    assert code == 2 and "not valid JSON" in err
    bad.write_text(json.dumps({"model_type": "t5"}))
    code, _, err = run(capsys, "predict", "--model", str(bad))
    assert code == 2 and "not supported" in err


LLAMA_CFG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4096, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 32000, "intermediate_size": 11008}  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {"head_dim": 64},  # 64 × 32 ≠ 4096: over-counted by 1.07B at 32 layers before issue 12, then refused
        {"model_type": "mistral", "hidden_size": 5120, "head_dim": 128},  # Mistral-Nemo's shape (+524M before)
        {"mlp_bias": True},
        {"attention_bias": True},
        {"model_type": "gpt_neox", "attention_bias": False},  # GPT-NeoX keeps its MLP biases
        {"model_type": "qwen2"},  # q, k, v biases, none on the output projection
    ],
)
def test_config_fields_once_miscounted_are_counted_exactly(tmp_path, capsys, extra):
    """`tmath predict --model config.json` counts what transformers builds from that config, to the parameter."""
    import torch
    import transformers

    cfg = {**LLAMA_CFG, **extra}
    if cfg["model_type"] == "gpt_neox":
        del cfg["num_key_value_heads"]  # GPT-NeoX has no such field: a config naming it is refused
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, err = run(capsys, "predict", "--model", str(path), "--seq", "512", "--format", "json")
    assert code == 0, err
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert json.loads(out)["params"] == sum(p.numel() for p in model.parameters())


def test_a_mixture_of_experts_config_is_refused_with_its_field(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_CFG, "num_local_experts": 8}))  # experts on a family without them
    code, out, err = run(capsys, "predict", "--model", str(path), "--seq", "512")
    assert code == 2 and out == "" and err.count("\n") == 1 and "num_local_experts" in err, err


def test_console_script_exit_code_no_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "predict", "--model", "gpt2", "--seq", "512", "--heads", "7"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
