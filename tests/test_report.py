"""`tmath report`: Markdown, self-contained HTML, PNG plots and exports, from synthetic records and a real sweep."""

from __future__ import annotations

import re
import textwrap

import pandas as pd
import pytest

from harness.cli import main
from harness.records import Record
from harness.report.build import build_report
from harness.report.frame import flat_row
from harness.results import append_record, latest_records, run_label
from harness.specbuild import build_spec
from harness.zero.estimator import EstimatorBytes, EstimatorPrediction
from tests.helpers import make_record

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 32, "batch": 2, "precision": "fp32"}


def synthetic(settings: dict, *, status: str = "ok", device: str = "cpu", scale: float = 1.0, **extra) -> Record:
    """A record whose measured terms are the predicted ones × `scale` (peak: the total × 1.2)."""
    spec = build_spec({**TINY, **settings}).replace(extra={"sweep": "synthetic"})
    if status != "ok":
        return make_record(
            spec, status=status, error={"type": "OutOfMemoryError", "message": "tried to allocate 80 GiB"}
        )
    formula = make_record(spec).prediction("korthikanti")
    pm, act = formula.memory_bytes, formula.activation_bytes
    timed = device != "meta"
    measured = {
        "device": device,
        "memory_bytes": {
            "weights": pm.weights,
            "gradients": pm.gradients,
            "optimizer": pm.optimizer,
            "activations": round(pm.activations * scale),
            "activations_layers": round(act.per_layer * act.layers * scale),
            "peak_allocated": round(pm.total * 1.2),
        },
        "step_ms": {"median": 100.0, "min": 90.0, "max": 120.0, "all": [90.0, 100.0, 120.0]} if timed else None,
        "tflops": {"model": 130.0, "hardware": 140.0, "counted": 129.0} if timed else None,
        "tokens_per_second": 640.0 if timed else None,
        "methods": {"weights": "unique parameter storages"},
        **{k: v for k, v in extra.items() if k != "environment"},
    }
    return make_record(spec, measured=measured, elapsed_s=1.0, environment=extra.get("environment"))


def a100_env() -> dict:
    return {
        "hostname": "node-1",
        "torch": "2.13.0",
        "cuda": "12.8",
        "transformers": "5.23.0",
        "deepspeed": "0.19.8",
        "git_commit": "abc123",
        "gpu": {"name": "NVIDIA A100-SXM4-80GB", "total_memory_bytes": 80 * 2**30, "nvml": {"driver": "550.54.15"}},
    }


@pytest.fixture
def results(tmp_path):
    runs = tmp_path / "res" / "runs.jsonl"
    cuda = synthetic(
        {"device": "cuda", "precision": "bf16-mixed"},
        device="cuda",
        gpu="a100-80gb",
        mfu=0.42,
        peak_tflops=312.0,
        environment=a100_env(),
    )
    cuda.measured.memory_bytes.peak_reserved, cuda.measured.memory_bytes.nvml_used = 2 * 2**30, 3 * 2**30
    zero = synthetic({"device": "cuda", "zero": 2, "gpus": 8}, device="cuda", gpu="a100-80gb", mfu=0.3)
    zero.predicted["deepspeed"] = EstimatorPrediction(
        function="estimate_zero2_model_states_mem_needs", memory_bytes=EstimatorBytes(gpu=123_456_789, cpu=0),
        args={}, assumes="16-bit parameters and Adam",
    )  # fmt: skip
    records = [
        synthetic({"recompute": "none"}),
        synthetic({"recompute": "selective"}, scale=1.01),
        synthetic({"recompute": "full"}),
        synthetic({"seq": 64}),
        synthetic({"seq": 16}),
        synthetic(
            {"model": "llama-2-7b", "seq": 4096, "batch": 1, "device": "meta", "precision": "bf16-mixed"}, device="meta"
        ),
        synthetic({"mode": "inference"}),
        cuda,
        zero,
        synthetic({"batch": 9999}, status="oom"),
    ]
    # A retried point: the later ok record supersedes the failure.
    records.insert(0, synthetic({"batch": 3}, status="error"))
    records.append(synthetic({"batch": 3}))
    for r in records:
        append_record(runs, r)
    return runs.parent, records


