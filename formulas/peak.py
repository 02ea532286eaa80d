"""The peak of a training step: the live set at each phase of the step, and its maximum.

Transformer Math 101 sums the terms (weights + gradients + optimizer state + activations); no moment of a
step holds all of them at once, and the moments that decide an out-of-memory hold things the sum does not
name: the loss's fp32 logits and their gradient, a tied embedding's gradient accumulated out of place, the
optimizer's per-parameter temporaries, mixed precision's fp32 copy of the gradients. This module walks the
phases of one steady step (optimizer state exists from the start, gradients are None) for the engine that
will run, and returns the largest live set, the phase it is in, and what is live then, in the categories
that `measured.peak_breakdown` uses (what each phase allocated):

    weights, buffers, inputs, optimizer      held across steps (optimizer: state and fp32 master copy)
    activations                              allocated by the forward (saved for backward, and transients)
    backward                                 allocated by the backward (gradients and transients)
    gradients                                gradients, once backward is over
    optimizer step                           allocated by the step (temporaries, mixed precision's fp32
                                             gradient copies)

Phases (the tracker's category while they run): `activations` (the forward), `backward`, `optimizer step`.
With L32 = 4·b·s·v (the loss's fp32 logits) and Le = e·b·s·v (the model's own logits), A the bytes saved
for backward, G the gradients and S the bytes held across steps, the candidates are, per micro-batch k
(G_k: the gradients accumulated before it, 0 for the first):

    forward end        S + G_k + A + Le + (L32 when e ≠ 4)     the logits and their fp32 copy beside log_softmax
    backward start     S + G_k + A + 2·L32                       nll_loss and log_softmax gradients, fp32
    head gradient      S + G_k + A + H (+ H when accumulating)   the output projection's weight gradient
    top layer          S + G_k + A − A_out + H + X               its MLP backward: A_out, the output layer's
                                                                 and loss's saved tensors, are freed; X the
                                                                 transients (`StepBytes.layer_transient`)
    top softmax        S + G_k + A' + H + 2·a·s²·b·g + ...       eager attention: the probabilities' and the
                                                                 scores' gradients (`_softmax_backward`)
    embedding          S + G + 2·H (tied)                        the embedding's gradient added out of place
    optimizer step     S + G + M + T                             M: fp32 gradient copies (mixed), T: temporaries

with H = e·v·h. T is the optimizer implementation's: for-loop AdamW (the CPU) two fp32 temporaries the size
of the tensor it updates and the previous tensor's quotient, still bound (the largest over the tensors), fused AdamW (the plain trainer on CUDA) none, foreach AdamW (DeepSpeed on CUDA) one
fp32 list the size of the stepped state, SGD none. DeepSpeed's engine is walked rank by rank
(`engine_step_peak`, from `formulas.zero`). Under full recompute the re-forwarded top block is not a
candidate of its own: it stays below the backward start on every point measured. Measured against the
exact live-bytes tracker (`results/peak`); what is not modelled is listed in `PeakPrediction.unmodelled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from formulas.activations import LOSS_LOGIT_BYTES, layer_bytes, output_bytes
from formulas.layouts import buffer_bytes, input_bytes, parameter_tensors
from formulas.memory import ModelStates
from formulas.params import mlp_params
from formulas.precision import activation_bytes_per_element, is_mixed, weight_bytes_per_param
from formulas.spec import RunSpec
from formulas.variants import activation_variant, layer_account, outside_account
from formulas.zero import BucketSizes, RankStates, allreduce_bucket_elements, zero_ranks

PHASES: tuple[str, ...] = ("activations", "backward", "optimizer step")
"""The phases of a step, named as the live tracker names what each allocates."""

HELD: tuple[str, ...] = ("weights", "buffers", "inputs", "optimizer")


@dataclass(frozen=True)
class PhasePeak:
    """The largest live set within one phase."""

    phase: str
    bytes: int
    breakdown: dict[str, int]
    """Category → live bytes at that moment (the categories of `measured.peak_breakdown`)."""
    moment: str
    """What is happening then: `backward start`, `embedding gradient`, ..."""


@dataclass(frozen=True)
class PeakPrediction:
    """The predicted peak of a steady training step: the largest phase peak."""

    bytes: int
    phase: str
    moment: str
    breakdown: dict[str, int]
    phases: tuple[PhasePeak, ...]
    """The peak of each phase."""
    unmodelled: tuple[str, ...] = ()
    """Departures known to exist and not in the numbers above."""
    basis: str = ""
    """What the walk stands on: the implementation, device and optimizer it was computed for."""
    states: dict[str, int] = field(default_factory=dict)
    """The model states the walk holds, per rank (weights, gradients after backward, optimizer state): the
    engine's own (DeepSpeed's fp32 partition, boundary parameters), the largest over ranks."""

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "phase": self.phase,
            "moment": self.moment,
            "basis": self.basis,
            "states": dict(self.states),
            "breakdown": dict(self.breakdown),
            "phases": {p.phase: {"bytes": p.bytes, "moment": p.moment} for p in self.phases},
            "unmodelled": list(self.unmodelled),
        }


@dataclass(frozen=True)
class StepBytes:
    """What the walk needs, bytes per GPU for one data-parallel rank (`formulas.predict` fills it)."""

    weights: int
    buffers: int
    inputs: int
    optimizer: int
    """Optimizer state held across steps, the fp32 master copy included."""
    gradients: int
    activations: int
    """Bytes saved for backward by one micro-batch's forward."""
    logits_model: int
    """Le: the output layer's logits in the model's dtype, one micro-batch (0 without an LM head)."""
    logits_fp32: int
    """L32: the loss's fp32 logits, one micro-batch (equal to Le in fp32)."""
    head_gradient: int
    """H: the output projection's weight gradient (e·v·h)."""
    tied: bool
    """The output projection is the embedding: its gradient arrives twice and is added out of place."""
    step_temporaries: int
    """The optimizer implementation's largest live temporaries during its update."""
    step_copies: int = 0
    """Mixed precision: the fp32 copies of every gradient that the master-weight step makes first."""
    grad_accum: int = 1
    unmodelled: tuple[str, ...] = field(default_factory=tuple)
    basis: str = ""
    embedding_gradients: int = 0
    """The input embeddings' gradients (token, position, token type), the last to arrive in backward."""
    largest_gradient: int = 0
    """The largest parameter tensor's gradient."""
    output_activations: int = 0
    """Of `activations`, those the output layer and the loss saved: freed before the layers' backward."""
    softmax_saved: int = 0
    """The activations still saved at the top layer's softmax backward (0: no s×s probabilities saved)."""
    softmax_transient: int = 0
    """What that softmax backward has live beyond them and the head's gradient (`_softmax_backward`)."""
    layer_transient: int = 0
    """The top layer's MLP backward beyond the saved activations, at its down projection: the incoming gradient
    and its copy on the residual branch (2·b·s·h), the projection's input gradient (b·s·f) and weight gradient
    (f·h), one micro-batch."""
    loss_frees_saved_logits: bool = False
    """The loss frees its saved fp32 logits before it makes their gradients (torch's tensor-parallel
    `loss_parallel` cross-entropy): the backward start holds A + L32, not A + 2·L32, and the head's gradient
    comes after them."""
    embedding_transient: int = 0
    """Beyond the embedding's gradient, what its backward allocates at the end of backward (DTensor's
    vocab-parallel embedding: a gradient of the whole vocabulary, e·v·h, before its rows are kept)."""


