"""The planner's arithmetic: the busiest rank's peak and the step time of a layout, term by term.

`tmath plan` scores every layout of a cluster with these functions. They are written with arithmetic
operators only (no `if`, no `max`), so that the same expressions take Python numbers (one layout, the tests)
and NumPy arrays (every layout at once, `harness.plan`): `_pos(x)` is max(x, 0), `_min(a, b)` min(a, b), and
a condition is a 0/1 factor (`1 * (zero >= 1)`).

**Memory** (per rank, the first and the last pipeline stage: the busiest is one of them)

    states       Transformer Math 101 with ZeRO (Rajbhandari et al. 2020): weights w·P, gradients g·P,
                 optimizer o·P for P the stage's parameters per tensor-parallel rank (the heaviest stages,
                 `formulas.params.pipeline_stage_params`), divided by dp from stage 1 (optimizer), 2
                 (gradients), 3 or FSDP (weights; plus the largest module gathered whole); offload moves the
                 optimizer state (and at stages 1-2 the gradients) to the host
                 (`formulas.memory.model_state_bytes`, of which this is the array form)
    activations  Korthikanti et al. 2022, Table 2 per layer at (t, sequence parallel, recompute), times the
                 stage's ceil(L/pp) layers, times the micro-batches in flight: Megatron-LM's warm-up count
                 (Narayanan et al. 2021: 1F1B holds pp − r on rank r; interleaved, v chunks per rank,
                 2·(pp − r − 1) + (v − 1)·pp + 1 chunks of L/(pp·v) layers; GPipe all M); the embedding's on
                 the first stage, the output layer's and the loss's fp32 logits (4·s·b·V/t) on the last
    peak         the larger of two moments of `formulas.peak`'s walk: the backward start (states, the
                 gradients already accumulated when M > 1 or pp > 1, the activations, and the loss's two
                 fp32 gradients 2·4·s·b·V/t on the last stage) and the optimizer step (states, gradients,
                 the fp32 gradient partition and the foreach AdamW temporary, 4 + 4 B per stepped parameter)

**Step time** (per optimizer step; every term printed by `tmath plan`)

    compute      hardware FLOPs per GPU (Transformer Math 101's 6P + Korthikanti's 12·L·s·h attention term,
                 plus what recompute repeats: selective, the attention core; full, each block's forward as
                 torch's non-reentrant checkpoint replays it, less a pre-LN MLP's output projection without
                 dropout (early stop), never the embedding or the output layer,
                 `formulas.compute.full_recompute_flops_per_token`) / (efficiency × the GPU's dense peak)
    attention    eager attention only: its s²-sized tensors' traffic (`eager_attention_bytes`) for the
                 stage's ceil(L/pp) layers and M micro-batches, at the GPU's datasheet memory bandwidth, after
                 the compute (the softmax and dropout kernels are memory-bound; Dao et al. 2022, §2.2);
                 flash attention keeps the scores on chip and has none
    bubble       compute × (pp − 1) / (v · M) (Narayanan et al. 2021, §2.2.1 and §2.2.2)
    tensor       per layer and micro-batch 4 all-reduces of e·b·s·h (2 forward, 2 backward; 6 with full
                 recompute; Shoeybi et al. 2019, §3; sequence parallelism's all-gather + reduce-scatter move
                 the same bytes, Korthikanti §4.2.2), ring cost 2·(t − 1)/t over the node's links, not overlapped
    pipeline     per micro-batch and chunk a forward send and a backward send of e·b·s·h/t (Megatron's
                 scatter/gather, Narayanan §4.1) over NVLink within a node, the network between nodes; not
                 overlapped
    data         gradient all-reduce 2·(dp − 1)/dp·Ψ once per step (ZeRO 0-1), ZeRO-2's reduce-scatter per
                 micro-batch plus one parameter all-gather, ZeRO-3/FSDP's two all-gathers and one
                 reduce-scatter per micro-batch (1.5× data parallel's volume, Rajbhandari et al. §7), at
                 `ring_group_gbps`: NVLink within a node; across nodes the NICs of the group's members in a
                 node (min(dp, node/t) of them, one per GPU, in Megatron-LM's rank order tp-dp-pp), no more
                 than NVLink; assumed overlapped with the
                 backward of the last micro-batch (ZeRO 0-2) or with each micro-batch's compute (ZeRO-3/FSDP's
                 prefetch); only what exceeds that window counts
    offload      the gradients to the host and the parameters back over PCIe, per step (CPU Adam's own time
                 is not modelled: a lower bound)
    optimizer    the optimizer step's memory traffic per rank at the GPU's datasheet memory bandwidth, after the
                 backward (it waits for the last gradient; nothing overlaps it): the elements the rank steps (its
                 stage's parameters per tensor-parallel rank, divided by dp under ZeRO ≥ 1 or FSDP) times the
                 bytes its implementation moves per element (`optimizer_step_bytes`); 0 under offload (the
                 host steps; CPU Adam is not modelled)

Not modelled: kernel launch gaps, NCCL's achieved bus bandwidth below the
datasheet's, hierarchical collectives, the embedding's and loss's collectives, compute/communication
contention. The efficiency is one constant fitted on published runs (`results/plan/published-fit.json`).
"""

