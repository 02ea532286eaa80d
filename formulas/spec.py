"""RunSpec: one training configuration in sections, validated once, shared by predict, measure and sweeps.

    RunSpec
    ├── model        ModelSettings        which model: a preset or config.json name, its Architecture, or --params
    ├── training     TrainingSettings     micro-batch, sequence, precision, optimizer, recompute, attention
    ├── parallel     ParallelSettings     ZeRO stage, GPUs and nodes, tp, pp, sequence parallel, offload
    ├── budget       BudgetSettings       token budget, accelerator, achieved TFLOP/s
    └── measurement  MeasurementSettings  how `tmath measure` runs it: implementation, device, steps, mode

Every field is a setting: its name is the CLI flag (`--grad-accum`), the sweep-file key (`grad_accum`) and
the record's JSON key, the same word everywhere; its type, default, bounds and docstring are the one source
that validation (`formulas.settings.check_fields`), the CLI (`harness.flags`) and the sweep-file model
(`harness.sweep.file`) read. A record keeps the spec flat (`RunSpec.to_dict`), as sweep files and flags
write it; `RunSpec.build(**flat)` and `RunSpec.from_dict` read that form back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cache
from typing import Literal, get_args

from formulas.activations import Attention, Recompute
from formulas.architecture import SHAPE_KEYS, Architecture
from formulas.families import code_family, hf_family
from formulas.finetune import LORA_FAMILIES, Finetune, targeted
from formulas.hardware import get_gpu
from formulas.memory import ZeroStage
from formulas.params import parameter_count
from formulas.precision import GradDtype, Optimizer, Precision
from formulas.settings import bounded, check_fields, choices, field_docs, field_types, setting_name

Offload = Literal["none", "cpu"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zero-bubble"]
"""torch.distributed.pipelining's schedules (`ScheduleGPipe`, `Schedule1F1B`, `ScheduleInterleaved1F1B`,
`ScheduleLoopedBFS`, `ScheduleInterleavedZeroBubble`); the last three run several stages per rank."""
DpShard = Literal["none", "fsdp2"]
LOOPED_SCHEDULES: tuple[str, ...] = ("interleaved-1f1b", "looped-bfs", "interleaved-zero-bubble")
Mode = Literal["train", "inference"]
Impl = Literal["reference", "hf"]
MeasuredDevice = Literal["cuda", "cpu", "meta"]
"""Where a measurement runs: a GPU, the CPU, or fake tensors (`meta`: shapes without data)."""
DeviceSetting = Literal["auto", "cuda", "cpu", "meta"]
"""`--device`: a MeasuredDevice, or `auto` (CUDA when the machine has it, else the CPU)."""

IMPLS: tuple[str, ...] = get_args(Impl)
MEASURED_DEVICES: tuple[str, ...] = get_args(MeasuredDevice)
MODES: tuple[str, ...] = get_args(Mode)
OFFLOADS: tuple[str, ...] = get_args(Offload)


@dataclass(frozen=True)
class ModelSettings:
    """model (a preset, a config.json, or the shape itself)"""

    arch: Architecture | None = None
    """The architecture; None only when `params` alone is given (model states only)."""
    name: str = bounded("custom", key="model")
    """Preset name (see `tmath presets`), path to a transformers config.json, or `custom` for a shape given by
    the shape settings (layers, hidden, heads, ...)."""
    params: int | None = bounded(None, maximum=10**15, count=True)
    """A parameter count without an architecture (model-state terms only), e.g. 7B."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.arch is None and self.params is None:
            raise ValueError("give a model (--model, or --layers/--hidden/--heads) or a parameter count (--params)")


