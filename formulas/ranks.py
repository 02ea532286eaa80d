"""The prediction per rank of a tensor/pipeline/FSDP2 layout (the record's `parallel` method, `tmath predict`'s
`per_rank`): every term of every rank as torch's engines split the model (`formulas.parallel`), and a walk of
the rank's step peak, with the departures of DTensor, FSDP2 and torch's pipeline schedules named.

    parallel_prediction(spec, device) -> ParallelPrediction(engine, ranks=[RankPrediction, ...], unmodelled)

Per rank: parameters exactly as DTensor and FSDP2 shard them, Korthikanti et al.'s Table 2 row at t (with or
without sequence parallelism; arXiv:2205.05198), the in-flight stage forwards of the schedule
(`formulas.parallel.in_flight_chunks`), and the peak walked with `formulas.peak.plain_step_peak` over the
rank's bytes (tensor parallel; pipeline: its first and second backward) or FSDP2's own moments. Each
departure below was measured on the CPU over gloo (results/parallel-cpu, tests/test_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formulas import activations as act
from formulas.families import code_family
from formulas.layouts import INDEX_BYTES, buffer_bytes, input_bytes
from formulas.parallel import (
    block_tensors,
    forward_stages,
    in_flight_chunks,
    local_tensors,
    numel,
    rank_stages,
    rank_tensors,
    shard_sizes,
    stage_layers,
    tp_local_shape,
)
from formulas.params import norm_params
from formulas.peak import StepBytes, for_loop_adamw_temporaries, plain_step_peak
from formulas.precision import MASTER_COPY_BYTES, activation_bytes_per_element, compute_dtype, is_mixed
from formulas.units import ceil_div
from formulas.variants import activation_variant, layer_account, outside_account

FSDP_UNSHARDED_SAVED = (
    "FSDP2 with reshard_after_forward=False: the gathered weights autograd saves (linear weights, norm weights "
    "and biases, the head) are kept gathered to backward and counted with the saved tensors, in the compute dtype"
)

SP_GATHERED_INPUT = (
    "sequence parallel: DTensor's column-parallel QKV and MLP-up linears save their all-gathered input "
    "(e·s·b·h each, whole) where Megatron saves the norm's s/t output and gathers it again in backward: "
    "+2·e·s·b·h·(1 − 1/t) per layer"
)


@dataclass(frozen=True)
class RankPrediction:
    """One rank's predicted terms (bytes on its device)."""

    rank: int
    coords: dict[str, int]
    stages: list[int]
    blocks: int
    parameter_elements: int
    weights: int
    gradients: int
    optimizer: int
    """Optimizer state with the fp32 master copy (plain trainer's mixed precision) and AdamW's step counters."""
    activations: int
    """Saved for backward by one micro-batch on this rank (its blocks, the embedding or head it holds)."""
    activations_layers: int
    per_layer: int
    in_flight_microbatches: int
    activations_in_flight: int
    peak: int
    peak_basis: str
    departures: dict[str, int] = field(default_factory=dict)
    """Named, measured departures from Korthikanti's rows included above (bytes on this rank)."""


@dataclass(frozen=True)
class ParallelPrediction:
    """Every rank of a tensor/pipeline/FSDP2 layout (`tmath measure` compares each with its rank)."""

    engine: str
    ranks: list[RankPrediction]
    unmodelled: list[str] = field(default_factory=list)

    @property
    def busiest(self) -> RankPrediction:
        return max(self.ranks, key=lambda r: r.peak)


