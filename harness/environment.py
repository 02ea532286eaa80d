"""The environment a measurement ran in: recorded with every result, never inferred later.

NVML (nvidia-ml-py) answers only where a driver is loaded; on a machine without one
`nvmlInit()` raises NVMLError_LibraryNotFound, which we catch and record as absent.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from harness import REPO_ROOT
from harness.records import HARNESS_VERSION, Environment
from harness.schema import from_json


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def git_commit() -> str | None:
    """HEAD of the checkout the harness runs from, with `-dirty` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def nvml_snapshot(index: int = 0) -> dict | None:
    """NVML's view of GPU `index`: name, driver, memory, clocks, power, temperature; None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "memory_total_bytes": int(mem.total),
            "memory_used_bytes": int(mem.used),
        }
        for key, query in (
            ("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
            ("max_sm_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
            ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
            ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
            ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        ):
            try:
                out[key] = query()
            except pynvml.NVMLError:
                out[key] = None
        return out
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def environment(device: str | None = None, argv: list[str] | None = None) -> Environment:
    """Everything needed to reproduce or compare a record."""
    env = {
        "harness_version": HARNESS_VERSION,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
        "bitsandbytes": _version("bitsandbytes"),
        "flash_attn": _version("flash-attn"),
        "git_commit": git_commit(),
        "command": argv if argv is not None else sys.argv,
        "device": device,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "multiprocessors": props.multi_processor_count,
            "nvml": nvml_snapshot(0),
        }
    return from_json(Environment, env, "environment")