@dataclass(frozen=True)
class TrainingSettings:
    """training"""

    batch: int = bounded(1, maximum=10**7)
    """b: micro-batch size per GPU (sequences)."""
    seq: int = bounded(2048, maximum=10**9)
    """s: sequence length in tokens (default: the model's positions, at most 2048)."""
    precision: Precision = "bf16-mixed"
    """fp32 | fp16 | bf16 (pure) | fp16-mixed | bf16-mixed (16-bit weights, fp32 master in the optimizer)."""
    optimizer: Optimizer = "adamw"
    """adamw | adam8bit (bitsandbytes) | sgd (with momentum)."""
    recompute: Recompute = "none"
    """Activation recomputation: none | selective (attention core) | full (every block)."""
    attention: Attention = "eager"
    """eager (explicit softmax; stores s×s scores) | flash (fused kernel; no s×s scores)."""
    grad_accum: int = bounded(1, maximum=10**7)
    """Micro-batches per optimizer step on each data-parallel rank."""
    grad_dtype: GradDtype = "auto"
    """Gradients: auto (the parameters' dtype, as torch and DeepSpeed keep them) | fp32 (Megatron-style fp32 main
    gradients, 4 B/param; predicted only: the measured trainers keep the parameters' dtype)."""
    finetune: Finetune = "full"
    """full (every weight trains) | lora (a frozen base with trainable low-rank adapters, peft; Hu et al. 2021) |
    qlora (LoRA on a 4-bit NF4 base, Dettmers et al. 2023; predicted only where bitsandbytes does not run)."""
    lora_rank: int = bounded(8, maximum=2**16)
    """r: the rank of each LoRA adapter (A is r × in, B is out × r)."""
    lora_alpha: int = bounded(16, maximum=2**20)
    """α: the adapters' scale α/r (peft `lora_alpha`); no memory term depends on it."""
    lora_dropout: float = bounded(0.0, minimum=0.0, maximum=0.99)
    """Dropout on each adapter's input (peft `lora_dropout`); above 0 every adapter keeps its mask and a copy."""
    lora_targets: str | None = None
    """Comma-separated modules the adapters wrap (peft `target_modules`, matched as a name or dotted suffix);
    default the attention projections: q_proj,k_proj,v_proj,o_proj (Llama's code), c_attn,attn.c_proj (GPT-2)."""

    def __post_init__(self) -> None:
        check_fields(self)
        lora = any(getattr(self, name) != default for name, default in lora_defaults().items())
        if self.finetune == "full" and lora:
            raise ValueError("--lora-rank, --lora-alpha, --lora-dropout and --lora-targets apply to --finetune lora "
                             "or qlora")  # fmt: skip