def _phase(phase: str, moment: str, parts: dict[str, int]) -> PhasePeak:
    parts = {k: v for k, v in parts.items() if v}
    return PhasePeak(phase, sum(parts.values()), parts, moment)


def plain_step_peak(b: StepBytes) -> PeakPrediction:
    """The walk of one steady step of the single-process trainer (`harness.trainers.plain`)."""
    held = {"weights": b.weights, "buffers": b.buffers, "inputs": b.inputs, "optimizer": b.optimizer}
    G, A, H = b.gradients, b.activations, b.head_gradient
    last = b.grad_accum > 1  # the last micro-batch runs with the earlier ones' gradients live
    before = G if last else 0  # the gradients accumulated before the last micro-batch (bytes as G)
    copy = b.logits_fp32 if b.logits_model != b.logits_fp32 else 0
    forward = _phase("activations", "forward end (logits beside log_softmax)",
                     {**held, "backward": before, "activations": A + b.logits_model + copy})  # fmt: skip
    freed = b.logits_fp32 if b.loss_frees_saved_logits else 0
    start = _phase("backward", "backward start (nll_loss and log_softmax gradients)",
                   {**held, "activations": A - freed, "backward": before + 2 * b.logits_fp32})  # fmt: skip
    head = _phase("backward", "output projection's weight gradient",
                  {**held, "activations": A - freed, "backward": before + H * (2 if last else 1)})  # fmt: skip
    layer = _phase("backward", "top layer's MLP backward",
                   {**held, "activations": A - b.output_activations, "backward": before + H + b.layer_transient})  # fmt: skip
    candidates = [start, head, layer]
    if b.softmax_saved:
        candidates.append(_phase("backward", "top layer's softmax backward",
                                 {**held, "activations": b.softmax_saved,
                                  "backward": before + H + b.softmax_transient}))  # fmt: skip
    X = b.embedding_transient
    if b.tied:
        candidates.append(_phase("backward", "tied embedding gradient added out of place",
                                 {**held, "backward": G + 2 * H + X}))  # fmt: skip
    else:
        candidates.append(_phase("backward", "backward end", {**held, "backward": G + X}))
    backward = max(candidates, key=lambda p: p.bytes)
    step = _phase("optimizer step", "optimizer update",
                  {**held, "gradients": G, "optimizer step": b.step_copies + b.step_temporaries})  # fmt: skip
    phases = (forward, backward, step)
    top = max(phases, key=lambda p: p.bytes)
    states = {"weights": b.weights, "gradients": G, "optimizer": b.optimizer}
    return PeakPrediction(top.bytes, top.phase, top.moment, top.breakdown, phases, b.unmodelled, b.basis, states)


