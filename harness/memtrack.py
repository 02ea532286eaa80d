"""Exact, device-independent byte accounting for one training step.

Two accountants, both keyed by *untyped storage* (the buffer a tensor views), so that views,
transposes and reshapes of one buffer are counted once, exactly as an allocator would:

- ``SavedTensorTracker``: the bytes autograd keeps alive for backward (the "activations" of the
  memory formulas), recorded through saved-tensor hooks around a forward pass.
- ``LiveTensorTracker``: live and peak bytes of every tensor storage, recorded through a
  ``TorchDispatchMode``. It is the CPU stand-in for ``torch.cuda.max_memory_allocated``, which
  has no CPU counterpart, and it also works under ``FakeTensorMode`` (shapes without data).

Both count raw ``nbytes``. The CUDA caching allocator rounds every block up to 512 bytes; add
that rounding when predicting CUDA numbers from these counts.

A storage is keyed by ``storage._cdata``, the address of its C++ ``StorageImpl``. It is valid
for real tensors and for fake tensors (whose ``data_ptr()`` is 0). An address is unique only
while its storage is alive, so each record also holds a *weak* reference to the storage's Python
object (a strong one would change what is alive). Once a ``StorageImpl`` has a Python object,
PyTorch keeps that one object until the ``StorageImpl`` dies and destroys it then, so
``record.storage() is storage`` tells a still-alive storage apart from a new one that reuses a
dead one's address, and a weakref callback fires before the address can be reused.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

OTHER = "other"


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds `t`'s bytes on this rank: a DTensor's local shard (a DTensor is a
    wrapper without storage of its own; tensor-parallel and FSDP2 parameters and activations are DTensors),
    else `t` itself."""
    inner = getattr(t, "_local_tensor", None)
    return t if inner is None else local_tensor(inner)


def storage_of(t: torch.Tensor) -> torch.UntypedStorage:
    """The untyped storage behind `t` on this rank (a DTensor's: its local shard's)."""
    return local_tensor(t).untyped_storage()


@dataclass(slots=True)
class _SavedStorage:
    storage: weakref.ref
    nbytes: int
    module: str
    dtype: torch.dtype
    excluded: bool
    packed: list[weakref.ref] = field(default_factory=list)  # the aliases autograd holds

    def kept(self) -> bool:
        return any(alias() is not None for alias in self.packed)


