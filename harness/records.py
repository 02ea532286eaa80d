"""Typed results: a Record is spec + predictions + measurement + environment + status; one JSON line per run.

    Record
    ├── spec          RunSpec (flat in JSON, as flags and sweep files write it)
    ├── predicted     method name → that method's prediction (`harness.predictions.METHODS`)
    ├── measured      Measurement: memory_bytes (MemoryBytes), step_ms, tflops, flops_counted, peak_breakdown,
    │                 activations by layer and dtype, the engine's report, and one RankResult per rank
    ├── environment   Environment: versions, machine, GPU, git commit, command line
    └── status, error, elapsed_s, harness_version, spec_key, schema_version

Records are the only form results take: tables, plots, calibration and checks read these types, never a
string path into JSON. `Record.from_dict` reads every schema version written so far (`SCHEMA_VERSION`;
records without one are schema 1 and are upgraded on reading), and a value that does not fit is a
`SchemaError` naming the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

from formulas.spec import MeasuredDevice, Mode, RunSpec
from harness.predictions import (
    BY_NAME,
    Method,
    Terms,
    predict_all,
    predictions_from_json,
    predictions_to_json,
    terms_of,
)
from harness.schema import SchemaError, from_json, to_json
from harness.trainers import EngineReport

HARNESS_VERSION = "3"
"""The measurement method's version: bumped whenever what is counted, how, or when changes.
1: the first records. 2: FLOPs counted on a step of their own (the counter's bookkeeping inflated the peaks
of the steady step it ran in, by 26% under full recompute); the steady step's peak phase and timeline.
3: CUDA timed steps without a host sync between them (events read after the last step); the attention
kernel that ran; `--compile`. On the CPU and fake tensors 3 measures what 2 did, the same way: records of 2
from those devices stand (no CUDA record had been made)."""

SCHEMA_VERSION = 2
"""1: the first records (no `schema_version` key). 2: predictions keyed by method name, FLOP formulas moved
from `measured.flops` to the prediction, ranks nested (`measured.ranks[i].measured`), the engine's report as
`measured.engine` with its `kind`, `spec.nodes`."""

Status = Literal["ok", "oom", "error", "timeout", "killed"]
STATUSES: tuple[str, ...] = get_args(Status)
"""ok: measured. oom: ran out of device or host memory. error: raised. timeout: killed at the
time limit. killed: the process died without a record (a signal, e.g. the kernel's OOM killer)."""


@dataclass
class MemoryBytes:
    """Measured bytes by term, per GPU (a rank's own, or the maximum over ranks); None: not measured here."""

    weights: int | None = None
    gradients: int | None = None
    optimizer: int | None = None
    activations: int | None = None
    """Unique storages saved for backward during the first forward."""
    activations_layers: int | None = None
    """The part saved inside the transformer blocks."""
    activations_other: int | None = None
    """Embedding, output layer and loss."""
    activations_in_flight: int | None = None
    """Pipeline runs: the most bytes saved for backward alive at once on the rank during a step (every
    micro-batch in flight on its stages, embedding and loss included)."""
    peak_allocated: int | None = None
    """Peak of the steady step (the second), or of the inference forward."""
    peak_backend_freed: int | None = None
    """CPU and fake tensors: of the steady peak, the bytes a thread other than the step's freed after it, by the
    step's end (multi-rank runs: 50 ms after it, `harness.measure.BACKEND_SETTLE_S`) (a process group's worker thread letting go of a collective's buffers after the step had
    dropped them: gloo). The step's program, each buffer freed when it was dropped, peaks between
    `peak_allocated - peak_backend_freed` and `peak_allocated` (`harness.memtrack.LiveTensorTracker`)."""
    peak_allocated_first_step: int | None = None
    peak_allocated_compiled: int | None = None
    """CUDA, `--compile`: the allocator's peak over the compiled timed steps (inductor's graphs save other
    tensors than the eager steps measured). `peak_reserved` and `peak_active` are then the compiled steps'."""
    graph_retained: int | None = None
    """Live bytes after the first forward less before it."""
    after_model: int | None = None
    buffers: int | None = None
    inputs: int | None = None
    kv_cache: int | None = None
    """Inference: the key/value cache the forward returned."""
    output: int | None = None
    """Inference: live bytes after the forward less after the model."""
    pre_model_allocated: int | None = None
    """CUDA: allocated before the model (cuBLAS workspace), reported, never subtracted."""
    pre_model_reserved: int | None = None
    nvml_used_before_model: int | None = None
    peak_reserved: int | None = None
    peak_active: int | None = None
    nvml_used: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    zero3_live_params: int | None = None
    """ZeRO-3: the most bytes of gathered, non-persistent parameters at any module's forward."""
    zero_extras: int | None = None
    """ZeRO: what the engine holds that no formula term names (buckets, scalars)."""
    host_model_states: int | None = None
    """ZeRO offload: model-state bytes in host memory."""

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def maxima(self, other: MemoryBytes) -> MemoryBytes:
        """Term by term, the larger of two ranks' bytes (pre_model_reserved: this rank's)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = a if b is None or f.name == "pre_model_reserved" else b if a is None else max(a, b)
        return MemoryBytes(**out)


@dataclass
class StepTimes:
    """Milliseconds per timed step (CUDA events on a GPU, perf_counter on the CPU)."""

    median: float
    min: float
    max: float
    all: list[float]


@dataclass
class Timeline:
    """Live bytes over one step, after each op, downsampled to at most `POINTS` (each the largest of its
    stretch of ops, with the phase it was in): the picture of where a step's memory goes."""

    live_bytes: list[int]
    phase: list[str]

    POINTS: ClassVar[int] = 400

    @classmethod
    def downsample(cls, samples: list[tuple[str, int]] | None) -> Timeline | None:
        if not samples:
            return None
        size = -(-len(samples) // cls.POINTS)
        kept = [max(samples[i : i + size], key=lambda s: s[1]) for i in range(0, len(samples), size)]
        return cls(live_bytes=[b for _, b in kept], phase=[p for p, _ in kept])


@dataclass
class Throughput:
    """TFLOP/s from the median step: model (6P + attention), hardware (+ recompute), counted (FlopCounterMode)."""

    model: float
    hardware: float
    counted: float


@dataclass
class Measurement:
    """What one process (or, gathered, one multi-rank run) measured, filled phase by phase by `measure`."""

    device: MeasuredDevice | None = None
    mode: Mode | None = None
    trainer: str | None = None
    """Which engine ran (`harness.trainers`): plain, deepspeed."""
    methods: dict[str, Any] = field(default_factory=dict)
    """How each number was measured: term → text, or device → text."""
    memory_bytes: MemoryBytes = field(default_factory=MemoryBytes)
    step_ms: StepTimes | None = None
    tflops: Throughput | None = None
    mfu: float | None = None
    hfu: float | None = None
    peak_tflops: float | None = None
    gpu: str | None = None
    """The accelerator's `formulas.hardware` name, matched from the CUDA device name."""
    tokens_per_second: float | None = None
    flops_counted: int | None = None
    """FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode."""
    attention_kernel: str | None = None
    """The attention kernel that ran (`harness.kernels`): flash, memory-efficient, cuDNN, math, eager."""
    step_mode: str | None = None
    """How the timed steps ran: `eager`, or what `--compile` did (torch.compile, fused AdamW)."""
    compile_seconds: float | None = None
    """`--compile`: seconds of the first compiled step (compilation included), untimed."""
    activations_by_layer: list[int] = field(default_factory=list)
    activations_by_dtype: dict[str, int] = field(default_factory=dict)
    saved_parameter_bytes: int | None = None
    peak_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per peak (first_step, steady, inference): the live bytes at it by the phase that allocated them."""
    peak_phase: dict[str, str] = field(default_factory=dict)
    """Per peak: the phase it happened in (activations: the forward, backward, optimizer step)."""
    timeline: Timeline | None = None
    """The steady step's live bytes, op by op (downsampled)."""
    inference_overhead: float | None = None
    """Inference: peak / (weights + buffers), against Transformer Math 101's 1.2."""
    engine: EngineReport | None = None
    ranks: list[RankResult] = field(default_factory=list)
    world_size: int | None = None
    launcher: str | None = None
    trainable_params: int | None = None
    """`--finetune lora`: Σ numel of the parameters that require a gradient (the adapters)."""


@dataclass
class RankResult:
    """One rank of a multi-rank run: its status and its own measurement."""

    rank: int
    status: Status
    elapsed_s: float | None = None
    measured: Measurement | None = None


@dataclass
class RunError:
    type: str
    message: str
    stderr_tail: str | None = None
    traceback_tail: str | None = None
    ranks: list[str] = field(default_factory=list)
    """Multi-rank runs: each failed rank's message."""


@dataclass
class GpuInfo:
    name: str | None = None
    capability: str | None = None
    total_memory_bytes: int | None = None
    multiprocessors: int | None = None
    nvml: dict | None = None
    """NVML's view: name, driver, memory, clocks, power, temperature."""


@dataclass
class Environment:
    """Everything needed to reproduce or compare a record (`harness.environment.environment`)."""

    harness_version: str | None = None
    timestamp_utc: str | None = None
    hostname: str | None = None
    python: str | None = None
    platform: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    memory_bytes: int | None = None
    torch: str | None = None
    cuda: str | None = None
    cudnn: int | None = None
    transformers: str | None = None
    deepspeed: str | None = None
    bitsandbytes: str | None = None
    flash_attn: str | None = None
    git_commit: str | None = None
    command: list[str] = field(default_factory=list)
    device: str | None = None
    gpu_count: int | None = None
    gpu: GpuInfo | None = None


@dataclass
class Outcome:
    """What a measuring process reports: a Record without the predictions (the parent adds those, once)."""

    status: Status
    measured: Measurement = field(default_factory=Measurement)
    error: RunError | None = None
    environment: Environment | None = None
    elapsed_s: float | None = None

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "outcome") -> Outcome:
        return from_json(cls, data, where)


@dataclass
class Record:
    spec: RunSpec
    status: Status
    predicted: dict[str, Any]
    """Method name → that method's prediction, or None where it does not apply (`harness.predictions`)."""
    measured: Measurement
    harness_version: str
    spec_key: str
    environment: Environment | None = None
    error: RunError | None = None
    elapsed_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def prediction(self, method: str):
        return self.predicted.get(method)

    @property
    def device(self) -> str:
        """Where it was measured, else the spec's device setting."""
        return self.measured.device or self.spec.measurement.device

    def terms(self, method: Method | str) -> Terms:
        """A method's comparable terms for this run (`harness.predictions.TERMS`)."""
        method = BY_NAME[method] if isinstance(method, str) else method
        return terms_of(method, self.predicted.get(method.name), self.spec, self.device)

    @classmethod
    def make(cls, spec: RunSpec, outcome: Outcome) -> Record:
        """The record of a run: its outcome beside every method's prediction for the device it ran on."""
        return cls(
            spec=spec,
            status=outcome.status,
            predicted=predict_all(spec, outcome.measured.device),
            measured=outcome.measured,
            harness_version=HARNESS_VERSION,
            spec_key=spec.key(),
            environment=outcome.environment,
            error=outcome.error,
            elapsed_s=outcome.elapsed_s,
        )

    @classmethod
    def failed(cls, spec: RunSpec, status: Status, error: RunError, elapsed_s: float | None = None) -> Record:
        """The record of a run that left no measurement (a timeout, a killed process, a harness failure)."""
        return cls.make(spec, Outcome(status=status, error=error, elapsed_s=elapsed_s))

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "harness_version": self.harness_version,
            "spec_key": self.spec_key,
            "status": self.status,
            "spec": self.spec.to_dict(),
            "predicted": predictions_to_json(self.predicted),
            "measured": to_json(self.measured),
            "environment": to_json(self.environment),
            "error": to_json(self.error),
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """A record of any schema version; SchemaError naming the first field that does not fit."""
        if not isinstance(data, dict):
            raise SchemaError(f"record: expected an object, got {type(data).__name__}")
        version = data.get("schema_version", 1)
        if version == 1:
            data = upgrade_v1(data)
        elif version != SCHEMA_VERSION:
            raise SchemaError(f"schema_version: {version!r} is not one this harness reads (1 to {SCHEMA_VERSION})")
        known = {"schema_version", "harness_version", "spec_key", "status", "spec", "predicted", "measured",
                 "environment", "error", "elapsed_s"}  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"{unknown[0]}: not a field of a record")
        for key in ("spec", "status", "spec_key", "harness_version"):
            if key not in data:
                raise SchemaError(f"{key}: missing")
        if not isinstance(data["spec"], dict):
            raise SchemaError("spec: expected an object")
        try:
            spec = RunSpec.from_dict(data["spec"])
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"spec: {str(exc).splitlines()[0]}") from None
        return cls(
            spec=spec,
            status=from_json(Status, data["status"], "status"),
            predicted=predictions_from_json(data.get("predicted") or {}),
            measured=from_json(Measurement, data.get("measured") or {}, "measured"),
            harness_version=from_json(str, data["harness_version"], "harness_version"),
            spec_key=from_json(str, data["spec_key"], "spec_key"),
            environment=from_json(Environment | None, data.get("environment"), "environment"),
            error=from_json(RunError | None, data.get("error"), "error"),
            elapsed_s=from_json(float | None, data.get("elapsed_s"), "elapsed_s"),
            schema_version=SCHEMA_VERSION,
        )


