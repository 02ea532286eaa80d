"""`tmath sweep`: expansion and validation, resume after a kill (nothing lost, nothing repeated),
failures recorded while the sweep goes on, no orphan worker after SIGTERM, and the submitit path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.launch import Limits
from harness.results import latest_records, read_records, repair_torn_tail
from harness.sweep import local
from harness.sweep.file import load_sweep, parse_size
from harness.sweep.run import run_sweep
from tests.helpers import make_record

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))

TINY = "{layers: 1, hidden: 32, heads: 2, vocab: 64, seq: 16, batch: 1, precision: fp32, steps: 1, warmup: 0}"


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def fake_record(spec, limits=None):
    return make_record(spec, measured={"device": "cpu"}, status="ok", elapsed_s=0.0)


def read_jsonl(path: Path):
    return read_records(path).records


# --------------------------------------------------------------------------------------------------
# Expansion


def test_shipped_sweeps_expand():
    names = {p.stem for p in SWEEPS}
    assert names >= {"cpu-smoke", "a100-node", "h100", "recompute", "seq-scaling", "zero-stages", "bert", "inference"}
    for path in SWEEPS:
        sweep = load_sweep(path)
        assert sweep.name == path.stem, "make run reports results/<file stem>"
        assert sweep.points
        assert all(p.spec.extra == {"sweep": sweep.name} for p in sweep.points)
        assert len({p.spec.key() for p in sweep.points}) == len(sweep.points)


def test_cpu_smoke_covers_the_measurement_paths():
    specs = [p.spec for p in load_sweep(REPO / "sweeps" / "cpu-smoke.yaml").points]
    assert {s.training.recompute for s in specs} == {"none", "selective", "full"}
    assert {s.training.precision for s in specs} >= {"fp32", "bf16-mixed"}
    assert {s.measurement.impl for s in specs} == {"reference", "hf"}
    assert any(s.model.arch.family == "encoder" for s in specs)
    assert any(s.model.arch.mlp == "swiglu" and s.measurement.impl == "hf" for s in specs)
    assert any(s.measurement.device == "meta" for s in specs)
    assert any(s.measurement.mode == "inference" for s in specs)
    # bf16 matmuls crawl on CPUs without bf16 units: keep bf16 points tiny.
    assert all(
        s.model.arch.hidden <= 256 for s in specs if s.training.precision != "fp32" and s.measurement.device != "meta"
    )


def test_grid_times_points_minus_exclude(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: g
        defaults: {TINY}
        grid:
          recompute: [none, selective, full]
          impl: [reference, hf]
          grad-accum: [1, 2]
        exclude:
          - {{impl: hf, recompute: selective}}
        points:
          - {{seq: 32}}
          - {{kv-heads: 1, batch: 2}}
        timeout: 12
        max_memory: 512MiB
        """,
    )
    sweep = load_sweep(path)
    assert len(sweep.points) == 3 * 2 * 2 - 2 + 2
    grid = sweep.points[:-2]
    assert [(p.spec.training.recompute, p.spec.measurement.impl, p.spec.training.grad_accum) for p in grid[:3]] == [
        ("none", "reference", 1),
        ("none", "reference", 2),
        ("none", "hf", 1),
    ]
    assert not any(p.spec.measurement.impl == "hf" and p.spec.training.recompute == "selective" for p in grid)
    assert all(p.spec.model.arch.hidden == 32 and p.spec.training.seq == 16 for p in grid)
    assert sweep.points[-2].spec.training.seq == 32 and sweep.points[-2].origin == "points[0]"
    last = sweep.points[-1].spec
    assert (last.model.arch.n_kv_heads, last.training.batch, last.model.arch.hidden) == (1, 2, 32)
    assert sweep.timeout == 12 and sweep.max_memory_bytes == 512 * 2**20


