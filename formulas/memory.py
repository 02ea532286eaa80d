"""Model-state memory per GPU: weights, gradients and optimizer state under ZeRO and 3D parallelism.

Sources:
- Transformer Math 101, "Sharded Optimizers" and "3D Parallelism": ZeRO-1 divides the optimizer
  state by the data-parallel degree N, ZeRO-2 also the gradients, ZeRO-3 also the weights, plus
  ZeRO-3's live parameters; model memory / (PP × TP), DP degree = GPUs / (PP × TP).
- Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
  (arXiv:1910.02054), Figure 1: P_os, P_os+g, P_os+g+p.

Offload (DeepSpeed): ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
Training", arXiv:2101.06840, §4.1) keeps the optimizer state (fp32 master, m, v) and an fp32 gradient
partition on the host, 16-bit weights on the GPU; ZeRO-Infinity (Rajbhandari et al. 2021,
arXiv:2104.07857) moves the ZeRO-3 weight partition to the host as well. Which 16-bit gradients stay
on the GPU after a step is DeepSpeed's choice, measured with DeepSpeed 0.19 (results/zero-cpu): none at
stages 1-2 (each reduced partition is copied to the host buffer), the 16-bit partition at stage 3.

One deliberate departure: Transformer Math 101 writes gradient memory / PP only. A
tensor-parallel rank holds gradients only for its own shard of the weights, so we divide the
gradients by PP × TP like the weights (Shoeybi et al. 2019, Megatron-LM, Section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

from formulas.precision import gradient_bytes_per_param, optimizer_bytes_per_param, weight_bytes_per_param
from formulas.units import ceil_div

ZeroStage = Literal[0, 1, 2, 3]
ZERO_STAGES: tuple[int, ...] = get_args(ZeroStage)

FP32_GRADIENT_BYTES = 4
"""ZeRO-Offload's host gradient partition is fp32, whatever the training precision."""


@dataclass(frozen=True)
class ModelStates:
    """Bytes of weights, gradients and optimizer state on one GPU."""

    weights: int
    gradients: int
    optimizer: int
    zero3_live_params: int = 0
    """Full (gathered) parameters that ZeRO-3 keeps live during a module's forward/backward."""
    host_weights: int = 0
    """Offloaded to host memory (DeepSpeed offload): the ZeRO-3 weight partition."""
    host_gradients: int = 0
    """Offloaded: the fp32 gradient partition the host optimizer steps with."""
    host_optimizer: int = 0
    """Offloaded: the optimizer state (fp32 master copy included)."""

    @property
    def total(self) -> int:
        """Bytes on the GPU."""
        return self.weights + self.gradients + self.optimizer + self.zero3_live_params

    @property
    def host_total(self) -> int:
        """Bytes this rank keeps in host memory (0 without offload)."""
        return self.host_weights + self.host_gradients + self.host_optimizer


def params_per_model_shard(params: int, tp: int = 1, pp: int = 1) -> int:
    """Parameters held by one (tp, pp) rank: P / (PP × TP) (Transformer Math 101, 3D parallelism)."""
    return ceil_div(params, tp * pp)


def add_states(a: ModelStates, b: ModelStates) -> ModelStates:
    """Field by field: the states of two groups of parameters held on one GPU."""
    return ModelStates(*(getattr(a, f.name) + getattr(b, f.name) for f in fields(ModelStates)))


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
    offload_optimizer: bool = False,
    offload_params: bool = False,
    grad_dtype: str = "auto",
    shard_params: int | None = None,
) -> ModelStates:
    """Weights, gradients and optimizer state per GPU.

    ZeRO stage k shards over the data-parallel degree `dp` (Transformer Math 101, ZeRO figure):
        stage >= 1: optimizer / N;  stage >= 2: gradients / N;  stage 3: weights / N
    ZeRO-3 also keeps the parameters of the module in use gathered in full; DeepSpeed's
    estimator sizes that by the largest module, which is what `zero3_live_params` counts
    (`estimate_zero3_model_states_mem_needs`: largest_layer_memory).

    `shard_params` replaces P / (TP × PP) with the parameters of the rank that holds the most (the heaviest
    pipeline stage, `formulas.params.pipeline_stage_params`); `grad_dtype` fp32 keeps fp32 main gradients.

    `offload_optimizer` (ZeRO >= 1) moves the optimizer state to the host with an fp32 gradient partition
    (4 B/param / N); the GPU keeps no gradients after the step at stages 1-2, its 16-bit partition at
    stage 3. `offload_params` (ZeRO-3) moves the 16-bit weight partition to the host.
    """
    if zero not in ZERO_STAGES:
        raise ValueError(f"zero stage must be one of 0, 1, 2, 3, got {zero!r}")
    shard = params_per_model_shard(params, tp, pp) if shard_params is None else shard_params
    w = weight_bytes_per_param(precision) * shard
    g = gradient_bytes_per_param(precision, grad_dtype) * shard
    o = optimizer_bytes_per_param(optimizer, precision) * shard
    live = 0
    if zero >= 1:
        o = ceil_div(o, dp)
    if zero >= 2:
        g = ceil_div(g, dp)
    if zero >= 3:
        w = ceil_div(w, dp)
        if dp > 1:
            live = weight_bytes_per_param(precision) * ceil_div(largest_module_params, tp)
    host_w = host_g = host_o = 0
    if offload_optimizer:
        if zero < 1:
            raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
        host_o, o = o, 0
        host_g = ceil_div(FP32_GRADIENT_BYTES * shard, dp)
        if zero < 3:
            g = 0
    if offload_params:
        if zero != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")
        host_w, w = w, 0
    return ModelStates(
        weights=w,
        gradients=g,
        optimizer=o,
        zero3_live_params=live,
        host_weights=host_w,
        host_gradients=host_g,
        host_optimizer=host_o,
    )
