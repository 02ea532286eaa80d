"""The layouts that fit a cluster, the largest micro-batch of each, and which is fastest (`formulas.plan`)."""

from __future__ import annotations

import json

from formulas.architecture import unmodelled_features
from formulas.calibration import Calibration
from formulas.hardware import GPUS, get_gpu
from formulas.plan import EFFICIENCY, EFFICIENCY_SOURCE, SCHEDULES
from formulas.precision import compute_dtype
from harness.errors import UsageError
from harness.flags import count
from harness.specbuild import resolve_architecture


def add_arguments(p) -> None:
    m = p.add_argument_group("model and batch")
    m.add_argument("--model", required=True, help="preset name (`tmath presets`) or a transformers config.json")
    m.add_argument("--seq", type=int, required=True, help="sequence length in tokens")
    batch = m.add_mutually_exclusive_group(required=True)
    batch.add_argument("--global-batch", type=count, metavar="N", help="sequences per optimizer step")
    batch.add_argument(
        "--tokens-per-step", type=count, metavar="N", help="tokens per optimizer step (a multiple of --seq)"
    )
    m.add_argument("--tokens", type=count, metavar="N", help="training budget in tokens: prints the days to train")
    m.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "fp16-mixed", "bf16", "fp32"))
    m.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    m.add_argument("--attention", default="flash", choices=("flash", "eager"), help="default flash")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpu", required=True, choices=tuple(GPUS), metavar="NAME", help="accelerator (`tmath gpus`)")
    c.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    c.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    c.add_argument("--inter-node-gbps", type=float, metavar="GB/S", help="one node's network, GB/s per direction "
                   "(default: the reference design's, `tmath gpus`)")  # fmt: skip
    c.add_argument("--gpu-memory", type=float, metavar="GIB", help="GiB per GPU if not the datasheet's")
    c.add_argument("--calibration", metavar="FILE", help="calibration.json (`tmath calibrate`): its reserve, context "
                   "and achieved fraction")  # fmt: skip
    c.add_argument("--efficiency", type=float, metavar="F", help="achieved fraction of the dense peak for the compute "
                   "term (default: fitted on published runs)")  # fmt: skip
    c.add_argument("--tflops", type=float, metavar="T", help="achieved TFLOP/s per GPU for the compute term")
    f = p.add_argument_group("constraints (each fixes its axis)")
    f.add_argument("--tp", type=int)
    f.add_argument("--pp", type=int)
    f.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    f.add_argument("--dp-shard", choices=("none", "fsdp2"), help="fsdp2: FSDP; none: no FSDP")
    f.add_argument("--recompute", choices=("none", "selective", "full"))
    f.add_argument("--sequence-parallel", action="store_true", default=None)
    f.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false")
    f.add_argument("--pp-schedule", choices=SCHEDULES)
    f.add_argument("--virtual-stages", type=int, metavar="V", help="model chunks per pipeline rank (searched: 1, 2, 4; "
                   "any V > 1 fixes the interleaved schedule)")  # fmt: skip
    f.add_argument("--offload-optimizer", choices=("none", "cpu"), help="cpu: search ZeRO-Offload too")
    f.add_argument("--micro-batch", type=int)
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=5, help="layouts to print (default 5)")
    o.add_argument("--verify", type=int, default=0, metavar="N", help="measure the top N's busiest rank on fake "
                   "tensors (`tmath measure --device meta`) next to the planner's and the engine walk's peak")  # fmt: skip
    o.add_argument("--format", default="table", choices=("table", "json"))