_V1_METHOD_KEYS = {"naive": "naive", "naive_mlp4c": "naive-mlp4c", "implementation": "implementation",
                   "deepspeed_estimator": "deepspeed"}  # fmt: skip
_V1_FORMULA_KEYS = ("params", "memory_bytes", "host_memory_bytes", "activation_bytes", "flops", "inference")


def _upgrade_measured_v1(measured: dict, spec: dict) -> dict:
    m = copy.deepcopy(measured)
    flops = m.pop("flops", None)
    if isinstance(flops, dict):
        m["flops_counted"] = flops.get("counted")
    if "zero" in m:
        zero = m.pop("zero")
        m["engine"] = {"kind": "deepspeed", **zero} if isinstance(zero, dict) else zero
        m.setdefault("trainer", "deepspeed")
    ranks = []
    for rank in m.get("ranks") or []:
        if not isinstance(rank, dict):
            ranks.append(rank)
            continue
        own = {k: v for k, v in rank.items() if k not in ("rank", "status", "elapsed_s")}
        entry = {k: rank[k] for k in ("rank", "status", "elapsed_s") if k in rank}
        if own:
            entry["measured"] = _upgrade_measured_v1(own, spec)
        ranks.append(entry)
    if "ranks" in m:
        m["ranks"] = ranks
    return m


