"""Bad input is one line on stderr and exit 2, checked before any work; a finished measurement is never lost.

Each case here was once a traceback, a silently ignored option or accepted nonsense (issue 8's list).
"""

from __future__ import annotations

import errno
import json

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.results import append_record, load_results, read_records
from harness.specbuild import build_spec
from tests.helpers import make_record

TINY = ["--model", "gpt2", "--layers", "1", "--hidden", "64", "--heads", "4", "--seq", "32", "--device", "cpu"]


def one_line_error(capsys, argv: list[str], needle: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tmath: error: ") and needle in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--timeout", "-1"], "--timeout must be a positive number of seconds"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--launcher", "deepspeed"], "this run is one process"),
        (["--mode", "inference", "--recompute", "full"], "recomputation does not apply"),
        (["--mode", "inference", "--grad-accum", "2"], "gradient accumulation does not apply"),
        (["--deepspeed-config", "ds.json"], "--deepspeed-config configures a DeepSpeed run"),
        (["--nodes", "2", "--gpus", "2", "--zero", "1"], "start from a --hostfile"),
        (["--steps", "10000000"], "steps must be at most"),
        (["--grad-dtype", "fp32"], "--grad-dtype fp32 (Megatron-style fp32 main gradients) is predicted only"),
        (["--precision", "fp16-mixed", "--device", "meta"], "cannot run on fake tensors"),
        (["--grad-dtype", "fp16"], "invalid choice"),
    ],
)
def test_measure_refuses_before_it_runs(capsys, argv, needle):
    one_line_error(capsys, ["measure", *TINY, *argv], needle)


def test_measure_out_is_checked_before_the_run(capsys, tmp_path):
    one_line_error(capsys, ["measure", *TINY, "--out", str(tmp_path)], "is a directory")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(capsys, ["measure", *TINY, "--out", str(blocker / "runs.jsonl")], "cannot create")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--batch", "1000000000000000"], "batch must be at most"),
        (["--layers", "1000000000000"], "layers must be at most"),
        (["--gpus", "1000000000", "--zero", "3"], "gpus must be at most"),
        (["--tflops", "nan"], "tflops must be positive"),
        (["--nodes", "3", "--gpus", "4"], "multiple of nodes"),
    ],
)
def test_absurd_sizes_are_refused(capsys, argv, needle):
    one_line_error(capsys, ["predict", "--model", "gpt2", *argv], needle)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"alpha": "x"}, "unknown key(s) alpha"),
        ({"peak_alpha": 1.2}, "harness 1's byte fit"),
        ({"reserved_ratio": "x"}, "reserved_ratio must be a number"),
        ({"peak_ratio": {"cuda": 1.2}}, "peak_ratio must map device kinds to phases"),
        ({"peak_ratio": {"cuda": {"all": -1}}}, "peak_ratio[cuda][all] must be positive"),
        ({"achieved_fraction": {"a100-80gb": "most"}}, "achieved_fraction must map"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_a_bad_calibration_file_is_refused(capsys, tmp_path, content, needle):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(content))
    one_line_error(capsys, ["predict", "--model", "gpt2", "--calibration", str(path)], needle)
    one_line_error(capsys, ["predict", "--model", "gpt2", "--calibration", str(tmp_path)], "cannot read it")


def test_naive_method_prints_one_count_per_row(capsys):
    assert main(["predict", "--model", "llama-2-7b", "--seq", "4096", "--batch", "1", "--method", "naive"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "parameters P" in line)
    naive = f"{4 * 32 * 4096**2:,}"
    assert row.count(naive) == 2 and "exact P, 6,738,415,616" in row


def test_headroom_and_fits_weigh_the_same_need(capsys, tmp_path):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"peak_ratio": {"cuda": {"all": 1.5}}, "reserved_ratio": 1.1, "context_bytes": 2**29}))
    assert main(["predict", "--model", "gpt2", "--seq", "1024", "--calibration", str(cal), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    need = out["calibration"]["device_bytes"]
    assert out["hardware"]["headroom_bytes"] == out["hardware"]["memory_bytes"] - need
    assert need == out["hardware"]["device_need_bytes"] == round(1.5 * out["memory_bytes"]["peak"] * 1.1 + 2**29)


def test_retry_failed_needs_resume(capsys):
    one_line_error(capsys, ["sweep", "sweeps/cpu-smoke.yaml", "--retry-failed"], "give it with --resume")
    one_line_error(capsys, ["sweep", "sweeps/cpu-smoke.yaml", "--slurm-partition", "gpu"], "--executor slurm")


def test_report_calibrate_and_sweep_check_where_they_write(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(capsys, ["report", "results/zero-cpu", "--out", str(blocker)], "not a directory")
    one_line_error(capsys, ["calibrate", "results/zero-cpu", "--out", str(blocker / "c.json")], "cannot create")
    one_line_error(capsys, ["sweep", "sweeps/cpu-smoke.yaml", "--out", str(blocker)], "not a directory")


def spec():
    return build_spec({"layers": 1, "hidden": 32, "heads": 2, "vocab": 64, "seq": 16})


def test_corrupt_lines_are_reported_with_file_and_line(capsys, tmp_path):
    runs = tmp_path / "runs.jsonl"
    good = make_record(spec(), measured={"device": "cpu"})
    append_record(runs, good)
    with runs.open("a") as fh:
        fh.write("this is not json\n")
        fh.write('{"hello": 1}\n')
        fh.write(json.dumps({**good.to_dict(), "status": "great"}) + "\n")
    read = read_records(runs)
    assert len(read.records) == 1
    assert [p.split(": ", 1)[0] for p in read.problems] == [f"{runs}:2", f"{runs}:3", f"{runs}:4"]
    assert "not JSON" in read.problems[0]
    assert "hello: not a field of a record" in read.problems[1]
    assert "status: expected one of" in read.problems[2]
    _, records = load_results(tmp_path)
    assert records == [good]
    err = capsys.readouterr().err
    assert err.count("tmath: warning: ") == 3 and f"{runs}:3" in err


def test_a_file_of_garbage_is_one_line(capsys, tmp_path):
    (tmp_path / "runs.jsonl").write_text('{"hello": 1}\n')
    one_line_error(capsys, ["check", str(tmp_path)], "holds no records (1 line(s) skipped")


def test_a_failed_write_rescues_the_record(monkeypatch, tmp_path):
    """A full disk while appending: the record goes to a rescue file, and the one-line error says where."""
    import harness.results as results

    def full(path, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "_write_line", full)
    monkeypatch.setattr(results.tempfile, "gettempdir", lambda: str(tmp_path))
    record = make_record(spec(), measured={"device": "cpu"})
    with pytest.raises(UsageError, match=r"\(No space left on device\); the record is in") as info:
        append_record(tmp_path / "runs" / "runs.jsonl", record)
    rescued = str(info.value).rsplit(" ", 1)[-1]
    assert read_records(rescued).records == [record]
