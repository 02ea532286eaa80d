"""The GPU check that works the first time: what comes back from the lent machine (scripts/check_returned.py),
the per-run table, the CPU stand-in sweeps, the sweep files' priority order, the probe on the CPU, and the
whole of scripts/device-check.sh as a dry run (slow: about a minute on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from harness.sweep.file import load_sweep

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"scripts_{name}"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


check_returned = script("check_returned")
run_table = script("run_table")
dry_sweep = script("dry_sweep")


def files(root: Path, sizes: dict[str, int]) -> Path:
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(size)  # sparse: the size is what counts
    return root


# --------------------------------------------------------------------------------------------------
# What comes back


def test_returned_accepts_what_the_device_check_writes(tmp_path):
    root = files(tmp_path, {"gpu-h200.tar.gz": 3 * MIB, "summary.txt": 2_000, "a/b/deep.txt": 1})
    verdict = check_returned.check(root)
    assert verdict.ok, verdict.violations
    assert verdict.files == (("a/b/deep.txt", 1), ("gpu-h200.tar.gz", 3 * MIB), ("summary.txt", 2_000))
    assert verdict.total_bytes == 3 * MIB + 2_001


@pytest.mark.parametrize(
    "sizes, words",
    [
        ({f"f{i}.txt": 1 for i in range(9)}, "9 files (at most 8"),
        ({"a/b/c/file.txt": 1}, "a/b/c/file.txt: 3 folders down"),
        ({"bad name.txt": 1}, "'bad name.txt' has characters"),
        ({"résumé.txt": 1}, "has characters"),
        ({"bad:dir/ok.txt": 1}, "bad:dir: name"),
        ({"big.tar.gz": 16 * MIB + 1}, "big.tar.gz: 16,777,217 bytes"),
        ({f"part{i}": 15 * MIB for i in range(5)}, "78,643,200 bytes in all"),
    ],
    ids=["nine-files", "three-folders", "space", "non-ascii", "bad-folder", "file-over-16MiB", "over-64MiB"],
)
def test_returned_refuses_each_violation(tmp_path, sizes, words):
    verdict = check_returned.check(files(tmp_path, sizes))
    assert not verdict.ok
    assert any(words in v for v in verdict.violations), verdict.violations


def test_returned_refuses_links_and_nothing(tmp_path):
    assert check_returned.check(tmp_path).violations == (f"{tmp_path}: no file to bring back",)
    files(tmp_path, {"real.txt": 1})
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    assert any("link.txt: a link" in v for v in check_returned.check(tmp_path).violations)


def test_returned_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, REPO / "scripts" / "check_returned.py", *args], capture_output=True, text=True
        )

    ok = run(str(files(tmp_path / "ok", {"summary.txt": 10})))
    assert ok.returncode == 0 and "check_returned: ok: 1 files, 10 bytes" in ok.stdout
    bad = run(str(files(tmp_path / "bad", {"a/b/c/x": 1})))
    assert bad.returncode == 1 and "FAIL: a/b/c/x: 3 folders down" in bad.stdout
    missing = run(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "is not a directory" in missing.stderr


# --------------------------------------------------------------------------------------------------
# The per-run table


def test_run_table_reads_records_with_and_without_the_kernel(tmp_path, capsys):
    base = {"spec": {"model": "pythia-1.4b", "precision": "bf16-mixed", "attention": "flash", "batch": 4, "seq": 2048}}
    ok = {
        **base,
        "spec_key": "a",
        "status": "ok",
        "predicted": {"peak": {"bytes": 40 * 2**30}},
        "measured": {
            "memory_bytes": {"peak_allocated": 42 * 2**30},
            "tflops": {"model": 301.25},
            "mfu": 0.3046,
            "attention_kernel": "flash",
        },
    }
    oom = {"spec": {**base["spec"], "model": "llama-2-7b", "recompute": "full"}, "spec_key": "b", "status": "oom"}
    lines = [json.dumps(ok), json.dumps(oom), '{"spec_key": "c", "status": "o']  # a write cut off at the limit
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    assert run_table.main([str(tmp_path), str(tmp_path / "missing")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path}: 2 runs (1 ok, 1 oom)"
    assert out[2].split() == [
        "pythia-1.4b",
        "b4",
        "s2048",
        "bf16-mixed",
        "flash",
        "ok",
        "42",
        "40",
        "1.050",
        "301",
        "30.5%",
        "flash",
    ]
    assert out[3].split() == ["llama-2-7b", "rc=full", "b4", "s2048", "bf16-mixed", "flash", "oom"] + ["-"] * 6
    assert "runs.jsonl:3: not a JSON line" in out[4]
    assert out[5] == f"{tmp_path / 'missing'}: no runs.jsonl (nothing ran)"


# --------------------------------------------------------------------------------------------------
# The sweeps, their order, and their CPU stand-ins


def test_gpu_sweeps_run_the_most_valuable_points_first():
    gpu1 = [p.spec for p in load_sweep(REPO / "sweeps" / "gpu-1.yaml").points]
    first = gpu1[0]
    assert (first.model.name, first.training.seq, first.training.batch) == ("pythia-1.4b", 2048, 4)
    assert (first.training.attention, first.training.precision, first.measurement.impl) == (
        "flash",
        "bf16-mixed",
        "reference",
    )
    assert gpu1[1].measurement.compile and gpu1[1].model.name == "pythia-1.4b"  # the same point, compiled
    assert gpu1[-1].model.name == "llama-2-7b" and gpu1[-1].training.recompute == "full"
    assert len(gpu1) == 15
    # The formula checks (reference GPT-2, bf16 autocast) come before the other precisions and transformers.
    ref = [i for i, s in enumerate(gpu1) if s.model.name == "gpt2" and s.measurement.impl == "reference"]
    hf = [i for i, s in enumerate(gpu1) if s.measurement.impl == "hf"]
    assert max(ref) < min(hf)
    zero = [p.spec for p in load_sweep(REPO / "sweeps" / "zero-1gpu.yaml").points]
    assert len(zero) == 10
    offload = [i for i, s in enumerate(zero) if s.parallel.offload_optimizer != "none"]
    assert offload == [8, 9]


@pytest.mark.parametrize("name", ["gpu-1", "zero-1gpu"])
def test_dry_sweep_keeps_the_first_points_on_the_cpu(tmp_path, name):
    out = tmp_path / f"{name}.yaml"
    assert dry_sweep.main([str(REPO / "sweeps" / f"{name}.yaml"), str(out), "--points", "2"]) == 0
    real = load_sweep(REPO / "sweeps" / f"{name}.yaml").points[:2]
    tiny = load_sweep(out, check_device=True).points  # measurable here, on the CPU
    assert [p.spec.measurement.device for p in tiny] == ["cpu", "cpu"]
    assert all(p.spec.model.arch.n_layers == 2 for p in tiny)
    for r, t in zip(real, tiny, strict=True):
        assert (t.spec.model.name, t.spec.training.precision, t.spec.training.attention, t.spec.parallel.zero) == (
            r.spec.model.name,
            r.spec.training.precision,
            r.spec.training.attention,
            r.spec.parallel.zero,
        )


def test_dry_sweep_refuses_a_grid(tmp_path, capsys):
    src = tmp_path / "g.yaml"
    src.write_text(yaml.safe_dump({"grid": {"seq": [64, 128]}, "points": [{"seq": 32}]}))
    assert dry_sweep.main([str(src), str(tmp_path / "o.yaml")]) == 2
    assert "has a grid" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The probe, on the CPU


def test_probe_on_the_cpu(tmp_path):
    probe = script("device_probe")
    assert probe.main(["--out", str(tmp_path), "--device", "cpu", "--gemm", "128", "--repeats", "3"]) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["device"]["type"] == "cpu" and result["driver"] is None
    assert result["gemm"]["n"] == 128 and result["gemm"]["tflops_median"] > 0 and result["gemm"]["dtype"] == "float32"
    assert set(result["sdpa"]["enabled"]) == {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"}
    assert result["sdpa"]["runs"]["MATH"] == "ok"  # the math backend runs anywhere
    assert "workspace_bytes" not in result["cublas_workspace"]
    assert (tmp_path / "probe.txt").read_text().startswith("device       cpu")


# --------------------------------------------------------------------------------------------------
# The whole check, dry


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "RESULTS_ROOT": str(results), "PY": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "device-check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "check_returned: ok: 2 files" in proc.stdout
    assert check_returned.check(out).ok
    assert sorted(p.name for p in out.iterdir()) == ["gpu-dry-run.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu-dry-run.tar.gz") as tar:
        names = set(tar.getnames())
        steps = tar.extractfile("gpu-dry-run/steps.tsv").read().decode().splitlines()
        probe = json.loads(tar.extractfile("gpu-dry-run/probe.json").read())
    for sweep in ("gpu-1", "zero-1gpu"):
        assert {f"gpu-dry-run/{sweep}/runs.jsonl", f"gpu-dry-run/{sweep}/report/report.md"} <= names
    assert probe["device"]["type"] == "cpu" and probe["gemm"]["tflops_median"] > 0
    exits = dict(line.split("\t")[:2] for line in steps[1:])
    assert list(exits) == [
        "probe",
        "gpu-1",
        "gpu-1-report",
        "gpu-1-calibrate",
        "gpu-1-check",
        "zero-1gpu",
        "zero-1gpu-report",
        "zero-1gpu-calibrate",
        "zero-1gpu-check",
        "gpu-tests",
    ]
    assert all(
        exits[k] == "0" for k in ("probe", "gpu-1", "gpu-1-report", "zero-1gpu", "zero-1gpu-report", "gpu-tests")
    )
    records = [json.loads(line) for line in (results / "gpu-dry-run" / "gpu-1" / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"] and records[0]["spec"]["model"] == "pythia-1.4b"
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "pythia-1.4b" in summary and summary.rstrip().endswith("would come back")