def test_points_only_and_name_default(tmp_path):
    path = write(tmp_path, f"defaults: {TINY}\npoints: [{{}}, {{batch: 2}}]\n", name="my-sweep.yaml")
    sweep = load_sweep(path)
    assert sweep.name == "my-sweep" and len(sweep.points) == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("grid: {recompute: [none, full]\n", "not valid YAML"),
        ("- 1\n- 2\n", "YAML mapping"),
        (f"defaults: {TINY}\npoints: [{{}}]\ngrids: {{}}\n", "unknown key(s) grids"),
        (f"defaults: {TINY}\ngrid: {{recompte: [none]}}\n", "unknown setting 'recompte'"),
        (f"defaults: {TINY}\ngrid: {{recompute: full}}\n", "grid.recompute must be a non-empty list"),
        (f"defaults: {TINY}\ngrid: {{precision: [fp32, fp64]}}\n", "grid point 1 (precision=fp64)"),
        (f"defaults: {TINY}\npoints: [{{}}, {{batch: 0}}]\n", "points[1]: batch must be a positive integer"),
        (f"defaults: {TINY}\npoints: [{{}}, {{batch: 1}}]\n", "points[1] is the same run as points[0]"),
        (f"defaults: {TINY}\ngrid: {{batch: [1, 2]}}\nexclude: [{{batch: 3}}]\n", "exclude[0] (batch=3) matches no"),
        (f"defaults: {TINY}\npoints: [{{}}]\nmax_memory: lots\n", "max_memory: not a size"),
        (f"defaults: {TINY}\npoints: [{{}}]\ntimeout: -1\n", "timeout must be a positive number"),
        (f"defaults: {TINY}\npoints: [{{}}]\nname: ../x\n", "name must be a plain directory name"),
        ("defaults: {batch: 1}\n", "no points"),
        ("points: [{seq: 16}]\n", "points[0]: give --model"),
        (f"defaults: {TINY}\npoints: [{{device: cuda}}]\n", "points[0]: --device cuda: no CUDA device"),
    ],
)
def test_malformed_sweep_is_one_line_exit_2(tmp_path, capsys, text, needle):
    if "device: cuda" in text:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    path = write(tmp_path, text)
    code = main(["sweep", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tmath: error: ") and str(path) in lines[0] and needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "runs.jsonl").exists(), "nothing runs when a point is invalid"


def test_missing_sweep_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


def test_dry_run_lists_points(tmp_path, capsys):
    path = write(tmp_path, f"name: d\ndefaults: {TINY}\ngrid: {{batch: [1, 2, 3]}}\n")
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "3 points" in out and "b3" in out
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# Running (in process, injected runner)


def test_refuses_existing_results_without_resume(tmp_path):
    sweep = load_sweep(write(tmp_path, f"name: r\ndefaults: {TINY}\ngrid: {{batch: [1, 2]}}\n"))
    out = tmp_path / "res"
    run_sweep(sweep, out, runner=fake_record, quiet=True)
    with pytest.raises(UsageError, match="already holds 2 record"):
        run_sweep(sweep, out, runner=fake_record, quiet=True)
    result = run_sweep(sweep, out, resume=True, runner=fake_record, quiet=True)
    assert (result.ran, result.skipped) == (0, 2)


def test_one_writer_per_results_file(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    sweep = load_sweep(write(tmp_path, f"name: l\ndefaults: {TINY}\npoints: [{{}}]\n"))
    runs = tmp_path / "res" / "runs.jsonl"
    runs.parent.mkdir()
    with runs.open("a") as other:  # another sweep process holding the file
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match="another sweep is writing"):
            run_sweep(sweep, runs.parent, runner=fake_record, quiet=True)
    assert run_sweep(sweep, runs.parent, runner=fake_record, quiet=True).ran == 1


def test_interrupted_sweep_resumes_without_loss_or_repeat(tmp_path):
    sweep = load_sweep(write(tmp_path, f"name: r\ndefaults: {TINY}\ngrid: {{batch: [1, 2, 3, 4, 5]}}\n"))
    out = tmp_path / "res"
    calls: list[str] = []

    def flaky(spec, limits):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(spec.key())
        return fake_record(spec)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, runner=flaky, quiet=True)
    assert len(read_jsonl(out / "runs.jsonl")) == 2
    ran: list[str] = []

    def counting(spec, limits):
        ran.append(spec.key())
        return fake_record(spec)

    run_sweep(sweep, out, resume=True, runner=counting, quiet=True)
    keys = [r.spec_key for r in read_jsonl(out / "runs.jsonl")]
    assert sorted(keys) == sorted(p.spec.key() for p in sweep.points)
    assert not set(ran) & set(calls)


def test_failures_are_recorded_and_retry_failed(tmp_path):
    sweep = load_sweep(write(tmp_path, f"name: f\ndefaults: {TINY}\ngrid: {{batch: [1, 2, 3]}}\n"))
    out = tmp_path / "res"

    def runner(spec, limits):
        if spec.training.batch == 1:
            raise RuntimeError("the harness itself broke")
        if spec.training.batch == 2:
            return make_record(spec, status="oom", error={"type": "OutOfMemoryError", "message": "boom"})
        return fake_record(spec)

    # The sweep records a runner that raises as an error and goes on (harness.sweep.local.guarded).
    result = run_sweep(sweep, out, runner=runner, quiet=True)
    assert result.statuses == {"error": 1, "oom": 1, "ok": 1}
    broken = next(r for r in read_jsonl(out / "runs.jsonl") if r.status == "error")
    assert "the harness itself broke" in broken.error.message and "RuntimeError" in broken.error.traceback_tail
    result = run_sweep(sweep, out, resume=True, retry_failed=True, runner=fake_record, quiet=True)
    assert result.ran == 2
    latest = latest_records(read_jsonl(out / "runs.jsonl"))
    assert [r.status for r in latest] == ["ok", "ok", "ok"]


def test_a_harness_failure_is_an_error_record():
    from harness.specbuild import build_spec

    spec = build_spec({"layers": 1, "hidden": 32, "heads": 2, "vocab": 64, "seq": 16})

    def broken(spec, limits):
        raise OSError("no such interpreter")

    record = local.guarded(spec, Limits(), broken)
    assert record.status == "error" and "no such interpreter" in record.error.message
    assert record.prediction("korthikanti") is not None, "a failed point still carries its prediction"


def test_sweep_limits_reach_multi_rank_points(tmp_path, monkeypatch):
    """A sweep's time limit and memory cap apply to multi-rank points too (they once lost the cap)."""
    import harness.launch as launch_module

    seen = {}

    def fake_distributed(spec, **kwargs):
        seen.update(kwargs)
        return fake_record(spec)

    monkeypatch.setattr(launch_module, "run_distributed", fake_distributed)
    text = f"name: z\ndefaults: {TINY}\npoints: [{{zero: 2, gpus: 2, device: cpu}}]\ntimeout: 7\nmax_memory: 16GiB\n"
    sweep = load_sweep(write(tmp_path, text))
    assert run_sweep(sweep, tmp_path / "res", quiet=True).statuses == {"ok": 1}
    assert seen["timeout"] == 7 and seen["max_memory_bytes"] == 16 * 2**30


def test_torn_tail_is_repaired(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"spec_key": "a", "status": "ok"}\n{"spec_key": "b", "sta')
    assert repair_torn_tail(path) == len('{"spec_key": "b", "sta')
    assert path.read_text() == '{"spec_key": "a", "status": "ok"}\n'
    assert repair_torn_tail(path) == 0


def test_parse_size():
    assert parse_size("8GiB", "x") == 8 * 2**30
    assert parse_size("1.5 GB", "x") == 1_500_000_000
    assert parse_size(4096, "x") == 4096
    with pytest.raises(UsageError, match="x: not a size"):
        parse_size("8 gigs", "x")


# --------------------------------------------------------------------------------------------------
# Real `tmath sweep` processes


_SLOW_SWEEP = """
import sys, time
import harness.sweep.run
from tests.helpers import make_record

def slow(spec, limits):
    time.sleep(0.4)
    return make_record(spec, measured={"device": "cpu"}, status="ok", elapsed_s=0.4)

harness.sweep.run.launch = slow
from harness.cli import main
sys.exit(main(["sweep", *sys.argv[1:]]))
"""


def _spawn(args: list[str], env: dict | None = None, script: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "harness.cli", "sweep", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkilled_sweep_resumes_losing_nothing_repeating_nothing(tmp_path):
    path = write(tmp_path, f"name: k\ndefaults: {TINY}\ngrid: {{batch: [1, 2, 3, 4, 5, 6, 7, 8]}}\n")
    out = tmp_path / "res"
    runs = out / "runs.jsonl"
    proc = _spawn([str(path), "--out", str(out)], script=_SLOW_SWEEP)
    _wait_for(lambda: len(read_jsonl(runs)) >= 3, what="three records")
    proc.kill()
    proc.wait()
    first = [r.spec_key for r in read_jsonl(runs)]
    assert 3 <= len(first) < 8
    # A kill in the middle of a write leaves a partial line: the resumed sweep must not glue onto it.
    with runs.open("a") as fh:
        fh.write('{"harness_version": "1", "spec_key": "torn')
    proc = _spawn([str(path), "--out", str(out), "--resume"], script=_SLOW_SWEEP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert "dropped a torn last line" in err.decode()
    keys = [r.spec_key for r in read_jsonl(runs)]
    expected = sorted(p.spec.key() for p in load_sweep(path).points)
    assert sorted(keys) == expected, "every point exactly once"
    assert keys[: len(first)] == first, "records already written are kept as they were"
    assert all(json.loads(line) for line in runs.read_text().splitlines())


def _processes_with(token: str) -> list[int]:
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token.encode() in env.read_bytes():
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigterm_kills_the_running_worker_and_resume_completes(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: t
        defaults: {TINY}
        points: [{{device: cpu}}, {{device: cpu, batch: 2}}]
        """,
    )
    out = tmp_path / "res"
    token = f"tmath-test-{uuid.uuid4().hex}"
    proc = _spawn([str(path), "--out", str(out)], env={"TMATH_TEST_TOKEN": token})
    # A worker (a grandchild that inherited the token) exists once the first point is running.
    _wait_for(lambda: any(p != proc.pid for p in _processes_with(token)), what="a worker process")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    _wait_for(lambda: not _processes_with(token), timeout=10, what="no orphan worker")
    done = read_jsonl(out / "runs.jsonl")
    proc = _spawn([str(path), "--out", str(out), "--resume"])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    records = read_jsonl(out / "runs.jsonl")
    assert len(records) == 2 and len({r.spec_key for r in records}) == 2
    assert records[: len(done)] == done
    assert all(r.status == "ok" for r in records), [r.error for r in records]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigterm_to_measure_takes_its_ranks_with_it():
    """`tmath measure --gpus 2` killed with SIGTERM leaves no launcher or rank behind."""
    token = f"tmath-test-{uuid.uuid4().hex}"
    flags = ["--model", "gpt2", "--layers", "1", "--hidden", "64", "--heads", "4", "--vocab", "128", "--seq", "32",
             "--gpus", "2", "--device", "cpu", "--steps", "50"]  # fmt: skip
    script = "import sys; from harness.cli import main; sys.exit(main(['measure', *sys.argv[1:]]))"
    proc = _spawn(flags, env={"TMATH_TEST_TOKEN": token}, script=script)
    # The launcher and its ranks inherit the token: wait until more than the CLI has it.
    _wait_for(lambda: len([p for p in _processes_with(token) if p != proc.pid]) >= 3, timeout=120,
              what="the launcher and two ranks")  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    _wait_for(lambda: not _processes_with(token), timeout=20, what="no orphan launcher or rank")


@pytest.mark.slow
def test_impossible_point_is_recorded_and_the_sweep_continues(tmp_path):
    # 20000 × 1024 tokens × 512 wide in fp32 is a 42 GB embedding output: far beyond the 4 GiB cap.
    path = write(
        tmp_path,
        """
        name: imp
        defaults: {layers: 1, hidden: 512, heads: 8, vocab: 64, device: cpu, precision: fp32, steps: 1, warmup: 0}
        points:
          - {batch: 20000, seq: 1024}
          - {hidden: 32, heads: 2, batch: 1, seq: 16}
        max_memory: 4GiB
        """,
    )
    out = tmp_path / "res"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    first, second = read_jsonl(out / "runs.jsonl")
    assert first.status == "oom", first.error
    assert "allocate" in first.error.message
    assert first.error.stderr_tail is not None
    assert second.status == "ok"
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--strict"]) == 1


@pytest.mark.slow
def test_submitit_executor_appends_records(tmp_path):
    pytest.importorskip("submitit")
    path = write(tmp_path, f"name: sub\ndefaults: {TINY}\npoints: [{{device: meta}}, {{device: meta, batch: 2}}]\n")
    sweep = load_sweep(path)
    out = tmp_path / "res"
    result = run_sweep(sweep, out, executor="slurm", slurm={"cluster": "local", "poll_s": 0.2}, timeout=120, quiet=True)
    records = read_jsonl(out / "runs.jsonl")
    assert result.ran == 2 and sorted(r.spec_key for r in records) == sorted(p.spec.key() for p in sweep.points)
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    assert all(r.spec.extra == {"sweep": "sub"} for r in records)


def test_slurm_without_sbatch_is_a_usage_error(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))
    sweep = load_sweep(write(tmp_path, f"name: s\ndefaults: {TINY}\npoints: [{{device: meta}}]\n"))
    with pytest.raises(UsageError, match="sbatch is not on PATH"):
        run_sweep(sweep, tmp_path / "o", executor="slurm", runner=fake_record, quiet=True)
