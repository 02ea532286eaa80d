"""Accelerators: dense peak TFLOP/s per dtype and memory, each from its datasheet.

All peaks are dense (the datasheets' "with sparsity" figures halved where they quote only those).
`fp32` is the non-tensor-core rate that an fp32 matmul gets with TF32 disabled (PyTorch's default
for matmuls since 1.12); AMD's is the matrix-core rate. Memory is the datasheet's capacity in GiB
(2**30 bytes), the convention nvidia-smi's totals follow; a measured run records the device's own
total from NVML instead. Memory bandwidth is the datasheet's, in GB/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from formulas.precision import compute_dtype
from formulas.units import GIB

A100_REFERENCE_TFLOPS = 312.0
"""A100 dense bf16 peak: the denominator that scales the 115 TFLOP/s-per-A100 bar to other GPUs."""

TFLOPS_BAR_A100 = 115.0
"""Transformer Math 101: "If you are seeing below 115 TFLOP/s/A100 there is probably something
wrong with your model or hardware configuration"."""

RULE_OF_THUMB_A100 = 120.0
"""Transformer Math 101: "you should always be able to achieve approximately 120 TFLOP/s/A100"."""


@dataclass(frozen=True)
class GPU:
    """One accelerator model."""

    name: str
    """Key used by `--gpu` (lower case, no spaces)."""
    label: str
    """Marketing name."""
    memory_gib: float
    """Datasheet memory capacity in GiB."""
    peak_tflops: dict
    """Dense peak TFLOP/s by dtype: fp32, tf32, fp16, bf16, fp8, int8 (absent: unsupported)."""
    source: str
    """Datasheet the numbers come from."""
    pattern: str
    """Regular expression matched (case-insensitively) against the CUDA/NVML device name."""
    memory_gbps: float
    """Datasheet memory (HBM/GDDR) bandwidth in GB/s (10**9 bytes per second): the planner's rate for the
    memory-bound traffic it models (`formulas.plan.eager_attention_bytes`)."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak(self, dtype: str) -> float | None:
        """Dense peak TFLOP/s for `fp32`, `fp16` or `bf16` (None where the GPU has no such unit)."""
        return self.peak_tflops.get(dtype)

    @property
    def half_precision_peak(self) -> float:
        """bf16 peak, or fp16 where the GPU has no bf16 (V100)."""
        return self.peak_tflops.get("bf16") or self.peak_tflops["fp16"]


_NV_DC = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_A100_PEAKS = {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "int8": 624.0}
_HOPPER_SXM = {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9}

GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("a100-40gb", "NVIDIA A100 40GB", 40, _A100_PEAKS, _A100, r"a100.*40\s*gb", 1555.0),
        GPU("a100-80gb", "NVIDIA A100 80GB", 80, _A100_PEAKS, _A100, r"a100", 2039.0),
        GPU(
            "h100-pcie",
            "NVIDIA H100 PCIe",
            80,
            {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0, "fp8": 1513.0, "int8": 1513.0},
            _NV_DC,
            r"h100.*pcie",
            2000.0,
        ),
        GPU("h100-sxm", "NVIDIA H100 SXM", 80, _HOPPER_SXM, _NV_DC, r"h100", 3350.0),
        GPU(
            "h200",
            "NVIDIA H200 SXM",
            141,
            _HOPPER_SXM,
            "https://www.nvidia.com/en-us/data-center/h200/",
            r"h200",
            4800.0,
        ),
        GPU(
            "v100",
            "NVIDIA V100 SXM2 32GB",
            32,
            {"fp32": 15.7, "fp16": 125.0},
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf",
            r"v100",
            900.0,
        ),
        GPU(
            "a10g",
            "NVIDIA A10G (AWS)",
            24,
            {"fp32": 31.2, "tf32": 35.0, "fp16": 70.0, "bf16": 70.0, "int8": 140.0},
            "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/",
            r"a10g",
            600.0,
        ),
        GPU(
            "l40s",
            "NVIDIA L40S",
            48,
            {"fp32": 91.6, "tf32": 183.0, "fp16": 362.05, "bf16": 362.05, "fp8": 733.0, "int8": 733.0},
            "https://www.nvidia.com/en-us/data-center/l40s/",
            r"l40s",
            864.0,
        ),
        GPU(
            "l4",
            "NVIDIA L4",
            24,
            {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5, "int8": 242.5},
            "https://www.nvidia.com/en-us/data-center/l4/",
            r"\bl4\b",
            300.0,
        ),
        GPU(
            "rtx-4090",
            "NVIDIA GeForce RTX 4090",
            24,
            # fp16/bf16 with fp32 accumulate, the mode PyTorch uses (Ada whitepaper, Appendix A).
            {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3, "int8": 660.6},
            "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
            r"4090",
            1008.0,
        ),
        GPU(
            "mi250x",
            "AMD Instinct MI250X",
            128,
            {"fp32": 95.7, "fp16": 383.0, "bf16": 383.0, "int8": 383.0},
            "https://www.amd.com/en/products/accelerators/instinct/mi200/mi250x.html",
            r"mi250x",
            3276.8,
        ),
        GPU(
            "mi300x",
            "AMD Instinct MI300X",
            192,
            {"fp32": 163.4, "tf32": 653.7, "fp16": 1307.4, "bf16": 1307.4, "fp8": 2614.9, "int8": 2614.9},
            "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
            r"mi300x",
            5300.0,
        ),
    )
}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by its `--gpu` key."""
    key = name.lower().strip()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def match_device_name(device_name: str) -> GPU | None:
    """The table entry for a CUDA/NVML device name such as 'NVIDIA H100 80GB HBM3', or None.

    Entries are tried in table order, so the more specific patterns (A100 40GB, H100 PCIe) win.
    """
    for gpu in GPUS.values():
        if re.search(gpu.pattern, device_name, flags=re.IGNORECASE):
            return gpu
    return None


