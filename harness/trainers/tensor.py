"""Tensor (and sequence) parallelism by torch's DTensor, in Megatron-LM's layout, behind the trainer protocol.

Megatron's split of a block (Shoeybi et al. 2019, Section 3; Korthikanti et al. 2022, Figure 5), as
`torch.distributed.tensor.parallel` plans:

    attn.qkv, mlp.fc (mlp.gate, mlp.up)   ColwiseParallel   weight and bias split by output rows: each rank
                                                            computes its heads and its slice of the MLP
    attn.proj, mlp.proj (mlp.down)        RowwiseParallel   weight split by input columns, output summed
                                                            (all-reduce), or reduce-scattered along the
                                                            sequence with sequence parallelism
    ln_1, ln_2, ln_f                      SequenceParallel  (with --sequence-parallel) norms, dropouts and
                                                            residual adds on s/t of the tokens; attention and
                                                            MLP inputs all-gathered (PrepareModuleInput)
    wte                                   RowwiseParallel   the vocabulary split (vocab-parallel embedding)
    lm_head                               ColwiseParallel   logits split by vocabulary, kept as a DTensor for
                                                            torch's `loss_parallel` cross-entropy

Position embeddings stay replicated (Megatron's), so with sequence parallelism the embedding output is
summed whole and each rank keeps its s/t slice from the embedding dropout on (a local chunk, no
communication). A tied `lm_head` shares the embedding's DTensor (both are split by vocabulary rows).

The fused QKV weight is split by contiguous rows, and each rank reads its rows as [q | k | v] of its own
heads: the row order of a Megatron-interleaved QKV weight. With the reference models' i.i.d. N(0, 0.02)
initialisation this is the same distribution of models as the unsplit one.

What autograd keeps differs from Korthikanti's sequence-parallel row in one named way: DTensor's
column-parallel linear saves its all-gathered input (e·s·b·h, whole), where Megatron saves the norm's
sharded output and gathers it again in backward (`formulas.ranks.SP_GATHERED_INPUT`).

Measured like the plain trainer (harness.measure): the saved-tensor and live-bytes trackers count DTensors
by their local shards (`harness.memtrack.storage_of`). With `--dp-shard fsdp2` the data-parallel dimension
of the mesh is sharded by FSDP2 over the tensor-parallel DTensors (2D, `harness.trainers.fsdp`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from formulas.ranks import (
    EMBEDDING_FULL_GRADIENT,
    EMBEDDING_GRADIENT_VIEW,
    HF_GATHERED_LOGITS,
    LOSS_PARALLEL_FREES,
    SP_GATHERED_INPUT,
)
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.memtrack import local_tensor, unique_storage_bytes
from harness.records import Measurement
from harness.trainers.account import TensorAccount
from harness.trainers.mesh import Layout, build_mesh
from harness.trainers.plain import PlainTrainer
from models.build import transformer_blocks


def _block_plan(block: nn.Module, sequence_parallel: bool) -> dict:
    sp = sequence_parallel
    # The sublayer's output: summed over ranks (Replicate), or reduce-scattered along the sequence (Shard(1)).
    out = Shard(1) if sp else Replicate()
    plan: dict = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(output_layouts=out)}
    if getattr(block.mlp, "gated", False):
        plan.update({"mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
                     "mlp.down": RowwiseParallel(output_layouts=out)})  # fmt: skip
    else:
        plan.update({"mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=out)})
    if sp:
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                    use_local_output=True)  # fmt: skip
        plan.update({"ln_1": SequenceParallel(), "attn": gather, "ln_2": SequenceParallel(), "mlp": gather})
    return plan


def apply_tensor_parallel(module: nn.Module, mesh, *, sequence_parallel: bool) -> None:
    """Megatron's tensor-parallel layout on whichever of `wte`, `drop`, `blocks`, `ln_f` and `lm_head` the
    module (a reference GPT, or a pipeline stage of one) has, over the 1-D tensor-parallel `mesh`."""
    t = mesh.size()
    blocks = getattr(module, "blocks", None)
    for block in blocks.children() if blocks is not None else ():
        attn = block.attn
        if attn.n_heads % t or attn.n_kv_heads % t:
            raise UsageError(f"--tp {t} must divide the heads ({attn.n_heads}) and kv-heads ({attn.n_kv_heads})")
        parallelize_module(block, mesh, _block_plan(block, sequence_parallel))
        attn.n_heads, attn.n_kv_heads = attn.n_heads // t, attn.n_kv_heads // t  # this rank's heads
    sp = sequence_parallel
    tied = hasattr(module, "wte") and hasattr(module, "lm_head") and module.lm_head.weight is module.wte.weight
    plan: dict = {}
    if hasattr(module, "wte"):
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sp:
            # Each rank keeps its s/t slice of the summed embedding: a local chunk, no communication.
            plan["drop"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                              use_local_output=True)  # fmt: skip
    if hasattr(module, "ln_f") and sp:
        plan["ln_f"] = SequenceParallel()
    if hasattr(module, "lm_head"):
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                          use_local_output=False)  # fmt: skip
    parallelize_module(module, mesh, plan)
    if tied:  # parallelize_module distributes each module's weight apart; both are split by vocabulary rows
        module.lm_head.weight = module.wte.weight


def apply_transformers_plan(model: nn.Module, mesh) -> None:
    """transformers' own tensor-parallel plan (`base_model_tp_plan` and the head's `_tp_plan`, expanded by the
    model's `_resolve_parallel_plans`) on a transformers model built from its config (`models.hf`), applied with
    `transformers.distributed.tensor_parallel.apply_tensor_parallelism`: what `from_pretrained(tp_plan="auto")`
    does after loading, here on the random weights every rank built alike (seed 0)."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    inner = model.model  # models.hf.HFLossModel wraps the transformers model
    plan, _, _ = inner._resolve_parallel_plans(DistributedConfig(tp_size=mesh.size()))
    apply_tensor_parallelism(inner, mesh, plan)


