"""The environment of a GPU check, before anything is measured: what ran where, and what the chip can do.

    python3 scripts/device_probe.py --out DIR [--device auto|cuda|cpu] [--gemm N] [--repeats R]

writes DIR/probe.json and DIR/probe.txt (the same, readable): the device (name, capability, memory, SMs), the
driver (NVML, else nvidia-smi), the versions a record carries (`harness.environment`), which
scaled-dot-product-attention backends are enabled (`torch.backends.cuda.*_sdp_enabled()`) and which of them
actually run a small input (`torch.nn.attention.sdpa_kernel` forcing one backend at a time), a dense GEMM
ceiling (N×N matmuls, bf16 on CUDA timed by CUDA events after warm-up, fp32 on the CPU by perf_counter: the
number an MFU is measured against in practice), and the cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG, allocated
and reserved bytes around the first matmul, which is when cuBLAS takes its workspace from the caching
allocator). On a machine without CUDA it still runs, on the CPU, without the CUDA fields (the dry run of
scripts/device-check.sh). A probe that fails is recorded as an error string in the JSON, not a crash.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
ENABLED_FLAGS = {
    "FLASH_ATTENTION": "flash_sdp_enabled",
    "EFFICIENT_ATTENTION": "mem_efficient_sdp_enabled",
    "CUDNN_ATTENTION": "cudnn_sdp_enabled",
    "MATH": "math_sdp_enabled",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@functools.cache
def _environment(device: str):
    """The environment a record carries (`harness.environment`): the one place versions and the GPU are read."""
    from harness.environment import environment

    return environment(device=device)


def versions(device: str) -> dict:
    env = _environment(device)
    keys = ("python", "torch", "cuda", "cudnn", "transformers", "deepspeed", "bitsandbytes", "flash_attn", "git_commit")
    return {key: getattr(env, key) for key in keys}


def driver() -> dict:
    """The driver version by NVML (pynvml), else by nvidia-smi; both missing is recorded, not raised."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return {"version": version.decode() if isinstance(version, bytes) else version, "source": "pynvml"}
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # any NVML failure falls back to nvidia-smi
        nvml_error = _first_line(exc)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"version": None, "source": None, "error": f"pynvml: {nvml_error}; no nvidia-smi"}
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"version": None, "source": None, "error": f"pynvml: {nvml_error}; nvidia-smi: {_first_line(exc)}"}
    if done.returncode != 0:
        return {"version": None, "source": None, "error": f"nvidia-smi exit {done.returncode}: {done.stderr[:200]}"}
    return {"version": done.stdout.strip().splitlines()[0], "source": "nvidia-smi", "nvml_error": nvml_error}


def device_info(device: str) -> dict:
    import torch

    if device != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    env = _environment(device)
    gpu = env.gpu
    return {
        "type": "cuda",
        "name": gpu.name,
        "count": env.gpu_count,
        "capability": gpu.capability,
        "total_memory_bytes": gpu.total_memory_bytes,
        "multiprocessors": gpu.multiprocessors,
    }


def workspace(device: str) -> dict:
    """CUBLAS_WORKSPACE_CONFIG and the allocator around the very first matmul (run before any other GEMM)."""
    import torch

    out = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if device != "cuda":
        return out
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    c = a @ b
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    output = c.numel() * c.element_size()
    out.update(
        allocated_before_bytes=before[0],
        allocated_after_bytes=after[0],
        reserved_before_bytes=before[1],
        reserved_after_bytes=after[1],
        output_bytes=output,
        workspace_bytes=after[0] - before[0] - output,
    )
    return out


