"""The process group and the DeviceMesh that torch's parallel engines compose on (dp × pp × tp).

One mesh per run, dimensions named as torchtitan names them, outermost first: `dp` (data parallel, FSDP2's
shard dimension), `pp` (pipeline stages), `tp` (tensor parallel, innermost, so that a tensor-parallel group
is the ranks of one node). Every dimension of size 1 is kept, so that a trainer asks for `mesh["tp"]`
whatever the layout. NCCL on CUDA, gloo on the CPU; under a launcher (torchrun) RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT are set, and a single process sets them itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from formulas.spec import RunSpec
from harness.processes import single_process_rendezvous

DIMS: tuple[str, ...] = ("dp", "pp", "tp")


FAKE_BACKEND = "fake"
"""torch's single-process stand-in for a job (`torch.testing._internal.distributed.fake_pg`): one process is
rank R of N, collectives return tensors of the right shapes without moving data. `tmath plan --verify`
measures one rank of a layout so, on fake tensors."""


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Make this process rank `rank` of `world_size` under the fake backend (before any mesh is built)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # What a launcher sets, which DeepSpeed's engine reads (LOCAL_RANK: one rank per node's device).
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    dist.init_process_group(FAKE_BACKEND, store=FakeStore(), rank=rank, world_size=world_size)


def fake_process_group() -> bool:
    """Whether this process runs under the fake backend (a one-rank dry run of a layout)."""
    return dist.is_initialized() and dist.get_backend() == FAKE_BACKEND


def init_process_group(device_type: str) -> None:
    """The default process group (once per process)."""
    if dist.is_initialized():
        return
    single_process_rendezvous()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


@dataclass(frozen=True)
class Layout:
    """This rank's place in the mesh."""

    mesh: DeviceMesh
    rank: int
    world_size: int
    coords: dict[str, int]
    """dp, pp and tp coordinates of this rank."""
    sizes: dict[str, int]


def build_mesh(spec: RunSpec, device_type: str) -> Layout:
    """The dp × pp × tp mesh of `spec` over every rank of the job. Its rank tensors are real even when the
    trainer is built in fake-tensor mode (a dry run, `tmath plan --verify`): a mesh cannot be made of fake
    tensors, so the mode is set aside while it is built."""
    init_process_group(device_type)
    p = spec.parallel
    sizes = {"dp": p.dp, "pp": p.pp, "tp": p.tp}
    world = dist.get_world_size()
    if world != p.gpus:
        raise RuntimeError(f"{world} ranks started for a layout of {p.gpus} (dp {p.dp} × pp {p.pp} × tp {p.tp})")
    with unset_fake_temporarily():
        mesh = init_device_mesh(device_type, tuple(sizes[d] for d in DIMS), mesh_dim_names=DIMS)
        coords = {d: mesh.get_local_rank(d) for d in DIMS}
    return Layout(mesh=mesh, rank=dist.get_rank(), world_size=world, coords=coords, sizes=sizes)
