"""Which attention kernel a step actually ran, seen from the ops the dispatcher runs.

`F.scaled_dot_product_attention` is a composite: it picks a backend (`torch._fused_sdp_choice`) and calls
that backend's aten op, which a TorchDispatchMode sees by name. The math fallback is a composite too and
decomposes into matmuls and a softmax before dispatch, so it shows as the absence of any fused op:

    _scaled_dot_product_flash_attention            flash (CUDA; FlashAttention-2 in ATen)
    _scaled_dot_product_flash_attention_for_cpu    flash (the CPU's tiled kernel)
    _scaled_dot_product_efficient_attention        memory-efficient (xFormers' kernel)
    _scaled_dot_product_cudnn_attention            cuDNN
    _scaled_dot_product_fused_attention_overrideable  a backend's own (XPU, out-of-tree)

The recorder is entered for the FLOP count step, which measures no memory, so it costs the memory steps
nothing.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

KERNELS: dict[str, str] = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_fused_attention_overrideable": "fused (backend's own)",
}
"""aten op (forward; the backward ops share the prefix) → the kernel's name. Longest prefix first."""


class AttentionKernels(TorchDispatchMode):
    """Records the fused attention ops that run inside the context (`ops`: aten op names)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith("_scaled_dot_product"):
            self.ops.add(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def _kernel(op: str) -> str | None:
    return next((kernel for prefix, kernel in KERNELS.items() if op.startswith(prefix)), None)


def attention_kernel(ops: set[str], requested: str) -> str:
    """What ran, from the ops seen and the attention the spec asked for (`eager` or `flash`)."""
    ran = sorted({k for k in map(_kernel, ops) if k is not None})
    if ran:
        return ", ".join(ran)
    # No fused op: the scores were written out, by the model's own matmuls and softmax (eager) or by SDPA's
    # math composite (its fallback when no fused kernel takes the inputs: on the CPU, any dropout).
    return "eager" if requested == "eager" else "math"
