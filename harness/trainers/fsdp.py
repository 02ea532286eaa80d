"""FSDP2 (`torch.distributed.fsdp.fully_shard`) behind the trainer protocol: ZeRO-3 by torch, one process per rank.

Each transformer block is one FSDP unit and the root (embeddings, final norm, head) another, as torchtitan
wraps them. Every parameter is a DTensor sharded on dim 0 over the data-parallel ranks (padded to a multiple
of N rows: `formulas.parallel.fsdp_shard_rows`); a unit's parameters are all-gathered before its forward and
backward, and freed after its forward when `reshard_after_forward` (the default) and after its backward.
Gradients are reduce-scattered into sharded DTensor gradients.

Precision is FSDP2's own: with `bf16-mixed` the sharded parameters, gradients and AdamW state are fp32 and a
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` casts each gathered unit to bf16 for compute:
4 + 4 + 8 = 16 bytes per parameter over N, the same total as ZeRO-3's 2 + 2 + 12 in other terms, and no
separate master copy. fp32 and pure bf16 shard the parameters as they are.

Measuring: FSDP2 frees and re-allocates the gathered parameters with `UntypedStorage.resize_`, which no
dispatched op shows, so the live tracker is told of each resize (`_tracked_resizes`); the gathered bytes
are labelled `gathered parameters` in the peak's breakdown and their maximum is reported by name.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
from torch.distributed.tensor import DTensor

from formulas.precision import is_mixed
from formulas.ranks import FSDP_UNSHARDED_SAVED
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.memtrack import unique_storage_bytes
from harness.records import Measurement
from harness.trainers.account import FSDPAccount
from harness.trainers.mesh import build_mesh
from harness.trainers.plain import PlainTrainer, make_torch_optimizer, param_dtype

GATHERED = "gathered parameters"


class _GatheredBytes:
    """The tracker told of FSDP2's storage resizes, and the most gathered bytes alive at once."""

    def __init__(self, probe):
        self.tracker = probe.tracker if probe is not None else None
        self.live: dict[int, int] = {}
        self.max_bytes = 0

    def resized(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self.live[storage._cdata] = storage.nbytes()
        self.max_bytes = max(self.max_bytes, sum(self.live.values()))
        if self.tracker is not None:
            self.tracker.remeasure(tensor, category=GATHERED)


@contextlib.contextmanager
def _tracked_resizes(gathered: _GatheredBytes):
    """Wrap FSDP2's `alloc_storage` and `free_storage` (module functions of `_fsdp_param`, imported by name
    into `_fsdp_param_group`) so that every resize is re-measured."""
    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc_storage(tensor):
        alloc(tensor)
        gathered.resized(tensor)

    def free_storage(tensor):
        free(tensor)
        gathered.resized(tensor)

    _fsdp_param.alloc_storage, _fsdp_param.free_storage = alloc_storage, free_storage
    _fsdp_param_group.alloc_storage = alloc_storage
    try:
        yield
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage = alloc, free
        _fsdp_param_group.alloc_storage = alloc


def mixed_policy(spec: RunSpec) -> MixedPrecisionPolicy | None:
    if not is_mixed(spec.training.precision):
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype(spec.training.precision), reduce_dtype=torch.float32)


def _to_fp32(model: nn.Module) -> None:
    """The parameters in fp32 as `model.float()` makes them (`param.data` replaced; a tensor-parallel DTensor
    swapped for a new parameter): fake tensors would take `_apply`'s `swap_tensors` path, which the trackers'
    weak references refuse. Buffers keep the compute dtype: FSDP2's policy casts parameters only, and fp32
    rotary tables would promote the queries and keys beside bf16 values."""
    replaced: dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_floating_point():
                    continue
                if isinstance(param.data, DTensor):  # tensor-parallel shards: a new parameter, as `_apply` swaps
                    if id(param) not in replaced:
                        replaced[id(param)] = nn.Parameter(param.data.float(), requires_grad=param.requires_grad)
                    module._parameters[name] = replaced[id(param)]
                else:
                    param.data = param.data.float()