def tflops_bar(gpu: GPU, bar_a100: float = TFLOPS_BAR_A100) -> float:
    """The per-A100 TFLOP/s bar expressed for `gpu` by the ratio of dense half-precision peaks."""
    return bar_a100 * gpu.half_precision_peak / A100_REFERENCE_TFLOPS


def default_tflops(gpu: GPU, precision: str) -> tuple[float, str]:
    """Achieved TFLOP/s when none is given: Transformer Math 101's ~120 TFLOP/s per A100.

    Expressed as its fraction of the A100's dense bf16 peak (120/312 = 38.5%) and applied to
    `gpu`'s peak for the run's dtype.
    """
    dtype = compute_dtype(precision)
    peak = gpu.peak(dtype)
    if peak is None:
        raise ValueError(f"{gpu.label} has no {dtype} units: choose another --precision or --gpu")
    fraction = RULE_OF_THUMB_A100 / A100_REFERENCE_TFLOPS
    source = (
        f"Transformer Math 101 rule of thumb: {RULE_OF_THUMB_A100:g} TFLOP/s per A100 = {fraction:.1%} "
        f"of peak, applied to the {gpu.label} {dtype} peak of {peak:g}"
    )
    return fraction * peak, source


CUDA_CONTEXT_BYTES = 287_047_680
"""A CUDA context with lazy module loading, PyTorch's default since 1.13: 287,047,680 bytes of device memory
(666,632,192 with eager loading), measured in pytorch/pytorch#86509. Outside PyTorch's caching allocator."""

CUBLAS_WORKSPACE_BYTES = 8_519_680
"""cuBLAS's workspace at PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" (2 × 4 MiB + 8 × 16 KiB,
aten/src/ATen/cuda/CublasHandlePool.cpp), per handle and stream."""

_HOPPER = ("h100-pcie", "h100-sxm", "h200")
_AMPERE_ADA_24GB = ("a100-40gb", "a100-80gb", "a10g", "l40s", "l4", "rtx-4090")


def cublaslt_workspace_bytes(gpu: GPU) -> int:
    """cuBLASLt's workspace as PyTorch sizes it (aten/src/ATen/cuda/CUDABlas.cpp, pytorch/pytorch#120925,
    after NVIDIA's cuBLAS guide): 32 MiB on Hopper, 4 MiB on Ampere and Ada with ≥ 24 GB, 1 MiB otherwise."""
    if gpu.name in _HOPPER:
        return 32 * 2**20
    return 4 * 2**20 if gpu.name in _AMPERE_ADA_24GB else 2**20


def fixed_overheads(gpu: GPU) -> dict[str, int]:
    """Device memory a training process holds whatever the model: published defaults, until a calibration
    (`tmath calibrate` on CUDA runs) replaces them. The allocator's fragmentation is not among them: it is
    fitted (reserved / allocated), not assumed."""
    return {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "cublas_workspace": CUBLAS_WORKSPACE_BYTES,
        "cublaslt_workspace": cublaslt_workspace_bytes(gpu),
    }