def _top(phases: list[PhasePeak]) -> PhasePeak:
    return max(phases, key=lambda p: p.bytes)


def engine_step_peak(b: StepBytes, stage: int, ranks: list[RankStates], step_temporaries_per_element: int,
                     all_reduce_bucket: int = 0) -> PeakPrediction:  # fmt: skip
    """The walk of one steady step of a DeepSpeed engine (`harness.trainers.deepspeed`), rank by rank; the
    rank that peaks highest is the answer.

    ZeRO-0 is the plain step with DeepSpeed's bucketed all-reduce of the gradients at the end of backward (a
    flat copy of up to `all_reduce_bucket` bytes). ZeRO-1/2/3, with R the rank's holdings (`formulas.zero`),
    S the bytes held across steps (buffers, inputs, R's weights and optimizer state; at stage 3 also its
    gradient partition and IPG bucket), W_g the parameters ZeRO-3 gathers for the forward, E the input
    embeddings' gradients (3·H for a tied embedding: both contributions and their sum) and p the rank's
    partition elements:

        forward end        S + A + W_g + Le + (L32 when e ≠ 4)
        backward start     S + A + W_g + 2·L32
        backward end       stage 1: S + G + E and then S + G + R.gradients + bucket (the reduction at the end)
                           stage 2: S + bucket + R.gradients + E (reduced bucket by bucket; E arrives last)
                           stage 3: S + E
        optimizer step     S + 4·p + t·p      the fp32 gradient partition and the optimizer's temporaries
                                              (t bytes per element: for-loop AdamW 8, SGD 0)
    """
    if stage == 0:
        plain = plain_step_peak(b)
        held = {"weights": b.weights, "buffers": b.buffers, "inputs": b.inputs, "optimizer": b.optimizer}
        reduce = _phase("backward", "gradient all-reduce (DeepSpeed's flattened bucket)",
                        {**held, "backward": b.gradients + all_reduce_bucket})  # fmt: skip
        phases = tuple(_top([p, reduce]) if p.phase == "backward" else p for p in plain.phases)
        top = _top(list(phases))
        return PeakPrediction(top.bytes, top.phase, top.moment, top.breakdown, phases, b.unmodelled, b.basis,
                              plain.states)  # fmt: skip
    best: tuple[PhasePeak, tuple[PhasePeak, ...]] | None = None
    A, copy = b.activations, (b.logits_fp32 if b.logits_model != b.logits_fp32 else 0)
    for r in ranks:
        held = {"weights": r.weights, "buffers": b.buffers, "inputs": b.inputs, "optimizer": r.optimizer}
        if stage == 3:
            held |= {"gradients": r.gradients, "zero buffers": r.bucket}
        forward = _phase("activations", "forward end (logits beside log_softmax)",
                         {**held, "activations": A + r.gathered + b.logits_model + copy})  # fmt: skip
        start = _phase("backward", "backward start (nll_loss and log_softmax gradients)",
                       {**held, "activations": A + r.gathered, "backward": 2 * b.logits_fp32})  # fmt: skip
        # The top layer's MLP backward: the head's gradient is held (stage 1, or a tied embedding's) or
        # reduced into the rank's gradient buffer (stage 2, allocated at the first bucket's reduction).
        head = b.head_gradient if stage == 1 or b.tied else 0
        reduced = r.gradients + r.bucket if stage == 2 else 0
        layer = _phase("backward", "top layer's MLP backward",
                       {**held, "activations": A - b.output_activations + r.gathered,
                        "backward": head + reduced + b.layer_transient})  # fmt: skip
        if stage == 1:
            ends = [_phase("backward", "backward end (full gradients)",
                           {**held, "backward": b.gradients + (2 * b.head_gradient if b.tied else 0)}),
                    _phase("backward", "gradient reduction at the end of backward",
                           {**held, "backward": b.gradients + r.gradients + r.bucket})]  # fmt: skip
        elif stage == 2:
            ends = [_phase("backward", "backward end (partition, IPG bucket, embedding gradients)",
                           {**held, "backward": r.gradients + r.bucket + b.embedding_gradients})]  # fmt: skip
        else:
            ends = [
                _phase("backward", "backward end (embedding gradients)", {**held, "backward": b.embedding_gradients})
            ]
        extra = []
        if b.softmax_saved:
            extra.append(_phase("backward", "top layer's softmax backward",
                                {**held, "activations": b.softmax_saved + r.gathered,
                                 "backward": head + reduced + b.softmax_transient}))  # fmt: skip
        backward = _top([start, layer, *extra, *ends])
        p = r.partition_elements
        step = _phase("optimizer step", "optimizer update (fp32 gradient partition)",
                      {**held, "optimizer step": 4 * p + step_temporaries_per_element * p})  # fmt: skip
        phases = (forward, backward, step)
        top = _top(list(phases))
        if best is None or top.bytes > best[0].bytes:
            best = (replace(top, moment=f"{top.moment}, rank {r.rank}"), phases)
    top, phases = best
    states = {"weights": max(r.weights for r in ranks), "gradients": max(r.gradients for r in ranks),
              "optimizer": max(r.optimizer for r in ranks)}  # fmt: skip
    return PeakPrediction(top.bytes, top.phase, top.moment, top.breakdown, phases, b.unmodelled, b.basis, states)