from __future__ import annotations

from formulas.units import ceil_div

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved-1f1b")
"""Pipeline schedules the planner searches, coded 0, 1, 2 in its arrays."""

FP32_GRADIENT_BYTES = 4
"""The fp32 gradient partition a mixed-precision step makes (DeepSpeed) or keeps (FSDP2)."""
FOREACH_TEMPORARY_BYTES = 4
"""torch's foreach AdamW (DeepSpeed's default on CUDA): one fp32 temporary per stepped element."""
LOSS_GRADIENT_COPIES = 2
"""The loss's two fp32 logit gradients at the backward start (nll_loss and log_softmax; `formulas.peak`)."""
FOREACH_ADAMW_BYTES = 80
"""torch's foreach AdamW (`torch.optim.adam._multi_tensor_adam`, capturable=False, weight decay on), DeepSpeed's
optimizer here, per fp32 element: eight passes, each reading its operands and writing its result: the decay's
mul_ (8 B), lerp_ into the first moment (12), mul_ and addcmul_ into the second (8 + 12), sqrt into a temporary
(8), div_ and add_ on it (8 + 8), addcdiv_ into the parameter (16)."""
DEEPSPEED_CAST_BYTES = 12
"""DeepSpeed's mixed-precision step around the optimizer, per element: the 16-bit gradient partition converted
into the fp32 one (2 + 4 B) and the updated fp32 partition copied back to the 16-bit weights (4 + 2 B)
(`deepspeed/runtime/zero/stage_1_and_2.py` and `stage3.py`, `step`)."""
TP_ALL_REDUCES = 4
"""Per layer and micro-batch: 2 in the forward, 2 in the backward (Shoeybi et al. 2019, §3, Figure 4)."""
TP_RECOMPUTE_ALL_REDUCES = 2
"""Full recompute repeats the forward's two."""


def _pos(x):
    """max(x, 0) for numbers and arrays."""
    return (x + abs(x)) / 2


def _min(a, b):
    """min(a, b) for numbers and arrays."""
    return (a + b - abs(a - b)) / 2


def model_states(P, dp, zero, fsdp, offload, *, w, g, o, largest, tp):
    """Weights, gradients, optimizer state and ZeRO-3's gathered module per rank, bytes (the array form of
    `formulas.memory.model_state_bytes`; FSDP shards as ZeRO-3). `P` the rank's parameters before data
    parallel, `w`/`g`/`o` bytes per parameter, `largest` the largest module's parameters."""
    s1, s2, s3 = 1 * (zero >= 1) + 1 * fsdp, 1 * (zero >= 2) + 1 * fsdp, 1 * (zero >= 3) + 1 * fsdp
    off = 1 * offload
    weights = s3 * ceil_div(w * P, dp) + (1 - s3) * w * P
    gradients = s2 * ceil_div(g * P, dp) + (1 - s2) * g * P
    optimizer = (s1 * ceil_div(o * P, dp) + (1 - s1) * o * P) * (1 - off)
    gradients = gradients * (1 - off * (1 - s3))  # offloaded at stages 1-2: none left on the GPU
    live = s3 * (dp > 1) * w * ceil_div(largest, tp)
    return weights, gradients, optimizer, live