@dataclass(frozen=True)
class ParallelSettings:
    """parallelism"""

    zero: ZeroStage = 0
    """ZeRO stage 0-3 over the data-parallel degree."""
    gpus: int = bounded(1, maximum=2**20)
    """GPUs in the job; data-parallel degree = gpus / (tp × pp)."""
    nodes: int = bounded(1, maximum=2**20)
    """Nodes the GPUs are spread over (a DeepSpeed hostfile sets it for `tmath measure`)."""
    tp: int = bounded(1, maximum=2**20)
    """Tensor-parallel degree t."""
    pp: int = bounded(1, maximum=2**20)
    """Pipeline-parallel degree."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (splits the replicated activations over t; needs tp > 1)."""
    partition_activations: bool = False
    """ZeRO-R: partition activations over the tensor-parallel ranks."""
    in_flight: int | None = bounded(None, maximum=2**20)
    """Micro-batches the first pipeline stage holds at once (default: what `pp_schedule` keeps, pp for 1F1B)."""
    pp_schedule: PipelineSchedule = "1f1b"
    """Pipeline schedule: gpipe | 1f1b | interleaved-1f1b | looped-bfs | interleaved-zero-bubble."""
    microbatches: int | None = bounded(None, maximum=2**20)
    """M: micro-batches of `batch` sequences per step through the pipeline (default pp)."""
    virtual_stages: int = bounded(1, maximum=2**10)
    """v: model chunks (stages) per pipeline rank; 2 or more for the interleaved and looped schedules."""
    dp_shard: DpShard = "none"
    """Data-parallel sharding by torch instead of DeepSpeed: none | fsdp2 (`fully_shard`, ZeRO-3-like)."""
    reshard_after_forward: bool = True
    """FSDP2: free each layer's gathered parameters after its forward (re-gathered in backward)."""
    offload_optimizer: Offload = "none"
    """DeepSpeed ZeRO-Offload: optimizer state and fp32 gradients in host memory (none | cpu)."""
    offload_params: Offload = "none"
    """DeepSpeed ZeRO-3 parameter offload to host memory (none | cpu)."""
    ep: int = bounded(1, maximum=2**20)
    """Expert parallelism: a MoE model's routed experts split over `ep` ranks, their gradients and optimizer state
    sharded over the dp/ep ranks holding the same experts (DeepSpeed-MoE, Rajbhandari et al. 2022). `predict` only;
    the per-rank states are measured through transformers' own engine (scripts/measure_ep.py, results/moe)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.gpus % (self.tp * self.pp):
            raise ValueError(
                f"gpus ({self.gpus}) must be a multiple of tp × pp ({self.tp} × {self.pp} = {self.tp * self.pp})"
            )
        if self.gpus % self.nodes:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of nodes ({self.nodes})")
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
        if self.in_flight is not None and self.pp == 1:
            raise ValueError("in-flight micro-batches apply to pipeline parallelism: it needs --pp > 1")
        if self.pp == 1 and (self.microbatches is not None or self.virtual_stages != 1 or self.pp_schedule != "1f1b"):
            raise ValueError("--microbatches, --virtual-stages and --pp-schedule apply to pipeline parallelism: "
                             "they need --pp > 1")  # fmt: skip
        looped = self.pp_schedule in LOOPED_SCHEDULES
        if looped and self.virtual_stages < 2:
            raise ValueError(f"--pp-schedule {self.pp_schedule} runs several stages per rank: it needs "
                             "--virtual-stages 2 or more")  # fmt: skip
        if not looped and self.virtual_stages != 1:
            raise ValueError(f"--pp-schedule {self.pp_schedule} runs one stage per rank: --virtual-stages "
                             f"{self.virtual_stages} needs interleaved-1f1b, looped-bfs or interleaved-zero-bubble")  # fmt: skip
        if self.microbatches is not None and self.pp_schedule != "gpipe" and self.microbatches < self.pp:
            raise ValueError(f"--pp-schedule {self.pp_schedule} needs at least as many micro-batches as stages "
                             f"(--microbatches {self.microbatches} < --pp {self.pp}); gpipe takes fewer")  # fmt: skip
        if self.dp_shard == "fsdp2" and self.zero:
            raise ValueError("--dp-shard fsdp2 shards with torch's FSDP2, --zero with DeepSpeed: give one of them")
        if not self.reshard_after_forward and self.dp_shard != "fsdp2":
            raise ValueError("--no-reshard-after-forward is an FSDP2 setting: it needs --dp-shard fsdp2")
        if self.offload_params != "none" and self.zero != 3:
            raise ValueError("--offload-params needs ZeRO stage 3 (only stage 3 partitions the parameters)")
        if self.offload_optimizer != "none" and self.zero == 0:
            raise ValueError("--offload-optimizer needs a ZeRO stage of 1, 2 or 3")
        if self.dp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the {self.dp} data-parallel ranks (gpus / (tp × pp))")
        if self.ep > 1 and (self.pp > 1 or self.dp_shard == "fsdp2" or self.offload_optimizer != "none"
                            or self.offload_params != "none"):  # fmt: skip
            raise ValueError("--ep is predicted with data and tensor parallelism and ZeRO 0-3 only (no --pp, "
                             "FSDP2 or offload)")  # fmt: skip

    @property
    def dp(self) -> int:
        """Data-parallel degree: GPUs / (PP × TP) (Transformer Math 101, 3D parallelism)."""
        return self.gpus // (self.tp * self.pp)

    @property
    def n_microbatches(self) -> int:
        """M: micro-batches per step through the pipeline (1 without one)."""
        if self.pp == 1:
            return 1
        return self.microbatches if self.microbatches is not None else self.pp


@dataclass(frozen=True)
class BudgetSettings:
    """compute budget"""

    tokens: int | None = bounded(None, maximum=10**17, count=True)
    """Training budget D in tokens (default: Chinchilla's 20·P), e.g. 300e9 or 1.5T."""
    gpu: str = "a100-80gb"
    """Accelerator the prediction is for (see `tmath gpus`)."""
    tflops: float | None = bounded(None, maximum=10**6)
    """Achieved TFLOP/s per GPU (default: Transformer Math 101's 120 per A100, scaled to `gpu`)."""

    def __post_init__(self) -> None:
        check_fields(self)
        get_gpu(self.gpu)


@dataclass(frozen=True)
class MeasurementSettings:
    """measurement"""

    mode: Mode = "train"
    """`train` (forward, backward, optimizer step) or `inference` (one forward, no grad)."""
    impl: Impl = "reference"
    """`reference` (models/gpt.py, models/bert.py) or `hf` (transformers)."""
    device: DeviceSetting = "auto"
    """auto | cuda | cpu | meta (fake tensors: shapes without data, nothing allocated)."""
    steps: int = bounded(3, minimum=0, maximum=10**6)
    """Timed training steps after warm-up (0: memory and FLOPs only, no timing)."""
    warmup: int = bounded(1, minimum=0, maximum=10**6)
    """Untimed steps first (allocator, cuBLAS workspace, lazy state)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the generated config (ZeRO runs)."""
    compile: bool = False
    """Time the warm-up and timed steps with torch.compile of the model and its loss (inductor) and fused
    AdamW; memory and FLOPs stay measured on the eager steps (one process, training, CUDA or CPU)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.compile and self.device == "meta":
            raise ValueError("--compile times real steps: fake tensors (--device meta) run none")
        if self.compile and self.mode == "inference":
            raise ValueError("--compile times training steps: not --mode inference")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "training": TrainingSettings,
    "parallel": ParallelSettings,
    "budget": BudgetSettings,
    "measurement": MeasurementSettings,
}
"""RunSpec's sections, in the order flags and documentation list them."""


def lora_defaults() -> dict:
    """The LoRA settings (`lora_rank`, `lora_alpha`, `lora_dropout`, `lora_targets`) at their defaults."""
    return {f.name: f.default for f in fields(TrainingSettings) if f.name.startswith("lora_")}


KEY_SINCE_SCHEMA_2 = {
    "nodes": 1, "grad_dtype": "auto", "compile": False,
    "pp_schedule": "1f1b", "microbatches": None, "virtual_stages": 1, "dp_shard": "none",
    "reshard_after_forward": True, "ep": 1,
    "finetune": "full", **lora_defaults(),
}  # fmt: skip
"""Settings added after the first records were written, with their defaults: at the default they stay out of
`RunSpec.key()`, so that earlier records keep their keys and `--resume` still matches them."""


@dataclass(frozen=True)
class RunSpec:
    """A model, a training setup and a parallel layout; optionally how to measure it."""

    model: ModelSettings
    training: TrainingSettings = field(default_factory=TrainingSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    measurement: MeasurementSettings = field(default_factory=MeasurementSettings)
    extra: dict = field(default_factory=dict)
    """Free-form tags carried into records (a sweep's name, a note); not used by any formula, not in the key."""

    def __post_init__(self) -> None:
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping of tags, got {type(self.extra).__name__}")
        arch, t, p, m = self.model.arch, self.training, self.parallel, self.measurement
        if m.mode == "inference":
            if t.recompute != "none":
                raise ValueError("--mode inference runs no backward: recomputation does not apply (--recompute none)")
            if t.grad_accum != 1:
                raise ValueError("--mode inference measures one forward: gradient accumulation does not apply")
        if m.compile and (p.gpus > 1 or p.zero or p.tp > 1 or p.pp > 1):
            raise ValueError("--compile is for one process without ZeRO (the plain trainer)")
        if p.ep > 1 and (arch is None or not arch.moe):
            raise ValueError(f"--ep {p.ep} splits routed experts: it needs a mixture-of-experts model")
        if p.ep > 1 and arch.experts % p.ep:
            raise ValueError(f"--ep {p.ep} must divide the model's {arch.experts} routed experts")
        if t.finetune != "full":
            _check_finetune(self)
        if arch is None:
            return
        if arch.n_heads % p.tp:
            raise ValueError(f"tp ({p.tp}) must divide heads ({arch.n_heads}): tensor parallelism splits heads")
        if arch.n_kv_heads % p.tp and arch.n_kv_heads >= p.tp:
            raise ValueError(f"tp ({p.tp}) must divide kv-heads ({arch.n_kv_heads})")
        if p.pp > arch.n_layers:
            raise ValueError(f"pp ({p.pp}) cannot exceed the number of layers ({arch.n_layers})")
        if p.pp * p.virtual_stages > arch.n_layers:
            raise ValueError(f"pp × virtual-stages ({p.pp} × {p.virtual_stages}) cannot exceed the number of layers "
                             f"({arch.n_layers}): a stage holds whole blocks")  # fmt: skip
        if p.pp > 1 and t.grad_accum != 1:
            raise ValueError("with --pp the schedule's --microbatches are the gradient accumulation: leave "
                             "--grad-accum at 1")  # fmt: skip
        if arch.position == "learned" and t.seq > arch.max_positions:
            raise ValueError(f"seq ({t.seq}) exceeds the {arch.max_positions} learned positions of {self.model.name}")

    # ---- the flat form: flags, sweep keys and records ----
    @classmethod
    def build(cls, **settings) -> RunSpec:
        """A RunSpec from flat settings (`batch=2, zero=1, arch=...`); absent ones take their defaults."""
        index = flat_fields()
        unknown = sorted(set(settings) - set(index) - {"extra"})
        if unknown:
            raise ValueError(f"unknown run setting(s): {', '.join(unknown)}")
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        for key, value in settings.items():
            if key != "extra":
                section, name = index[key]
                parts[section][name] = value
        return cls(
            **{name: SECTIONS[name](**parts[name]) for name in SECTIONS},
            extra=dict(settings.get("extra") or {}),
        )

    def to_dict(self) -> dict:
        """Flat: every setting by its name, the architecture under `arch`, and `extra`."""
        out: dict = {}
        for section in SECTIONS:
            part = getattr(self, section)
            for f in fields(part):
                value = getattr(part, f.name)
                out[setting_name(f)] = value.to_dict() if isinstance(value, Architecture) else value
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        data = dict(data)
        if data.get("arch") is not None:
            data["arch"] = Architecture.from_dict(data["arch"])
        extra = data.get("extra")
        if isinstance(extra, dict) and "nodes" in extra:  # schema 1 carried the node count as a tag
            extra = dict(extra)
            data.setdefault("nodes", extra.pop("nodes"))
            data["extra"] = extra
        return cls.build(**data)

    def replace(self, **changes) -> RunSpec:
        """A copy with flat settings changed (`spec.replace(seq=512, device="meta")`)."""
        index = flat_fields()
        parts: dict[str, dict] = {}
        for key, value in changes.items():
            if key == "extra":
                continue
            if key not in index:
                raise ValueError(f"unknown run setting {key!r}")
            section, name = index[key]
            parts.setdefault(section, {})[name] = value
        updated = {s: replace(getattr(self, s), **v) for s, v in parts.items()}
        if "extra" in changes:
            updated["extra"] = dict(changes["extra"])
        return replace(self, **updated)

    def key(self) -> str:
        """Stable hash of everything that defines the run (not `extra`): a sweep's resume key."""
        data = self.to_dict()
        data.pop("extra")
        for name, default in KEY_SINCE_SCHEMA_2.items():
            if data[name] == default:
                del data[name]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---- derived ----
    @property
    def total_params(self) -> int:
        return self.model.params if self.model.params is not None else parameter_count(self.model.arch).total


def _check_finetune(spec: RunSpec) -> None:
    """LoRA and QLoRA: one process (no ZeRO, tensor or pipeline layout), training, an architecture whose
    transformers code is modelled, targets that match its linears."""
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    if arch is None:
        raise ValueError(f"--finetune {t.finetune} counts adapters from the architecture: give a model, not --params")
    if p.zero or p.tp > 1 or p.pp > 1 or p.dp_shard != "none":
        raise ValueError(f"--finetune {t.finetune} is modelled for one replica (data parallel at most): no --zero, "
                         "--tp, --pp or --dp-shard")  # fmt: skip
    if spec.measurement.mode != "train":
        raise ValueError(f"--finetune {t.finetune} is a training setting: not --mode inference")
    if t.grad_dtype != "auto":
        raise ValueError("--grad-dtype fp32 is a full-training setting: LoRA adapters are fp32 already")
    family = hf_family(arch)
    if family not in LORA_FAMILIES:
        raise ValueError(f"--finetune {t.finetune} is measured on transformers {', '.join(LORA_FAMILIES)}, not "
                         f"{family}")  # fmt: skip
    targeted(arch, code_family(arch), t.lora_targets)


@dataclass(frozen=True)
class Setting:
    """One setting as flags and sweep files see it: where it lives, its type and its help."""

    key: str
    """Its name: `grad_accum` (the flag is `--grad-accum`)."""
    section: str
    """The RunSpec section it belongs to; shape settings belong to `model`."""
    owner: type
    """The dataclass that declares it (a section, or Architecture for shape settings)."""
    field: str
    """The field's name there (`n_layers` for the setting `layers`)."""
    type: object
    default: object
    help: str
    choices: tuple | None
    count: bool
    """Given as a count with a suffix on the command line (7B, 1.5T)."""

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@cache
def flat_fields() -> dict[str, tuple[str, str]]:
    """Setting name → (section, field name) for RunSpec's fields (the resolved `arch` included)."""
    return {setting_name(f): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)}


@cache
def settings() -> dict[str, Setting]:
    """Every setting a user can give, by name, in section order: RunSpec's fields (not the resolved `arch`)
    and the architecture's shape settings (`layers`, `hidden`, ...), which join the model section."""
    out: dict[str, Setting] = {}

    def add(section: str, cls: type, f) -> None:
        tp = field_types(cls)[f.name]
        out[setting_name(f)] = Setting(
            key=setting_name(f), section=section, owner=cls, field=f.name, type=tp,
            default=None if f.default is MISSING else f.default,
            help=field_docs(cls).get(f.name, setting_name(f)), choices=choices(tp), count=bool(f.metadata.get("count")),
        )  # fmt: skip

    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name != "arch":
                add(section, cls, f)
        if section == "model":
            by_key = {setting_name(f): f for f in fields(Architecture)}
            for key in SHAPE_KEYS:
                add("model", Architecture, by_key[key])
    return out
