"""The pipeline trainer's parts (`harness.trainers.pipeline`): the stage modules cut from the reference GPT, and
the first step's accounting of what each (stage, micro-batch) forward saves and how much of it is alive at once.

    StageModule      one stage: its blocks, the embeddings on the first, final norm and head on the last
    keep_only        drop from the model what this rank's stages do not run
    SavedLedger      saved storages still held by autograd across the schedule (the in-flight bytes)
    ChunkTracker     a SavedTensorTracker per stage forward that also feeds the ledger
    Meter            the first step's per-chunk counts, the ledger, and the stage outputs kept for backward
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from harness.memtrack import SavedTensorTracker, storage_of

Chunk = tuple[int, int]
"""(stage index, micro-batch index): one stage forward of one micro-batch."""


@contextlib.contextmanager
def flop_counter_without_module_hooks():
    """Suspend the module tracking of an active `FlopCounterMode` (its total is unchanged: it counts every op
    it dispatches; only the per-module split stops). Its backward hooks (`register_multi_grad_hook` on module
    inputs) fail inside the zero-bubble input-gradient pass, torch 2.13: "A leaf node was passed to
    _will_engine_execute_node but we are currently running autograd.grad()" (a stage input is a leaf)."""
    # FlopCounterMode enters an inner dispatch mode that points back at it (`counter`).
    counters = [
        m.counter
        for m in _get_current_dispatch_mode_stack()
        if isinstance(getattr(m, "counter", None), FlopCounterMode)
    ]
    for counter in counters:
        counter.mod_tracker.__exit__()
    try:
        yield
    finally:
        for counter in counters:
            counter.mod_tracker.__enter__()


