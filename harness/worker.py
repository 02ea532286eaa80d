"""Subprocess entry point: measure one spec and write its outcome, whatever happens.

    python -m harness.worker OUTCOME.json < {"spec": {...}, "argv": [...], "max_memory_bytes": N}

The outcome (`harness.records.Outcome`) is written atomically (temporary file, then rename). An exception
becomes an outcome with status `oom` or `error` and the traceback's tail; only a signal (SIGKILL from the
kernel's OOM killer, a timeout) leaves none, and the parent (`harness.runner`) writes that record. Progress
lines go to stderr (`harness.progress`), where the parent shows them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from formulas.spec import RunSpec
from harness import progress
from harness.environment import environment
from harness.measure import measure
from harness.processes import die_with_parent, limit_address_space
from harness.records import Measurement, Outcome, RunError, Status
from harness.trainers import resolve_device

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def classify_exception(exc: BaseException) -> Status:
    """oom for every flavour of allocation failure (CUDA, CPU allocator, Python), else error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS):
        return "oom"
    return "error"


def measure_payload(
    payload: dict, *, before_measure: Callable[[RunSpec], None] | None = None, with_environment: bool = True,
    label: str = "",
) -> tuple[RunSpec, Outcome]:  # fmt: skip
    """Measure `payload`'s spec in this process: (spec, outcome); an exception becomes its status. The
    prediction is left to whoever builds the record (a distributed run's parent, once).

    `before_measure(spec)` runs first (a distributed rank selects its GPU there); `with_environment=False`
    skips the environment (the other ranks of a distributed run: rank 0 records it). `label` prefixes the
    progress lines (`rank 1`).
    """
    spec = RunSpec.from_dict(payload["spec"])
    # Cap host memory where the run lives in it (an address-space cap would break CUDA's mappings).
    if payload.get("max_memory_bytes") and resolve_device(spec.measurement.device) in ("cpu", "meta"):
        limit_address_space(int(payload["max_memory_bytes"]))

    measured = Measurement()
    error = None
    status: Status = "ok"
    t0 = time.perf_counter()
    try:
        if before_measure is not None:
            before_measure(spec)
        measure(spec, measured, progress=progress.emitter(label))
    except Exception as exc:
        status = classify_exception(exc)
        text = str(exc).strip()
        error = RunError(
            type=type(exc).__name__,
            message=text.splitlines()[0][:500] if text else type(exc).__name__,
            traceback_tail=traceback.format_exc()[-4000:],
        )
    elapsed = time.perf_counter() - t0
    env = environment(device=measured.device, argv=payload.get("argv")) if with_environment else None
    return spec, Outcome(status=status, measured=measured, error=error, environment=env, elapsed_s=elapsed)


def write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, allow_nan=False))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    result = Path(argv[1])
    payload = json.loads(sys.stdin.read())
    die_with_parent()
    _, outcome = measure_payload(payload)
    write_atomically(result, outcome.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
