"""Benchmark of `tmath plan`'s search: candidates scored per second, and whole searches end to end.

    .venv/bin/python scripts/bench_plan.py [--out results/bench/plan.json]

Each case runs `harness.plan.search.plan` 5 times (after one untimed run) and keeps the fastest; the rate is
candidates scored (every point of the product, rejected ones included) per second of that run, on one
process (NumPy's element-wise kernels are single-threaded). The end-to-end time of the CLI is measured too, as
a subprocess (`tmath plan ... --format json`), imports included. Targets (issue 11): ≥ 100,000 candidates/s on
one core, a 70B search on 512 GPUs in < 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.plan.search import PlanRequest, plan
from models.presets import PRESETS

CASES = (
    ("llama-2-13b", 4096, 512, "h100-sxm", 64),
    ("llama-2-70b", 4096, 1024, "h100-sxm", 512),
    ("megatron-175b", 2048, 1536, "a100-80gb", 1024),
    ("megatron-1t", 2048, 3072, "a100-80gb", 3072),
)


def bench(model: str, seq: int, batch: int, gpu: str, gpus: int) -> dict:
    req = PlanRequest(arch=PRESETS[model], model=model, seq=seq, global_batch=batch, gpu=gpu, gpus=gpus,
                      gpus_per_node=8, efficiency=0.5)  # fmt: skip
    result = plan(req)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        plan(req)
        best = min(best, time.perf_counter() - t0)
    cli = [sys.executable, "-m", "harness.cli", "plan", "--model", model, "--seq", str(seq), "--global-batch",
           str(batch), "--gpu", gpu, "--gpus", str(gpus), "--format", "json"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cli, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return {"model": model, "seq": seq, "global_batch": batch, "gpu": gpu, "gpus": gpus,
            "candidates": result.searched, "layouts": result.layouts, "search_seconds": best,
            "candidates_per_second": result.searched / best, "cli_seconds": wall,
            "best": result.candidates[0].layout if result.candidates else None}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench/plan.json")
    args = parser.parse_args()
    rows = [bench(*case) for case in CASES]
    for r in rows:
        print(f"{r['model']:>14} on {r['gpus']:>5} × {r['gpu']:<9} {r['candidates']:>8,} candidates in "
              f"{r['search_seconds'] * 1e3:7.1f} ms = {r['candidates_per_second']:>11,.0f}/s; CLI {r['cli_seconds']:.2f} s")  # fmt: skip
    out = {"how": __doc__.split("\n\n")[1].replace("\n", " "), "machine": {"cpus": os.cpu_count(),
           "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "cases": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