def test_report_from_synthetic_records(results):
    out_dir, records = results
    written = build_report(out_dir, export=("csv", "parquet"))
    report = out_dir / "report"
    assert written["markdown"] == report / "report.md" and written["html"] == report / "report.html"
    for name in ("measured_vs_predicted", "error_by_term", "activations_vs_seq", "throughput"):
        assert written[name].read_bytes().startswith(PNG), name
    md = written["markdown"].read_text()
    for heading in (
        "## Environment",
        "## Measured vs predicted, per term",
        "## Prediction error by term and method",
        "## Activations against sequence length",
        "## Throughput",
        "## CUDA allocator and context overheads",
        "## Failed runs",
        "### Inference runs",
    ):
        assert heading in md, heading
    assert "NVIDIA A100-SXM4-80GB" in md and "550.54.15" in md and "abc123" in md and "node-1" in md
    assert "tried to allocate 80 GiB" in md and "| oom" in md
    failed = md.split("## Failed runs")[1].split("##")[0]
    rows = [line for line in failed.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(rows) == 1 and "| oom" in rows[0], "the retried failure is superseded by its ok record"
    # The DeepSpeed estimator has its column, filled for the ZeRO run.
    error_table = md.split("## Prediction error by term and method")[1].split("![")[0]
    lines = error_table.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| term")).split("|")]
    states = [c.strip() for c in next(line for line in lines if line.startswith("| model states")).split("|")]
    assert states[header.index("deepspeed")].endswith("n=1")
    # Bars: the A100 runs get 115 × 312/312; CPU runs none.
    assert "115.0" in md and "pass" in md

    page = written["html"].read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page, "self-contained"

    csv = pd.read_csv(written["csv"])
    parquet = pd.read_parquet(written["parquet"])
    assert len(csv) == len(parquet) == len(records) - 1, "one row per spec key"
    assert {"measured_weights_bytes", "predicted_weights_bytes", "naive_activations_bytes", "tflops_model"} <= set(csv)


def test_flat_row_terms():
    rec = synthetic({"recompute": "selective"}, scale=1.5)
    row = flat_row(rec)
    assert row["measured_weights_bytes"] == row["predicted_weights_bytes"]
    assert row["measured_activations_bytes"] == round(1.5 * row["predicted_activations_bytes"])
    assert row["predicted_activations_per_layer_bytes"] == rec.prediction("korthikanti").activation_bytes.per_layer
    assert row["naive_activations_per_layer_bytes"] == row["naive_activations_bytes"] / 2
    assert row["predicted_peak_bytes"] == rec.prediction("korthikanti").memory_bytes.total
    assert row["measured_model_states_bytes"] == row["predicted_model_states_bytes"]
    inf_rec = synthetic({"mode": "inference"})
    inf = flat_row(inf_rec)
    assert inf["measured_peak_bytes"] is None and inf["measured_inference_peak_bytes"] is not None
    # Transformer Math 101's rule, 1.2 × weights, plus the KV cache of the prompt.
    pred = inf_rec.prediction("korthikanti").inference
    assert inf["predicted_inference_peak_bytes"] == pred.total == round(1.2 * pred.weights) + pred.kv_cache


def test_implementation_variant_is_a_method():
    """`predicted.implementation` (formulas.variants) is compared on activations only, as its own method."""
    from harness.report.frame import error_frame, frame

    rec = synthetic({"impl": "hf", "device": "cpu"})
    impl = rec.prediction("implementation")
    assert impl is not None and impl.device == "cpu"
    row = flat_row(rec)
    assert row["implementation_activations_bytes"] == impl.total
    assert row["implementation_activations_per_layer_bytes"] == sum(impl.layers) / len(impl.layers)
    assert row["implementation_weights_bytes"] is None
    errors = error_frame(frame([rec]))
    assert set(errors[errors["method"] == "implementation"]["term"]) == {"activations", "activations_per_layer"}


def test_offloaded_states_are_their_own_term():
    rec = synthetic({"zero": 2, "gpus": 2, "offload_optimizer": "cpu"})
    host = rec.prediction("korthikanti").host_memory_bytes
    assert host.optimizer > 0 and host.gradients > 0 and rec.prediction("korthikanti").memory_bytes.optimizer == 0
    rec.measured.memory_bytes.host_model_states = host.total
    row = flat_row(rec)
    assert row["measured_host_model_states_bytes"] == row["predicted_host_model_states_bytes"] == host.total
    # A CPU run's tracker sees host and device as one memory: the predicted peak counts both.
    assert row["predicted_peak_bytes"] == rec.prediction("korthikanti").memory_bytes.total + host.total
    assert flat_row(synthetic({"zero": 2, "gpus": 2}))["predicted_host_model_states_bytes"] is None


def test_latest_records_keeps_first_position_newest_content():
    a1, b, a2 = synthetic({"batch": 1}, status="error"), synthetic({"batch": 2}), synthetic({"batch": 1})
    assert latest_records([a1, b, a2]) == [a2, b]


def test_run_label():
    spec = build_spec({**TINY, "model": "gpt2", "recompute": "full", "zero": 1, "gpus": 8})
    assert run_label(spec) == "gpt2 L2 h64 fp32 rc=full ZeRO-1 ×8 b2 s32 auto"
    assert run_label(spec, without=("seq",), device="cuda") == "gpt2 L2 h64 fp32 rc=full ZeRO-1 ×8 b2 cuda"
    offload = build_spec({**TINY, "model": "gpt2", "zero": 3, "gpus": 2, "offload_params": "cpu"})
    assert run_label(offload) == "gpt2 L2 h64 fp32 ZeRO-3 off-param=cpu ×2 b2 s32 auto"


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no results at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "runs.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no records" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty"), "--export", "xlsx"]) == 2


@pytest.mark.slow
def test_report_from_a_real_tiny_sweep(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: tiny
            defaults: {layers: 2, hidden: 32, heads: 2, vocab: 64, batch: 1, precision: fp32, device: cpu, steps: 1, warmup: 0}
            points:
              - {seq: 16}
              - {seq: 32, device: meta}
            """
        )
    )
    out = tmp_path / "results" / "tiny"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert main(["report", str(out), "--export", "csv"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed
    md = (out / "report" / "report.md").read_text()
    assert "custom L2 h32 fp32 b1 s16 cpu" in md and "custom L2 h32 fp32 b1 s32 meta" in md
    assert "None: every run is ok." in md
    df = pd.read_csv(out / "report" / "runs.csv")
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2
    # The reference model matches the formulas byte for byte on weights and gradients.
    for term in ("weights", "gradients"):
        assert (ok[f"measured_{term}_bytes"] == ok[f"predicted_{term}_bytes"]).all(), term
    assert (out / "report" / "activations_vs_seq.png").read_bytes().startswith(PNG)
