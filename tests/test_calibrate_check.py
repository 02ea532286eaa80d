"""`tmath calibrate` recovers known factors from synthetic records; `tmath check` exit codes and the scaled bar."""

from __future__ import annotations

import itertools
import json

import pytest

from formulas.calibration import Calibration
from formulas.hardware import GPUS, tflops_bar
from harness.calibrate import calibrate, fit_line, fit_ratio
from harness.check import check_records, judge
from harness.cli import main
from harness.errors import UsageError
from harness.records import Environment, GpuInfo, Record
from harness.results import append_record
from harness.specbuild import build_spec
from tests.helpers import make_record

ALPHA, BETA = 1.25, 3 * 2**28
RESERVED, CONTEXT = 1.125, 5 * 2**27
INFERENCE = 1.375


def record(settings: dict, measured: dict, *, status: str = "ok", device: str = "cuda") -> Record:
    spec = build_spec({"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 32, **settings})
    return make_record(spec, measured={"device": device, **measured}, status=status)


def edited(r: Record, edit) -> Record:
    """`r` with its JSON form changed by `edit(data)` (a record as another tool might have written it)."""
    data = r.to_dict()
    edit(data)
    return Record.from_dict(data)


def cuda_run(batch: int, gpu: str = "a100-80gb", mfu: float = 0.4, mode: str = "train") -> Record:
    """A CUDA record whose memory follows the factors above exactly (integers, as measured)."""
    r = record({"batch": batch, "mode": mode, "device": "cuda", "gpu": gpu}, {})
    formula = r.prediction("korthikanti").memory_bytes
    total = formula.total * 4  # a multiple of 4: α·total is an integer
    weights = formula.weights * 8
    peak = INFERENCE * weights if mode == "inference" else ALPHA * total + BETA
    reserved = RESERVED * peak
    tflops = mfu * GPUS[gpu].peak("bf16")

    def edit(data):
        data["predicted"]["korthikanti"]["memory_bytes"]["total"] = total
        data["measured"] = {
            "device": "cuda",
            "gpu": gpu,
            "mfu": mfu,
            "tflops": {"model": tflops, "hardware": tflops, "counted": tflops},
            "memory_bytes": {
                "weights": weights,
                "peak_allocated": int(peak),
                "peak_reserved": int(reserved),
                "nvml_used": int(reserved + CONTEXT),
            },
        }

    assert peak == int(peak) and reserved == int(reserved)
    return edited(r, edit)


def cpu_run(batch: int, ratio: float = 2.0) -> Record:
    r = record({"batch": batch, "device": "cpu"}, {}, device="cpu")
    total = r.prediction("korthikanti").memory_bytes.total

    def edit(data):
        data["measured"]["memory_bytes"] = {"weights": 1, "peak_allocated": int(ratio * total)}
        data["measured"]["tflops"] = {"model": 0.05, "hardware": 0.05, "counted": 0.05}

    return edited(r, edit)


def synthetic_records() -> list[Record]:
    runs = [cuda_run(b, "a100-80gb", mfu) for b, mfu in ((1, 0.40), (2, 0.45), (4, 0.50), (8, 0.47))]
    runs += [cuda_run(b, "h100-sxm", mfu) for b, mfu in ((1, 0.30), (16, 0.35))]
    runs += [cuda_run(b, mode="inference", mfu=0.2) for b in (1, 3)]
    runs += [cpu_run(b) for b in (1, 2, 3)]  # ignored: CUDA runs exist
    runs.append(record({"batch": 5}, {}, status="oom"))
    return runs


def test_calibrate_recovers_known_factors():
    cal = calibrate(synthetic_records(), source="synthetic")
    assert cal.peak_alpha == pytest.approx(ALPHA, rel=1e-9)
    assert cal.peak_beta == pytest.approx(BETA, rel=1e-9)
    assert cal.reserved_ratio == pytest.approx(RESERVED, rel=1e-12)
    assert cal.context_bytes == pytest.approx(CONTEXT, rel=1e-12)
    assert cal.inference_overhead == pytest.approx(INFERENCE, rel=1e-12)
    # Medians of the training runs: A100 (0.40, 0.45, 0.47, 0.50 → 0.46), H100 (0.30, 0.35 → 0.325).
    assert cal.achieved_fraction["a100-80gb"] == pytest.approx(0.46)
    assert cal.achieved_fraction["h100-sxm"] == pytest.approx(0.325)
    assert cal.fit["peak"]["n"] == 6 and cal.fit["peak"]["r2"] == pytest.approx(1.0)
    assert cal.fit["peak"]["residuals_bytes"]["max_abs"] < 1e-3 * BETA
    assert cal.fit["reserved_ratio"]["n"] == 8 and cal.fit["inference_overhead"]["n"] == 2
    assert "cuda" in cal.source and "synthetic" in cal.source


def test_calibrate_without_cuda_keeps_defaults_and_says_why():
    cal = calibrate([cpu_run(b, ratio=2.0) for b in (1, 2, 4)])
    assert cal.peak_alpha == pytest.approx(2.0, rel=1e-9) and abs(cal.peak_beta) < 1e-3
    default = Calibration()
    assert (cal.reserved_ratio, cal.context_bytes, cal.inference_overhead) == (
        default.reserved_ratio,
        default.context_bytes,
        default.inference_overhead,
    )
    assert cal.achieved_fraction == {}
    for factor in ("reserved_ratio", "context_bytes", "inference_overhead", "achieved_fraction"):
        assert cal.fit[factor]["n"] == 0 and cal.fit[factor]["reason"], factor
    assert "no CUDA runs" in cal.source and "cpu" in cal.source


def test_calibrate_needs_ok_runs():
    with pytest.raises(UsageError, match="no ok runs"):
        calibrate([record({}, {}, status="oom")])
    with pytest.raises(UsageError, match="no ok meta runs"):
        calibrate([cpu_run(1)], device="meta")


def test_fits():
    alpha, beta, stats = fit_line([1e9, 2e9, 3e9], [1.5e9 + 7, 3e9 + 7, 4.5e9 + 7])
    assert alpha == pytest.approx(1.5, rel=1e-12) and beta == pytest.approx(7, abs=1e-3) and stats["r2"] == 1.0
    alpha, beta, stats = fit_line([2e9, 2e9], [3e9, 3e9])
    assert (alpha, beta) == (1.5, 0.0) and "β fixed at 0" in stats["note"]
    k, stats = fit_ratio([1.0, 2.0], [1.2, 2.4])
    assert k == pytest.approx(1.2) and stats["ratio_median"] == pytest.approx(1.2)


def test_calibrate_cli_writes_what_predict_applies(tmp_path, capsys):
    runs = tmp_path / "res" / "runs.jsonl"
    for r in synthetic_records():
        append_record(runs, r)
    assert main(["calibrate", str(runs.parent)]) == 0
    out = capsys.readouterr().out
    assert "1.2500 · predicted total" in out and "calibration.json" in out
    path = runs.parent / "calibration.json"
    cal = Calibration.load(path)
    assert cal.peak_alpha == pytest.approx(ALPHA) and json.loads(path.read_text())["fit"]["peak"]["n"] == 6
    code = main(["predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(path), "--format", "json"])
    assert code == 0
    pred = json.loads(capsys.readouterr().out)
    total = pred["memory_bytes"]["total"]
    assert pred["calibration"]["peak_allocated_bytes"] == round(ALPHA * total + BETA)
    assert "calibrated" in pred["training"]["tflops_source"]
    assert main(["predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(path)]) == 0
    assert "calibrated" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# check


_BATCH = itertools.count(1)


def timed(tflops: float, gpu: str | None = "a100-80gb", device: str = "cuda", env_name: str | None = None) -> Record:
    """A timed run; each call a distinct spec (its own batch), as the runs of a sweep are."""
    measured = {"tflops": {"model": tflops, "hardware": tflops * 1.3, "counted": tflops}}
    if gpu:
        measured["gpu"] = gpu
    r = record({"device": device, "batch": next(_BATCH)}, measured, device=device)
    if env_name:
        r.environment = Environment(gpu=GpuInfo(name=env_name))
    return r


def run_check(tmp_path, capsys, records, *argv):
    runs = tmp_path / "runs.jsonl"
    runs.unlink(missing_ok=True)
    for r in records:
        append_record(runs, r)
    code = main(["check", str(tmp_path), *argv])
    return code, capsys.readouterr().out


def test_check_exit_codes(tmp_path, capsys):
    code, out = run_check(tmp_path, capsys, [timed(130), timed(116)], "--min-tflops", "115")
    assert code == 0 and out.count("PASS") == 2
    code, out = run_check(tmp_path, capsys, [timed(130), timed(98.5)], "--min-tflops", "115")
    assert code == 1 and "FAIL" in out and "98.50 <  115.00" in out and "a100-80gb" in out
    # Non-ok and untimed (fake-tensor) runs are skipped, not failed.
    skipped = [record({"batch": 999}, {}, status="oom"), timed(0, gpu=None, device="meta")]
    skipped[1].measured.tflops = None
    code, out = run_check(tmp_path, capsys, [timed(120), *skipped], "--min-tflops", "115")
    assert code == 0 and "SKIP  status oom" in out and "SKIP  not timed (device meta)" in out
    # A check that checked nothing fails.
    code, out = run_check(tmp_path, capsys, skipped, "--min-tflops", "115")
    assert code == 1 and "nothing to check" in out
    # The hardware metric counts recomputation.
    code, _ = run_check(tmp_path, capsys, [timed(100)], "--min-tflops", "115", "--metric", "hardware")
    assert code == 0


def test_check_scaled_bar(tmp_path, capsys):
    h100_bar = 115 * 989.4 / 312
    assert tflops_bar(GPUS["h100-sxm"], 115) == pytest.approx(h100_bar)
    h100 = timed(300, gpu=None, env_name="NVIDIA H100 80GB HBM3")
    code, _ = run_check(tmp_path, capsys, [h100], "--min-tflops", "115")
    assert code == 0, "unscaled: 300 ≥ 115"
    code, out = run_check(tmp_path, capsys, [h100], "--min-tflops", "115", "--scale-to-gpu")
    assert code == 1 and f"{h100_bar:7.2f}" in out and "h100-sxm" in out
    code, _ = run_check(tmp_path, capsys, [timed(400, gpu="h100-sxm")], "--min-tflops", "115", "--scale-to-gpu")
    assert code == 0
    # V100 has no bf16: its fp16 peak scales the bar.
    v = judge(timed(50, gpu="v100"), 115, scale_to_gpu=True)
    assert v.bar == pytest.approx(115 * 125 / 312) and v.passed
    # When scaling, a CPU run (no GPU) and an unknown GPU are skipped, listed with the reason.
    cpu = timed(0.05, gpu=None, device="cpu")
    odd = timed(500, gpu=None, env_name="Mystery Accelerator 9000")
    result = check_records([cpu, odd, timed(400, gpu="h100-sxm")], 115, scale_to_gpu=True)
    assert result.exit_code == 0
    assert [v.reason for v in result.skipped] == [
        "no GPU (cannot scale the bar)",
        "GPU 'Mystery Accelerator 9000' is not in formulas.hardware",
    ]
    # Without scaling, a CPU run is checked against the bar as it is, and fails it.
    assert check_records([cpu], 115).exit_code == 1


def test_check_usage_errors(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none"), "--min-tflops", "115"]) == 2
    assert "no results at" in capsys.readouterr().err
    code, _ = run_check(tmp_path, capsys, [timed(130)], "--min-tflops", "0")
    assert code == 2
