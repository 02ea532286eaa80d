"""DeepSpeed ZeRO 0-3 behind the trainer protocol, with an exact per-rank account of what the engine holds.

The engine is built from the spec's config (`harness.zero.config`); `harness.zero.accounting` walks it at
each snapshot the protocol asks for (after init, after the last backward of a step, after the step, and at
the steady state), and `finish` turns the walk into the rank's `ZeroAccount`. Instrumentation samples what
no snapshot sees: ZeRO-1's full gradients before reduction, the IPG bucket, ZeRO-3's gathered parameters.
"""

from __future__ import annotations

import contextlib
import logging
import time

import deepspeed
import torch
import torch.distributed as dist

from formulas.precision import is_mixed
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.processes import single_process_rendezvous
from harness.records import Measurement
from harness.trainers.plain import PlainTrainer, make_torch_optimizer
from harness.zero.account import TERMS, Buckets, Explained, Snapshot, ZeroAccount
from harness.zero.accounting import TRACKER_CATEGORY, Accountant, is_zero3_param, live_storage_bytes, totals
from harness.zero.config import effective_config

SETTLE_S = 2.0
"""Longest wait for communication threads to release a finished collective's tensors (see `_residual`)."""


def init_distributed(device_type: str) -> None:
    """The default process group: NCCL on CUDA, gloo on CPU.

    Under a launcher (torchrun, deepspeed) RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are
    set; a single process sets them itself, or `deepspeed.init_distributed` falls back to MPI discovery
    (`deepspeed.comm.comm.init_distributed`, `auto_mpi_discovery`), which needs mpi4py.
    """
    if dist.is_initialized():
        return
    single_process_rendezvous()
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


