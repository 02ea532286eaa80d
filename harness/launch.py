"""Launch one measurement: the one entry point that `tmath measure` and every sweep point go through.

    record = launch(spec, Limits(timeout_s=600, max_memory_bytes=8 * 2**30))

The spec's trainer (`harness.trainers.select`) decides how it runs: in one worker subprocess
(`harness.runner`) or as one process per rank through a launcher (`harness.distributed`). The limits apply
the same way to both: a time limit for the whole run, and a host address-space cap for CPU and fake-tensor
runs, shared among the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.spec import RunSpec
from harness.distributed import LAUNCHERS, run_distributed
from harness.errors import UsageError
from harness.processes import default_max_memory_bytes
from harness.progress import Callback
from harness.records import Record
from harness.runner import run_point
from harness.trainers import select


@dataclass(frozen=True)
class Limits:
    """What one measurement may use."""

    timeout_s: float | None = None
    """Seconds before the run is killed (status `timeout`); None: no limit."""
    max_memory_bytes: int | None = None
    """Host address-space cap for CPU and meta runs (split among ranks); None: 85% of this machine's RAM."""

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {self.timeout_s:g}")
        if self.max_memory_bytes is not None and not self.max_memory_bytes > 0:
            raise UsageError(f"--max-memory must be positive, got {self.max_memory_bytes}")

    def memory_cap(self) -> int | None:
        return self.max_memory_bytes if self.max_memory_bytes is not None else default_max_memory_bytes()


@dataclass(frozen=True)
class LaunchOptions:
    """How the ranks of a multi-rank run start."""

    launcher: str = "torchrun"
    """torchrun (one node) or deepspeed (with a hostfile, several nodes)."""
    hostfile: str | None = None

    def check(self, spec: RunSpec) -> None:
        """Options that do not apply to `spec` are one-line errors, not silently ignored."""
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        launched = select(spec).launched
        if not launched and (self.launcher != "torchrun" or self.hostfile):
            flag = "--hostfile" if self.hostfile else f"--launcher {self.launcher}"
            raise UsageError(f"{flag} starts the ranks of a --zero/--gpus run; this run is one process")
        if self.hostfile and self.launcher != "deepspeed":
            raise UsageError("--hostfile needs --launcher deepspeed (torchrun is started on each node by hand)")


def launch(
    spec: RunSpec,
    limits: Limits = Limits(),
    options: LaunchOptions = LaunchOptions(),
    *,
    argv: list[str] | None = None,
    progress: Callback | None = None,
) -> Record:
    """Measure `spec` in processes of its own and return the record (a failed run is a record too)."""
    options.check(spec)
    cap = limits.memory_cap()
    if select(spec).launched:
        return run_distributed(
            spec, timeout=limits.timeout_s, argv=argv, max_memory_bytes=cap, launcher=options.launcher,
            hostfile=options.hostfile, progress=progress,
        )  # fmt: skip
    return run_point(spec, timeout=limits.timeout_s, argv=argv, max_memory_bytes=cap, progress=progress)