class StageModule(nn.Module):
    """One pipeline stage of the reference GPT: its blocks, with the embeddings on the first stage and the final
    norm and output layer on the last. The modules are the model's own (not copies), so the stage trains them."""

    def __init__(self, model: nn.Module, index: int, n_stages: int, blocks: range) -> None:
        super().__init__()
        self.index = index
        # Only the modules the stage runs are attributes (`hasattr` tells a stage's part, as
        # `harness.trainers.tensor.apply_tensor_parallel` reads it).
        if index == 0:
            self.wte = model.wte
            if model.wpe is not None:
                self.wpe = model.wpe
                self.register_buffer("positions", model.positions, persistent=False)
            self.drop = model.drop
        # Keyed by the block's index in the model, so that measured activations name the model's blocks.
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        if index == n_stages - 1:
            self.ln_f = model.ln_f
            self.lm_head = model.lm_head

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """(`blocks.<model index>`, block) for each block of the stage, in order."""
        return [(f"blocks.{i}", block) for i, block in self.blocks.items()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As `GPT.prefill`, over this stage's part: ids (B, T) → hidden (B, T, h) → ... → logits (B, T, V)."""
        if hasattr(self, "wte"):
            # The schedule splits the step's concatenated ids into views of one storage; a copy gives each
            # micro-batch its own (B, T) ids, as a data loader hands them, so that the ids the embedding saves
            # are this micro-batch's B·T·8 bytes, not the whole step's.
            ids = x.clone()
            x = self.wte(ids)  # (B, T, h)
            if hasattr(self, "wpe"):
                x = x + self.wpe(self.positions[: ids.size(1)])  # (T, h) broadcast over the batch
            x = self.drop(x)
        for block in self.blocks.values():
            x = block(x)
        if hasattr(self, "lm_head"):
            x = self.lm_head(self.ln_f(x))  # (B, T, V)
        return x


def keep_only(model: nn.Module, stages: list[StageModule]) -> None:
    """Drop from `model` every module and buffer that none of this rank's `stages` runs, so that the
    parameters and buffers it still holds are this rank's (and the others are freed).

    A tied output layer on the last stage keeps the embedding matrix as its own parameter once the first
    stage's embedding is dropped: torch's pipelining has no shared-parameter gradient sync, so the two copies
    (first and last rank) train apart; Megatron-LM all-reduces their gradients (Narayanan et al. 2021, §4.1)."""
    kept_blocks = {int(i) for stage in stages for i in stage.blocks}
    if not any(hasattr(stage, "wte") for stage in stages):
        model.wte = None
        if model.wpe is not None:
            model.wpe = None
            model.positions = None
    for i in range(len(model.blocks)):
        if i not in kept_blocks:
            model.blocks[i] = nn.Identity()
    if not any(hasattr(stage, "lm_head") for stage in stages):
        model.ln_f = None
        model.lm_head = None


@dataclass(slots=True)
class _Held:
    nbytes: int
    chunk: Chunk
    aliases: int = 0


class SavedLedger:
    """Bytes of the storages saved for backward that autograd still holds, across every stage forward of a
    step: a storage enters when a forward first saves it and leaves when autograd drops its last saved alias
    (that micro-batch's backward). `peak_bytes` is the most held at once, `peak_chunks` the most (stage,
    micro-batch) forwards holding saved storages at once. Storages in `exclude` (parameters) are not counted."""

    def __init__(self, exclude: set[int]) -> None:
        self._exclude = exclude
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_chunks = 0
        self.chunks_at_peak: list[Chunk] = []
        self._held: dict[int, _Held] = {}
        self._per_chunk: dict[Chunk, int] = {}
        self._refs: set[weakref.ref] = set()

    def hold(self, chunk: Chunk, t: torch.Tensor, packed: torch.Tensor) -> None:
        """Autograd saved `t` (as the alias `packed`) in the forward of `chunk`."""
        key = storage_of(t)._cdata
        if key in self._exclude:
            return
        held = self._held.get(key)
        if held is None:  # a held storage is alive (its aliases hold it), so its address is its own
            held = _Held(storage_of(t).nbytes(), chunk)
            self._held[key] = held
            self.live_bytes += held.nbytes
            self._per_chunk[chunk] = self._per_chunk.get(chunk, 0) + 1
        held.aliases += 1
        self._refs.add(weakref.ref(packed, partial(self._release, key, held)))
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.chunks_at_peak = sorted(self._per_chunk)
        self.peak_chunks = max(self.peak_chunks, len(self._per_chunk))

    def _release(self, key: int, held: _Held, ref: weakref.ref) -> None:
        self._refs.discard(ref)
        held.aliases -= 1
        if held.aliases:
            return
        self.live_bytes -= held.nbytes
        self._per_chunk[held.chunk] -= 1
        if not self._per_chunk[held.chunk]:
            del self._per_chunk[held.chunk]
        if self._held.get(key) is held:
            del self._held[key]

    def holds(self, t: torch.Tensor) -> bool:
        return storage_of(t)._cdata in self._held


class ChunkTracker(SavedTensorTracker):
    """A `SavedTensorTracker` for one stage's forwards that also tells the step's ledger what it saves."""

    def __init__(self, ledger: SavedLedger, exclude: nn.Module, modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__(exclude=exclude, modules=modules)
        self.ledger = ledger
        self.chunk: Chunk = (-1, -1)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        packed = super()._pack(t)
        self.ledger.hold(self.chunk, t, packed)
        return packed


@dataclass
class ChunkSaved:
    """What one (stage, micro-batch) forward saved for backward (its loss included on the last stage)."""

    total_bytes: int = 0
    bytes_by_module: dict[str, int] | None = None
    bytes_by_dtype: dict[str, int] | None = None
    excluded_bytes: int = 0

    def add(self, tracker: SavedTensorTracker) -> None:
        self.total_bytes += tracker.total_bytes
        self.excluded_bytes += tracker.excluded_bytes
        self.bytes_by_module = merge_counts(self.bytes_by_module, tracker.bytes_by_module)
        dtypes = {str(k).removeprefix("torch."): v for k, v in tracker.bytes_by_dtype.items()}
        self.bytes_by_dtype = merge_counts(self.bytes_by_dtype, dtypes)


def merge_counts(a: dict[str, int] | None, b: dict[str, int]) -> dict[str, int]:
    out = dict(a or {})
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


class Meter:
    """The first step's accounting: per-chunk saved bytes, the ledger, and the stage outputs kept for backward."""

    def __init__(self, model: nn.Module, stages: list[StageModule]) -> None:
        exclude = {storage_of(t)._cdata for t in (*model.parameters(), *model.buffers())}
        self.ledger = SavedLedger(exclude)
        self.trackers = {s.index: ChunkTracker(self.ledger, model, s.named_blocks()) for s in stages}
        self.loss_tracker = ChunkTracker(self.ledger, model, [])
        self.saved: dict[Chunk, ChunkSaved] = {}
        self.last_forward: Chunk = (-1, -1)
        self.outputs_live = 0
        self.outputs_peak = 0
        self._output_refs: set[weakref.ref] = set()

    @contextlib.contextmanager
    def forward(self, chunk: Chunk, tracker: ChunkTracker):
        tracker.chunk = chunk
        with tracker:
            yield
        self.saved.setdefault(chunk, ChunkSaved()).add(tracker)

    def keep_outputs(self, outputs: tuple) -> None:
        """The stage's outputs, kept in its forward cache until the micro-batch's backward: counted while
        alive where no saved tensor already holds their storage."""
        for t in outputs:
            if not isinstance(t, torch.Tensor) or self.ledger.holds(t):
                continue
            storage = storage_of(t)
            nbytes = storage.nbytes()
            self.outputs_live += nbytes
            self.outputs_peak = max(self.outputs_peak, self.outputs_live)
            self._output_refs.add(weakref.ref(storage, partial(self._output_freed, nbytes)))

    def _output_freed(self, nbytes: int, ref: weakref.ref) -> None:
        self._output_refs.discard(ref)
        self.outputs_live -= nbytes
