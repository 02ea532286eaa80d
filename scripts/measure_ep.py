"""Expert parallelism measured over gloo ranks through transformers' own engine, against `tmath predict --ep`.

transformers 5.x shards a mixture of experts with `DistributedConfig(fsdp_size=N, ep_size=E)`: the dense
parameters FSDP-sharded over the N ranks, each rank holding E/ep of every MoE layer's experts whole (ep = N
by default, so that the expert-data-parallel group is one rank; with ep < N each expert is FSDP-sharded
over the N/ep ranks that hold it). This script builds a Mixtral-shaped model that way on
CPU, runs one training step (forward, backward, AdamW) and records each rank's local parameter, gradient and
optimizer-state elements, next to `formulas.predict` for `--zero 3 --ep N --gpus N` (ZeRO-3's dense sharding
is FSDP's). Run:

    python -m torch.distributed.run --nproc-per-node 2 scripts/measure_ep.py results/moe/ep2-of-2.json
    python -m torch.distributed.run --nproc-per-node 4 scripts/measure_ep.py results/moe/ep2-of-4.json 2

Parameters, gradients and optimizer state only: the activations of an expert-parallel step depend on how
many rows the router sends to each rank's experts, which real token ids decide (`formulas` predicts the
expected count; not compared here).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

SHAPE = {"model": "models/hub/mixtral-8x7b.json", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
         "ffn_hidden": 96, "vocab": 128, "seq": 16, "batch": 2, "precision": "fp32"}  # fmt: skip
"""Mixtral's config narrowed: 8 experts of 96 per layer, top 2."""


def _local(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def main(out: str, ep: int | None = None) -> None:
    import transformers
    from transformers.distributed import DistributedConfig

    from formulas.predict import predict
    from harness.environment import environment
    from harness.schema import to_json
    from harness.specbuild import build_spec
    from models.hf import hf_config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = ep or world
    torch.manual_seed(0)
    spec = build_spec({**SHAPE, "gpus": world, "zero": 3, "ep": ep, "device": "cpu"})
    cls = transformers.MixtralForCausalLM
    config = hf_config(spec.model.arch, "eager")
    distributed, _, mesh = cls.prepare_distribute_model(DistributedConfig(fsdp_size=world, ep_size=ep))
    model = cls.maybe_distribute_model(cls(config), distributed, mesh).train()
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    optimizer.step()
    measured = {
        "parameters": sum(_local(p) for p in model.parameters()),
        "gradients": sum(_local(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(_local(v) for s in optimizer.state.values() for k, v in s.items() if k != "step"),
    }
    states = predict(spec).states
    predicted = {
        "parameters": states.weights // 4,
        "gradients": states.gradients // 4,
        "optimizer": states.optimizer // 4,
    }
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "measured": measured})
    if rank == 0:
        record = {
            "what": "elements per rank of a Mixtral-shaped model under transformers' FSDP + expert parallelism "
            "(DistributedConfig(fsdp_size, ep_size)) over gloo, one AdamW step, fp32; predicted: tmath predict "
            "--zero 3 --ep N --gpus N (bytes / 4)",
            "settings": {**SHAPE, "gpus": world, "ep": ep},
            "predicted_per_rank": {k: int(v) for k, v in predicted.items()},
            "ranks": per_rank,
            "environment": to_json(environment(device="cpu", argv=sys.argv)),
        }
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ep.json", int(sys.argv[2]) if len(sys.argv) > 2 else None)
