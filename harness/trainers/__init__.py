"""Trainers: one engine per file, all behind one protocol, chosen by the spec.

    plain      harness.trainers.plain      one process: torch optimizers, autocast, an fp32 master copy
    deepspeed  harness.trainers.deepspeed  DeepSpeed ZeRO 0-3 (and offload), one process per rank
    tensor     harness.trainers.tensor     DTensor tensor (and sequence) parallel, Megatron's layout, optionally
                                           FSDP2 over the data-parallel dimension
    pipeline   harness.trainers.pipeline   torch.distributed.pipelining stages and schedules (tensor parallel
                                           within each stage)
    fsdp2      harness.trainers.fsdp       FSDP2 `fully_shard` per block and over the model

`harness.measure` runs the same protocol whatever the engine: it asks `select(spec)` for the entry, builds
the trainer, and calls the methods of `harness.trainers.protocol.Trainer`. A new engine (FSDP2, tensor or
pipeline parallel) is a new file with a class that implements `Trainer`, and one entry in `TRAINERS`;
`measure` does not change.
Entries are light (no torch, no DeepSpeed): the CLI and the sweep consult them before anything is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.schema import SchemaError, Tagged
from harness.zero.config import check_deepspeed, uses_deepspeed


def _finetune_checks(spec: RunSpec) -> None:
    ft = spec.training.finetune
    if ft == "qlora":
        raise UsageError("--finetune qlora needs bitsandbytes' 4-bit kernels (CUDA): it is predicted, not measured, "
                         "here (tmath predict)")  # fmt: skip
    if spec.measurement.impl != "hf":
        raise UsageError(f"--finetune {ft} is measured on the transformers models through peft: give --impl hf")
    if spec.parallel.gpus > 1:
        raise UsageError(f"--finetune {ft} is measured in one process: --gpus 1")
    if spec.measurement.device == "meta":
        raise UsageError(f"--finetune {ft} cannot run on fake tensors (peft's adapter set-up swaps parameters, which "
                         "FakeTensorMode refuses): measure on cpu")  # fmt: skip
    if spec.measurement.compile:
        raise UsageError(f"--finetune {ft} is measured eager: not --compile")


def _common_checks(spec: RunSpec) -> None:
    if spec.training.finetune != "full":
        _finetune_checks(spec)
    if spec.training.grad_dtype != "auto":
        raise UsageError(
            "--grad-dtype fp32 (Megatron-style fp32 main gradients) is predicted only: the measured trainers keep "
            "gradients in the parameters' dtype"
        )
    arch = spec.model.arch
    if arch is not None and arch.capacity_factor is not None:
        raise UsageError(f"--capacity-factor {arch.capacity_factor}: transformers' experts are dropless; an expert "
                         "capacity is predicted only")  # fmt: skip
    if spec.parallel.ep > 1:
        raise UsageError(f"--ep {spec.parallel.ep}: tmath measure has no expert-parallel trainer yet, so its step is "
                         "predicted only (its per-rank states are measured by scripts/measure_ep.py); measure with "
                         "--ep 1")  # fmt: skip


def _plain_checks(spec: RunSpec, device: str) -> None:
    _common_checks(spec)
    arch = spec.model.arch
    if device == "meta" and arch is not None and arch.moe and spec.training.precision not in ("bf16", "bf16-mixed"):
        raise UsageError(f"a mixture of experts on --device meta needs bf16 or bf16-mixed: torch's fake "
                         f"aten._grouped_mm accepts bf16 only (--precision {spec.training.precision} runs on --device cpu)")  # fmt: skip
    if spec.training.optimizer == "adam8bit" and device != "cuda":
        raise UsageError("--optimizer adam8bit (bitsandbytes) needs a CUDA device")
    if spec.measurement.deepspeed_config:
        raise UsageError("--deepspeed-config configures a DeepSpeed run: give it with --zero 1-3 or --gpus N")
    if spec.training.precision == "fp16-mixed" and device == "meta":
        raise UsageError(
            "--precision fp16-mixed cannot run on fake tensors (--device meta): its loss scaler reads whether the "
            "gradients are finite; measure it on cpu or cuda"
        )


def _single_process(spec: RunSpec) -> bool:
    return not uses_deepspeed(spec) and spec.parallel.tp == 1 and spec.parallel.pp == 1


def _torch_engine(spec: RunSpec) -> bool:
    p = spec.parallel
    return p.tp > 1 or p.pp > 1 or p.dp_shard == "fsdp2"


def _data_parallel(spec: RunSpec) -> bool:
    return uses_deepspeed(spec) and not _torch_engine(spec)


HF_TP_PLANS: tuple[str, ...] = ("llama",)
"""transformers families measured under their config's `base_model_tp_plan` (transformers 5.x): Llama (and Mistral); GPT-2 and BERT have no plan, GPT-NeoX's is not measured yet."""


def _torch_parallel_checks(spec: RunSpec, device: str) -> None:
    """What torch's parallel engines are not measured with, before any rank starts."""
    _common_checks(spec)
    p, t = spec.parallel, spec.training
    layout = f"--tp {p.tp} --pp {p.pp}" + (" --dp-shard fsdp2" if p.dp_shard == "fsdp2" else "")
    if device == "meta":
        _fake_rank_checks(spec, layout)
    if spec.measurement.mode != "train":
        raise UsageError(f"{layout} is measured in training mode only")
    if spec.measurement.impl == "hf" and p.pp > 1:
        raise UsageError(f"{layout} is measured on the reference models (--impl reference); transformers models "
                         "under pipeline parallelism are predicted only")  # fmt: skip
    if spec.measurement.impl == "hf" and p.tp > 1:
        from formulas.families import hf_family

        family = hf_family(spec.model.arch) if spec.model.arch is not None else None
        if family not in HF_TP_PLANS:
            raise UsageError(f"--tp {p.tp} --impl hf: transformers' {family} model has no tensor-parallel plan "
                             f"(base_model_tp_plan: {', '.join(HF_TP_PLANS)}); measure it with --impl reference")  # fmt: skip
        if p.sequence_parallel:
            raise UsageError("--sequence-parallel --impl hf: transformers' default tensor-parallel plans do not "
                             "split the sequence; measure it with --impl reference")  # fmt: skip
        if p.dp_shard == "fsdp2":
            raise UsageError("--impl hf --tp with --dp-shard fsdp2 is not measured (transformers' plan under FSDP2)")
    if spec.model.arch is not None and spec.model.arch.family != "decoder" and (p.tp > 1 or p.pp > 1):
        raise UsageError(f"{layout} is measured on decoder models (GPT, Llama shapes); BERT is predicted only")
    if p.zero:
        raise UsageError(f"--zero {p.zero} with {layout}: DeepSpeed over a tensor/pipeline mesh is not measured; "
                         "shard the data-parallel dimension with --dp-shard fsdp2")  # fmt: skip
    if p.dp > 1 and p.dp_shard != "fsdp2":
        raise UsageError(f"{p.gpus} GPUs at tp {p.tp} × pp {p.pp} leave {p.dp} data-parallel ranks: measured with "
                         "--dp-shard fsdp2 (or set --gpus to tp × pp)")  # fmt: skip
    if t.precision == "fp16-mixed":
        raise UsageError(f"--precision fp16-mixed (loss scaling) is not measured with {layout}: use bf16-mixed")
    if t.optimizer == "adam8bit":
        raise UsageError(f"--optimizer adam8bit is not measured with {layout}")
    if spec.measurement.deepspeed_config:
        raise UsageError("--deepspeed-config configures a DeepSpeed run; this layout runs torch's engines")


