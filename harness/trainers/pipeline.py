"""Pipeline parallel through `torch.distributed.pipelining`: stages of whole blocks, torch's schedules, and the
activations each rank holds in flight, measured per micro-batch.

How it runs. The reference GPT is split at block boundaries into pp × v stages (`formulas.parallel`:
`stage_blocks` for the blocks of a stage, `rank_stages` for torch's looped placement s = pp_rank + k·pp, so
that the predictions and the trainer split alike). Stage 0 keeps the token and position embeddings and the
embedding dropout, the last stage the final norm and the output layer; the loss is the schedule's `loss_fn`,
the model's own `F.cross_entropy` over fp32 logits. Each rank builds the whole model (`harness.measure` hands
it over), keeps its stages' modules and drops the rest, in the model object itself: `measure` tracks that
object's parameters as the weights. One `PipelineStage` per local stage is given its input and output shapes
(static metadata: no metadata-inference forward in the first measured step) and initialised when the trainer
is built, so the engine's receive buffers are allocated before the first step and named in the live tracker
(category `pipeline buffers`). `forward_backward` concatenates the micro-batches and runs `schedule.step`:
every micro-batch's stage forwards and backwards in the schedule's order (GPipe: all forwards, then all
backwards; 1F1B: pp − r forwards of warm-up, then one backward per forward), the gradients accumulated and
divided by M (the mean over micro-batches); `step` is the optimizer step of the plain trainer over this rank's
parameters (fp32, pure 16-bit, or bf16-mixed with autocast and an fp32 master copy).

How it measures. The live tracker's category is `activations` during each stage forward (and the loss) and
`backward` during each stage backward. During the first step every (stage, micro-batch) forward runs under a
`SavedTensorTracker` (this rank's parameters and buffers excluded, the stage's blocks as modules), which gives
the bytes that micro-batch's forward saves on this stage, by block, exactly as `measure` counts a plain
forward. Its pack hook also hands each saved alias to a ledger (`SavedLedger`) that keeps, across the whole
schedule, the bytes of saved storages autograd still holds (a storage leaves when autograd drops its last
saved alias, in that micro-batch's backward): the most at once is `activations_in_flight`, and the most
micro-batch stage-forwards holding saved tensors at once is the account's `in_flight_microbatches`, the
quantity `formulas.parallel.in_flight_chunks` predicts.

What torch's engine holds beyond the formula's terms, each measured and named in the account: the receive
buffers of every micro-batch's stage input and output gradient, allocated once for the run (a non-first
stage's first block saves its input, which is that buffer: counted in the activations, as a plain forward
counts its block input); each stage's output, kept in the stage's forward cache until that micro-batch's
backward (the root of its backward) and by the schedule's loop until its next forward returns: B·s·h per
micro-batch on a non-last stage, the whole logits B·s·v on the last, which a plain forward frees once the loss
is taken; and the step's concatenated inputs. Departures from the simple in-flight count are measured, not
assumed: interleaved-zero-bubble's input-gradient pass keeps a micro-batch's saved tensors (retain_graph) until
its weight pass, so it holds more than its warm-up. With `--tp`, each stage gets Megatron's layout
(`harness.trainers.tensor.apply_tensor_parallel`) over the rank's tensor-parallel group and the loss is
DTensor's `loss_parallel`. With `--dp-shard fsdp2`, every block and every stage root is a `fully_shard` unit over
the rank's data-parallel group (`harness.trainers.fsdp.apply_fsdp`, torchtitan's composition) and the optimizer
steps the fp32 shards (FSDP2's mixed precision); torch's `PipelineStage` then keeps each unit gathered and its
gradients unsharded between micro-batches and reduces once after the last, which the account notes and
`formulas.ranks` walks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor.parallel import loss_parallel

from formulas.parallel import in_flight_chunks, rank_stages, stage_blocks
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.memtrack import local_tensor, unique_storage_bytes
from harness.records import Measurement
from harness.trainers.account import PipelineAccount
from harness.trainers.mesh import build_mesh
from harness.trainers.plain import PlainTrainer, param_dtype
from harness.trainers.stages import (
    Chunk,
    ChunkSaved,
    Meter,
    StageModule,
    flop_counter_without_module_hooks,
    keep_only,
    merge_counts,
)

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "looped-bfs": ScheduleLoopedBFS,
    "interleaved-zero-bubble": ScheduleInterleavedZeroBubble,
}
"""`--pp-schedule` → torch's schedule class; the first two run one stage per rank, the others v."""

