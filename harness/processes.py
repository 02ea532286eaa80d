"""Helpers for the processes a measurement runs in: their environment, limits, and what is kept of their output."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
from collections.abc import Iterator

from harness import REPO_ROOT

STDERR_TAIL_CHARS = 4000
"""How much of a failed run's stderr its record keeps."""


def default_max_memory_bytes() -> int | None:
    """CPU runs are capped at 85% of physical memory, so an impossible point fails as `oom` in its own
    process rather than summoning the kernel's OOM killer onto the machine."""
    try:
        return int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return None


def worker_env() -> dict:
    """A child imports this checkout's packages whatever the caller's working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(text: str | bytes | None, chars: int = STDERR_TAIL_CHARS) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-chars:]


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limit_address_space(limit: int) -> None:
    """Turn host-memory exhaustion into a MemoryError/allocator error instead of the OOM killer."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a killed sweep leaves no orphan holding
    memory (or a GPU) while the resumed sweep starts its next point. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) ends a command the way Ctrl-C does: through KeyboardInterrupt, so that
    the launch in progress kills its worker's or its ranks' process group on the way out."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def single_process_rendezvous() -> None:
    """The environment a launcher sets for a process group (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), set for one process where no launcher did; a launcher's values are kept."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
