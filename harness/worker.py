"""Subprocess entry point: measure one spec and write its record, whatever happens.

    python -m harness.worker RESULT.json < {"spec": {...}, "argv": [...], "max_memory_bytes": N}

The record is written atomically (temporary file, then rename). An exception becomes a record
with status `oom` or `error` and the traceback's tail; only a signal (SIGKILL from the kernel's
OOM killer, a timeout) leaves no record, and the runner writes that one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path


def _limit_address_space(limit: int) -> None:
    """Turn host-memory exhaustion into a MemoryError/allocator error instead of the OOM killer."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, so a killed sweep leaves no orphan holding
    memory (or a GPU) while the resumed sweep starts its next point. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def measure_payload(payload: dict, *, before_measure=None, with_environment: bool = True) -> tuple:
    """Measure `payload`'s spec in this process: (spec, outcome), where outcome holds the `make_record`
    arguments other than the spec (status, measured, error, environment, elapsed_s); an exception becomes
    its status. The prediction is left to whoever builds the record (a distributed run's parent, once).

    `before_measure(spec)` runs first (a distributed rank selects its GPU there); `with_environment=False`
    skips the environment (the other ranks of a distributed run: rank 0 records it).
    """
    from formulas.spec import RunSpec
    from harness.record import classify_exception

    spec = RunSpec.from_dict(payload["spec"])

    from harness.environment import environment
    from harness.measure import measure, resolve_device

    # Cap host memory where the run lives in it (an address-space cap would break CUDA's mappings).
    if payload.get("max_memory_bytes") and resolve_device(spec.device) in ("cpu", "meta"):
        _limit_address_space(int(payload["max_memory_bytes"]))

    measured: dict = {}
    error = None
    t0 = time.perf_counter()
    try:
        if before_measure is not None:
            before_measure(spec)
        measure(spec, measured)
        status = "ok"
    except Exception as exc:
        status = classify_exception(exc)
        error = {
            "type": type(exc).__name__,
            "message": str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__,
            "traceback_tail": traceback.format_exc()[-4000:],
        }
    elapsed = time.perf_counter() - t0
    env = environment(device=measured.get("device"), argv=payload.get("argv")) if with_environment else None
    return spec, {"status": status, "measured": measured, "error": error, "environment": env, "elapsed_s": elapsed}


def main(argv: list[str]) -> int:
    result = Path(argv[1])
    payload = json.loads(sys.stdin.read())
    _die_with_parent()
    from harness.record import make_record

    spec, outcome = measure_payload(payload)
    record = make_record(spec, **outcome)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, allow_nan=False))
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