def _fake_rank_checks(spec: RunSpec, layout: str) -> None:
    from harness.trainers.mesh import fake_process_group

    if not fake_process_group():
        raise UsageError(f"--device meta measures one process with fake tensors; {layout} runs one process per rank "
                         "(`tmath plan --verify` dry-runs one rank of it)")  # fmt: skip


def _deepspeed_checks(spec: RunSpec, device: str) -> None:
    _common_checks(spec)
    if device == "meta":
        _fake_rank_checks(spec, "DeepSpeed")
    check_deepspeed(spec, device)


@dataclass(frozen=True)
class TrainerEntry:
    name: str
    path: str
    """`module:Class` of the Trainer, imported when a measurement builds it."""
    applies: Callable[[RunSpec], bool]
    launched: bool
    """One process per rank through a launcher (torchrun, deepspeed), even for a single rank."""
    check: Callable[[RunSpec, str], None]
    """What it cannot measure on a device, as one-line UsageErrors, before anything is built."""
    report: str | None = None
    """`module:Class` of its per-rank report in a record (`measured.engine`, kind = the entry's name)."""

    def load(self) -> type:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)


TRAINERS: tuple[TrainerEntry, ...] = (
    TrainerEntry("plain", "harness.trainers.plain:PlainTrainer", _single_process, False, _plain_checks),
    TrainerEntry(
        "pipeline",
        "harness.trainers.pipeline:PipelineTrainer",
        lambda s: s.parallel.pp > 1,
        True,
        _torch_parallel_checks,
        report="harness.trainers.account:PipelineAccount",
    ),
    TrainerEntry(
        "tensor",
        "harness.trainers.tensor:TensorParallelTrainer",
        lambda s: s.parallel.tp > 1 and s.parallel.pp == 1,
        True,
        _torch_parallel_checks,
        report="harness.trainers.account:TensorAccount",
    ),
    TrainerEntry(
        "fsdp2",
        "harness.trainers.fsdp:FSDPTrainer",
        lambda s: s.parallel.dp_shard == "fsdp2" and s.parallel.tp == 1 and s.parallel.pp == 1,
        True,
        _torch_parallel_checks,
        report="harness.trainers.account:FSDPAccount",
    ),
    TrainerEntry(
        "deepspeed",
        "harness.trainers.deepspeed:DeepSpeedTrainer",
        _data_parallel,
        True,
        _deepspeed_checks,
        report="harness.zero.account:ZeroAccount",
    ),
)


