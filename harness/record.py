"""A record: spec + prediction + measurement + environment + status; one JSON line per run.

Records are the only form results take: tables, plots, calibration and checks are computed from
them. Every number is an int (bytes, FLOPs) or a float (ms, TFLOP/s); nothing is parsed from text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import formulas
from formulas.naive import NAIVE_METHODS
from formulas.spec import RunSpec
from formulas.variants import implementation_summary
from harness.environment import HARNESS_VERSION

STATUSES: tuple[str, ...] = ("ok", "oom", "error", "timeout", "killed")
"""ok: measured. oom: ran out of device or host memory. error: raised. timeout: killed at the
time limit. killed: the process died without a record (a signal, e.g. the kernel's OOM killer)."""

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def classify_exception(exc: BaseException) -> str:
    """oom for every flavour of allocation failure (CUDA, CPU allocator, Python), else error."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS):
        return "oom"
    return "error"


def predicted_summary(spec: RunSpec) -> dict:
    """The formulas' terms for this spec (Korthikanti), with the naive baselines beside them."""
    p = formulas.predict(spec)
    d = p.to_dict()
    out = {
        "method": "korthikanti",
        "params": p.params,
        "memory_bytes": d["memory_bytes"],
        "host_memory_bytes": d["host_memory_bytes"],
        "activation_bytes": d["activation_bytes"],
        "flops": d["flops"],
        "inference": d["inference"],
    }
    if spec.zero > 0:
        from harness.zero import deepspeed_estimate  # imports DeepSpeed lazily, and only for ZeRO runs

        out["deepspeed_estimator"] = deepspeed_estimate(spec)
    if spec.arch is not None:
        for method in NAIVE_METHODS:
            out[method.replace("-", "_")] = {"memory_bytes": formulas.predict(spec, method=method).memory_bytes()}
    return out


def make_record(
    spec: RunSpec,
    *,
    measured: dict,
    status: str,
    error: dict | None = None,
    environment: dict | None = None,
    elapsed_s: float | None = None,
) -> dict:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    predicted = predicted_summary(spec)
    # The implementation's own activation account (formulas.variants): what this model and these kernels
    # store, beside the paper's count. None where the settings are not modelled.
    predicted["implementation"] = implementation_summary(spec, (measured or {}).get("device"))
    return {
        "harness_version": HARNESS_VERSION,
        "spec_key": spec.key(),
        "status": status,
        "spec": spec.to_dict(),
        "predicted": predicted,
        "measured": measured,
        "environment": environment,
        "error": error,
        "elapsed_s": elapsed_s,
    }


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line, flushed and fsynced: a killed sweep loses nothing written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records of a results file; a torn last line (a kill mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