class DeepSpeedTrainer:
    """The `harness.trainers.protocol.Trainer` protocol over a DeepSpeed engine, with the per-rank account.

    The term methods return device bytes (what a GPU holds); host bytes of offloaded state are in the
    account (`finish`). Snapshots are taken where the protocol asks: weights after the engine
    is built, gradients after the last backward of a step, optimizer state after the step.
    """

    schedules_microbatches = False

    def __init__(self, model, spec: RunSpec, *, device_type: str, probe=None):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed(device_type)
        # A first barrier before the baseline: on torch 2.11 the first `dist.barrier()` leaves a 1-byte tensor
        # alive for the life of the process group, which DeepSpeed's own barriers would otherwise add to the
        # residual of every ZeRO-3 snapshot (seen with torch 2.11's CPU build; torch 2.13 keeps none).
        dist.barrier()
        self.spec = spec
        self.model = model
        self.device_type = device_type
        self.probe = probe
        self.mixed = is_mixed(spec.training.precision)
        self.config = effective_config(spec)
        # Live bytes that are not the model's (the inputs): the residual's baseline. The exact live tracker,
        # not the CUDA allocator, on every device: it counts host (offloaded) storages too, unrounded, as
        # the walk does.
        own = live_storage_bytes([*model.parameters(), *model.buffers()])
        self._baseline = (probe.tracker.live_bytes - own) if probe is not None else 0
        params = [p for p in model.parameters() if p.requires_grad]
        client = (
            None if "optimizer" in self.config else make_torch_optimizer(spec.training.optimizer, params, device_type)
        )
        previous = probe.tracker.category if probe is not None else None
        if probe is not None:
            probe.tracker.category = "engine init"  # what the walk misses is named by the phase that made it
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=client, config=self.config
            )
        finally:
            if probe is not None:
                probe.tracker.category = previous
        self.stage = self.engine.zero_optimization_stage()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self._micro = 0
        self._account = Accountant(self.engine, self.config, device_type)
        self.snapshots: dict[str, Snapshot] = {}
        self._before_reduction: int | None = None
        self._bucket_bytes_max = 0
        self._gathered = {"forward": 0, "backward": 0}
        self._sampling = True
        self._hooks: list = []
        self._instrument()
        self._snapshot("after_init")

    # ---- instrumentation: full gradients before ZeRO-1 reduces them, buckets, ZeRO-3 gathered params ----
    def _instrument(self) -> None:
        opt = self.engine.optimizer
        if hasattr(opt, "reduce_gradients") and self.stage == 1:
            original = opt.reduce_gradients

            def reduce_gradients(*args, **kwargs):
                if self._sampling and self._before_reduction is None:
                    self._before_reduction = live_storage_bytes(p.grad for p in self.model.parameters())
                return original(*args, **kwargs)

            opt.reduce_gradients = reduce_gradients
        if hasattr(opt, "setup_buckets"):
            setup = opt.setup_buckets

            def setup_buckets(*args, **kwargs):
                out = setup(*args, **kwargs)
                if self._sampling:
                    held = live_storage_bytes(t for b in opt.ipg_buckets.values() for t in b.buffer)
                    self._bucket_bytes_max = max(self._bucket_bytes_max, held)
                return out

            opt.setup_buckets = setup_buckets
        if self.stage == 3:
            for module in self.model.modules():
                self._hooks.append(module.register_forward_pre_hook(lambda *_: self._sample_gathered("forward")))
            for p in self.model.parameters():
                if p.requires_grad:
                    self._hooks.append(
                        p.register_post_accumulate_grad_hook(lambda *_: self._sample_gathered("backward"))
                    )

    def _sample_gathered(self, phase: str) -> None:
        """Bytes of ZeRO-3 parameters gathered whole right now (the module in use and those prefetched),
        persistent ones excluded: the `zero3_live_params` term."""
        if not self._sampling:
            return
        live = live_storage_bytes(
            p.data for p in self.model.parameters() if p.data.numel() and not getattr(p, "ds_persist", False)
        )
        self._gathered[phase] = max(self._gathered[phase], live)

    @contextlib.contextmanager
    def _zero3_saved_parameters(self):
        """Let autograd save ZeRO-3 parameters as themselves while a saved-tensor tracker is active.

        Without hooks autograd keeps a leaf parameter itself, so when ZeRO-3 releases it (an empty
        `param.data`) the gathered storage is freed and backward re-gathers it. A tracker's pack hook
        (`SavedTensorTracker`) keeps a detached alias instead, which would pin every gathered storage until
        backward: the whole model. These inner hooks hand parameters back as they are and pass every other
        tensor to the tracker; parameters are model state, not activations, so the tracker need not see them.

        The tracker also keys the parameters it excludes by storage address, taken before the forward: the
        empty placeholders ZeRO-3 leaves in `param.data`. Gathering replaces and frees them, and an activation
        allocated at a freed address would be taken for a parameter; holding them for the forward prevents that.
        """
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if self.stage != 3 or top is None:
            yield
            return
        placeholders = [p.data for p in self.model.parameters()]  # noqa: F841 (held, not used)
        outer_pack, outer_unpack = top

        def pack(t):
            return (True, t) if is_zero3_param(t) else (False, outer_pack(t))

        def unpack(packed):
            is_param, value = packed
            return value if is_param else outer_unpack(value)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    # ---- the Trainer interface ----
    def forward(self, batch: dict):
        with self._zero3_saved_parameters():
            return self.engine(**batch)

    def backward(self, loss) -> None:
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed counts the micro-step and steps nothing

    def step(self) -> None:
        self.engine.step()
        self._micro = 0

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    train_step = PlainTrainer.train_step  # the same micro-batch loop, over the engine's forward, backward and step

    def infer(self, batch: dict):
        raise UsageError("DeepSpeed runs are measured in training mode only")

    def compile(self) -> str:
        raise UsageError("--compile is for one process without ZeRO (the plain trainer)")

    def weight_bytes(self) -> int:
        return self.snapshots["after_init"].totals["weights"].device

    def buffer_bytes(self) -> int:
        return live_storage_bytes(self.model.buffers())

    def gradient_bytes(self) -> int:
        return self._snapshot("after_backward").totals["gradients"].device

    def optimizer_tensors(self) -> list:
        best = self._account.walk()
        return [t for rule, _, t in best.values() if rule.term == "optimizer"]

    def optimizer_bytes(self) -> int:
        return self._snapshot("after_step").totals["optimizer"].device

    # ---- the account ----
    def _snapshot(self, name: str) -> Snapshot:
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # collectives in flight still hold their buffers
        held, by_term = self._account.snapshot()
        if self.probe is not None:
            # Tensors made without a dispatched op (torch.tensor(...): AdamW's step) are invisible to the live
            # tracker until registered; after this the residual is what it saw and the walk did not find.
            # Each storage is labelled with its term, so that a peak's breakdown names DeepSpeed's buffers.
            for term, tensors in by_term.items():
                self.probe.tracker.track(*tensors, category=TRACKER_CATEGORY[term])
        placed = totals(held)
        walked = sum(p.device + p.host for p in placed.values())
        snap = Snapshot(totals=placed, held=held)
        if self.probe is not None:
            residual, settle_ms = self._residual(walked)
            # Live storages the walk did not reach keep the label of the phase that allocated them.
            named = {*TRACKER_CATEGORY.values(), "inputs", "model"}  # "model": built before the engine
            by_phase = {c: b for c, b in self.probe.tracker.snapshot().items() if c not in named}
            snap = Snapshot(placed, held, residual, settle_ms, by_phase)
        self.snapshots[name] = snap
        return snap

    def _residual(self, walked: int) -> tuple[int, float]:
        """Live bytes not walked, once the communication threads have let go of the last collective's tensors.

        A gloo (or NCCL) work object references its tensors until its worker thread releases it, which can be
        a moment after the collective has completed for the caller: under CPU contention the last bucket of
        a backward was seen alive that way. Wait up to `SETTLE_S` for such transients; what remains is real.
        """
        tracker = self.probe.tracker
        residual = tracker.live_bytes - self._baseline - walked
        t0 = time.perf_counter()
        while residual > 0 and time.perf_counter() - t0 < SETTLE_S:
            time.sleep(0.005)
            residual = tracker.live_bytes - self._baseline - walked
        return residual, round((time.perf_counter() - t0) * 1e3, 1)

    def finish(self, measurement: Measurement) -> None:
        """The account in `measurement.engine`, and the terms set to the steady state (after a step)."""
        self._sampling = False
        for handle in self._hooks:
            handle.remove()
        final = self._snapshot("steady").totals
        mem = measurement.memory_bytes
        mem.weights = final["weights"].device
        mem.zero3_live_params = self._gathered["forward"] if self.stage == 3 else 0
        mem.zero_extras = final["extras"].device
        mem.host_model_states = sum(final[t].host for t in TERMS)
        explained = self._account.explanations()
        if self._before_reduction is not None:
            explained["gradients_before_reduction_bytes"] = self._before_reduction
        explained["reduce_bucket_bytes_max"] = self._bucket_bytes_max
        if self.stage == 3:
            explained["zero3_gathered_forward_max_bytes"] = self._gathered["forward"]
            explained["zero3_gathered_backward_max_bytes"] = self._gathered["backward"]
        zero_cfg = self.config.get("zero_optimization", {})
        measurement.engine = ZeroAccount(
            stage=self.stage,
            rank=self.rank,
            world_size=self.world_size,
            optimizer_class=type(self.engine.optimizer).__name__,
            base_optimizer_class=type(getattr(self.engine, "basic_optimizer", None)).__name__,
            config=self.config,
            buckets=Buckets(
                reduce_bucket_elements=zero_cfg.get("reduce_bucket_size"),
                allgather_bucket_elements=zero_cfg.get("allgather_bucket_size"),
                prefetch_bucket_elements=zero_cfg.get("stage3_prefetch_bucket_size"),
                param_persistence_threshold=zero_cfg.get("stage3_param_persistence_threshold"),
                overlap_comm=bool(getattr(self.engine, "zero_overlap_comm", lambda: False)()),
            ),
            explained_bytes=Explained(**explained),
            snapshots=dict(self.snapshots),
            host_bytes={t: final[t].host for t in TERMS},
        )
        measurement.methods = {
            **measurement.methods,
            "weights": "bytes DeepSpeed holds for parameters after a step (flat buffers with padding; ZeRO-3 "
            "partitions, persistent and gathered parameters), device only",
            "gradients": "bytes DeepSpeed holds for gradients after the last backward of a step (reduced "
            "partitions, param.grad, padding), device only",
            "optimizer": "bytes of the fp32 master partition and the base optimizer's state after a step",
            "zero3_live_params": "largest bytes of gathered, non-persistent ZeRO-3 parameters seen at any "
            "module's forward",
            "engine": "every tensor reachable from the engine, deduplicated by storage, by term and component; "
            "residual_bytes = live bytes − bytes before the engine − walked bytes",
        }