def apply_fsdp(roots: nn.Module | list[nn.Module], mesh, spec: RunSpec, *, probe=None) -> _GatheredBytes:
    """`fully_shard` each block, then its root, over the 1-D data-parallel `mesh` (a model, or each pipeline
    stage of one: every stage is a root, as torchtitan shards them); returns the resize accountant (entered for
    the life of the process: the trainer's steps all need it)."""
    roots = roots if isinstance(roots, list) else [roots]
    policy = mixed_policy(spec)
    kwargs = {"mesh": mesh, "reshard_after_forward": spec.parallel.reshard_after_forward}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for root in roots:
        if is_mixed(spec.training.precision):
            _to_fp32(root)  # FSDP2's mixed precision: fp32 sharded parameters, bf16 compute (the policy)
        for block in root.blocks.children():
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)
    gathered = _GatheredBytes(probe)
    # Kept open for the life of the run (the process ends with it); held by `gathered`, for a generator
    # context manager that is collected runs its `finally` and would undo the wrapping at once.
    gathered.resizes = _tracked_resizes(gathered)
    gathered.resizes.__enter__()
    return gathered


class FSDPTrainer(PlainTrainer):
    """The plain trainer's steps over an FSDP2-sharded model; AdamW on the sharded fp32 (or pure) DTensors."""

    schedules_microbatches = False

    def __init__(self, model: nn.Module, spec: RunSpec, *, device_type: str, probe=None):
        self.layout = build_mesh(spec, device_type)
        self.spec = spec
        self.gathered = apply_fsdp(model, self.layout.mesh["dp"], spec, probe=probe)
        self.init_sharded(model, spec, device_type)

    @classmethod
    def over_sharded(cls, model: nn.Module, spec: RunSpec, device_type: str) -> FSDPTrainer:
        """The trainer's steps over a model another engine has already sharded (FSDP2 inside pipeline stages:
        `harness.trainers.pipeline`), with no mesh or sharding of its own."""
        trainer = cls.__new__(cls)
        trainer.spec = spec
        trainer.init_sharded(model, spec, device_type)
        return trainer

    def init_sharded(self, model: nn.Module, spec: RunSpec, device_type: str) -> None:
        """The plain trainer's state over FSDP2-sharded parameters: no autocast, no master copy."""
        self.model = self._module = model
        self.precision, self.device_type = spec.training.precision, device_type
        self.mixed = False  # FSDP2's policy casts; the optimizer steps the fp32 shards themselves
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_torch_optimizer(spec.training.optimizer, params, device_type)
        self.scaler = None

    def compile(self) -> str:
        raise UsageError("--compile is for one process without ZeRO (the plain trainer)")

    def infer(self, batch: dict):
        raise UsageError("FSDP2 runs are measured in training mode only")

    def finish(self, measurement: Measurement) -> None:
        lay, p = self.layout, self.spec.parallel
        measurement.engine = FSDPAccount(
            rank=lay.rank, world_size=lay.world_size, mesh=dict(lay.sizes), coords=dict(lay.coords),
            engine=f"FSDP2 fully_shard per block and root over dp={p.dp}, reshard_after_forward="
            f"{p.reshard_after_forward}" + (", MixedPrecisionPolicy(bf16, reduce fp32)" if mixed_policy(self.spec)
                                            else ""),
            parameter_elements=sum(q._local_tensor.numel() for q in self.model.parameters()),
            blocks=list(range(len(self.model.blocks))),
            named_bytes={"gathered_parameters_max": self.gathered.max_bytes,
                         "buffers": unique_storage_bytes(self.model.buffers())},
            notes=[] if p.reshard_after_forward else [FSDP_UNSHARDED_SAVED],
        )  # fmt: skip
        measurement.methods = {
            **measurement.methods,
            "weights": "unique storages of this rank's sharded parameters (DTensor local shards, padded rows)",
            "gradients": "unique storages of the sharded gradients after backward (reduce-scattered)",
        }