# --------------------------------------------------------------------------------------------------
# The inputs of the walk, from the spec


def target_device(device: str) -> str:
    """The device a prediction is for: the spec's when it names one, else a GPU (`auto` plans for one)."""
    return device if device in ("cuda", "cpu", "meta") else "cuda"


@dataclass(frozen=True)
class _Saved:
    """What the forward saves, as the walk needs it."""

    total: int
    output: int
    """The output layer's and the loss's share (freed before the layers' backward)."""
    per_layer: int
    loss_bytes: int
    """The loss's bytes per logit."""
    scores_bytes: int
    """Bytes per element of the attention probabilities' gradients in the softmax backward (0: no s×s
    probabilities saved, flash or SDPA attention, or recomputed)."""
    note: str | None = None


def _activations(spec: RunSpec, device: str, paper: int) -> _Saved:
    """The implementation's saved bytes where its variant is modelled (`formulas.variants`), else the paper's
    count with the reason."""
    t, arch = spec.training, spec.model.arch
    e = activation_bytes_per_element(t.precision)
    eager = t.attention == "eager" and t.recompute == "none"
    try:
        variant = activation_variant(
            arch, impl=spec.measurement.impl, precision=t.precision, attention=t.attention, recompute=t.recompute,
            device=device,
        )  # fmt: skip
    except ValueError as exc:
        output = output_bytes(arch, t.seq, t.batch, elem_bytes=e)
        per_layer = layer_bytes(arch, t.seq, t.batch, elem_bytes=e, recompute=t.recompute, attention=t.attention)
        note = f"activations: the paper's count ({str(exc).splitlines()[0]})"
        return _Saved(paper, output, per_layer, LOSS_LOGIT_BYTES, e if eager else 0, note)
    account = layer_account(arch, t.seq, t.batch, variant)
    outside = outside_account(arch, t.seq, t.batch, variant)
    eager = eager and variant.sdpa_kernel == "none"
    scores = (4 if variant.softmax_fp32 else e) if eager else 0
    return _Saved(account.total(arch.n_layers) + outside.total, outside.output, account.per_layer,
                  variant.loss_logit_bytes, scores)  # fmt: skip