def in_flight(schedule, pp, v, M, rank):
    """Micro-batches of a stage's L/pp layers that pipeline rank `rank` holds at once (1 without a pipeline):
    GPipe all M; 1F1B and interleaved Megatron-LM's warm-up count plus the one in its forward, in chunks of
    L/(pp·v) layers, over v."""
    gpipe = 1 * (schedule == 0)
    looped = 1 * (v > 1)
    warm = (pp - rank - 1) * (1 + looped) + looped * (v - 1) * pp
    held = gpipe * M + (1 - gpipe) * _min(M * v, warm + 1) / v
    return held * (pp > 1) + 1 * (pp == 1)


def stage_peak(*, states, gradients, accumulating, layer_bytes, layers, held, embedding, output, loss_grad,
               step_extra, backward_extra=0):  # fmt: skip
    """One stage's peak: the backward start or the optimizer step, whichever is larger. `states` the bytes held
    across steps (weights, optimizer, ZeRO-3's gathered module), `layer_bytes`/`embedding`/`output` one
    micro-batch's, `loss_grad` the loss's gradients at the backward start (0 off the last stage),
    `backward_extra` what the backward holds beyond them (FSDP2 in a pipeline: the stage gathered and its
    unsharded gradients)."""
    activations = held * (layers * layer_bytes + embedding) + output
    backward = states + accumulating * gradients + activations + loss_grad + backward_extra
    step = states + gradients + step_extra
    return backward + _pos(step - backward), activations


def optimizer_step_bytes(*, master, gradient, state, foreach_adamw, casts):
    """Bytes one stepped element moves through memory in the optimizer step. A single-pass (fused) update, as
    torch's `fused=True` AdamW and Megatron-LM's FusedAdam run it, reads the parameter (`master` bytes: the fp32
    master in mixed precision), its gradient and the `state` bytes of moments and writes the parameter and the
    state back: 2·master + gradient + 2·state (AdamW in mixed precision 8 + 4 + 16 = 28 B; Kingma and Ba 2015,
    Algorithm 1). `foreach_adamw` (0/1) takes torch's foreach AdamW's eight passes instead
    (`FOREACH_ADAMW_BYTES`); `casts` (0/1) adds DeepSpeed's two mixed-precision copies."""
    fused = 2 * master + gradient + 2 * state
    return foreach_adamw * FOREACH_ADAMW_BYTES + (1 - foreach_adamw) * fused + casts * DEEPSPEED_CAST_BYTES


def ring_all_reduce_seconds(nbytes, ranks, gbps):
    """A ring all-reduce of `nbytes` over `ranks` at `gbps` GB/s per direction: 2·(n − 1)/n·bytes / bw
    (Patarasuk and Yuan 2009; NCCL's bus bandwidth convention)."""
    return 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9)


def eager_attention_bytes(elements, *, e, dropout, replays, mask_bytes=1):
    """Memory traffic of eager attention's s²-sized tensors, per layer and micro-batch, for `elements` =
    b·(a/t)·s² scores per rank: each tensor is written once by the kernel that makes it and read once by each
    kernel that uses it, as Megatron-LM's core attention runs it (baddbmm, the fused scale-mask-softmax,
    dropout, bmm; megatron/model/transformer.py, 2021):

        forward    scores written and read by the softmax (2e), probabilities written and read (2e); with
                   dropout its mask written (1 B) and its output written and read by the value matmul (2e)
        backward   the value matmul's input gradient written (e) and its input read for the value gradient
                   (e); with dropout the gradient read with the mask and the probabilities' gradient written
                   (2e + 1 B); the softmax backward reads its gradient and its output and writes the scores'
                   gradient (3e); the query and key gradients each read it (2e)

    `replays` forward passes more (1 under selective or full recompute: both run the attention core again).
    Flash attention keeps the scores on chip: no such traffic (Dao et al. 2022, §3.1)."""
    drop = dropout * (2 * e + mask_bytes)
    forward = 4 * e + drop
    backward = 7 * e + drop
    return elements * (forward * (1 + replays) + backward)


