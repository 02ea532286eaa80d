"""The plain trainer: one process, one training step per precision and optimizer, on CUDA, CPU and fake tensors.

Precision semantics (the ones Transformer Math 101 counts):
- fp32: fp32 weights, gradients and optimizer state (AdamW m, v: 8 B/param), no master copy.
- fp16 / bf16 (pure): 16-bit weights and gradients, optimizer state in the parameter dtype.
- fp16-mixed / bf16-mixed: 16-bit weights and gradients in the model, an fp32 master copy and fp32
  optimizer state owned by the optimizer (12 B/param for AdamW), forward under `torch.autocast` so
  the ops autocast keeps in fp32 (layer norm, softmax, loss) run in fp32; fp16 adds loss scaling
  (GradScaler). This is Megatron-LM's Float16OptimizerWithFloat16Params and DeepSpeed's bf16/fp16
  optimizer layout (Micikevicius et al. 2018, "Mixed Precision Training", Section 3.1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from formulas.precision import compute_dtype, is_mixed
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.memtrack import unique_storage_bytes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def param_dtype(precision: str) -> torch.dtype:
    """dtype of the model's own parameters: fp32, or 16-bit for pure and mixed half precision."""
    return DTYPES[compute_dtype(precision)]


def make_torch_optimizer(name: str, params: list[torch.Tensor], device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), SGD with momentum 0.9, or bitsandbytes' 8-bit AdamW (CUDA only)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device_type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adam8bit":
        if device_type != "cuda":
            raise UsageError("--optimizer adam8bit (bitsandbytes) needs a CUDA device")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--optimizer adam8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    raise UsageError(f"unknown optimizer {name!r}")


class MasterWeightOptimizer:
    """An fp32 master copy of 16-bit parameters, with the optimizer stepping on the copy.

    step(): copy the 16-bit gradients into fp32 master gradients (transient: freed after the step,
    so they show in the step's peak, not in the gradient term), step, copy the masters back.
    A parameter that is fp32 already (peft's LoRA adapters on a 16-bit base) is its own master: no copy.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer_name: str, device_type: str):
        self.params = [p for p in params if p.requires_grad]
        with torch.no_grad():
            self.master = [
                p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in self.params
            ]
        self.optimizer = make_torch_optimizer(optimizer_name, self.master, device_type)

    def _copied(self):
        return [(p, m) for p, m in zip(self.params, self.master, strict=True) if m is not p]

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for p, m in self._copied():
            m.grad = None if p.grad is None else p.grad.float()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            for p, m in self._copied():
                p.copy_(m)
        for _, m in self._copied():
            m.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from (m for p, m in self._copied())
        yield from _optimizer_state_tensors(self.optimizer)


def _optimizer_state_tensors(opt) -> Iterator[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (torch: exp_avg, exp_avg_sq, step,
    momentum_buffer; bitsandbytes: state1, state2 and their quantisation maps)."""
    for state in opt.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class PlainTrainer:
    """Forward, backward and optimizer step of a plain (single-process) training run (`harness.trainers.protocol.Trainer`)."""

    schedules_microbatches = False

    def __init__(self, model: torch.nn.Module, spec: RunSpec, *, device_type: str, probe=None):
        self.model = model
        self._module = model  # what forward calls: the model, or its compiled form after compile()
        precision, optimizer = spec.training.precision, spec.training.optimizer
        self.precision = precision
        self.device_type = device_type
        self.mixed = is_mixed(precision)
        params = list(model.parameters())
        if spec.measurement.mode == "inference":
            # Inference holds weights only: no optimizer state, no master copy, dropout off.
            self.optimizer, self.scaler = None, None
            model.eval()
            return
        if self.mixed:
            self.optimizer = MasterWeightOptimizer(params, optimizer, device_type)
        else:
            self.optimizer = make_torch_optimizer(optimizer, [p for p in params if p.requires_grad], device_type)
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=param_dtype(self.precision))

    def forward(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            return self._module(**batch)

    def compile(self) -> str:
        """torch.compile (inductor) of the model, whose forward ends in its loss, and AdamW switched to its
        fused kernel (CPU and CUDA): what a tuned step runs. The memory steps before it ran eager, with the
        for-loop AdamW on the CPU that `formulas.peak` walks; the optimizer state is the same tensors."""
        done = ["torch.compile (inductor) of the model and its loss"]
        # Dropout's random numbers from ATen's bernoulli_ rather than inductor's per-element generator: on the
        # CPU the latter took 13% of a 4-layer GPT-2 step for the s×s attention masks, bernoulli_ 6%
        # (scripts/bench_cpu_step.py), and the masks are eager's own.
        self._module = torch.compile(self.model, options={"fallback_random": True})
        inner = self.optimizer.optimizer if self.mixed else self.optimizer
        if isinstance(inner, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            done.append("fused AdamW")
        return "; ".join(done)

    @torch.no_grad()
    def infer(self, batch: dict):
        """One inference forward over the prompt: logits (and the KV cache for transformers decoders)."""
        with self.autocast():
            return self.model.prefill(batch["input_ids"])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.mixed:
            self.optimizer.step(self.scaler)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        if self.mixed:
            self.optimizer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, batches: list[dict]) -> None:
        """grad_accum micro-batches, then one optimizer step."""
        for batch in batches:
            loss = self.forward(batch)
            self.backward(loss)
            del loss
        self.step()

    # ---- model-state accounting (unique storages, exact) ----
    def weight_bytes(self) -> int:
        return unique_storage_bytes(self.model.parameters())

    def buffer_bytes(self) -> int:
        return unique_storage_bytes(self.model.buffers())

    def gradient_bytes(self) -> int:
        return unique_storage_bytes(p.grad for p in self.model.parameters())

    def optimizer_tensors(self) -> list[torch.Tensor]:
        """Optimizer state, with the fp32 master copy in mixed precision."""
        if self.optimizer is None:
            return []
        if self.mixed:
            return list(self.optimizer.state_tensors())
        return list(_optimizer_state_tensors(self.optimizer))

    def optimizer_bytes(self) -> int:
        return unique_storage_bytes(self.optimizer_tensors())

    def finish(self, measurement) -> None:
        """Nothing to add: the protocol's own counts are this engine's account."""
