"""Inference memory: weights times an overhead factor, plus the key/value cache.

Source: Transformer Math 101, "Inference": Total Memory_Inference ≈ 1.2 × Model Memory ("in our
experience this overhead is ≤ 20%"). The KV cache, which the blog leaves to other posts, is the
keys and values of every layer for every cached token: 2 · L · b · s · kv_heads · head_dim
elements (Pope et al. 2022, "Efficiently Scaling Transformer Inference", Section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from formulas.architecture import Architecture

INFERENCE_OVERHEAD = 1.2


def kv_cache_bytes(arch: Architecture, batch: int, context: int, bytes_per_element: int) -> int:
    """2 (K and V) · L · b · s · kv_heads · head_dim · bytes per element."""
    return 2 * arch.n_layers * batch * context * arch.kv_width * bytes_per_element


@dataclass(frozen=True)
class InferenceMemory:
    weights: int
    overhead_factor: float
    kv_cache: int
    DERIVED: ClassVar[tuple[str, ...]] = ("total",)
    """Properties written out beside the fields (a record keeps them; its reader checks them)."""

    @property
    def total(self) -> int:
        return round(self.weights * self.overhead_factor) + self.kv_cache


def inference_memory(
    params: int,
    bytes_per_param: int,
    *,
    arch: Architecture | None = None,
    batch: int = 1,
    context: int = 0,
    overhead_factor: float = INFERENCE_OVERHEAD,
) -> InferenceMemory:
    if overhead_factor < 1.0:
        raise ValueError(f"inference overhead factor must be >= 1, got {overhead_factor!r}")
    kv = kv_cache_bytes(arch, batch, context, bytes_per_param) if arch is not None else 0
    return InferenceMemory(weights=params * bytes_per_param, overhead_factor=overhead_factor, kv_cache=kv)