BUFFERS_CATEGORY = "pipeline buffers"
"""Live-tracker category of what the schedule allocates when it is initialised (its receive buffers)."""

SPLIT_BACKWARD = ("interleaved-zero-bubble",)
"""Schedules that split each backward into an input-gradient pass (`torch.autograd.grad`) and a weight pass."""


class _MeteredStage(PipelineStage):
    """A `PipelineStage` whose chunk forwards and backwards label the live tracker's phase, run under the
    trainer's autocast, and (during the measured step) count what they save."""

    def __init__(self, trainer: PipelineTrainer, module: StageModule, *args, **kwargs) -> None:
        super().__init__(module, *args, **kwargs)
        self.trainer = trainer

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        trainer = self.trainer
        trainer.set_category("activations")
        chunk = (self.stage_index, fwd_chunk_id)
        trainer.last_forward = chunk
        meter = trainer.meter
        with contextlib.ExitStack() as stack:
            stack.enter_context(trainer.plain.autocast())
            if meter is not None:
                stack.enter_context(meter.forward(chunk, meter.trackers[self.stage_index]))
            output = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        if meter is not None:
            meter.keep_outputs(self.fwd_cache[fwd_chunk_id][0])
        return output

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self.trainer.set_category("backward")
        with self.trainer.loss_parallel():
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self.trainer.set_category("backward")
        with self.trainer.loss_parallel():
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward)


