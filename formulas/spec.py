"""RunSpec: one training configuration, validated, shared by predict, measure and sweeps.

Fields use the CLI flag names (with `_` for `-`), so a sweep axis, a flag and a JSON key are the
same word. Measurement-only fields (impl, device, steps, ...) are carried here too so that a record's
spec is the whole recipe of its run; the formulas ignore them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from formulas.activations import ATTENTIONS, RECOMPUTES
from formulas.architecture import Architecture
from formulas.hardware import get_gpu
from formulas.memory import ZERO_STAGES
from formulas.params import parameter_count
from formulas.precision import OPTIMIZERS, PRECISIONS

IMPLS: tuple[str, ...] = ("reference", "hf")
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu", "meta")
OFFLOADS: tuple[str, ...] = ("none", "cpu")
MODES: tuple[str, ...] = ("train", "inference")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class RunSpec:
    """A model, a training setup and a parallel layout; optionally how to measure it."""

    arch: Architecture | None
    """The architecture; None only when `params` alone is given (model states only)."""
    model: str = "custom"
    """Preset name, config path, or `custom` for an architecture given by flags."""
    params: int | None = None
    """`--params N`: a parameter count without an architecture (model-state terms only)."""
    batch: int = 1
    """b: micro-batch size per GPU (sequences)."""
    seq: int = 2048
    """s: sequence length in tokens."""
    precision: str = "bf16-mixed"
    """fp32 | fp16 | bf16 (pure) | fp16-mixed | bf16-mixed (16-bit weights, fp32 master in the optimizer)."""
    optimizer: str = "adamw"
    """adamw | adam8bit (bitsandbytes) | sgd (with momentum)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (attention core) | full (every block)."""
    attention: str = "eager"
    """eager (explicit softmax; stores s×s scores) | flash (fused kernel; no s×s scores)."""
    zero: int = 0
    """ZeRO stage 0-3 over the data-parallel degree."""
    gpus: int = 1
    """GPUs in the job; data-parallel degree = gpus / (tp × pp)."""
    tp: int = 1
    """Tensor-parallel degree t."""
    pp: int = 1
    """Pipeline-parallel degree."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (splits the replicated activations over t; needs tp > 1)."""
    partition_activations: bool = False
    """ZeRO-R: partition activations over the tensor-parallel ranks."""
    in_flight: int | None = None
    """Micro-batches the first pipeline stage holds at once (default pp, the 1F1B schedule)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each data-parallel rank."""
    tokens: int | None = None
    """Training budget D in tokens (default: Chinchilla's 20·P)."""
    gpu: str = "a100-80gb"
    """Accelerator the prediction is for (see `formulas.hardware.GPUS`)."""
    tflops: float | None = None
    """Achieved TFLOP/s per GPU (default: Transformer Math 101's 120 per A100, scaled to `gpu`)."""
    mode: str = "train"
    """Measurement: `train` (forward, backward, optimizer step) or `inference` (forward only, no grad)."""
    impl: str = "reference"
    """Measurement: `reference` (models/gpt.py, models/bert.py) or `hf` (transformers)."""
    device: str = "auto"
    """Measurement: auto | cuda | cpu | meta (fake tensors: no memory allocated)."""
    steps: int = 3
    """Measurement: timed training steps after warm-up (0: memory and FLOPs only, no timing)."""
    warmup: int = 1
    """Measurement: untimed steps first (allocator, cuBLAS workspace, lazy state)."""
    offload_optimizer: str = "none"
    """DeepSpeed ZeRO optimizer-state offload: none | cpu."""
    offload_params: str = "none"
    """DeepSpeed ZeRO-3 parameter offload: none | cpu."""
    deepspeed_config: str | None = None
    """A user's DeepSpeed JSON merged over the generated one."""
    extra: dict = field(default_factory=dict)
    """Free-form tags carried into records (a sweep's name, a note); not used by any formula."""

    def __post_init__(self) -> None:
        if self.arch is None and self.params is None:
            raise ValueError("give a model (--model, or --layers/--hidden/--heads) or a parameter count (--params)")
        if self.params is not None:
            _positive_int("params", self.params)
        for name in ("batch", "seq", "gpus", "tp", "pp", "grad_accum"):
            _positive_int(name, getattr(self, name))
        for name in ("steps", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("recompute", self.recompute, RECOMPUTES)
        _one_of("attention", self.attention, ATTENTIONS)
        _one_of("zero", self.zero, ZERO_STAGES)
        _one_of("mode", self.mode, MODES)
        _one_of("impl", self.impl, IMPLS)
        _one_of("device", self.device, DEVICES)
        _one_of("offload-optimizer", self.offload_optimizer, OFFLOADS)
        _one_of("offload-params", self.offload_params, OFFLOADS)
        get_gpu(self.gpu)
        if self.gpus % (self.tp * self.pp):
            raise ValueError(
                f"gpus ({self.gpus}) must be a multiple of tp × pp ({self.tp} × {self.pp} = {self.tp * self.pp})"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence parallelism splits activations over tensor-parallel ranks: it needs --tp > 1")
        if self.partition_activations and self.tp == 1:
            raise ValueError(
                "ZeRO-R partition-activations splits activations over tensor-parallel ranks: it needs --tp > 1"
            )
        if self.zero >= 2 and self.pp > 1:
            raise ValueError(
                f"ZeRO stage {self.zero} shards gradients, which pipeline parallelism accumulates: "
                "DeepSpeed forbids ZeRO-2/3 with --pp > 1 (use --zero 0 or 1)"
            )
        if self.in_flight is not None:
            _positive_int("in-flight", self.in_flight)
            if self.pp == 1:
                raise ValueError("in-flight micro-batches apply to pipeline parallelism: it needs --pp > 1")
        if self.offload_params != "none" and self.zero != 3:
            raise ValueError("--offload-params needs ZeRO stage 3 (only stage 3 partitions the parameters)")
        if self.offload_optimizer != "none" and self.zero == 0:
            raise ValueError("--offload-optimizer needs a ZeRO stage of 1, 2 or 3")
        if self.tokens is not None:
            _positive_int("tokens", self.tokens)
        if self.tflops is not None and not self.tflops > 0:
            raise ValueError(f"tflops must be positive, got {self.tflops!r}")
        if self.arch is not None:
            self._check_arch(self.arch)

    def _check_arch(self, arch: Architecture) -> None:
        if arch.n_heads % self.tp:
            raise ValueError(f"tp ({self.tp}) must divide heads ({arch.n_heads}): tensor parallelism splits heads")
        if arch.n_kv_heads % self.tp and arch.n_kv_heads >= self.tp:
            raise ValueError(f"tp ({self.tp}) must divide kv-heads ({arch.n_kv_heads})")
        if self.pp > arch.n_layers:
            raise ValueError(f"pp ({self.pp}) cannot exceed the number of layers ({arch.n_layers})")
        if arch.position == "learned" and self.seq > arch.max_positions:
            raise ValueError(f"seq ({self.seq}) exceeds the {arch.max_positions} learned positions of {self.model}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: GPUs / (PP × TP) (Transformer Math 101, 3D parallelism)."""
        return self.gpus // (self.tp * self.pp)

    @property
    def total_params(self) -> int:
        return self.params if self.params is not None else parameter_count(self.arch).total

    def to_dict(self) -> dict:
        out = asdict(self)
        out["arch"] = self.arch.to_dict() if self.arch is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run setting(s): {', '.join(unknown)}")
        data = dict(data)
        if data.get("arch") is not None:
            data["arch"] = Architecture.from_dict(data["arch"])
        return cls(**data)

    def replace(self, **changes) -> RunSpec:
        return replace(self, **changes)

    def key(self) -> str:
        """Stable hash of everything that defines the run (not `extra`): a sweep's resume key."""
        data = self.to_dict()
        data.pop("extra")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
