"""Bytes per parameter and per activation element for each precision and optimizer.

Source: EleutherAI, *Transformer Math 101* (2023), sections "Model Parameters", "Optimizer States"
and "Gradients". Mixed precision keeps 16-bit weights and gradients and counts the fp32 master
copy inside the optimizer; pure fp32 has no master copy.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "bf16", "fp16-mixed", "bf16-mixed"]
Optimizer = Literal["adamw", "adam8bit", "sgd"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
GradDtype = Literal["auto", "fp32"]
"""Gradient storage: `auto` the parameters' dtype (torch, DeepSpeed), `fp32` fp32 main gradients (Megatron-style)."""
GRAD_DTYPES: tuple[str, ...] = get_args(GradDtype)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

MASTER_COPY_BYTES = 4
"""The fp32 copy of the parameters that mixed precision keeps inside the optimizer."""

_STATE_BYTES = {
    # Optimizer state per parameter excluding any master copy, keyed by the state's storage:
    # "fp32" when the model is fp32 or mixed (states live next to the fp32 master), "16" when
    # states take the dtype of pure fp16/bf16 parameters (torch.optim initialises them with
    # zeros_like(param)). 8-bit Adam keeps 1-byte m and v whatever the parameter dtype.
    ("adamw", "fp32"): 8,  # momentum 4 + variance 4
    ("adamw", "16"): 4,
    ("adam8bit", "fp32"): 2,  # momentum 1 + variance 1
    ("adam8bit", "16"): 2,
    ("sgd", "fp32"): 4,  # momentum 4
    ("sgd", "16"): 2,
}


def _check(precision: str, optimizer: str | None = None) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def is_mixed(precision: str) -> bool:
    _check(precision)
    return precision.endswith("-mixed")


def compute_dtype(precision: str) -> str:
    """The dtype the matrix multiplies run in: `fp32`, `fp16` or `bf16`."""
    _check(precision)
    return precision.removesuffix("-mixed")


def weight_bytes_per_param(precision: str) -> int:
    """fp32: 4 bytes/param; fp16/bf16, pure or mixed: 2 bytes/param (Transformer Math 101)."""
    return 4 if compute_dtype(precision) == "fp32" else 2


def gradient_bytes_per_param(precision: str, grad_dtype: str = "auto") -> int:
    """Gradients take the model's dtype: fp32 4, fp16/bf16 (pure or mixed) 2 (Transformer Math 101); with
    `grad_dtype` fp32 an fp32 main gradient per parameter, 4, whatever the weights (Megatron-LM's
    `--accumulate-allreduce-grads-in-fp32`, the `main_grad` buffers of its DistributedDataParallel)."""
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}")
    return 4 if grad_dtype == "fp32" else weight_bytes_per_param(precision)


def activation_bytes_per_element(precision: str) -> int:
    """Bytes of one stored activation element; Korthikanti et al. assume 16-bit activations (2)."""
    return weight_bytes_per_param(precision)


def optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    """Optimizer state per parameter, with the fp32 master copy in mixed precision.

    Transformer Math 101: AdamW 12 (master 4 + momentum 4 + variance 4), 8-bit Adam 6
    (master 4 + 1 + 1), SGD with momentum 8 (master 4 + momentum 4) in mixed precision;
    without the master copy in pure fp32 (AdamW 8, SGD 4). Pure fp16/bf16 keeps torch's
    states in the parameter dtype (AdamW 4, SGD 2).
    """
    _check(precision, optimizer)
    storage = "16" if precision in ("fp16", "bf16") else "fp32"
    master = MASTER_COPY_BYTES if is_mixed(precision) else 0
    return master + _STATE_BYTES[(optimizer, storage)]