def for_loop_adamw_temporaries(tensors: list[int], state_bytes: int) -> int:
    """The for-loop AdamW's (`_single_tensor_adamw`) largest live temporaries over tensors of these sizes, in
    the order it steps them: sqrt(v), then its quotient `denom`, while the previous tensor's `denom` is still
    bound to the loop's local variable."""
    previous = [0, *tensors[:-1]]
    return state_bytes * max(2 * n + p for n, p in zip(tensors, previous, strict=True))


def step_bytes(spec: RunSpec, states: ModelStates, paper_activations: int) -> StepBytes:
    """The bytes one steady step of the plain trainer handles, for the implementation and device of `spec`."""
    arch, t = spec.model.arch, spec.training
    device = target_device(spec.measurement.device)
    impl = spec.measurement.impl
    e = activation_bytes_per_element(t.precision)
    unmodelled: list[str] = []
    saved = _activations(spec, device, paper_activations)
    activations, output_saved, loss_bytes, note = saved.total, saved.output, saved.loss_bytes, saved.note
    if note:
        unmodelled.append(note)
    optimizer_impl = {"adamw": "fused AdamW" if device == "cuda" else "for-loop AdamW", "sgd": "SGD with momentum",
                      "adam8bit": "8-bit AdamW"}[t.optimizer]  # fmt: skip
    basis = (
        f"{impl} model on {device}, activations by "
        + ("the paper's count" if note else "formulas.variants")
        + f", {optimizer_impl}"
        + (", an fp32 master copy" if is_mixed(t.precision) else "")
    )
    tensors = parameter_tensors(arch, impl)
    adamw = t.optimizer == "adamw"
    state_bytes = 4 if is_mixed(t.precision) or t.precision == "fp32" else weight_bytes_per_param(t.precision)
    if adamw and device == "cuda":
        temporaries = 0  # fused AdamW (harness.trainers.plain on CUDA): no per-tensor temporaries
        unmodelled.append("optimizer step: fused AdamW's workspace on CUDA (not yet measured on a GPU)")
    elif adamw:
        temporaries = for_loop_adamw_temporaries(tensors, state_bytes)
    else:
        temporaries = 0  # SGD with momentum updates in place
    if t.optimizer == "adam8bit":
        unmodelled.append("optimizer step: bitsandbytes' 8-bit AdamW kernels")
    if t.grad_dtype == "fp32":
        unmodelled.append(
            "fp32 main gradients: the 16-bit gradient of each parameter before it is added is not counted"
        )
    bsv = t.batch * t.seq * arch.vocab if arch.family == "decoder" or arch.mlm_head else 0
    return StepBytes(
        weights=states.weights,
        buffers=buffer_bytes(arch, impl, t.attention, e),
        inputs=input_bytes(arch, t.batch, t.seq) * t.grad_accum,
        optimizer=states.optimizer + (4 * len(tensors) if adamw else 0),  # AdamW's fp32 `step` per tensor
        gradients=states.gradients,
        activations=activations,
        logits_model=e * bsv,
        logits_fp32=loss_bytes * bsv,
        head_gradient=e * arch.vocab * arch.hidden,
        tied=arch.tied_embeddings,
        step_temporaries=temporaries,
        # The master step's fp32 copies of the gradients (none when the main gradients are fp32 already).
        step_copies=4 * sum(tensors) if is_mixed(t.precision) and t.grad_dtype == "auto" else 0,
        grad_accum=t.grad_accum,
        unmodelled=tuple(unmodelled),
        basis=basis,
        embedding_gradients=e * _embedding_elements(arch),
        largest_gradient=e * max(tensors),
        output_activations=output_saved,
        **_softmax_backward(arch, t.seq, t.batch, e, saved),
        layer_transient=e * (t.batch * t.seq * (2 * arch.hidden + arch.ffn_hidden) + arch.ffn_hidden * arch.hidden),
    )


