"""`tmath calibrate` recovers known factors from synthetic records and refuses ratios that make things worse; `tmath check` exit codes and the scaled bar."""

from __future__ import annotations

import itertools
import json

import pytest

from formulas.calibration import ALL_PHASES, Calibration
from formulas.hardware import GPUS, tflops_bar
from harness.calibrate import PeakPair, calibrate, fit_ratio, leave_one_out
from harness.check import check_records, judge
from harness.cli import main
from harness.errors import UsageError
from harness.predictions import BY_NAME
from harness.records import Environment, GpuInfo, Record
from harness.results import append_record
from harness.specbuild import build_spec
from tests.helpers import make_record

RATIO = 1.25
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


def predicted_peak(r: Record) -> int:
    return BY_NAME["peak"].predict(r.spec, r.device).bytes


def cuda_run(batch: int, gpu: str = "a100-80gb", mfu: float = 0.4, mode: str = "train", ratio=RATIO) -> Record:
    """A CUDA record whose memory follows the factors above (integers, as measured)."""
    r = record({"batch": batch, "mode": mode, "device": "cuda", "gpu": gpu}, {})
    weights = r.prediction("korthikanti").memory_bytes.weights * 8
    peak = round(INFERENCE * weights if mode == "inference" else ratio * predicted_peak(r))
    reserved = round(RESERVED * peak)
    tflops = mfu * GPUS[gpu].peak("bf16")

    def edit(data):
        data["measured"] = {
            "device": "cuda",
            "gpu": gpu,
            "mfu": mfu,
            "tflops": {"model": tflops, "hardware": tflops, "counted": tflops},
            "memory_bytes": {
                "weights": weights,
                "peak_allocated": peak,
                "peak_reserved": reserved,
                "nvml_used": reserved + CONTEXT,
            },
        }

    return edited(r, edit)


def cpu_run(batch: int, ratio: float = 2.0, **settings) -> Record:
    r = record({"batch": batch, "device": "cpu", **settings}, {}, device="cpu")
    peak = round(ratio * predicted_peak(r))

    def edit(data):
        data["measured"]["memory_bytes"] = {"weights": 1, "peak_allocated": peak}
        data["measured"]["tflops"] = {"model": 0.05, "hardware": 0.05, "counted": 0.05}

    return edited(r, edit)


def synthetic_records() -> list[Record]:
    runs = [cuda_run(b, "a100-80gb", mfu) for b, mfu in ((1, 0.40), (2, 0.45), (4, 0.50), (8, 0.47))]
    runs += [cuda_run(b, "h100-sxm", mfu) for b, mfu in ((1, 0.30), (16, 0.35))]
    runs += [cuda_run(b, mode="inference", mfu=0.2) for b in (1, 3)]
    runs += [cpu_run(b, ratio=2.0) for b in (1, 2, 3)]  # fitted apart from the CUDA runs
    runs.append(record({"batch": 5}, {}, status="oom"))
    return runs


def test_calibrate_recovers_known_factors():
    cal = calibrate(synthetic_records(), source="synthetic")
    # Device kinds are never pooled: the CUDA runs' ratio is 1.25 and the CPU runs' 2.0.
    phases = cal.fit["peak_ratio"]["cuda"]["phases"]
    assert cal.peak_ratio["cuda"][ALL_PHASES] == pytest.approx(RATIO, rel=1e-6)
    assert all(cal.peak_ratio["cuda"][phase] == pytest.approx(RATIO, rel=1e-6) for phase, n in phases.items() if n >= 3)
    assert cal.peak_ratio["cpu"][ALL_PHASES] == pytest.approx(2.0, rel=1e-6)
    assert cal.fit["peak_ratio"]["cuda"]["n"] == 6 and cal.fit["peak_ratio"]["cpu"]["n"] == 3
    assert cal.fit["peak_ratio"]["cuda"]["loo_median_abs_error"] < 1e-6
    assert cal.fit["peak_ratio"]["cuda"]["uncalibrated_median_abs_error"] == pytest.approx(0.2, rel=1e-5)
    assert cal.reserved_ratio == pytest.approx(RESERVED, rel=1e-6)
    assert cal.context_bytes == pytest.approx(CONTEXT, rel=1e-6)
    assert cal.inference_overhead == pytest.approx(INFERENCE, rel=1e-6)
    # Medians of the training runs: A100 (0.40, 0.45, 0.47, 0.50 → 0.46), H100 (0.30, 0.35 → 0.325).
    assert cal.achieved_fraction["a100-80gb"] == pytest.approx(0.46)
    assert cal.achieved_fraction["h100-sxm"] == pytest.approx(0.325)
    assert cal.fit["reserved_ratio"]["n"] == 8 and cal.fit["inference_overhead"]["n"] == 2
    assert "cuda" in cal.source and "synthetic" in cal.source


def test_a_ratio_applies_only_to_its_own_device_kind_and_phase():
    cal = Calibration(peak_ratio={"cuda": {ALL_PHASES: 1.1, "optimizer step": 1.5}})
    assert cal.ratio("cuda", "optimizer step") == 1.5 and cal.ratio("cuda", "forward") == 1.1
    assert cal.ratio("cpu", "forward") is None and cal.peak_bytes(1000, "meta", "forward") is None


