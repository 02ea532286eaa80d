"""Model-state memory per GPU: weights, gradients and optimizer state under ZeRO and 3D parallelism.

Sources:
- Transformer Math 101, "Sharded Optimizers" and "3D Parallelism": ZeRO-1 divides the optimizer
  state by the data-parallel degree N, ZeRO-2 also the gradients, ZeRO-3 also the weights, plus
  ZeRO-3's live parameters; model memory / (PP × TP), DP degree = GPUs / (PP × TP).
- Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
  (arXiv:1910.02054), Figure 1: P_os, P_os+g, P_os+g+p.

One deliberate departure: Transformer Math 101 writes gradient memory / PP only. A
tensor-parallel rank holds gradients only for its own shard of the weights, so we divide the
gradients by PP × TP like the weights (Shoeybi et al. 2019, Megatron-LM, Section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.precision import gradient_bytes_per_param, optimizer_bytes_per_param, weight_bytes_per_param

ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)


def _ceil_div(x: int, y: int) -> int:
    return -(-x // y)


@dataclass(frozen=True)
class ModelStates:
    """Bytes of weights, gradients and optimizer state on one GPU."""

    weights: int
    gradients: int
    optimizer: int
    zero3_live_params: int = 0
    """Full (gathered) parameters that ZeRO-3 keeps live during a module's forward/backward."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.zero3_live_params


def params_per_model_shard(params: int, tp: int = 1, pp: int = 1) -> int:
    """Parameters held by one (tp, pp) rank: P / (PP × TP) (Transformer Math 101, 3D parallelism)."""
    return _ceil_div(params, tp * pp)


def model_state_bytes(
    params: int,
    *,
    precision: str,
    optimizer: str,
    zero: int = 0,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    largest_module_params: int = 0,
) -> ModelStates:
    """Weights, gradients and optimizer state per GPU.

    ZeRO stage k shards over the data-parallel degree `dp` (Transformer Math 101, ZeRO figure):
        stage >= 1: optimizer / N;  stage >= 2: gradients / N;  stage 3: weights / N
    ZeRO-3 also keeps the parameters of the module in use gathered in full; DeepSpeed's
    estimator sizes that by the largest module, which is what `zero3_live_params` counts
    (`estimate_zero3_model_states_mem_needs`: largest_layer_memory).
    """
    if zero not in ZERO_STAGES:
        raise ValueError(f"zero stage must be one of 0, 1, 2, 3, got {zero!r}")
    shard = params_per_model_shard(params, tp, pp)
    w = weight_bytes_per_param(precision) * shard
    g = gradient_bytes_per_param(precision) * shard
    o = optimizer_bytes_per_param(optimizer, precision) * shard
    live = 0
    if zero >= 1:
        o = _ceil_div(o, dp)
    if zero >= 2:
        g = _ceil_div(g, dp)
    if zero >= 3:
        w = _ceil_div(w, dp)
        if dp > 1:
            live = weight_bytes_per_param(precision) * _ceil_div(largest_module_params, tp)
    return ModelStates(weights=w, gradients=g, optimizer=o, zero3_live_params=live)