def sdpa(device: str) -> dict:
    """Which SDPA backends are enabled, and which run (B, nh, T, hs) = (2, 8, 256, 64) when forced alone."""
    import torch
    import torch.nn.functional as F

    enabled = {name: bool(getattr(torch.backends.cuda, flag)()) for name, flag in ENABLED_FLAGS.items()}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    runs: dict[str, object] = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return {"enabled": enabled, "runs": {}, "error": _first_line(exc), "device": device}
    q, k, v = (torch.randn(2, 8, 256, 64, device=device, dtype=dtype) for _ in range(3))  # (B, nh, T, hs)
    for name in BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            runs[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if device == "cuda":
                torch.cuda.synchronize()
            runs[name] = "ok" if bool(torch.isfinite(out).all()) else "ran, non-finite output"
        except Exception as exc:  # a backend that refuses the input is the answer sought
            runs[name] = _first_line(exc)
    return {"enabled": enabled, "runs": runs, "device": device, "dtype": str(dtype).removeprefix("torch.")}


def gemm(device: str, n: int, repeats: int, warmup: int = 3) -> dict:
    """Dense N×N×N matmul ceiling: 2·N³ FLOPs a matmul, median of `repeats` timed after `warmup`."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    times_ms = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times_ms.append((time.perf_counter() - t0) * 1e3)
    median_ms = statistics.median(times_ms)
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "warmup": warmup,
        "timer": "cuda events" if device == "cuda" else "perf_counter",
        "median_ms": median_ms,
        "min_ms": min(times_ms),
        "tflops_median": flops / (median_ms * 1e-3) / 1e12,
        "tflops_best": flops / (min(times_ms) * 1e-3) / 1e12,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _section(name: str, fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # one failing probe must not hide the others
        return {"error": _first_line(exc), "probe": name}


def probe(device: str = "auto", n: int | None = None, repeats: int = 20) -> dict:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    n = n or (8192 if device == "cuda" else 1024)
    result = {
        "device": _section("device", device_info, device),
        "versions": _section("versions", versions, device),
        "driver": _section("driver", driver) if device == "cuda" else None,
        # First, so that the matmul it times is this process's first cuBLAS call.
        "cublas_workspace": _section("workspace", workspace, device),
        "sdpa": _section("sdpa", sdpa, device),
        "gemm": _section("gemm", gemm, device, n, repeats),
        "host": {"hostname": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    if device == "cuda":
        result["memory_after_probe"] = {
            "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(),
        }
    return result


def text(result: dict) -> str:
    """probe.json as a page: one line per fact."""
    lines = []
    dev = result["device"]
    lines.append(f"device       {dev.get('type')}: {dev.get('name')}  {dev.get('error', '')}".rstrip())
    if dev.get("type") == "cuda":
        lines.append(
            f"             capability {dev['capability']}, {dev['total_memory_bytes'] / 2**30:.1f} GiB, "
            f"{dev['multiprocessors']} SMs, {dev['count']} device(s)"
        )
    if result.get("driver") is not None:
        drv = result["driver"]
        lines.append(f"driver       {drv.get('version')} ({drv.get('source')}) {drv.get('error', '')}".rstrip())
    ver = result["versions"]
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in ver.items() if v is not None))
    attn = result["sdpa"]
    if "enabled" in attn:
        lines.append(
            "sdpa on      " + ", ".join(f"{k.lower()} {'on' if v else 'off'}" for k, v in attn["enabled"].items())
        )
        lines.append(f"sdpa runs    ({attn.get('device')}, {attn.get('dtype')}, (2, 8, 256, 64) causal)")
        for name, verdict in attn["runs"].items():
            lines.append(f"  {name:20} {verdict}")
    else:
        lines.append(f"sdpa         {attn.get('error')}")
    g = result["gemm"]
    if "tflops_median" in g:
        lines.append(
            f"gemm         {g['n']}³ {g['dtype']}: {g['tflops_median']:.4g} TFLOP/s median, {g['tflops_best']:.4g} best "
            f"({g['median_ms']:.3f} ms, {g['repeats']} timed by {g['timer']} after {g['warmup']} warm-up)"
        )
    else:
        lines.append(f"gemm         {g.get('error')}")
    ws = result["cublas_workspace"]
    line = f"cublas       CUBLAS_WORKSPACE_CONFIG={ws.get('CUBLAS_WORKSPACE_CONFIG')}"
    if "workspace_bytes" in ws:
        line += (
            f"; first matmul: allocated {ws['allocated_before_bytes']:,} → {ws['allocated_after_bytes']:,} B, "
            f"reserved {ws['reserved_before_bytes']:,} → {ws['reserved_after_bytes']:,} B "
            f"(workspace {ws['workspace_bytes']:,} B besides the {ws['output_bytes']:,} B output)"
        )
    lines.append(line + (f"  {ws['error']}" if "error" in ws else ""))
    if "memory_after_probe" in result:
        m = result["memory_after_probe"]
        lines.append(f"after probe  allocated {m['allocated_bytes']:,} B, reserved {m['reserved_bytes']:,} B")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="where probe.json and probe.txt go")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--gemm", type=int, metavar="N", help="matmul size (default 8192 on CUDA, 1024 on the CPU)")
    parser.add_argument("--repeats", type=int, default=20, metavar="R", help="timed matmuls (default 20)")
    args = parser.parse_args(argv)
    if (args.gemm is not None and args.gemm < 1) or args.repeats < 1:
        print("device_probe: error: --gemm and --repeats must be positive", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"device_probe: error: --out {out} is not a directory", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = probe(args.device, args.gemm, args.repeats)
    except ValueError as exc:
        print(f"device_probe: error: {exc}", file=sys.stderr)
        return 2
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    page = text(result)
    smi = shutil.which("nvidia-smi")
    if result["device"].get("type") == "cuda" and smi is not None:
        try:
            page += "\n" + subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            page += f"\nnvidia-smi: {_first_line(exc)}\n"
    (out / "probe.txt").write_text(page, encoding="utf-8")
    print(page, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
