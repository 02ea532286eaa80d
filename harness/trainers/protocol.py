"""What `harness.measure` needs of an engine (`harness.trainers` lists the engines)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from harness.records import Measurement


class Trainer(Protocol):
    """What `harness.measure` needs of an engine: the steps of training, and the bytes it holds by term.

    Constructed as `cls(model, spec, device_type=..., probe=...)`, where `probe` is the measurement's memory
    probe (its `tracker` labels live storages by phase). Byte methods count unique storages exactly, on the
    accelerator (what decides an OOM); host bytes of offloaded state belong in the engine's report.
    """

    model: torch.nn.Module
    schedules_microbatches: bool
    """True when the engine runs the micro-batches' forwards and backwards itself, interleaved
    (`forward_backward`; a pipeline schedule): `measure` then calls that instead of `forward` and `backward`,
    and the engine counts the activations it saves and sets them in `finish`."""

    def forward(self, batch: dict) -> torch.Tensor:
        """One micro-batch's forward; returns the loss."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """The optimizer step (gradients are cleared after it)."""

    def forward_backward(self, batches: list[dict]) -> None:
        """Every micro-batch's forward and backward, no optimizer step (engines that schedule micro-batches);
        the engine sets the live tracker's category to `activations` or `backward` as its stages run."""

    def train_step(self, batches: list[dict]) -> None:
        """grad_accum micro-batches, then one optimizer step."""

    def infer(self, batch: dict) -> Any:
        """One forward without gradients (inference mode)."""

    def compile(self) -> str:
        """Switch the steps to their fastest form for timing (`--compile`), after the memory steps; returns
        what was done, for the record's `step_mode`."""

    def weight_bytes(self) -> int: ...

    def buffer_bytes(self) -> int: ...

    def gradient_bytes(self) -> int: ...

    def optimizer_tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor of optimizer state, an fp32 master copy included."""

    def optimizer_bytes(self) -> int: ...

    def finish(self, measurement: Measurement) -> None:
        """After the instrumented steps: set the engine's own view of the terms and its per-rank report
        (`measurement.engine`); the plain trainer has nothing to add."""