def upgrade_v1(data: dict) -> dict:
    """A schema-1 record in schema-2 form (the values are unchanged; only where they live moves)."""
    data = dict(data)
    spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
    predicted = data.get("predicted")
    if isinstance(predicted, dict):
        upgraded: dict = {}
        if "memory_bytes" in predicted:
            formula = {k: copy.deepcopy(predicted[k]) for k in _V1_FORMULA_KEYS if k in predicted}
            measured_flops = (data.get("measured") or {}).get("flops") or {}
            if isinstance(formula.get("flops"), dict) and isinstance(measured_flops, dict):
                # Schema 1 kept the formulas' matmul count (and, for inference, the forward FLOPs) beside the
                # counted FLOPs; they are predictions, so they move here.
                formula["flops"]["per_step_matmul"] = measured_flops.get("formula_matmul")
                if spec.get("mode") == "inference":
                    formula["flops"]["per_step_forward"] = measured_flops.get("model_per_step")
            upgraded["korthikanti"] = formula
        for old, new in _V1_METHOD_KEYS.items():
            if old in predicted:
                upgraded[new] = predicted[old]
        data["predicted"] = upgraded
    if isinstance(data.get("measured"), dict):
        data["measured"] = _upgrade_measured_v1(data["measured"], spec)
    data["schema_version"] = SCHEMA_VERSION
    return data