def ring_group_gbps(members_per_node, spans_nodes, intra_gbps, nic_gbps):
    """The bus bandwidth of a ring collective over a group: the node's links inside one node; across nodes,
    each of NCCL's rings (channels) enters and leaves every node once, and the channels spread over the NICs
    of the group's members in the node (one NIC per GPU in the reference designs), so the group's ring runs at
    `members_per_node` NICs' rate, and no faster than the node's own links (NVIDIA/nccl#687, #569: more of a
    group's GPUs per node use more NICs). A group with one member per node (tensor parallel filling the node)
    gets one NIC."""
    return spans_nodes * _min(intra_gbps, members_per_node * nic_gbps) + (1 - spans_nodes) * intra_gbps


def step_terms(*, tokens, gpus, hw_flops_per_token, tflops, pp, v, M, tp, layers, tp_collectives, act_bytes, dp,
               zero, fsdp, grad_bytes, weight_bytes, tp_gbps, pp_gbps, dp_gbps, offload, pcie_gbps,
               attention_bytes=0, memory_gbps=1.0, optimizer_bytes=0):  # fmt: skip
    """Seconds per optimizer step by term (see the module's docstring). `tokens` per step (global batch ×
    seq), `act_bytes` e·b·s·h of one micro-batch, `grad_bytes`/`weight_bytes` the rank's gradient and weight
    bytes before data-parallel sharding, `attention_bytes` eager attention's traffic per layer and micro-batch
    (`eager_attention_bytes`; 0 under flash attention), `optimizer_bytes` the rank's optimizer-step traffic
    (stepped elements × `optimizer_step_bytes`), bandwidths in GB/s per direction."""
    compute = tokens * hw_flops_per_token / gpus / (tflops * 1e12)
    attention = layers * M * attention_bytes / (memory_gbps * 1e9)
    bubble = compute * (pp - 1) / (v * M)
    tensor = (tp > 1) * tp_collectives * layers * M * ring_all_reduce_seconds(act_bytes, tp, tp_gbps)
    pipeline = (pp > 1) * 2 * v * M * (act_bytes / tp) / (pp_gbps * 1e9)
    f = (dp - 1) / dp / (dp_gbps * 1e9)
    s2, s3 = 1 * (zero == 2) * (1 - fsdp), 1 * (zero == 3) + 1 * fsdp
    s01 = 1 - s2 - s3
    per_micro = compute / M
    backward = per_micro * 2 / 3  # the backward's share of a micro-batch (4P of 6P per token)
    data = (s01 * _pos(2 * f * grad_bytes - backward)
            + s2 * (M * _pos(f * grad_bytes - backward) + f * weight_bytes)
            + s3 * M * _pos(f * (2 * weight_bytes + grad_bytes) - per_micro))  # fmt: skip
    moved = (grad_bytes + weight_bytes) / dp
    host = 1 * offload * moved / (pcie_gbps * 1e9)
    optimizer = (1 - 1 * offload) * optimizer_bytes / (memory_gbps * 1e9)
    return {"compute": compute, "attention": attention, "bubble": bubble, "tensor": tensor, "pipeline": pipeline,
            "data": data, "offload": host, "optimizer": optimizer}  # fmt: skip


def step_seconds(terms: dict):
    return sum(terms.values())


def mfu(tokens, model_flops_per_token, seconds, gpus, peak_tflops):
    """Model FLOPs utilisation: model FLOPs per step (no recompute) / (seconds × GPUs × dense peak) (PaLM,
    Chowdhery et al. 2022, Appendix B)."""
    return tokens * model_flops_per_token / (seconds * gpus * peak_tflops * 1e12)


EFFICIENCY = 0.586
"""Achieved fraction of the dense peak in the compute term: fitted on half of the published runs in
results/plan/published.csv (`scripts/fit_published.py`, results/plan/published-fit.json)."""
EFFICIENCY_HELD_OUT_ERROR = 0.090
"""The fit's held-out median |error| of predicted MFU (hardware TFLOP/s for Narayanan et al.'s rows), the step
time's error on runs it was not fitted on (results/plan/published-fit.json; tests/test_plan.py checks)."""
EFFICIENCY_SOURCE = f"fitted on published runs, held-out median |error| {EFFICIENCY_HELD_OUT_ERROR:.1%} (results/plan/published-fit.json)"
