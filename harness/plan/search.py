"""The planner's search: every layout of a cluster scored at once with `formulas.plan`, in NumPy arrays.

    plan(request) -> Plan(candidates=[Candidate, ...] best first, rejected={reason: count}, searched=N)

Axes: tensor parallel t (a divisor of the GPUs per node: a tensor-parallel group stays in one node),
pipeline parallel pp (a divisor of GPUs / t, at most L), data parallel dp = GPUs / (t·pp); ZeRO 0-3 or FSDP;
sequence parallelism (t > 1); recompute none, selective, full; the pipeline schedule (GPipe, 1F1B, interleaved
1F1B with v = 2 or 4 chunks per rank); optimizer offload (ZeRO ≥ 1, only with `--offload cpu`: CPU Adam's
time is not modelled, so an offloaded step time is a lower bound); micro-batch b, with gradient accumulation
M = global batch / (dp·b). A constraint given on the command line fixes its axis. Every point of the product
is scored; those that cannot run are counted by reason:

    invalid split          t does not divide the heads (or the kv heads), pp·v exceeds the layers
    unsupported            ZeRO-2/3 with pp > 1 (DeepSpeed forbids), offload without ZeRO or with FSDP,
                           ZeRO or FSDP with dp = 1 (nothing to shard over),
                           interleaving with M not a multiple of pp (Megatron-LM's rule), M < pp (1F1B)
    batch not divisible    the global batch is not a multiple of dp·b
    over memory            the busiest rank's peak with the fixed overheads exceeds the GPU's memory

A layout is every axis but the micro-batch; for each the fastest micro-batch that fits is its candidate, and
the largest that fits is reported beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from formulas import compute, hardware
from formulas import plan as fp
from formulas.activations import LOSS_LOGIT_BYTES, embedding_bytes, layer_bytes, output_bytes
from formulas.calibration import ALL_PHASES, Calibration
from formulas.interconnect import interconnect
from formulas.layouts import parameter_tensors
from formulas.params import largest_module_params, parameter_count, pipeline_stage_params
from formulas.peak import for_loop_adamw_temporaries
from formulas.precision import (
    activation_bytes_per_element,
    compute_dtype,
    gradient_bytes_per_param,
    is_mixed,
    optimizer_bytes_per_param,
    weight_bytes_per_param,
)
from formulas.units import ceil_div

RECOMPUTE = ("none", "selective", "full")
SHARDING = ((0, False), (1, False), (2, False), (3, False), (0, True))
"""(ZeRO stage, FSDP) pairs, coded 0..4."""
PIPELINES = ((1, 1), (0, 1), (2, 2), (2, 4))
"""(schedule code in `formulas.plan.SCHEDULES`, v) pairs; a layout without a pipeline takes the first."""
REASONS = ("invalid split", "unsupported", "batch not divisible", "over memory")
MASK_BYTES = 1


@dataclass(frozen=True)
class PlanRequest:
    arch: object
    model: str
    seq: int
    global_batch: int
    gpu: str
    gpus: int
    gpus_per_node: int
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    attention: str = "flash"
    fixed: dict = field(default_factory=dict)
    """Axes fixed by the user: tp, pp, dp, zero, fsdp, sequence_parallel, recompute, schedule, virtual_stages,
    offload, micro_batch."""
    efficiency: float | None = None
    """Achieved fraction of the dense peak for the compute term (None: the fitted default)."""
    efficiency_source: str = ""
    calibration: Calibration | None = None
    inter_node_gbps: float | None = None
    memory_bytes: int | None = None
    """The GPU's memory if not the datasheet's (`--gpu-memory`)."""
    tokens: int | None = None
    max_micro_batch: int = 1024
    walk: bool = True
    """Refine the shortlist with the engine walks (`harness.plan.refine`); off for scoring fixed layouts."""
    device: str = "cuda"
    """What the peak is for: `cuda` (a GPU: fused AdamW, DeepSpeed's foreach AdamW, the fixed overheads) or
    `cpu`/`meta` (a CPU or fake-tensor dry run: torch's for-loop AdamW, no CUDA context), as `formulas.peak`."""


@dataclass(frozen=True)
class Candidate:
    layout: dict
    micro_batch: int
    grad_accum: int
    max_micro_batch: int
    peak_bytes: int
    device_bytes: int
    headroom_bytes: int
    fits: bool
    busiest_stage: str
    step_seconds: float
    tokens_per_second_per_gpu: float
    mfu: float
    train_days: float | None
    terms: dict
    memory: dict
    planner_peak_bytes: int = 0
    """The array screen's peak (`formulas.plan`), whatever `peak_bytes` is."""
    peak_model: str = "formulas.plan"
    """What `peak_bytes` and `max_micro_batch` come from: an engine walk, or the screen where none applies."""


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    candidates: list[Candidate]
    rejected: dict
    searched: int
    layouts: int
    efficiency: float
    efficiency_source: str
    memory_limit: int
    overheads: dict
    bandwidths: dict
    unmodelled: tuple[str, ...]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _axis(name: str, values: list, fixed: dict) -> list:
    if name in fixed and fixed[name] is not None:
        return [fixed[name]]
    return values


def grid(req: PlanRequest) -> dict[str, np.ndarray]:
    """The product of every axis, flat: one entry per candidate, the micro-batch fastest-varying."""
    f = req.fixed
    arch = req.arch
    tps = _axis("tp", [t for t in _divisors(req.gpus_per_node) if req.gpus % t == 0], f)
    pps = _axis("pp", [p for p in _divisors(req.gpus) if p <= arch.n_layers], f)
    shards = [
        (z, fs) for z, fs in SHARDING if ("zero" not in f or f["zero"] == z) and ("fsdp" not in f or f["fsdp"] == fs)
    ]
    sps = _axis("sequence_parallel", [False, True], f)
    rcs = [RECOMPUTE.index(r) for r in _axis("recompute", list(RECOMPUTE), f)]
    pipelines = PIPELINES
    if f.get("virtual_stages", 1) > 1 and (2, f["virtual_stages"]) not in PIPELINES:
        pipelines = (*PIPELINES, (2, f["virtual_stages"]))  # a fixed v the search does not try (v = 3)
    pipes = [(s, v) for s, v in pipelines if ("schedule" not in f or fp.SCHEDULES[s] == f["schedule"])
             and ("virtual_stages" not in f or f["virtual_stages"] == v)]  # fmt: skip
    offs = _axis("offload", [False], f)  # searched only when asked: CPU Adam's time is not modelled
    top = min(req.global_batch, req.max_micro_batch)
    bs = _axis("micro_batch", [b for b in _divisors(req.global_batch) if b <= top], f)
    axes = np.meshgrid(np.arange(len(tps)), np.arange(len(pps)), np.arange(len(shards)), np.arange(len(sps)),
                       np.arange(len(rcs)), np.arange(len(pipes)), np.arange(len(offs)), np.arange(len(bs)),
                       indexing="ij")  # fmt: skip
    ti, pi, si, spi, ri, qi, oi, bi = (a.ravel() for a in axes)
    shard = np.array(shards, dtype=np.int64).reshape(-1, 2)
    pipe = np.array(pipes, dtype=np.int64).reshape(-1, 2)
    g = {
        "tp": np.array(tps, dtype=np.int64)[ti], "pp": np.array(pps, dtype=np.int64)[pi],
        "zero": shard[si, 0], "fsdp": shard[si, 1].astype(bool), "sp": np.array(sps, dtype=bool)[spi],
        "rc": np.array(rcs, dtype=np.int64)[ri], "schedule": pipe[qi, 0], "v": pipe[qi, 1],
        "offload": np.array(offs, dtype=bool)[oi], "b": np.array(bs, dtype=np.int64)[bi],
        "_tp_index": ti, "_pp_index": pi, "_tps": np.array(tps), "_pps": np.array(pps), "_bs": len(bs),
    }  # fmt: skip
    g["dp"] = np.maximum(req.gpus // (g["tp"] * g["pp"]), 1)
    g["_split"] = req.gpus % (g["tp"] * g["pp"]) == 0
    return g


def _tables(req: PlanRequest, tps: list[int], pps: list[int]) -> dict:
    """The per-(t, sp, recompute) and per-pp scalars the arrays index: computed once with the scalar formulas."""
    arch, s = req.arch, req.seq
    e = activation_bytes_per_element(req.precision)
    layer = np.zeros((len(tps), 2, 3), dtype=np.float64)
    for i, t in enumerate(tps):
        for sp in (0, 1):
            for r, rc in enumerate(RECOMPUTE):
                layer[i, sp, r] = layer_bytes(arch, s, 1, elem_bytes=e, mask_bytes=MASK_BYTES, recompute=rc,
                                              attention=req.attention, tp=t, sequence_parallel=bool(sp))  # fmt: skip
    emb = np.array([[embedding_bytes(arch, s, 1, elem_bytes=e, mask_bytes=MASK_BYTES, tp=t if sp else 1)
                     for sp in (0, 1)] for t in tps], dtype=np.float64)  # fmt: skip
    out = np.array([output_bytes(arch, s, 1, elem_bytes=e, tp=t) for t in tps], dtype=np.float64)
    stages = [pipeline_stage_params(arch, p) for p in pps]
    # A mixture of experts computes with its active parameters (Fedus et al. 2021); it holds all of them.
    params = parameter_count(arch).active
    model_token = compute.training_flops_per_token(params, arch, s)
    # float64: 6·P·tokens overflows int64 above ~10^12 parameters
    # What recompute replays: full, the blocks as torch's non-reentrant checkpoint replays them (early stop;
    # `compute.full_recompute_flops_per_token`, what the FLOP counter counts); selective, the attention core.
    replayed = {"none": 0, "selective": compute.recompute_flops_per_token(params, "selective", arch, s),
                "full": compute.full_recompute_flops_per_token(arch, s)}  # fmt: skip
    hw = np.array([model_token + replayed[rc] for rc in RECOMPUTE], dtype=np.float64)
    state = 4 if is_mixed(req.precision) or req.precision == "fp32" else weight_bytes_per_param(req.precision)
    # The plain trainer's for-loop AdamW off CUDA (`formulas.peak`); SGD updates in place.
    loop = for_loop_adamw_temporaries(parameter_tensors(arch, "reference"), state) if req.optimizer == "adamw" else 0
    return {"loop": loop, "master": state, "layer": layer, "emb": emb, "out": out, "first": np.array([st[0] for st in stages], dtype=np.float64),
            "last": np.array([st[-1] for st in stages], dtype=np.float64), "hw": hw, "model_token": model_token,
            "params": params, "e": e}  # fmt: skip


def score(req: PlanRequest) -> tuple[dict, dict, Plan]:
    """Every candidate's peak, fit and step time, as arrays; the constants they share; and the plan without its
    candidates."""
    arch = req.arch
    gpu = hardware.get_gpu(req.gpu)
    ic = interconnect(req.gpu)
    g = grid(req)
    tb = _tables(req, list(g["_tps"]), list(g["_pps"]))
    tp, pp, dp, b, v, zero, fsdp = g["tp"], g["pp"], g["dp"], g["b"], g["v"], g["zero"], g["fsdp"]
    M = req.global_batch // (dp * b)
    divisible = req.global_batch % (dp * b) == 0
    M = np.maximum(M, 1)
    split_ok = (
        g["_split"]
        & (arch.n_heads % tp == 0)
        & ((arch.n_kv_heads % tp == 0) | (arch.n_kv_heads < tp))
        & (pp * v <= arch.n_layers)
    )
    pipeline = pp > 1
    supported = ~((zero >= 2) & pipeline) & ~(g["offload"] & ((zero == 0) | fsdp))
    supported &= ~(g["sp"] & (tp == 1))
    supported &= ~((dp == 1) & ((zero >= 1) | fsdp))  # nothing to shard over
    supported &= pipeline | ((g["schedule"] == 1) & (v == 1))
    supported &= ~(pipeline & (g["schedule"] == 2) & (M % pp != 0))
    supported &= ~(pipeline & (g["schedule"] != 0) & (pp > M))
    w, gb = weight_bytes_per_param(req.precision), gradient_bytes_per_param(req.precision)
    o = optimizer_bytes_per_param(req.optimizer, req.precision)
    largest = largest_module_params(arch)
    tpi, ppi = g["_tp_index"], g["_pp_index"]
    layer = tb["layer"][tpi, g["sp"].astype(np.int64), g["rc"]]
    # Without DeepSpeed a layout runs on torch's engines (FSDP2, DTensor): DTensor's sequence-parallel linears
    # save their gathered input (`formulas.ranks.SP_GATHERED_INPUT`, measured): + 2·e·s·h·(1 − 1/t) per layer
    # and sequence. Under DeepSpeed's ZeRO the tensor parallelism is Megatron's, which re-gathers instead.
    e = tb["e"]
    torch_engine = fsdp | (zero == 0)
    layer = layer + (torch_engine & g["sp"] & (g["rc"] != 2)) * 2 * e * req.seq * arch.hidden * (1 - 1 / tp)
    layers = ceil_div(arch.n_layers, pp)
    accumulating = 1 * ((M > 1) | pipeline)
    # The step's fp32 gradient copies (mixed precision), and DeepSpeed's foreach AdamW temporaries (ZeRO ≥ 1;
    # the plain trainer and FSDP2 on CUDA step with fused AdamW).
    # On the CPU and fake tensors torch's for-loop AdamW keeps two fp32 temporaries: per stepped element under
    # DeepSpeed, the largest tensor's (and the previous quotient) in the plain trainer (`formulas.peak`).
    cuda = req.device == "cuda"
    deepspeed = (zero >= 1) & ~fsdp
    temporaries = fp.FOREACH_TEMPORARY_BYTES if cuda else 2 * fp.FOREACH_TEMPORARY_BYTES
    mixed = is_mixed(req.precision)
    # The gradient the step reads: the fp32 partition (DeepSpeed), FSDP2's fp32 reduce dtype or the autocast
    # trainer's fp32 gradients in mixed precision; the parameters' own dtype otherwise.
    step_gradient = fp.FP32_GRADIENT_BYTES if mixed else gb
    step_extra_per_param = (fp.FP32_GRADIENT_BYTES if mixed else 0) + temporaries * deepspeed
    plain = (zero == 0) & ~fsdp & (tp == 1) & (pp == 1)
    loop_temporaries = 0 if cuda else plain * tb["loop"]
    f_inner = arch.ffn_hidden
    # The top layer's MLP backward (`formulas.peak.StepBytes.layer_transient`): the incoming gradient and its
    # residual copy, the projection's input gradient (split by t) and its weight gradient.
    transient = e * (b * req.seq * (2 * arch.hidden + f_inner / tp) + f_inner * arch.hidden / tp)
    peaks, parts, params = [], [], {}
    for stage in ("first", "last"):
        P = params[stage] = ceil_div(tb[stage][ppi], tp)
        weights, grads, optim, live = fp.model_states(P, dp, zero, fsdp, g["offload"], w=w, g=gb, o=o,
                                                      largest=largest, tp=tp)  # fmt: skip
        rank = np.zeros_like(pp) if stage == "first" else pp - 1
        held = fp.in_flight(g["schedule"], pp, v, M, rank)
        first = 1 * ((stage == "first") | ~pipeline)
        last = 1 * ((stage == "last") | ~pipeline)
        logits = LOSS_LOGIT_BYTES * req.seq * b * arch.vocab / tp
        opt_part = np.where((zero >= 1) | fsdp, ceil_div(P, dp), P) * (1 - g["offload"])
        # FSDP2 inside pipeline stages: torch's PipelineStage neither reshards nor reduces between micro-batches
        # (`formulas.ranks._pipeline_fsdp_walk`): the stage stays gathered (e·P) and its gradients accumulate
        # unsharded (fp32 under mixed precision) from the first backward to the step.
        fsdp_pipe = fsdp & pipeline
        unsharded = fsdp_pipe * (e + step_gradient) * P
        if stage == "first":  # ... the embedding's accumulator of the whole vocabulary under tp (DTensor's gradient)
            unsharded = unsharded + fsdp_pipe * step_gradient * (
                arch.vocab * arch.hidden - ceil_div(arch.vocab * arch.hidden, tp)
            )
        peak, acts = fp.stage_peak(
            states=weights + optim + live, gradients=grads, accumulating=accumulating * (1 - fsdp_pipe),
            backward_extra=unsharded, layer_bytes=layer * b,
            layers=layers, held=held, embedding=first * tb["emb"][tpi, g["sp"].astype(np.int64)] * b,
            output=last * tb["out"][tpi] * b,
            loss_grad=last * fp.LOSS_GRADIENT_COPIES * logits + (1 - last) * transient,
            step_extra=step_extra_per_param * opt_part + loop_temporaries,
        )  # fmt: skip
        peaks.append(peak)
        parts.append({"weights": weights, "gradients": grads, "optimizer": optim, "zero3_live": live,
                      "activations": acts, "held_microbatches": held})  # fmt: skip
    peak = np.maximum(peaks[0], peaks[1])
    busiest = np.where(peaks[0] >= peaks[1], 0, 1)
    overheads = hardware.fixed_overheads(gpu) if cuda else {}
    memory = req.memory_bytes if req.memory_bytes is not None else gpu.memory_bytes
    cal = req.calibration
    reserve = cal.reserved_ratio if cal is not None else 1.0
    # A calibration's measured / predicted peak on CUDA (its phase-independent ratio: the planner's peak is one
    # of two moments, not the walk's phases) scales the peak before the reserve.
    reserve *= (cal.ratio("cuda", ALL_PHASES) or 1.0) if cal is not None else 1.0
    fixed = sum(overheads.values()) if cal is None or cal.context_bytes is None else cal.context_bytes
    device = peak * reserve + fixed
    fits = device <= memory

    peak_tflops = gpu.peak(compute_dtype(req.precision))
    efficiency, eff_source = req.efficiency, req.efficiency_source
    tokens = req.global_batch * req.seq
    network = req.inter_node_gbps if req.inter_node_gbps is not None else ic.node_network_gbps
    per_gpu_network = network / min(req.gpus_per_node, req.gpus)
    intra = ic.intra_node_gbps
    node = min(req.gpus_per_node, req.gpus)
    pp_gbps = np.where(tp * pp > req.gpus_per_node, per_gpu_network, intra)
    # Ranks numbered as Megatron-LM numbers them (`parallel_state.initialize_model_parallel`, order
    # "tp-cp-ep-dp-pp": tensor parallel fastest, then data parallel, the pipeline outermost): a data-parallel
    # group has min(dp, node / t) members in each node. The harness's torch mesh, (dp, pp, tp), numbers the
    # same where it runs data parallel (pp = 1).
    dp_gbps = fp.ring_group_gbps(np.minimum(dp, node // tp), 1 * (dp * tp > node), intra, per_gpu_network)
    tp_coll = fp.TP_ALL_REDUCES + fp.TP_RECOMPUTE_ALL_REDUCES * (g["rc"] == 2)
    eager = 1 * (req.attention == "eager")
    scores = b * (arch.n_heads / tp) * float(req.seq) ** 2
    attention_bytes = eager * fp.eager_attention_bytes(scores, e=e, dropout=1 * (arch.dropout > 0),
                                                       replays=1 * (g["rc"] != 0), mask_bytes=MASK_BYTES)  # fmt: skip
    # The optimizer step: the busiest stage's elements per rank (sharded from ZeRO-1 / FSDP), at the bytes its
    # engine's implementation moves: DeepSpeed's foreach AdamW and casts, torch's fused AdamW otherwise.
    per_element = fp.optimizer_step_bytes(master=tb["master"], gradient=step_gradient, state=o - (4 if mixed else 0),
                                          foreach_adamw=deepspeed * (req.optimizer == "adamw"), casts=deepspeed * mixed)  # fmt: skip
    stepped = np.maximum(params["first"], params["last"])
    stepped = np.where((zero >= 1) | fsdp, ceil_div(stepped, dp), stepped)
    terms = fp.step_terms(
        tokens=tokens, gpus=req.gpus, hw_flops_per_token=tb["hw"][g["rc"]], tflops=efficiency * peak_tflops, pp=pp,
        v=v, M=M, tp=tp, layers=layers, tp_collectives=tp_coll, act_bytes=e * b * req.seq * arch.hidden,
        dp=dp, zero=zero, fsdp=1 * fsdp, grad_bytes=gb * params["first"], weight_bytes=w * params["first"], tp_gbps=intra,
        pp_gbps=pp_gbps, dp_gbps=dp_gbps, offload=g["offload"], pcie_gbps=ic.pcie_gbps,
        attention_bytes=attention_bytes, memory_gbps=gpu.memory_gbps, optimizer_bytes=stepped * per_element,
    )  # fmt: skip
    seconds = fp.step_seconds(terms)
    arrays = {**g, "M": M, "peak": peak, "device": device, "fits": fits, "busiest": busiest, "seconds": seconds,
              "divisible": divisible, "split_ok": split_ok, "supported": supported, "terms": terms,
              "parts": parts, "mfu": fp.mfu(tokens, tb["model_token"], seconds, req.gpus, peak_tflops)}  # fmt: skip
    constants = {"tokens": tokens, "memory": memory, "reserve": reserve, "fixed": fixed}
    shell = Plan(req, [], {}, 0, 0, efficiency, eff_source, memory, overheads,
                 {"intra_node_gbps": intra, "node_network_gbps": network, "pcie_gbps": ic.pcie_gbps,
                  "network_assumed": ic.assumed and req.inter_node_gbps is None, "memory_gbps": gpu.memory_gbps},
                 UNMODELLED)  # fmt: skip
    return arrays, constants, shell


UNMODELLED = (
    "step time: kernel launch gaps, NCCL's achieved bus bandwidth (datasheet rates "
    "are used), hierarchical collectives, the embedding's and the loss's collectives, CPU Adam under offload",
    "memory: the allocator's fragmentation unless a calibration gives reserved/allocated; engine-specific "
    "departures (`formulas.ranks`, `formulas.variants`) are in the engine walks that `--verify` compares",
)


def plan(req: PlanRequest, top: int = 5) -> Plan:
    """Score every candidate and keep the best `top` layouts that fit, best first."""
    a, c, shell = score(req)
    n = a["peak"].size
    valid = a["split_ok"]
    rejected = {
        "invalid split": int((~valid).sum()),
        "unsupported": int((valid & ~a["supported"]).sum()),
        "batch not divisible": int((valid & a["supported"] & ~a["divisible"]).sum()),
        "over memory": int((valid & a["supported"] & a["divisible"] & ~a["fits"]).sum()),
    }
    ok = valid & a["supported"] & a["divisible"] & a["fits"]
    nb = a["_bs"]
    layout_id = np.arange(n) // nb
    # Per layout: the largest micro-batch that fits (b grows with the index within a layout).
    max_b = np.zeros(n // nb, dtype=np.int64)
    np.maximum.at(max_b, layout_id[ok], a["b"][ok])
    # Fastest first; ties: the smaller peak, then torch's FSDP2 before DeepSpeed's ZeRO-3 (the engine a dry run
    # can measure), then the smaller micro-batch.
    order = np.lexsort((a["b"], ~a["fsdp"], a["peak"], np.round(a["seconds"], 9)))
    order = order[ok[order]]
    usable = valid & a["supported"] & a["divisible"]
    seen: set[int] = set()
    candidates: list[Candidate] = []
    walks, started = 0, time.perf_counter()
    for i in order:
        lid = int(layout_id[i])
        if lid in seen:
            continue
        screened = _candidate(a, c, req, int(i), int(max_b[lid]))
        if req.walk and walks < MAX_WALKS and time.perf_counter() - started < WALK_SECONDS:
            walks += 1
            refined = _walked(req, c, screened, a["b"][lid * nb : (lid + 1) * nb][usable[lid * nb : (lid + 1) * nb]])
            if refined is None:  # over memory by the engine walk: a smaller micro-batch of it may come later
                rejected["over memory"] += 1
                continue
            screened = refined
        seen.add(lid)
        candidates.append(screened)
        if len(candidates) >= top:
            break
    return replace(shell, candidates=candidates, rejected=rejected, searched=int(n), layouts=int(n // nb))


MAX_WALKS = 200
"""Engine walks a search spends on its shortlist at most (each a few milliseconds)."""
WALK_SECONDS = 3.0
"""And the time they may take: past it the remaining candidates keep the screen's peak (`peak_model` says so)."""


def _walked(req: PlanRequest, c: dict, cand: Candidate, micro_batches: np.ndarray) -> Candidate | None:
    """The candidate with the engine walk's peak and largest micro-batch where a walk models its layout
    (`harness.plan.refine`); None when the walk puts it over memory; as it is where no walk applies."""
    from harness.plan.refine import engine_walk

    def need(peak: int) -> int:
        return int(peak * c["reserve"] + c["fixed"])

    per_replica = req.global_batch // cand.layout["dp"]
    peak, basis = engine_walk(req, cand.layout, cand.micro_batch, cand.grad_accum)
    if peak is None:
        return replace(cand, peak_model=basis)
    if need(peak) > c["memory"]:
        return None
    largest = cand.micro_batch
    for b in sorted(int(x) for x in micro_batches if x > cand.micro_batch):
        bigger, _ = engine_walk(req, cand.layout, b, per_replica // b)
        if bigger is None or need(bigger) > c["memory"]:
            break
        largest = b
    return replace(cand, peak_bytes=peak, device_bytes=need(peak), headroom_bytes=c["memory"] - need(peak),
                   max_micro_batch=largest, peak_model=basis)  # fmt: skip


def _candidate(a: dict, c: dict, req: PlanRequest, i: int, max_b: int) -> Candidate:
    zero, fsdp = int(a["zero"][i]), bool(a["fsdp"][i])
    pp = int(a["pp"][i])
    layout = {
        "dp": int(a["dp"][i]), "tp": int(a["tp"][i]), "pp": pp, "zero": zero, "fsdp": fsdp,
        "sequence_parallel": bool(a["sp"][i]), "recompute": RECOMPUTE[int(a["rc"][i])],
        "schedule": fp.SCHEDULES[int(a["schedule"][i])] if pp > 1 else None,
        "virtual_stages": int(a["v"][i]), "offload": "cpu" if a["offload"][i] else "none",
    }  # fmt: skip
    seconds = float(a["seconds"][i])
    tokens_per_s = c["tokens"] / seconds
    stage = int(a["busiest"][i])
    memory = {k: float(v[i]) for k, v in a["parts"][stage].items()}
    days = req.tokens / tokens_per_s / 86400 if req.tokens else None
    return Candidate(
        layout=layout, micro_batch=int(a["b"][i]), grad_accum=int(a["M"][i]), max_micro_batch=max_b,
        peak_bytes=int(a["peak"][i]), device_bytes=int(a["device"][i]),
        headroom_bytes=int(c["memory"] - a["device"][i]), fits=bool(a["fits"][i]),
        busiest_stage=("first" if stage == 0 else "last") if pp > 1 else "only",
        step_seconds=seconds, tokens_per_second_per_gpu=tokens_per_s / req.gpus, mfu=float(a["mfu"][i]),
        train_days=days, terms={k: float(v[i]) if np.ndim(v) else float(v) for k, v in a["terms"].items()},
        memory=memory, planner_peak_bytes=int(a["peak"][i]),
    )  # fmt: skip