def _softmax_backward(arch, seq: int, batch: int, e: int, saved: _Saved) -> dict[str, int]:
    """The top layer's softmax backward with eager attention (s×s probabilities saved): still saved then, all
    but the output layer's and the top layer's own saved tensors, which keeps its probabilities, Q, K, the
    projections' input and the norm's; live in backward, the gradients of the probabilities and of the
    scores (two a·s²·b tensors, fp32 where the softmax runs in fp32), the top layer's MLP and output
    projection weight gradients and the incoming gradient with its residual copy."""
    if not saved.scores_bytes:
        return {}
    sbh, scores = seq * batch * arch.hidden, arch.n_heads * seq * seq * batch
    sbq = seq * batch * arch.q_width  # Q and the projection's input are a·d wide
    kept = e * scores + e * (2 * sbq + sbh + seq * batch * arch.kv_width)
    weights = mlp_params(arch) + arch.q_width * arch.hidden
    return {
        "softmax_saved": saved.total - saved.output - saved.per_layer + kept,
        "softmax_transient": 2 * saved.scores_bytes * scores + e * weights + 2 * e * sbh,
    }


def _embedding_elements(arch) -> int:
    """Elements of the input embeddings' gradients live at the end of backward: token (3× when tied to the
    output layer: its two contributions and their out-of-place sum), learned positions, token types."""
    token = arch.vocab * arch.hidden * (3 if arch.tied_embeddings else 1)
    positions = arch.max_positions * arch.hidden if arch.position == "learned" else 0
    return token + positions + (arch.type_vocab or 0) * arch.hidden


def sum_of_terms(states: ModelStates, activations: int | None, reason: str, *, host: bool = False) -> PeakPrediction:
    """The sum of the terms as a peak, for what the walk does not model: it says why. `host`: the device is
    the host (a CPU run), so offloaded states share its memory and count."""
    parts = {"weights": states.weights, "gradients": states.gradients, "optimizer": states.optimizer,
             "zero3 live params": states.zero3_live_params, "activations": activations or 0,
             "host (offloaded)": states.host_total if host else 0}  # fmt: skip
    parts = {k: v for k, v in parts.items() if v}
    states_held = {"weights": states.weights, "gradients": states.gradients, "optimizer": states.optimizer}
    return PeakPrediction(sum(parts.values()), "none", f"the sum of the terms: {reason}", parts, (), (reason,),
                          states=states_held)  # fmt: skip