def _coords(rank: int, dp: int, pp: int, tp: int) -> dict[str, int]:
    """Row-major over (dp, pp, tp), as `init_device_mesh` numbers the ranks."""
    return {"dp": rank // (pp * tp), "pp": (rank // tp) % pp, "tp": rank % tp}


SUM_BASIS = "the sum of the rank's terms: weights + gradients + optimizer + buffers + inputs + activations in flight"

EMBEDDING_FULL_GRADIENT = (
    "DTensor's vocab-parallel embedding: its backward makes a gradient of the whole vocabulary (e·V·h) on every "
    "rank before keeping its V/t rows; with a tied head the end of backward holds G + H + e·V·h (measured at "
    "t = 2 and 4), where one process holds G + 2H"
)
SHARDED_DEPARTURES = frozenset(
    {"repeat_kv", "softmax_fp32", "sdpa_math_fallback", "sdpa_value_keeps_qkv", "sdpa_output_copy", "gelu_new"}
)
"""Departures (formulas.variants) that live on the heads or on the MLP's inner width: split by t."""

HF_GATHERED_LOGITS = (
    "transformers' plan gathers the head's logits whole on every rank (`colwise_gather_output`) and its loss runs "
    "on them: the loss's fp32 logits and their gradients are e·s·b·V, not V/t, per rank"
)
EMBEDDING_GRADIENT_VIEW = (
    "DTensor's vocab-parallel embedding without a tied head on the same rank: its gradient is a view of the "
    "whole-vocabulary gradient, which stays allocated: e·V·h where the shard is e·V·h/t"
)
LOSS_PARALLEL_FREES = (
    "loss_parallel's cross-entropy frees its saved fp32 logits (V/t) before making their gradients: the backward "
    "starts at A + L32, where the single-process loss holds A + 2·L32"
)


def _tensor_parallel_walk(spec, local, weights, gradients, optimizer, activations, output, v_rows, e, whole_vocab=0):
    """`formulas.peak.plain_step_peak` over one tensor-parallel rank's bytes: the plain trainer's step on its
    local shards, the loss on its V/t logits."""
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    tp, sp = p.tp, p.sequence_parallel
    h, f, s, b = arch.hidden, arch.ffn_hidden, t.seq, t.batch
    sizes = [x.elements for x in local]
    temporaries = step_temporaries(spec, sizes)
    tokens = s * b // (tp if sp else 1)
    head = e * v_rows * h
    positions = arch.max_positions * h if arch.position == "learned" else 0
    hf = spec.measurement.impl == "hf"
    buffers, inputs = buffer_bytes(arch, spec.measurement.impl, t.attention, e), input_bytes(arch, b, s) * t.grad_accum
    logits = arch.vocab if hf else v_rows  # transformers' plan gathers the logits whole (HF_GATHERED_LOGITS)
    walk = plain_step_peak(StepBytes(
        weights=weights, buffers=buffers, inputs=inputs, optimizer=optimizer, gradients=gradients,
        activations=activations, logits_model=e * s * b * logits, logits_fp32=4 * s * b * logits,
        head_gradient=head, tied=arch.tied_embeddings, step_temporaries=temporaries,
        step_copies=4 * (sum(sizes) + whole_vocab) if is_mixed(t.precision) else 0,
        embedding_gradients=e * (v_rows * h * (3 if arch.tied_embeddings else 1) + positions),
        largest_gradient=e * max(sizes), output_activations=output,
        layer_transient=e * (2 * tokens * h + s * b * (f // tp) + (f // tp) * h), grad_accum=t.grad_accum,
        loss_frees_saved_logits=not hf,  # loss_parallel (LOSS_PARALLEL_FREES); transformers' is a plain loss
        # DTensor's vocab-parallel embedding backward: a whole-vocabulary gradient (EMBEDDING_FULL_GRADIENT)
        embedding_transient=e * arch.vocab * h - head if tp > 1 else 0,
    ))  # fmt: skip
    return walk


def step_temporaries(spec, sizes: list[int]) -> int:
    """The optimizer update's largest temporaries over a rank's local tensors (`formulas.peak`): for-loop AdamW
    on the CPU keeps sqrt(v) and its quotient for the tensor it updates, the previous quotient still bound;
    fused AdamW on CUDA (the plain trainer's) none; SGD none."""
    t = spec.training
    if t.optimizer != "adamw" or spec.measurement.device == "cuda":
        return 0
    return for_loop_adamw_temporaries(sizes, 4 if is_mixed(t.precision) or t.precision == "fp32" else 2)


def _fsdp_walk(spec, tensors, local, held, gradients, activations, e, v_rows) -> tuple[str, int]:
    """The largest of the moments that decide an FSDP2 step's peak, for one rank (measured on the CPU:
    results/parallel-cpu): the root unit (embeddings, final norm, head) stays gathered from its forward to
    the end of backward; at the backward start FSDP2 has also gathered the last block again (its backward
    prefetch); without resharding every unit stays gathered. Gathered units are in the compute dtype e.
    `activations` excludes what autograd saves of the gathered weights (counted with them)."""
    p, t, arch = spec.parallel, spec.training, spec.model.arch
    tp = p.tp
    root = [x for x in tensors if not x.name.startswith(("ln_1", "ln_2", "attn", "mlp"))]
    block = block_tensors(arch)
    root_gathered = e * sum(numel(tp_local_shape(x, tp, 0)) for x in root)
    block_gathered = e * sum(numel(tp_local_shape(x, tp, 0)) for x in block)
    blocks = sum(1 for x in tensors if x.name == "ln_1.weight")
    if p.reshard_after_forward:
        forward, prefetch = root_gathered, block_gathered
    else:
        forward, prefetch = root_gathered + blocks * block_gathered, 0
    s, b = t.seq, t.batch
    L32, Le = act.LOSS_LOGIT_BYTES * s * b * v_rows, e * s * b * v_rows
    sizes = [x.elements for x in local]
    temporaries = step_temporaries(spec, sizes)
    # The end of backward: the root's gradients unsharded in e (a tied head's arrives twice and is added out of
    # place: 3·H), beside the blocks' reduce-scattered shards and the fp32 reduce-scatter buffer of the last
    # block reduced (FSDP2 reduces in fp32 here: `reduce_dtype`), still alive.
    blocks_local = [x for x in local if x.name.startswith(("ln_1", "ln_2", "attn", "mlp"))]
    grad_bytes = gradients // max(1, sum(x.storage_elements for x in local))
    head = e * sum(numel(tp_local_shape(x, tp, 0)) for x in root if x.name in ("wte.weight", "lm_head.weight"))
    other_root = root_gathered - head
    tied = arch.tied_embeddings and any(x.name == "wte.weight" for x in root)
    end = (held + root_gathered + grad_bytes * sum(x.storage_elements for x in blocks_local)
           + (3 * head if tied else head) + other_root + 4 * block_gathered // e)  # fmt: skip
    moments = {
        "end of backward (the root's gradients unsharded, the last block's fp32 reduce-scatter buffer)": end,
        "forward end (root unit gathered, logits beside log_softmax)":
            held + forward + activations + Le + (L32 if e != act.LOSS_LOGIT_BYTES else 0),
        # With tp > 1, loss_parallel frees its saved logits first (LOSS_PARALLEL_FREES).
        "backward start (root and the last block gathered, nll_loss and log_softmax gradients)":
            held + forward + prefetch + activations + (1 if tp > 1 else 2) * L32,
        "optimizer update": held + gradients + temporaries,
    }  # fmt: skip
    moment = max(moments, key=moments.get)
    return moment, moments[moment]


def _pipeline_walk(spec, stages, local, weights, gradients, optimizer, per_stage, count, output, v_rows, e,
                   whole_vocab=0, embedding_transient=0, moving_only=False):  # fmt: skip
    """`formulas.peak.plain_step_peak` over one pipeline rank at the two backwards that can decide its peak:
    the first, with `count` stage forwards in flight and no gradients yet, and the second, beside the gradients
    the first made (accumulated in place from then on; all of the rank's, as an upper bound with several
    stages) with min(count, forwards − 1) in flight (GPipe: one fewer; 1F1B: as many, when M > count). What torch's engine holds beyond the plain step
    (measured: `harness.trainers.pipeline`, results/parallel-cpu):

        receive buffers      M · e·b·s·h for the inputs of a non-first stage and M for the output gradients of
                             a non-last one, for the whole run (a non-first stage's first block saves its input,
                             which is that buffer: counted once)
        stage outputs        kept from each forward to its micro-batch's backward (count of them, the logits
                             on the last stage), and the previous one until the next forward returns: one more
                             at a forward's end (walked as the forward's "logits")
    """
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    s, b, h, tp, sp, M = t.seq, t.batch, arch.hidden, p.tp, p.sequence_parallel, p.n_microbatches
    last_stage = p.pp * p.virtual_stages - 1
    not_first = sum(st != 0 for st in stages)
    not_last = sum(st != last_stage for st in stages)
    head = last_stage in stages
    hidden = e * b * (s // tp if sp else s) * h  # one micro-batch's stage input or output on this rank
    receive = M * hidden * (not_first + not_last)
    Le, L32 = e * s * b * v_rows, act.LOSS_LOGIT_BYTES * s * b * v_rows
    sizes = [x.elements for x in local]
    temporaries = step_temporaries(spec, sizes)
    embedding = 0 in stages
    positions = arch.max_positions * h if arch.position == "learned" else 0
    ids = INDEX_BYTES * s * b * M * (int(embedding) + int(head))  # the step's concatenated ids and labels

    def alive(c: int) -> int:
        """Saved bytes of the first c stage forwards in flight (`forward_stages`), less the receive buffers they
        save (held above), plus their stage outputs."""
        total = 0
        for k in forward_stages(p.pp_schedule, p.pp, M, p.virtual_stages, c):
            st = stages[k]
            total += per_stage[k] - (hidden if st != 0 else 0) + (hidden if st != last_stage else Le)
        return total

    def backward(activations: int, accumulated: int):
        """One backward: `activations` saved, `accumulated` 2 when the gradients of an earlier one are live."""
        return plain_step_peak(StepBytes(
            weights=weights, buffers=buffer_bytes(arch, "reference", t.attention, e) + receive,
            inputs=input_bytes(arch, b, s) * M + ids, optimizer=optimizer, gradients=gradients,
            activations=activations, logits_model=Le if head else hidden, logits_fp32=L32 if head else 0,
            head_gradient=e * v_rows * h if head else 0, tied=False, step_temporaries=temporaries,
            step_copies=4 * (sum(sizes) + whole_vocab) if is_mixed(t.precision) else 0,
            grad_accum=accumulated, embedding_gradients=e * (v_rows * h + positions) if embedding else 0,
            largest_gradient=e * max(sizes), output_activations=output if head else 0,
            layer_transient=e * (2 * (s // tp if sp else s) * b * h + s * b * (arch.ffn_hidden // tp)
                                 + (arch.ffn_hidden // tp) * h),
            loss_frees_saved_logits=tp > 1, embedding_transient=embedding_transient if embedding else 0,
        ))  # fmt: skip

    walks = [backward(alive(count), 1)]
    forwards = M * len(stages)  # stage forwards on this rank in a step
    if forwards > 1:
        walks.append(backward(alive(min(count, forwards - 1)), 2))
    if moving_only:  # the forward and backward phases of both backwards (the caller walks the step)
        return max((ph for w in walks for ph in w.phases[:2]), key=lambda ph: ph.bytes)
    return max(walks, key=lambda w: w.bytes)


def _pipeline_fsdp_walk(spec, stages, tensors, local, c, weights, gradients, optimizer, held, per_stage, count, out,
                        v_rows, e) -> tuple[str, int]:  # fmt: skip
    """FSDP2 inside pipeline stages (every block and every stage root a `fully_shard` unit, torchtitan's
    composition). torch's `PipelineStage` runs each micro-batch's backward with `set_reshard_after_backward(False)`
    and `set_requires_gradient_sync(False)` (`backward_maybe_with_nosync`) and reduces once, after the last
    (`perform_reduce_grad`): from a unit's first backward to the step its parameters stay gathered (e·U, U the
    rank's unsharded elements) and its gradients accumulate unsharded in FSDP2's reduce dtype (fp32 under
    bf16-mixed: `FSDPParam.to_accumulated_grad_if_needed`). The pipeline walk's forward and backward run with
    those beside the shards, and a stage's input embeddings' new gradients (e, before FSDP2 adds them into the
    accumulators) beside all of the accumulators at its backward's end; the optimizer update holds the
    reduce-scattered shards."""
    p, t = spec.parallel, spec.training
    U = sum(x.elements for x in local_tensors(tensors, tp=p.tp, tp_rank=c["tp"], dp_shard=1, dp_rank=0))
    accumulator = 4 if is_mixed(t.precision) else e
    h = spec.model.arch.hidden
    positions = spec.model.arch.max_positions * h if spec.model.arch.position == "learned" else 0
    # The embeddings' new gradients (first stage only: the walk says); under tensor parallelism DTensor's
    # vocab-parallel embedding makes it of the whole vocabulary (EMBEDDING_FULL_GRADIENT, as `_tensor_parallel_walk`).
    arrived = e * ((spec.model.arch.vocab if p.tp > 1 else v_rows) * h + positions)
    # ... and FSDP2 accumulates that gradient as it arrives (`to_accumulated_grad_if_needed`: `.to(reduce_dtype)`
    # of the unsharded gradient), so the first stage's embedding accumulator is of the whole vocabulary too.
    whole = (spec.model.arch.vocab - v_rows) * h if p.tp > 1 and 0 in stages else 0
    moved = _pipeline_walk(spec, stages, local, weights + e * U, accumulator * (U + whole), optimizer, per_stage,
                           count, out, v_rows, e, embedding_transient=arrived, moving_only=True)  # fmt: skip
    step = held + gradients + step_temporaries(spec, [x.elements for x in local])
    if step > moved.bytes:
        return "optimizer update (the reduce-scattered shards)", step
    return f"{moved.moment}, the stage's units gathered and their gradients unsharded ({moved.phase})", moved.bytes


def parallel_prediction(spec, device: str, first_replica: bool = False) -> ParallelPrediction | None:
    """Per-rank terms of a run on torch's parallel engines (`harness.trainers.tensor`, `pipeline`, `fsdp`), or
    None where they do not run it (no architecture, not a decoder, not a torch-engine layout, inference).
    `first_replica`: only the ranks at data-parallel coordinate 0 (FSDP2's first shard is the largest: torch's
    chunking), as the planner asks for the busiest rank of a large mesh."""
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    if arch is None or arch.family != "decoder" or spec.measurement.mode != "train":
        return None
    if not (p.tp > 1 or p.pp > 1 or p.dp_shard == "fsdp2"):
        return None
    impl = spec.measurement.impl
    fsdp = p.dp_shard == "fsdp2"
    llama_plan = code_family(arch) == "llama" and arch.model_type != "phi3" and not arch.moe and arch.qk_norm == "none"
    if impl == "hf" and (not llama_plan or p.pp > 1 or fsdp or p.sequence_parallel):
        return None  # transformers models are measured under their own tensor-parallel plan (Llama's) only
    device = device if device in ("cpu", "cuda", "meta") else "cuda"
    notes: list[str] = []
    try:
        variant = activation_variant(arch, impl=impl, precision=t.precision, attention=t.attention,
                                     recompute=t.recompute, device=device)  # fmt: skip
    except ValueError:  # CUDA autocast: not measured yet; the pure 16-bit row stands in and says so
        variant = activation_variant(arch, impl=impl, precision=compute_dtype(t.precision),
                                     attention=t.attention, recompute=t.recompute, device=device)  # fmt: skip
        notes.append("CUDA autocast's fp32 copies (norms, softmax) are not measured yet: the pure 16-bit row")
    e = activation_bytes_per_element(t.precision)
    mixed = is_mixed(t.precision)
    # FSDP2's mixed precision keeps fp32 shards and optimizer state and casts for compute; the plain trainer
    # keeps 16-bit weights and gradients and an fp32 master copy in the optimizer.
    w_bytes = 4 if (fsdp and mixed) or t.precision == "fp32" else 2
    state = {"adamw": 2, "sgd": 1}[t.optimizer] * (4 if mixed or t.precision == "fp32" else 2)
    master = MASTER_COPY_BYTES if mixed and not fsdp else 0
    s, b, h, tp, sp = t.seq, t.batch, arch.hidden, p.tp, p.sequence_parallel
    sbh = s * b * h
    terms = act.layer_terms(arch, s, b, elem_bytes=e, mask_bytes=variant.mask_bytes, recompute=t.recompute,
                            attention=t.attention, stats_bytes=variant.stats_bytes)  # fmt: skip
    per_layer = terms.bytes(tp, sp)
    departures: dict[str, int] = {}
    shared = 0
    if impl == "hf":
        # The paper's row at t, and transformers' departures (formulas.variants) split as its plan splits them:
        # what lives on the heads or the MLP's inner width by t, the norms' copies and statistics whole.
        account = layer_account(arch, s, b, variant)
        per_layer = act.layer_terms(arch, s, b, elem_bytes=e, recompute=t.recompute, attention=t.attention).bytes(tp)
        for name, nbytes in account.departures.items():
            departures[name] = ceil_div(nbytes, tp) if name in SHARDED_DEPARTURES else nbytes
        shared = sum(account.shared.values())
    if sp and t.recompute != "full":
        departures["sp_gathered_input"] = 2 * e * sbh - 2 * ceil_div(e * sbh, tp)
    # FSDP2 without resharding after forward: the gathered weights that autograd saves (the linears' weights,
    # the norms' weights and biases) stay the gathered ones until backward, and are saved in the compute dtype.
    saved_unsharded = fsdp and not p.reshard_after_forward
    norm_elements = norm_params(arch)
    if saved_unsharded:
        linear = sum(numel(x.shape) for x in block_tensors(arch) if x.name.endswith("weight") and len(x.shape) == 2)
        departures["fsdp_unsharded_saved"] = e * (linear + 2 * norm_elements) // tp
    per_layer += sum(departures.values())
    stages_total = p.pp * p.virtual_stages
    layers_of = stage_layers(arch.n_layers, stages_total)
    M = p.n_microbatches
    ranks = []
    unmodelled = notes
    if fsdp:
        unmodelled.append("FSDP2 walk: the moments inside a block's backward (its unsharded gradients and fp32 "
                          "reduce-scatter buffer beside the activations still saved) are not candidates; they decide "
                          "the peak where the weights outweigh the activations (9% under on a 2-layer h = 64 model)")  # fmt: skip
    if fsdp and p.pp > 1:
        unmodelled.append("pipeline FSDP2 walk: the other in-flight micro-batches' activations at a stage's backward "
                          "end, and the step-end reduce-scatter's fp32 input (one unit's unsharded gradients) are not "
                          "walked; the head's new gradient is walked as the plain trainer's accumulation (2·e·v·h): "
                          "-2.2% and +4.2% on 4 gloo ranks (results/plan/real-pp2-fsdp2-gpt2-4l.json)")  # fmt: skip
        if p.tp > 1:
            unmodelled.append("pipeline FSDP2 walk with tensor parallel: the first stage's embedding accumulator is "
                              "walked whole-vocabulary (FSDP2 accumulates DTensor's whole-vocabulary gradient); -1.1% "
                              "and +1.2% on fake-tensor ranks of GPT-2 4 layers, tp 2 x pp 2 x dp 2 "
                              "(results/plan/fake-tp2-pp2-fsdp2-gpt2-4l.json)")  # fmt: skip
    unmodelled.append("a collective's buffer that the process group's worker thread lets go of after the step has "
                      "dropped it is freed late (gloo under CPU contention); the walks free it when dropped, and "
                      "the measured peak says how much was (`peak_backend_freed`)")  # fmt: skip
    if p.pp_schedule == "interleaved-zero-bubble":
        unmodelled.append("interleaved zero bubble: after its input-gradient pass a stage forward keeps only what "
                          "its weight pass needs; counted whole until then")  # fmt: skip
    for rank in range(p.gpus):
        c = _coords(rank, p.dp, p.pp, p.tp)
        if first_replica and c["dp"]:
            continue
        stages = rank_stages(c["pp"], p.pp, p.virtual_stages) if p.pp > 1 else [0]
        n_blocks = sum(layers_of[st] for st in stages)
        embedding, head = 0 in stages, (stages_total - 1) in stages
        tensors = rank_tensors(arch, blocks=n_blocks, embedding=embedding, head=head, head_copy=head and not embedding,
                               impl=impl)  # fmt: skip
        local = local_tensors(tensors, tp=tp, tp_rank=c["tp"], dp_shard=p.dp if fsdp else 1, dp_rank=c["dp"])
        elements = sum(x.elements for x in local)
        storage = sum(x.storage_elements for x in local)
        weights = w_bytes * storage
        gradients = w_bytes * (storage if fsdp else elements)  # FSDP2 reduce-scatters into padded shards
        tied_here = arch.tied_embeddings and embedding and head
        if embedding and tp > 1 and not fsdp and not tied_here:
            # DTensor's vocab-parallel embedding: its gradient is a view of the whole-vocabulary one
            # (EMBEDDING_GRADIENT_VIEW); a tied head's gradient is added to it out of place, a local tensor.
            wte_rows = shard_sizes(arch.vocab, tp)[c["tp"]]
            gradients += w_bytes * (arch.vocab - wte_rows) * h
            # ... and the mixed step's fp32 copy of that gradient is of the whole vocabulary too (measured:
            # results/plan/real-pp2-tp2-gpt2-4l.json, +4·(V − V/t)·h at the optimizer step).
            whole_vocab = (arch.vocab - wte_rows) * h
        else:
            whole_vocab = 0
        steps = 4 * len(local) if t.optimizer == "adamw" else 0  # AdamW's fp32 `step` per tensor
        optimizer = (state + master) * elements + steps
        v_rows = shard_sizes(arch.vocab, tp)[c["tp"]]
        out = 0
        emb = 0
        if embedding:
            emb = ceil_div(variant.mask_bytes * sbh, tp if sp else 1) if arch.dropout > 0 else 0
            emb += INDEX_BYTES * s * b  # the token ids the embedding's backward reads
        if head:
            norm = e * sbh + arch.norm_statistics * s * b * variant.stats_bytes
            out = ceil_div(norm, tp if sp else 1) + e * sbh + act.LOSS_LOGIT_BYTES * s * b * v_rows
            out += INDEX_BYTES * s * b + 4  # labels, and nll_loss's fp32 total weight
            if saved_unsharded:
                out += e * (arch.vocab * h + norm_elements)  # the head's weight and the final norm's, gathered
        layers_bytes = per_layer * n_blocks + shared
        if impl == "hf":  # the head's logits are gathered whole: the embedding, head and loss as on one GPU
            emb, out = 0, outside_account(arch, s, b, variant).total
        activations = layers_bytes + emb + out
        count = in_flight_chunks(p.pp_schedule, p.pp, M, c["pp"], p.virtual_stages) if p.pp > 1 else 1
        per_stage = [layers_of[st] * per_layer + (emb if st == 0 else 0) + (out if st == stages_total - 1 else 0)
                     for st in stages]  # fmt: skip
        in_flight = sum(per_stage[k] for k in forward_stages(p.pp_schedule, p.pp, M, p.virtual_stages, count))
        held = weights + optimizer + buffer_bytes(arch, "reference", t.attention, e) + input_bytes(arch, b, s) * M
        peak, basis = held + gradients + in_flight, SUM_BASIS
        if p.pp == 1 and not fsdp:
            walk = _tensor_parallel_walk(spec, local, weights, gradients, optimizer, activations, out, v_rows, e,
                                         whole_vocab)  # fmt: skip
            peak, basis = walk.bytes, f"phase walk: {walk.moment} ({walk.phase})"
        elif p.pp > 1 and fsdp:
            moment, peak = _pipeline_fsdp_walk(spec, stages, tensors, local, c, weights, gradients, optimizer, held,
                                               per_stage, count, out, v_rows, e)  # fmt: skip
            basis = f"pipeline FSDP2 walk: {moment}"
        elif p.pp > 1:
            walk = _pipeline_walk(spec, stages, local, weights, gradients, optimizer, per_stage, count, out, v_rows, e,
                                  whole_vocab)  # fmt: skip
            peak, basis = walk.bytes, f"pipeline walk: {walk.moment} ({walk.phase})"
        elif fsdp:
            saved_gathered = departures.get("fsdp_unsharded_saved", 0) * n_blocks + (
                e * (arch.vocab * h + norm_elements) if saved_unsharded else 0)  # fmt: skip
            moment, peak = _fsdp_walk(spec, tensors, local, held, gradients, activations - saved_gathered, e, v_rows)
            basis = f"FSDP2 walk: {moment}"
        ranks.append(RankPrediction(
            rank=rank, coords=c, stages=stages if p.pp > 1 else [], blocks=n_blocks, parameter_elements=elements,
            weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
            activations_layers=layers_bytes, per_layer=per_layer, in_flight_microbatches=count,
            activations_in_flight=in_flight, peak=peak, peak_basis=basis,
            departures={k: v * n_blocks for k, v in departures.items()},
        ))  # fmt: skip
    if p.virtual_stages > 1:
        unmodelled.append("pipeline walk with several stages per rank: the second backward is walked beside all of "
                          "the rank's gradients, where only the stages already back-propagated have them (an upper "
                          "bound: 0-8% over on results/parallel-cpu)")  # fmt: skip
    if p.tp > 1:
        unmodelled.append("tensor parallel walk: the top layer's eager-softmax backward is not a candidate")
    engine = {"pipeline": f"pipeline {p.pp_schedule} pp={p.pp} v={p.virtual_stages} M={M}"}.get(
        "pipeline" if p.pp > 1 else "", f"tp={tp}" + (" sp" if sp else "") + (f" fsdp2 dp={p.dp}" if fsdp else "")
    )
    if p.pp > 1 and tp > 1:
        engine += f", tp={tp}" + (" sp" if sp else "")
    if p.pp > 1 and fsdp:
        engine += f", fsdp2 dp={p.dp}"
    return ParallelPrediction(engine=engine, ranks=ranks, unmodelled=unmodelled)