class SavedTensorTracker:
    """Count the unique storages autograd saves for backward while the context is active.

    Wrap only the forward pass, and keep its output (it holds the graph)::

        with SavedTensorTracker(exclude=model, modules=list(model.blocks.named_children())) as saved:
            loss = model(x).sum()
        saved.total_bytes, saved.bytes_by_module

    Parameters and buffers are model state, not activations, but autograd saves them too (a
    Linear saves its weight, ``masked_fill`` saves a registered causal mask). Storages of the
    tensors in ``exclude`` (a module: its parameters and buffers) are therefore counted apart, in
    ``excluded_bytes``. The set is taken when the tracker is built, so parameters swapped in
    during forward (ZeRO-3 gathers) count as activations.

    ``modules`` is a list of ``(name, module)``; each newly saved storage is attributed to the
    innermost of them running when it was first saved, else to ``"other"``. The dtype of the
    first tensor saved from a storage labels all of it in ``bytes_by_dtype``.

    What the hooks see is exactly what autograd stores, which matters for recomputation:

    - ``torch.utils.checkpoint`` saves the checkpointed function's inputs through an autograd
      Function and then installs its own saved-tensor hooks, so only those inputs are counted;
      tensors recomputed in backward are not stored and not counted. The inputs are saved
      before the checkpointed module's forward hook runs, so they are attributed to the module
      enclosing the ``checkpoint`` call.
    - Selective activation checkpointing (``create_selective_checkpoint_contexts``) caches the
      outputs of its must-save ops inside the checkpoint, not through saved-tensor hooks: they
      are invisible here (use ``LiveTensorTracker`` to see them).
    - Any other saved-tensor hooks installed inside the tracked region (CPU offloading) hide the
      tensors they pack in the same way.

    "Kept" means autograd still holds a saved alias of the storage when the context exits. A
    storage whose every saved alias was released before then (its part of the graph was
    dropped during forward) is not kept for backward, even if the storage itself is still
    alive. Counts are final at exit and read zero before; a tracker can be re-entered, and each
    entry starts afresh. Every saved storage lands in exactly one of three totals:

    - ``total_bytes`` (``count`` storages): kept and not excluded, split by ``bytes_by_module``
      and ``bytes_by_dtype``; the activation memory.
    - ``excluded_bytes``: kept storages of ``exclude`` (parameters, buffers).
    - ``released_bytes``: saved during forward but no longer held at exit.
    """

    def __init__(
        self,
        exclude: nn.Module | Iterable[torch.Tensor] | None = None,
        modules: Iterable[tuple[str, nn.Module]] = (),
    ) -> None:
        if isinstance(exclude, nn.Module):
            exclude = itertools.chain(exclude.parameters(), exclude.buffers())
        self._excluded_keys = {storage_of(t)._cdata for t in exclude or ()}
        self._modules = list(modules)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._reset()

    def _reset(self) -> None:
        self.total_bytes = 0
        self.count = 0
        self.excluded_bytes = 0
        self.released_bytes = 0
        self.bytes_by_module: dict[str, int] = {}
        self.bytes_by_dtype: dict[torch.dtype, int] = {}
        self._saved: dict[int, _SavedStorage] = {}
        self._replaced: list[_SavedStorage] = []
        self._active_modules: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SavedTensorTracker:
        self._reset()
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(partial(self._enter_module, name)))
            self._handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active_modules.clear()
        for record in [*self._saved.values(), *self._replaced]:
            if not record.kept():
                self.released_bytes += record.nbytes
            elif record.excluded:
                self.excluded_bytes += record.nbytes
            else:
                nbytes = record.storage().nbytes()  # alive: a kept alias holds it; re-read in case it grew
                self.total_bytes += nbytes
                self.count += 1
                self.bytes_by_module[record.module] = self.bytes_by_module.get(record.module, 0) + nbytes
                self.bytes_by_dtype[record.dtype] = self.bytes_by_dtype.get(record.dtype, 0) + nbytes
        self._saved.clear()
        self._replaced.clear()

    def _enter_module(self, name: str, module: nn.Module, args: object) -> None:
        self._active_modules.append(name)

    def _exit_module(self, module: nn.Module, args: object, output: object) -> None:
        self._active_modules.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Return a detached alias, not ``t``: for a saved *output*, ``t`` carries the grad_fn that
        # owns this saved value, and holding it would form a C++-side reference cycle that even
        # gc.collect() cannot free if the graph is dropped without backward. Autograd restores
        # the grad_fn on unpack; the alias shares the storage, so nothing is copied. Autograd
        # holds the alias exactly as long as it keeps the saved tensor, so a weakref to it tells
        # whether the storage is still kept for backward.
        packed = t.detach()
        storage = storage_of(t)
        key = storage._cdata
        record = self._saved.get(key)
        if record is None or record.storage() is not storage:
            if record is not None:  # the storage first saved here died; this one reuses its address
                self._replaced.append(record)
            module = self._active_modules[-1] if self._active_modules else OTHER
            excluded = key in self._excluded_keys
            record = _SavedStorage(weakref.ref(storage), storage.nbytes(), module, t.dtype, excluded)
            self._saved[key] = record
        record.packed.append(weakref.ref(packed))
        return packed


def _storage_keys(leaves: Iterable[object]) -> set[int]:
    return {storage_of(leaf)._cdata for leaf in leaves if isinstance(leaf, torch.Tensor)}


@dataclass(slots=True)
class _LiveStorage:
    ref: weakref.ref
    nbytes: int
    category: str
    born: int = 0
    """The tracker's op count when the storage was registered."""


class LiveTensorTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages, exact to the byte, on any device.

    Every op's outputs pass through ``__torch_dispatch__``, backward included (the autograd
    engine dispatches its ops with the mode active), so each storage an op allocates is
    registered when it is created, and a weakref callback subtracts it when it is freed.

    Tensors that existed before the mode was entered (parameters, gradients, optimizer state,
    inputs) count only once registered with ``track``. Until then they are invisible: an op that
    views or mutates one in place returns an input's storage, which allocates nothing and is
    not registered. So without ``track`` the counts are bytes allocated since entry, the same
    quantity the profiler's allocator events give.

    Peaks are sampled after each op, which is where allocations happen. A kernel's internal
    allocations that do not go through the dispatcher are not seen; the profiler does see them.
    Measured: AdamW's single-tensor update wraps Python scalars into 0-dim tensors inside
    ``add_``/``mul_``/``div`` (4 bytes each, freed at once), 12 bytes of profiler peak on a tiny
    MLP; a forward and backward of Linear/ReLU/GELU/LayerNorm/softmax/dropout had none.

    An op's output storage that is already known is re-measured, so ``Tensor.resize_`` and
    ``out=`` ops that grow a buffer are accounted. ``UntypedStorage.resize_`` (FSDP's way of
    freeing parameters) bypasses the dispatcher: it is seen only when a later op outputs a
    tensor on that storage. DeepSpeed ZeRO-3 frees by assigning ``param.data``, which is seen.

    Tensors on the ``meta`` device are skipped: they report ``nbytes`` but allocate nothing (DeepSpeed
    ZeRO-1/2 keeps one per parameter as a shape record). Fake tensors report their fake device, so
    they are counted.

    Each storage carries a category: ``track(..., category=...)`` sets it for existing tensors
    (and relabels them), and storages created by ops take the tracker's current ``category``
    (set it per phase, e.g. ``"forward"`` then ``"backward"``). ``snapshot()`` splits live
    bytes by category and ``peak_snapshot`` is that split at the peak; ``peak_category`` is the category
    that was current when the peak was reached (the phase the peak happened in). ``record_timeline()``
    starts keeping the live bytes after every op with the current category, for a picture of a step.

    With ``FakeTensorMode``, enter the fake mode first and this tracker second, so that this
    (innermost) mode sees each op first and registers the fake outputs::

        with fake_mode, LiveTensorTracker() as mem:
            mem.track(*model.parameters(), category="params")
            model(x).sum().backward()

    Frees keep being counted after the context exits (the callbacks stay attached to registered
    storages); allocations are not.

    A storage can be freed on another thread: a process group's worker thread (gloo's) holds the
    tensors of a collective until it lets go of its work item, and when the step has already
    dropped them, the buffer is freed there, whenever that thread next runs and takes the GIL
    (measured: an FSDP2 all-gather output kept about 30 ops longer, in 2 of 5 runs of 4 ranks on
    2 cores). The counters are updated under a lock, so such a free is counted exactly when it
    happens; and
    ``peak_backend_freed`` is the bytes live at the current peak that another thread freed after
    it, so the same program with every such buffer freed when the step dropped it peaks between
    ``peak_bytes - peak_backend_freed`` and ``peak_bytes``.
    """

    def __init__(self, category: str = OTHER) -> None:
        super().__init__()
        self.category = category
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_snapshot: dict[str, int] = {}
        self.peak_category = category
        self.timeline: list[tuple[str, int]] | None = None
        self._recording = False
        self._live_by_category: dict[str, int] = {}
        self._storages: dict[int, _LiveStorage] = {}
        self.peak_backend_freed = 0
        self._ops = 0
        self._peak_op = 0
        self._owner = threading.get_ident()
        self._lock = threading.RLock()  # frees may run on a process group's worker thread

    def track(self, *tensors: object, category: str | None = None) -> None:
        """Register tensors that already exist, or pytrees of them (lists, dicts, ``optimizer.state``).

        Non-tensor leaves are ignored. A storage that is already registered is relabelled.
        """
        category = self.category if category is None else category
        for leaf in pytree.tree_leaves(tensors):
            if isinstance(leaf, Iterator):
                raise TypeError("track() got an iterator; unpack it: track(*model.parameters())")
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                record = self._register(storage_of(leaf), category)
                self._add(record.category, -record.nbytes)
                record.category = category
                self._add(category, record.nbytes)
        self._update_peak()

    def remeasure(self, *tensors: torch.Tensor, category: str | None = None) -> None:
        """Re-read the size of each tensor's storage after a resize the dispatcher does not see
        (`UntypedStorage.resize_`: FSDP2 frees and re-allocates its gathered parameters that way). A known
        storage keeps its category unless `category` is given; an unknown one is registered under it."""
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = storage_of(t)
            record = self._storages.get(storage._cdata)
            if record is None or record.ref() is not storage:
                if storage.nbytes():
                    self._register(storage, category or self.category)
                continue
            if category is not None and category != record.category:
                self._add(record.category, -record.nbytes)
                record.category = category
                self._add(category, record.nbytes)
            self._register(storage, record.category)
        self._update_peak()

    def snapshot(self) -> dict[str, int]:
        """Live bytes by category (categories with no live bytes are left out)."""
        return {category: nbytes for category, nbytes in self._live_by_category.items() if nbytes}

    def reset_peak(self) -> None:
        """Start a new peak window at the current live bytes (e.g. before each step)."""
        with self._lock:
            self.peak_bytes = self.live_bytes
            self.peak_snapshot = self.snapshot()
            self.peak_category = self.category
            self.peak_backend_freed = 0
            self._peak_op = self._ops

    def record_timeline(self, on: bool = True) -> None:
        """Keep (category, live bytes) after every op from now on; `on=False` stops (the timeline is kept)."""
        self._recording = on
        if on:
            self.timeline = [(self.category, self.live_bytes)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._ops += 1
        input_keys = None
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue  # a meta tensor is a shape record with no memory behind it
            storage = storage_of(leaf)
            if storage._cdata not in self._storages:
                # An unknown storage is new unless the op only viewed or mutated an input's storage:
                # an untracked tensor from before entry must not be counted because an op touched it.
                if input_keys is None:
                    input_keys = _storage_keys(pytree.tree_leaves((args, kwargs)))
                if storage._cdata in input_keys:
                    continue
            self._register(storage, self.category)
        self._update_peak()
        if self._recording:
            self.timeline.append((self.category, self.live_bytes))
        return out

    def _register(self, storage: torch.UntypedStorage, category: str) -> _LiveStorage:
        """Return the record of ``storage``, creating it or re-measuring it (it may have grown)."""
        key = storage._cdata
        with self._lock:
            record = self._storages.get(key)
            if record is None:  # a dead storage's record is gone: its callback ran before its address was freed
                record = _LiveStorage(weakref.ref(storage, partial(self._on_free, key)), 0, category, self._ops)
                self._storages[key] = record
            nbytes = storage.nbytes()
            self._add(record.category, nbytes - record.nbytes)
            record.nbytes = nbytes
        return record

    def _on_free(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            record = self._storages.pop(key)
            self._add(record.category, -record.nbytes)
            if threading.get_ident() != self._owner and record.born <= self._peak_op:
                self.peak_backend_freed += record.nbytes

    def _add(self, category: str, nbytes: int) -> None:
        with self._lock:
            self._live_by_category[category] = self._live_by_category.get(category, 0) + nbytes
            self.live_bytes += nbytes

    def _update_peak(self) -> None:
        with self._lock:
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self.peak_snapshot = self.snapshot()
                self.peak_category = self.category
                self.peak_backend_freed = 0
                self._peak_op = self._ops


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = storage_of(t)
        seen.setdefault(st._cdata, st.nbytes())
    return sum(seen.values())