def engine_unmodelled(spec: RunSpec) -> str | None:
    """Why the walk does not model `spec`'s DeepSpeed step (None: it does)."""
    p, t = spec.parallel, spec.training
    if p.offload_optimizer != "none" or p.offload_params != "none":
        return "ZeRO-Offload's step (host buffers and copies) is not walked yet"
    if t.grad_accum > 1:
        return "gradient accumulation under DeepSpeed is not walked yet"
    if spec.measurement.deepspeed_config:
        return "a user's --deepspeed-config (its buckets and thresholds) is not read by the walk"
    if t.optimizer == "adam8bit":
        return "8-bit AdamW as DeepSpeed's client optimizer is not walked"
    if t.grad_dtype == "fp32":
        return "DeepSpeed with fp32 gradients (data_types.grad_accum_dtype) is not walked"
    return None


def step_peak(spec: RunSpec, states: ModelStates, paper_activations: int) -> PeakPrediction | None:
    """The predicted peak of a steady training step of `spec`, or None where it is not modelled (no
    architecture, inference, tensor or pipeline parallelism, what `engine_unmodelled` names)."""
    p, t = spec.parallel, spec.training
    if spec.model.arch is None or spec.measurement.mode != "train" or p.tp > 1 or p.pp > 1 or p.dp_shard == "fsdp2":
        return None
    b = step_bytes(spec, states, paper_activations)
    if p.zero == 0 and p.gpus == 1:
        return plain_step_peak(b)
    if engine_unmodelled(spec):
        return None
    arch, impl = spec.model.arch, spec.measurement.impl
    tensors = parameter_tensors(arch, impl)
    buckets = BucketSizes.for_hidden(arch.hidden)
    e = weight_bytes_per_param(t.precision)
    state = {"adamw": 8, "sgd": 4}[t.optimizer]  # torch's state of the fp32 master partition
    device = target_device(spec.measurement.device)
    notes = ["ZeRO: the all-gather of updated parameters after the step (an all-gather bucket) is not counted",
             "a collective's flat buffer freed late: the communication thread (gloo's worker, NCCL's watchdog) "
             "drops it a moment after the collective returns; under CPU contention the last gradient bucket "
             "has been seen alive into the optimizer step (up to one bucket more), which the walk does not "
             "count"]  # fmt: skip
    adamw = t.optimizer == "adamw"
    # DeepSpeed builds torch's AdamW (`torch_adam`): on CUDA it defaults to foreach, whose update keeps one
    # fp32 list the size of the stepped state (`_multi_tensor_adamw`: sqrt(v)); on the CPU the for-loop
    # keeps two temporaries the size of the tensor it updates (sqrt(v), then its quotient).
    foreach = device == "cuda" and adamw
    if foreach:
        notes.append("DeepSpeed's torch AdamW on CUDA is foreach: one fp32 list the size of the stepped state "
                     "(torch's _multi_tensor_adamw), not yet measured on a GPU")  # fmt: skip
    kept = tuple(n for n in b.unmodelled if "fused AdamW" not in n)
    b = replace(b, unmodelled=kept + tuple(notes),
                basis=b.basis.replace(", for-loop AdamW", "").replace(", fused AdamW", "")
                + f", DeepSpeed ZeRO-{p.zero} over {p.dp} ranks (torch AdamW)")  # fmt: skip
    if p.zero == 0:
        bucket = e * allreduce_bucket_elements(tensors)
        if foreach:
            b = replace(b, step_temporaries=4 * sum(tensors))
        return engine_step_peak(b, 0, [], 0, all_reduce_bucket=bucket)
    ranks = zero_ranks(tensors, stage=p.zero, dp=p.dp, weight_bytes=e, gradient_bytes=e, state_bytes=state,
                       buckets=buckets)  # fmt: skip
    temporaries = (4 if foreach else 2 * 4) if adamw else 0  # per stepped fp32 element
    # DeepSpeed does not count AdamW's step counters per tensor: its optimizer steps one flat partition.
    b = replace(b, optimizer=ranks[0].optimizer, gradients=e * sum(tensors))
    return engine_step_peak(b, p.zero, ranks, temporaries)