class PipelineTrainer:
    """The `harness.trainers.protocol.Trainer` protocol over torch's pipeline schedules, one process per rank
    (`schedules_microbatches`: `measure` hands over all micro-batches of a step; the activations are counted
    here and set in `finish`)."""

    schedules_microbatches = True

    def __init__(self, model: nn.Module, spec: RunSpec, *, device_type: str, probe=None) -> None:
        self.spec = spec
        self.probe = probe
        self.device_type = device_type
        previous = self.set_category("engine init")  # what the process group and mesh allocate, by name
        try:
            self.layout = build_mesh(spec, device_type)
        finally:
            self.set_category(previous)
        p, t, arch = spec.parallel, spec.training, spec.model.arch
        self.pp_rank = self.layout.coords["pp"]
        self.n_stages = p.pp * p.virtual_stages
        self.microbatches = p.n_microbatches
        self.stage_ids = rank_stages(self.pp_rank, p.pp, p.virtual_stages)
        self.stages = [
            StageModule(model, s, self.n_stages, stage_blocks(arch.n_layers, self.n_stages, s)) for s in self.stage_ids
        ]
        keep_only(model, self.stages)
        self.model = nn.ModuleDict({f"stage{m.index}": m for m in self.stages})
        if p.tp > 1:
            self._tensor_parallel()
        self.gathered = None
        if p.dp_shard == "fsdp2":
            # FSDP2 inside each stage over the rank's data-parallel group (torchtitan's composition): every block
            # and every stage root a unit; AdamW on the fp32 shards, FSDP2's policy casting for compute.
            from harness.trainers.fsdp import FSDPTrainer, apply_fsdp

            self.gathered = apply_fsdp(list(self.stages), self.layout.mesh["dp"], spec, probe=probe)
            self.plain = FSDPTrainer.over_sharded(self.model, spec, device_type)
        else:
            # The optimizer, autocast and master copy of the plain trainer, over this rank's parameters.
            self.plain = PlainTrainer(self.model, spec, device_type=device_type)
        self.meter: Meter | None = None
        self._measured = False
        self.last_forward: Chunk = (-1, -1)
        self.input_bytes = 0

        self.pipeline_stages = [self._pipeline_stage(m) for m in self.stages]
        cls = SCHEDULES[p.pp_schedule]
        if p.pp_schedule in ("gpipe", "1f1b"):
            self.schedule = cls(self.pipeline_stages[0], n_microbatches=self.microbatches, loss_fn=self._loss)
        else:
            self.schedule = cls(self.pipeline_stages, n_microbatches=self.microbatches, loss_fn=self._loss)
        self._initialize(t.batch, t.seq)

    def _pipeline_stage(self, module: StageModule) -> _MeteredStage:
        """torch's stage for `module`, told the shapes of its input and output (static metadata: no
        metadata-inference forward and backward at the first step)."""
        t, p, arch = self.spec.training, self.spec.parallel, self.spec.model.arch
        B, T = t.batch, t.seq
        # Sequence parallel hands each tensor-parallel rank its s/t slice of the hidden state between blocks.
        T_hidden = T // p.tp if p.tp > 1 and p.sequence_parallel else T
        # Under bf16-mixed the model's parameters are 16-bit and every stage boundary (block output, logits)
        # is in their dtype too, as in pure 16-bit: autocast keeps only norms and the loss in fp32.
        dtype = param_dtype(t.precision)
        hidden = torch.empty(B, T_hidden, arch.hidden, dtype=dtype, device="meta", requires_grad=True)
        ids = torch.empty(B, T, dtype=torch.long, device="meta")
        logits = torch.empty(B, T, arch.vocab, dtype=dtype, device="meta", requires_grad=True)
        first, last = module.index == 0, module.index == self.n_stages - 1
        cuda = self.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return _MeteredStage(
            self, module, module.index, self.n_stages, device,
            input_args=ids if first else hidden, output_args=logits if last else hidden,
            group=self.layout.mesh["pp"].get_group(),
        )  # fmt: skip

    def _initialize(self, B: int, T: int) -> None:
        """Initialise the schedule's stages now (the ranks' warm-up exchange, the receive buffers of every
        micro-batch) rather than in the first measured step, under a category of their own. Where the static
        shapes do not suffice (DTensor boundaries), torch infers them here with a forward and backward of its
        own on these example inputs: under the step's autocast and loss_parallel, before anything is measured."""
        previous = self.set_category(BUFFERS_CATEGORY)
        example = (torch.zeros(B, T, dtype=torch.long),)
        target = torch.zeros(B, T, dtype=torch.long)
        try:
            with self.plain.autocast(), self.loss_parallel():
                if hasattr(self.schedule, "_initialize_stages"):
                    self.schedule._initialize_stages(example, {}, target)
                else:
                    self.schedule._initialize_stage(example, {}, target)
        finally:
            self.set_category(previous)

    def _tensor_parallel(self) -> None:
        """Megatron's tensor-parallel layout within each stage, over this rank's tensor-parallel group."""
        from harness.trainers.tensor import apply_tensor_parallel

        for stage in self.stages:
            apply_tensor_parallel(stage, self.layout.mesh["tp"], sequence_parallel=self.spec.parallel.sequence_parallel)

    def loss_parallel(self) -> contextlib.AbstractContextManager:
        """DTensor's vocabulary-parallel cross-entropy (tensor parallel: the logits are split by vocabulary),
        for the loss and every backward through it."""
        return loss_parallel() if self.spec.parallel.tp > 1 else contextlib.nullcontext()

    def set_category(self, category: str) -> str | None:
        """Label what the live tracker sees from now on; returns the previous label."""
        if self.probe is None:
            return None
        previous = self.probe.tracker.category
        self.probe.tracker.category = category
        return previous

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own loss (`GPT.forward`): cross-entropy over fp32 logits, under the forward's autocast.
        Counted with the last stage's forward of the same micro-batch (the schedule takes it right after)."""
        self.set_category("activations")
        # The labels are a view of the step's concatenated labels: a copy of the micro-batch's own, as for ids.
        labels = labels.clone()
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.loss_parallel())
            stack.enter_context(self.plain.autocast())
            if self.meter is not None:
                stack.enter_context(self.meter.forward(self.last_forward, self.meter.loss_tracker))
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))

    # ---- the Trainer interface ----
    def forward_backward(self, batches: list[dict]) -> None:
        """Every micro-batch through the schedule (the first call counts what each stage forward saves)."""
        if len(batches) != self.microbatches:
            raise RuntimeError(f"{len(batches)} micro-batches for a schedule of {self.microbatches}")
        if not self._measured:
            self.meter = Meter(self.model, self.stages)
        try:
            self._run(batches)
        finally:
            if self.meter is not None:
                self._measured = True
                self.measured_meter, self.meter = self.meter, None

    def _run(self, batches: list[dict]) -> None:
        kwargs = {}
        args: tuple = ()
        if 0 in self.stage_ids:
            args = (torch.cat([b["input_ids"] for b in batches]),)
        if self.n_stages - 1 in self.stage_ids:
            kwargs["target"] = torch.cat([b["labels"] for b in batches])
        self.input_bytes = unique_storage_bytes([*args, *kwargs.values()])
        split = self.spec.parallel.pp_schedule in SPLIT_BACKWARD
        with flop_counter_without_module_hooks() if split else contextlib.nullcontext():
            # return_outputs=False: the last stage would otherwise keep every micro-batch's logits for the step.
            self.schedule.step(*args, return_outputs=False, **kwargs)

    def train_step(self, batches: list[dict]) -> None:
        self.forward_backward(batches)
        self.step()

    def forward(self, batch: dict) -> torch.Tensor:
        raise UsageError("a pipeline runs its micro-batches through its schedule (forward_backward)")

    def backward(self, loss: torch.Tensor) -> None:
        raise UsageError("a pipeline runs its micro-batches through its schedule (forward_backward)")

    def step(self) -> None:
        self.plain.step()

    def infer(self, batch: dict):
        raise UsageError("--pp is measured in training mode only")

    def compile(self) -> str:
        raise UsageError("--compile is not measured with --pp (pipeline stages run eager)")

    # ---- model-state accounting (this rank's stages, unique storages) ----
    def weight_bytes(self) -> int:
        return self.plain.weight_bytes()

    def buffer_bytes(self) -> int:
        return self.plain.buffer_bytes()

    def gradient_bytes(self) -> int:
        return self.plain.gradient_bytes()

    def optimizer_tensors(self) -> list[torch.Tensor]:
        return self.plain.optimizer_tensors()

    def optimizer_bytes(self) -> int:
        return self.plain.optimizer_bytes()

    # ---- the account ----
    def _receive_buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stages' receive buffers: every micro-batch's stage input, and its output gradient."""
        acts, grads = [], []
        for stage in self.pipeline_stages:
            for infos in stage.args_recv_info.values():
                acts += [i.buffer for i in infos if not i.is_root_arg and i.buffer is not None]
            for infos in stage.grad_recv_info.values():
                grads += [i.buffer for i in infos if i.buffer is not None]
        return acts, grads

    def finish(self, measurement: Measurement) -> None:
        """Activations of one micro-batch (the first) on this rank's stages, the most held in flight, and the
        rank's account."""
        meter = getattr(self, "measured_meter", None)
        if meter is None:
            raise RuntimeError("finish() before the measured forward_backward")
        p, t = self.spec.parallel, self.spec.training
        M = self.microbatches
        per_mb = [sum(meter.saved.get((s, m), ChunkSaved()).total_bytes for s in self.stage_ids) for m in range(M)]
        first = [meter.saved.get((s, 0), ChunkSaved()) for s in self.stage_ids]
        by_layer = [
            saved.bytes_by_module.get(name, 0) if saved.bytes_by_module else 0
            for stage, saved in zip(self.stages, first, strict=True)
            for name, _ in stage.named_blocks()
        ]
        mem = measurement.memory_bytes
        mem.activations = per_mb[0]
        mem.activations_layers = sum(by_layer)
        mem.activations_other = per_mb[0] - sum(by_layer)
        mem.activations_in_flight = meter.ledger.peak_bytes
        measurement.activations_by_layer = by_layer
        dtypes: dict[str, int] = {}
        for saved in first:
            dtypes = merge_counts(dtypes, saved.bytes_by_dtype or {})
        measurement.activations_by_dtype = dtypes
        measurement.saved_parameter_bytes = sum(saved.excluded_bytes for saved in first)

        acts, grads = self._receive_buffers()
        named = {
            "activation receive buffers": unique_storage_bytes(acts),
            "gradient receive buffers": unique_storage_bytes(grads),
            "stage outputs kept for backward (most at once)": meter.outputs_peak,
            "concatenated micro-batch inputs": self.input_bytes,
        }
        predicted = in_flight_chunks(p.pp_schedule, p.pp, M, self.pp_rank, p.virtual_stages)
        blocks = [int(i) for stage in self.stages for i in stage.blocks]
        notes = [
            f"in flight: {meter.ledger.peak_chunks} stage forwards held saved tensors at once "
            f"(formulas.parallel.in_flight_chunks: {predicted}); at the peak: "
            + ", ".join(f"stage {s} mb {m}" for s, m in meter.ledger.chunks_at_peak),
            "activations: one micro-batch (the first) through this rank's stages, its loss on the last stage; "
            "a non-first stage's first block saves its input, which is the engine's receive buffer for that "
            "micro-batch (allocated once for the run, named in named_bytes)",
            "stage outputs stay alive after the forward (named_bytes): in the stage's forward cache until the "
            "micro-batch's backward, and in the schedule's loop until the next forward returns; the hidden state "
            "on a non-last stage, the whole logits on the last (a plain forward frees them after the loss)",
        ]
        if p.pp_schedule in SPLIT_BACKWARD:
            notes.append(
                "zero bubble: each micro-batch's input-gradient pass keeps its saved tensors (retain_graph) until "
                "its weight pass, which rank r runs r micro-batches later: more in flight than the warm-up"
            )
        if self.spec.model.arch.tied_embeddings and self.n_stages - 1 in self.stage_ids and 0 not in self.stage_ids:
            notes.append(
                "tied output layer: the last stage keeps its own copy of the token embedding; torch's pipelining "
                "does not all-reduce the two copies' gradients (Megatron-LM does), so they train apart"
            )
        if self.gathered is not None:
            named["gathered parameters (most at once)"] = self.gathered.max_bytes
            notes.append(
                "FSDP2 inside the stages: torch's PipelineStage runs every micro-batch's backward without resharding "
                "or reducing (set_reshard_after_backward(False), set_requires_gradient_sync(False)) and reduces once "
                "after the last (perform_reduce_grad): the stage's units stay gathered from their first backward and "
                "their gradients accumulate unsharded (in fp32 under bf16-mixed) until the step"
            )
        schedule = type(self.schedule).__name__
        measurement.engine = PipelineAccount(
            rank=self.layout.rank,
            world_size=self.layout.world_size,
            mesh=dict(self.layout.sizes),
            coords=dict(self.layout.coords),
            engine=(
                f"torch.distributed.pipelining {schedule}: {self.n_stages} stages over pp {p.pp}"
                + (f" (v {p.virtual_stages} per rank)" if p.virtual_stages > 1 else "")
                + f", {M} micro-batches of {t.batch}"
                + (f", tensor parallel {p.tp} within each stage" if p.tp > 1 else "")
                + (f", FSDP2 fully_shard per block and stage root over dp {p.dp}" if self.gathered is not None else "")
            ),
            parameter_elements=sum(local_tensor(q).numel() for q in self.model.parameters()),
            blocks=blocks,
            stages=list(self.stage_ids),
            schedule=p.pp_schedule,
            microbatches=M,
            in_flight_microbatches=meter.ledger.peak_chunks,
            activations_per_microbatch=per_mb,
            named_bytes=named,
            notes=notes,
        )