def test_leave_one_out_is_reported_beside_the_uncalibrated_error():
    # Ratios 1.10, 1.20, 1.30 (one phase): uncalibrated |error|s 9.1%, 16.7%, 23.1%; leave-one-out each run is
    # predicted with the median of the other two (1.25, 1.20, 1.15): 13.6%, 0%, 11.5%.
    pairs = [PeakPair(f"r{i}", "cpu", "forward", 1000, round(1000 * k)) for i, k in enumerate((1.1, 1.2, 1.3))]
    check = leave_one_out(pairs)
    assert check["uncalibrated_median_abs_error"] == pytest.approx(1 - 1000 / 1200)
    assert check["loo_median_abs_error"] == pytest.approx(1 - 1.15 * 1000 / 1300)
    assert check["loo_median_abs_error"] < check["uncalibrated_median_abs_error"]
    assert check["loo_max_abs_error"] == pytest.approx(1.25 * 1000 / 1100 - 1)


def test_a_ratio_that_would_make_predictions_worse_is_refused():
    # Predictions already right on average, scattered both ways: any ratio fitted without a run moves it
    # away, so leave-one-out is worse than no calibration and no ratio is written.
    runs = [cpu_run(b, ratio=k) for b, k in ((1, 0.9), (2, 1.1), (3, 0.95), (4, 1.05))]
    with pytest.raises(UsageError, match=r"cpu: leave-one-out median .* is not below the uncalibrated"):
        calibrate(runs)
    # With something else to write, the refusal is recorded in the file and the ratio left out.
    cal = calibrate([*runs, cuda_run(1, mode="inference"), cuda_run(2, mode="inference")])
    assert "cpu" not in cal.peak_ratio and "not below" in cal.fit["peak_ratio"]["cpu"]["refused"]
    assert cal.inference_overhead == pytest.approx(INFERENCE, rel=1e-6)


def test_calibrate_without_cuda_keeps_defaults_and_says_why():
    cal = calibrate([cpu_run(b, ratio=2.0) for b in (1, 2, 4)])
    assert cal.peak_ratio == {"cpu": pytest.approx({ALL_PHASES: 2.0, **cal.peak_ratio["cpu"]}, rel=1e-6)}
    default = Calibration()
    assert (cal.reserved_ratio, cal.context_bytes, cal.inference_overhead) == (
        default.reserved_ratio,
        default.context_bytes,
        default.inference_overhead,
    )
    assert cal.achieved_fraction == {}
    for factor in ("reserved_ratio", "context_bytes", "inference_overhead", "achieved_fraction"):
        assert cal.fit[factor]["n"] == 0 and cal.fit[factor]["reason"], factor
    assert "3 cpu" in cal.source


def test_calibrate_needs_ok_runs():
    with pytest.raises(UsageError, match="no ok runs"):
        calibrate([record({}, {}, status="oom")])
    with pytest.raises(UsageError, match="no ok meta runs"):
        calibrate([cpu_run(1)], device="meta")
    with pytest.raises(UsageError, match="one run: nothing to validate"):
        calibrate([cpu_run(1)])


def test_fit_ratio():
    k, stats = fit_ratio([1.0, 2.0], [1.2, 2.4])
    assert k == pytest.approx(1.2) and stats["ratio_median"] == pytest.approx(1.2) and stats["r2"] == 1.0


def test_an_old_byte_fit_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="run `tmath calibrate` again"):
        Calibration.from_dict({"peak_alpha": 1.2, "peak_beta": 1e8})


def test_calibrate_cli_writes_what_predict_applies(tmp_path, capsys):
    runs = tmp_path / "res" / "runs.jsonl"
    for r in synthetic_records():
        append_record(runs, r)
    assert main(["calibrate", str(runs.parent)]) == 0
    out = capsys.readouterr().out
    assert "peak allocated / predicted peak on cuda: all 1.2500" in out and "calibration.json" in out
    assert "20.000% uncalibrated, 0.000% leave-one-out" in out
    path = runs.parent / "calibration.json"
    cal = Calibration.load(path)
    assert json.loads(path.read_text())["fit"]["peak_ratio"]["cuda"]["n"] == 6
    code = main(["predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(path), "--format", "json"])
    assert code == 0
    pred = json.loads(capsys.readouterr().out)
    ratio = cal.ratio("cuda", pred["peak"]["phase"])
    assert pred["calibration"]["peak_ratio_applied"] == ratio
    assert pred["calibration"]["peak_allocated_bytes"] == round(ratio * pred["memory_bytes"]["peak"])
    assert pred["calibration"]["device_bytes"] == round(pred["calibration"]["peak_allocated_bytes"] * cal.reserved_ratio
                                                        + cal.context_bytes) == pred["hardware"]["device_need_bytes"]  # fmt: skip
    assert "calibrated" in pred["training"]["tflops_source"]
    assert main(["predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(path)]) == 0
    assert "calibrated" in capsys.readouterr().out
    # A CPU prediction takes the CPU runs' ratio, not the CUDA one.
    assert main(["predict", "--model", "gpt2", "--seq", "1024", "--device", "cpu", "--calibration", str(path),
                 "--format", "json"]) == 0  # fmt: skip
    pred = json.loads(capsys.readouterr().out)
    assert pred["calibration"]["peak_ratio_applied"] == cal.ratio("cpu", pred["peak"]["phase"])


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