def select(spec: RunSpec) -> TrainerEntry:
    """The engine that measures `spec`, or a one-line UsageError when none does."""
    for entry in TRAINERS:
        if entry.applies(spec):
            return entry
    raise UsageError("no engine measures this layout")  # every layout is some entry's; kept for new settings


class EngineReport(Tagged):
    """An engine's per-rank account in a record (`measured.engine`; DeepSpeed's: `harness.zero.account`),
    told apart by `kind`, the name of its TrainerEntry."""

    @classmethod
    def resolve(cls, kind: str) -> type:
        return engine_report_type(kind)


def engine_report_type(kind: str) -> type:
    """The record type of an engine's per-rank report (`measured.engine.kind`)."""
    for entry in TRAINERS:
        if entry.name == kind and entry.report:
            module, name = entry.report.split(":")
            return getattr(importlib.import_module(module), name)
    known = ", ".join(e.name for e in TRAINERS if e.report)
    raise SchemaError(f"measured.engine.kind: {kind!r} is not an engine's report ({known})")


def resolve_device(requested: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu; `cuda` without one is a one-line error."""
    import torch  # here, not at the top: the CLI's parent reads this registry without loading torch otherwise

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: no CUDA device is available (torch {torch.__version__})")
    return requested


def check_measurable(spec: RunSpec, device: str) -> TrainerEntry:
    """What `measure` cannot run, as one-line errors before anything is built; the engine that will run it."""
    if spec.model.arch is None:
        raise UsageError("measure needs an architecture (--model or --layers/--hidden/--heads), not only --params")
    if spec.measurement.impl == "hf" and spec.training.recompute == "selective":
        raise UsageError("selective recompute is implemented for --impl reference only")
    entry = select(spec)
    entry.check(spec, device)
    return entry
