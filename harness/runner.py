"""One subprocess per measurement: a clean allocator and process state, and a crash becomes a record.

The parent never imports the model; it sends the spec to `python -m harness.worker`, waits (with a
timeout), and returns the worker's record. When the worker dies without writing one (a signal, the
kernel's OOM killer, a timeout), the parent writes a record with that status and the stderr tail.
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
from harness.environment import REPO_ROOT
from harness.record import make_record

STDERR_TAIL_CHARS = 4000


def default_max_memory_bytes() -> int | None:
    """CPU runs are capped at 85% of physical memory, so an impossible point fails as `oom` in its own
    process rather than summoning the kernel's OOM killer onto the machine."""
    try:
        return int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return None


def worker_env() -> dict:
    """The worker imports this checkout's packages whatever the caller's working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _worker_command(result: Path) -> list[str]:
    return [sys.executable, "-m", "harness.worker", str(result)]


def _tail(text: str | bytes | None) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-STDERR_TAIL_CHARS:]


def run_point(
    spec: RunSpec,
    *,
    timeout: float | None = None,
    argv: list[str] | None = None,
    max_memory_bytes: int | None = None,
) -> dict:
    """Measure `spec` in a fresh Python process and return its record (never raises for a failed run)."""
    payload = {
        "spec": spec.to_dict(),
        "argv": argv if argv is not None else sys.argv,
        "max_memory_bytes": max_memory_bytes,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tmath-") as tmp:
        result = Path(tmp) / "record.json"
        proc = subprocess.Popen(
            _worker_command(result),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
            start_new_session=True,  # its own process group: a timeout kills the whole tree
        )
        timed_out = False
        try:
            _, err = proc.communicate(json.dumps(payload).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt): take the worker's group with us.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        elapsed = time.perf_counter() - t0
        if result.exists() and not timed_out:
            record = json.loads(result.read_text())
            if record["status"] != "ok":
                record["error"] = {**(record.get("error") or {}), "stderr_tail": _tail(err)}
            return record
    if timed_out:
        status, message = "timeout", f"killed after the {timeout:g} s time limit"
    elif proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        status = "killed"
        hint = " (the kernel's OOM killer sends SIGKILL)" if proc.returncode == -signal.SIGKILL else ""
        message = f"worker died from {sig}{hint}"
    else:
        status, message = "killed", f"worker exited with status {proc.returncode} without writing a record"
    return make_record(
        spec,
        measured={},
        status=status,
        error={"type": status, "message": message, "stderr_tail": _tail(err)},
        elapsed_s=elapsed,
    )
