"""One subprocess per measurement: a clean allocator and process state, and a crash becomes a record.

The parent never imports the model; it sends the spec to `python -m harness.worker`, waits (with a
timeout), and makes the record from the worker's outcome. When the worker dies without writing one (a
signal, the kernel's OOM killer, a timeout), the parent writes a record with that status and the stderr tail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from formulas.spec import RunSpec
from harness.processes import worker_env
from harness.progress import Callback, StderrReader
from harness.records import Outcome, Record, RunError


def _worker_command(result: Path) -> list[str]:
    return [sys.executable, "-m", "harness.worker", str(result)]


def run_point(
    spec: RunSpec,
    *,
    timeout: float | None = None,
    argv: list[str] | None = None,
    max_memory_bytes: int | None = None,
    progress: Callback | None = None,
) -> Record:
    """Measure `spec` in a fresh Python process and return its record (never raises for a failed run)."""
    payload = {
        "spec": spec.to_dict(),
        "argv": argv if argv is not None else sys.argv,
        "max_memory_bytes": max_memory_bytes,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tmath-") as tmp:
        result = Path(tmp) / "outcome.json"
        proc = subprocess.Popen(
            _worker_command(result),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=worker_env(),
            start_new_session=True,  # its own process group: a timeout kills the whole tree
        )
        reader = StderrReader(proc.stderr, progress)
        timed_out = False
        try:
            try:
                proc.stdin.write(json.dumps(payload).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the worker died at start: its status and stderr tell why
                pass
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt): take the worker's group with us.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        err = reader.text()
        elapsed = time.perf_counter() - t0
        if result.exists() and not timed_out:
            outcome = Outcome.from_dict(json.loads(result.read_text()))
            if outcome.status != "ok" and outcome.error is not None:
                outcome.error.stderr_tail = err
            return Record.make(spec, outcome)
    if timed_out:
        status, message = "timeout", f"killed after the {timeout:g} s time limit"
    elif proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        status = "killed"
        hint = " (the kernel's OOM killer sends SIGKILL)" if proc.returncode == -signal.SIGKILL else ""
        message = f"worker died from {sig}{hint}"
    else:
        status, message = "killed", f"worker exited with status {proc.returncode} without writing a record"
    return Record.failed(spec, status, RunError(type=status, message=message, stderr_tail=err), elapsed_s=elapsed)