def describe(spec: RunSpec) -> str:
    p = spec.parallel
    if spec.measurement.impl == "hf":
        return (f"transformers' tensor-parallel plan t={p.tp} (base_model_tp_plan: colwise q/k/v and MLP-up, rowwise "
                "o and MLP-down, vocab-parallel embedding, the head's logits gathered whole)")  # fmt: skip
    text = f"DTensor tensor parallel t={p.tp} (Megatron: colwise QKV/MLP-up, rowwise out/MLP-down, vocab-parallel"
    text += " embedding and loss_parallel head)"
    if p.sequence_parallel:
        text += ", sequence parallel norms and dropouts"
    if p.dp_shard == "fsdp2":
        text += f", FSDP2 over dp={p.dp}"
    return text


class TensorParallelTrainer(PlainTrainer):
    """The plain trainer's steps over a model split by `apply_tensor_parallel` (and FSDP2 over dp when asked):
    DTensor parameters, gradients and optimizer state; the loss through `loss_parallel`."""

    schedules_microbatches = False

    def __init__(self, model: nn.Module, spec: RunSpec, *, device_type: str, probe=None):
        self.layout: Layout = build_mesh(spec, device_type)
        self.spec = spec
        self.hf = spec.measurement.impl == "hf"
        if self.hf:
            apply_transformers_plan(model, self.layout.mesh["tp"])
        else:
            apply_tensor_parallel(model, self.layout.mesh["tp"], sequence_parallel=spec.parallel.sequence_parallel)
        if spec.parallel.dp_shard == "fsdp2":
            from harness.trainers.fsdp import FSDPTrainer, apply_fsdp  # 2D: FSDP2 over the TP DTensors

            self.gathered = apply_fsdp(model, self.layout.mesh["dp"], spec, probe=probe)
            FSDPTrainer.init_sharded(self, model, spec, device_type)
            return
        super().__init__(model, spec, device_type=device_type, probe=probe)

    def _loss_parallel(self):
        # transformers' plans gather the logits whole ("colwise_gather_output"): its loss is a plain one.
        return contextlib.nullcontext() if self.hf else loss_parallel()

    def forward(self, batch: dict) -> torch.Tensor:
        with self._loss_parallel(), self.autocast():
            return self._module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        with self._loss_parallel():
            loss.backward()

    def compile(self) -> str:
        raise UsageError("--compile is for one process without ZeRO (the plain trainer)")

    def infer(self, batch: dict):
        raise UsageError("tensor-parallel runs are measured in training mode only")

    def finish(self, measurement: Measurement) -> None:
        lay = self.layout
        if self.hf:
            notes = [HF_GATHERED_LOGITS]
        else:
            notes = [EMBEDDING_FULL_GRADIENT, LOSS_PARALLEL_FREES]
            if self.model.lm_head.weight is not self.model.wte.weight:
                notes.append(EMBEDDING_GRADIENT_VIEW)
        if self.spec.parallel.sequence_parallel:
            notes.append(SP_GATHERED_INPUT)
        named = {"buffers": unique_storage_bytes(self.model.buffers())}
        if hasattr(self, "gathered"):
            named["gathered_parameters_max"] = self.gathered.max_bytes
        measurement.engine = TensorAccount(
            rank=lay.rank, world_size=lay.world_size, mesh=dict(lay.sizes), coords=dict(lay.coords),
            engine=describe(self.spec),
            parameter_elements=local_parameter_elements(self.model),
            blocks=list(range(len(transformer_blocks(self.model)))),
            named_bytes=named,
            notes=notes,
        )  # fmt: skip
        measurement.methods = {
            **measurement.methods,
            "weights": "unique storages of this rank's parameters (DTensor local shards, replicated ones whole)",
            "activations": "unique storages saved for backward on this rank (DTensor local shards), parameters "
            "and buffers excluded",
        }


def local_parameter_elements(model: nn.Module) -> int:
    """Elements of the parameters this rank holds: DTensors by their local shards, tied ones once."""
    return sum(local_tensor(p).numel() for p in model.parameters())  # parameters() yields a tied one once