def request_from_args(args):
    from harness.plan.search import PlanRequest

    if args.gpus < 1 or args.gpus_per_node < 1 or args.seq < 1:
        raise UsageError("--gpus, --gpus-per-node and --seq must be positive")
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise UsageError(f"--gpus {args.gpus} is not a whole number of nodes of {args.gpus_per_node}")
    if args.top < 1 or args.verify < 0:
        raise UsageError("--top must be at least 1 and --verify at least 0")
    if args.tokens_per_step is not None:
        if args.tokens_per_step % args.seq:
            raise UsageError(f"--tokens-per-step {args.tokens_per_step} is not a multiple of --seq {args.seq}")
        global_batch = args.tokens_per_step // args.seq
    else:
        global_batch = args.global_batch
    name, arch = resolve_architecture({"model": args.model})
    if arch.moe:
        raise UsageError(f"{name}: mixtures of experts are not planned yet (the search has no expert parallelism "
                         "and splits no experts over tensor ranks); `tmath predict --ep` gives one layout's states")  # fmt: skip
    missing = unmodelled_features(arch)
    if missing:
        raise UsageError(f"{name}: the planner needs the activations, which are not modelled for {', '.join(missing)}")
    if arch.position == "learned" and args.seq > arch.max_positions:
        raise UsageError(f"--seq {args.seq} exceeds the {arch.max_positions} learned positions of {name}")
    fixed = {"tp": args.tp, "pp": args.pp, "zero": args.zero, "recompute": args.recompute,
             "sequence_parallel": args.sequence_parallel, "schedule": args.pp_schedule,
             "virtual_stages": args.virtual_stages, "micro_batch": args.micro_batch}  # fmt: skip
    fixed = {k: v for k, v in fixed.items() if v is not None}
    if args.dp_shard is not None:
        fixed["fsdp"] = args.dp_shard == "fsdp2"
        if fixed["fsdp"]:
            fixed.setdefault("zero", 0)
            if fixed["zero"]:
                raise UsageError("--dp-shard fsdp2 shards with FSDP, --zero with DeepSpeed: give one of them")
    if args.offload_optimizer is not None:
        fixed["offload"] = args.offload_optimizer == "cpu"
    for axis in ("tp", "pp", "micro_batch", "virtual_stages"):
        if axis in fixed and fixed[axis] < 1:
            raise UsageError(f"--{axis.replace('_', '-')} must be positive")
    if "tp" in fixed and args.gpus_per_node % fixed["tp"] and fixed["tp"] <= args.gpus:
        raise UsageError(f"--tp {fixed['tp']} does not divide the {args.gpus_per_node} GPUs of a node")
    if "pp" in fixed and fixed["pp"] > arch.n_layers:
        raise UsageError(f"--pp {fixed['pp']} exceeds the {arch.n_layers} layers of {name}")
    gpu = get_gpu(args.gpu)
    peak = gpu.peak(compute_dtype(args.precision))
    if peak is None:
        raise UsageError(f"{gpu.label} has no {compute_dtype(args.precision)} units: choose another --precision")
    calibration = None
    if args.calibration:
        try:
            calibration = Calibration.load(args.calibration)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.tflops is not None:
        if not 0 < args.tflops <= peak:
            raise UsageError(f"--tflops {args.tflops:g} must be in (0, {peak:g}] (the {gpu.label}'s dense peak)")
        efficiency, source = args.tflops / peak, f"given (--tflops {args.tflops:g})"
    elif args.efficiency is not None:
        if not 0 < args.efficiency <= 1:
            raise UsageError(f"--efficiency {args.efficiency:g} must be in (0, 1]")
        efficiency, source = args.efficiency, "given (--efficiency)"
    elif calibration is not None and gpu.name in calibration.achieved_fraction:
        efficiency, source = calibration.achieved_fraction[gpu.name], f"calibration {args.calibration}"
    else:
        efficiency, source = EFFICIENCY, EFFICIENCY_SOURCE
    memory = None if args.gpu_memory is None else int(args.gpu_memory * 2**30)
    if memory is not None and memory <= 0:
        raise UsageError("--gpu-memory must be positive")
    return PlanRequest(arch=arch, model=name, seq=args.seq, global_batch=global_batch, gpu=gpu.name, gpus=args.gpus,
                       gpus_per_node=args.gpus_per_node, precision=args.precision, optimizer=args.optimizer,
                       attention=args.attention, fixed=fixed, efficiency=efficiency, efficiency_source=source,
                       calibration=calibration, inter_node_gbps=args.inter_node_gbps, memory_bytes=memory,
                       tokens=args.tokens)  # fmt: skip


def run(args) -> int:
    from harness.display.plan import print_plan, print_verification
    from harness.plan.search import plan
    from harness.plan.verify import verify

    request = request_from_args(args)
    result = plan(request, top=args.top)
    checks = verify(result, args.verify) if args.verify else []
    if args.format == "json":
        print(json.dumps(plan_to_dict(result, checks), indent=2))
    else:
        print_plan(result)
        if checks:
            print_verification(checks)
    return 0


def plan_to_dict(result, checks=()) -> dict:
    """The public JSON contract of `tmath plan --format json` (documented in the README)."""
    from dataclasses import asdict

    r = result.request
    return {
        "model": r.model, "seq": r.seq, "global_batch": r.global_batch, "gpu": r.gpu, "gpus": r.gpus,
        "gpus_per_node": r.gpus_per_node, "precision": r.precision, "attention": r.attention, "fixed": r.fixed,
        "efficiency": result.efficiency, "efficiency_source": result.efficiency_source,
        "memory_limit_bytes": result.memory_limit, "overheads": result.overheads, "bandwidths": result.bandwidths,
        "candidates": [asdict(c) for c in result.candidates], "rejected": result.rejected,
        "searched": result.searched, "layouts": result.layouts, "unmodelled": list(result.unmodelled),
        "verify": [asdict(c) for c in checks],
    }  # fmt: skip
