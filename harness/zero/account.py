"""What a DeepSpeed rank holds, as the record keeps it: components by term and placement, per snapshot.

These are the types of `measured.engine` for DeepSpeed runs (`kind: deepspeed`); `harness.zero.accounting`
fills them by walking the engine. They import neither torch nor DeepSpeed, so that reports and displays
read them anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.trainers import EngineReport

TERMS: tuple[str, ...] = ("weights", "gradients", "optimizer", "extras")
"""Model-state terms of the formulas, plus what DeepSpeed holds that no formula term names."""


@dataclass(frozen=True)
class Held:
    """Bytes of one named component that a rank holds, after dedup by storage."""

    term: str
    """weights | gradients | optimizer | extras | buffers."""
    name: str
    """What it is, in DeepSpeed's words where it has some."""
    placement: str
    """device (the accelerator) | host (offloaded to CPU memory)."""
    nbytes: int
    tensors: int


@dataclass(frozen=True)
class Placed:
    """Bytes of a term on the accelerator and in host memory."""

    device: int = 0
    host: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Everything the engine holds at one point of the protocol (after_init, after_backward, after_step, steady)."""

    totals: dict[str, Placed]
    """term → bytes by placement (the TERMS and `buffers`)."""
    held: list[Held] = field(default_factory=list)
    residual_bytes: int | None = None
    """Live bytes the walk did not reach (live − before the engine − walked); None without a live tracker."""
    settle_ms: float | None = None
    """How long the residual took to settle (communication threads releasing a collective's tensors)."""
    residual_by_phase: dict[str, int] = field(default_factory=dict)
    """The residual split by the protocol phase that allocated it."""

    def held_in(self, term: str) -> list[Held]:
        return [h for h in self.held if h.term == term and h.nbytes]


@dataclass(frozen=True)
class Buckets:
    """The communication buffer sizes the engine ran with (elements)."""

    reduce_bucket_elements: int | None = None
    allgather_bucket_elements: int | None = None
    prefetch_bucket_elements: int | None = None
    param_persistence_threshold: int | None = None
    overlap_comm: bool = False


@dataclass(frozen=True)
class Explained:
    """Bytes that explain a rank's departures from "divide by N", from DeepSpeed's own bookkeeping."""

    weights_alignment_padding_bytes: int | None = None
    """ZeRO-1/2: padding of the flat parameter buffer to a multiple of 2·N elements."""
    gradients_boundary_parameter_bytes: int | None = None
    """ZeRO-1/2: gradient elements of parameters that straddle the partition boundary, held whole."""
    partition_elements: int | None = None
    weights_partition_padding_bytes: int | None = None
    """ZeRO-3: padding of the per-parameter partitions (ceil(numel/N) each)."""
    weights_persistent_parameter_bytes: int | None = None
    """ZeRO-3: parameters under the persistence threshold, whole on every rank."""
    weights_gather_padding_bytes: int | None = None
    gradients_before_reduction_bytes: int | None = None
    """ZeRO-1: the full gradients held until they are reduced at the end of backward."""
    reduce_bucket_bytes_max: int | None = None
    """The IPG bucket's largest size during backward."""
    zero3_gathered_forward_max_bytes: int | None = None
    zero3_gathered_backward_max_bytes: int | None = None


@dataclass(frozen=True)
class ZeroAccount(EngineReport):
    """One rank's account of a DeepSpeed engine."""

    kind = "deepspeed"
    stage: int
    rank: int
    world_size: int
    optimizer_class: str
    base_optimizer_class: str
    config: dict
    """The DeepSpeed config the engine ran with (generated, with a user's file merged over it)."""
    buckets: Buckets
    explained_bytes: Explained
    snapshots: dict[str, Snapshot]
    host_bytes: dict[str, int]
    """Offloaded bytes in host memory by term."""
