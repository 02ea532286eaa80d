"""The per-rank report of torch's parallel engines (`measured.engine` of tensor, pipeline and FSDP2 runs).

What a rank holds and why, beside the protocol's terms: its place in the dp × pp × tp mesh, the blocks and
pipeline stages it runs, its share of the parameters, and what the engine allocated that no formula term
names (communication buffers, gathered parameters), each measured by the live-bytes tracker and named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.trainers import EngineReport


@dataclass(frozen=True)
class ParallelAccount(EngineReport):
    """One rank of a run on torch's engines (DTensor tensor parallel, pipelining, FSDP2)."""

    rank: int
    world_size: int
    mesh: dict[str, int]
    """Mesh sizes by dimension name (dp, pp, tp)."""
    coords: dict[str, int]
    """This rank's coordinate on each dimension."""
    engine: str
    """What ran, in words (the parallel styles, schedule or sharding)."""
    parameter_elements: int
    """Elements of the parameters this rank holds (local shards of DTensors)."""
    blocks: list[int] = field(default_factory=list)
    """Indices of the transformer blocks this rank runs."""
    stages: list[int] = field(default_factory=list)
    """Pipeline stage indices on this rank (more than one with virtual stages)."""
    schedule: str | None = None
    microbatches: int | None = None
    in_flight_microbatches: int | None = None
    """Pipeline: the most micro-batch stage-forwards whose saved tensors were alive at once."""
    activations_per_microbatch: list[int] | None = None
    """Pipeline: bytes saved for backward by this rank's stages for each micro-batch (first step)."""
    named_bytes: dict[str, int] = field(default_factory=dict)
    """What the engine allocates beyond the terms, by name (measured): communication buffers, gathered
    parameters, received activations."""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorAccount(ParallelAccount):
    kind = "tensor"


@dataclass(frozen=True)
class PipelineAccount(ParallelAccount):
    kind = "pipeline"


@dataclass(frozen=True)
class FSDPAccount(ParallelAccount):
    kind = "fsdp2"
