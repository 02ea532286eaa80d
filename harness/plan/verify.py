"""`tmath plan --verify N`: the top N layouts' busiest rank measured on fake tensors, next to the planner's peak
and the engine walk's (`formulas.predict`, `formulas.ranks`).

Each rank runs in a subprocess of its own (`harness.plan.fakerank`: the fake process group is process-wide)
on `--device meta`: shapes without data, every tensor the step makes counted by the live-bytes tracker.
DeepSpeed's ZeRO 1-3 runs so too, its value reads (the overflow vote, the gradient norm's check, ZeRO-3's
trace check) answered as a finite step answers them (`harness.plan.fakerank`). What cannot run so is said with
its reason: ZeRO-Offload (CPU Adam), DeepSpeed's stage 0 over data-parallel replicas, replicas beside a
pipeline. Tensor parallel over unsharded replicas is measured as one replica.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

from formulas.spec import RunSpec
from harness.plan.refine import candidate_spec, one_replica, walk_spec

VERIFY_TIMEOUT_S = 900


@dataclass(frozen=True)
class Check:
    layout: dict
    micro_batch: int
    grad_accum: int
    rank: int
    planned_peak: int
    walk_peak: int | None
    walk_basis: str
    measured_peak: int | None
    status: str
    """measured | not verifiable | failed"""
    note: str
    seconds: float

    @property
    def error(self) -> float | None:
        """(planned − measured) / measured."""
        if not self.measured_peak:
            return None
        return (self.planned_peak - self.measured_peak) / self.measured_peak


def _why_not(spec: RunSpec) -> str | None:
    p = spec.parallel
    if p.offload_optimizer != "none" or p.offload_params != "none":
        return "ZeRO-Offload steps on the host (DeepSpeed's CPU Adam): not on fake tensors"
    if not p.zero and p.dp > 1 and p.dp_shard != "fsdp2" and p.tp == 1:
        return "DeepSpeed's stage 0 over data-parallel replicas reads its weight norm, which fake tensors lack"
    if p.pp > 1 and (p.zero or (p.dp > 1 and p.dp_shard != "fsdp2")):
        return "a pipeline with data-parallel replicas (not FSDP2) runs DeepSpeed or replicas tmath does not run"
    return None


def run_fake_rank(spec: RunSpec, rank: int, timeout: float = VERIFY_TIMEOUT_S) -> dict:
    """Rank `rank` of `spec` on fake tensors in a process of its own (`harness.plan.fakerank`): its
    `{"memory_bytes", "flops_counted"}`, or `{"error": one line}` when it times out or fails."""
    request = json.dumps({"spec": spec.to_dict(), "rank": rank})
    try:
        done = subprocess.run([sys.executable, "-m", "harness.plan.fakerank"], input=request, text=True,
                              capture_output=True, timeout=timeout)  # fmt: skip
        last = (done.stdout.strip().splitlines() or ["{}"])[-1]
        return json.loads(last)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    except json.JSONDecodeError:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the fake-tensor run failed: {tail[:200]}"}


def verify(result, n: int, timeout: float = VERIFY_TIMEOUT_S) -> list[Check]:
    checks = []
    for candidate in result.candidates[:n]:
        t0 = time.perf_counter()
        base = dict(layout=candidate.layout, micro_batch=candidate.micro_batch, grad_accum=candidate.grad_accum,
                    planned_peak=candidate.peak_bytes)  # fmt: skip
        try:
            spec = candidate_spec(
                result.request, candidate.layout, candidate.micro_batch, candidate.grad_accum, device="meta"
            )
        except ValueError as exc:
            checks.append(Check(**base, rank=0, walk_peak=None, walk_basis="", measured_peak=None,
                                status="not verifiable", note=str(exc).splitlines()[0], seconds=0.0))  # fmt: skip
            continue
        walk, basis, rank = walk_spec(spec, fsdp=True)
        reason = _why_not(spec)
        if reason:
            checks.append(Check(**base, rank=rank, walk_peak=walk, walk_basis=basis, measured_peak=None,
                                status="not verifiable", note=reason, seconds=0.0))  # fmt: skip
            continue
        replica = one_replica(spec)
        note = "; one data-parallel replica (its all-reduce buckets not included)" if replica is not spec else ""
        spec = replica
        out = run_fake_rank(spec, rank, timeout)
        measured = (out.get("memory_bytes") or {}).get("peak_allocated")
        status = "measured" if measured else "failed"
        checks.append(Check(**base, rank=rank, walk_peak=walk, walk_basis=basis, measured_peak=measured,
                            status=status,
                            note=out.get("error", "fake tensors, live-bytes tracker (device meta)" + note),
                            seconds=time.perf_counter() - t0))  # fmt: skip
    return checks
