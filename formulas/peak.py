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
    embedding          S + G + 2·H (tied)                        the embedding's gradient added out of place
    optimizer step     S + G + M + T                             M: fp32 gradient copies (mixed), T: temporaries

with H = e·v·h. Measured against the exact live-bytes tracker (`results/peak`); what is not modelled is
listed in `PeakPrediction.unmodelled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formulas.activations import LOSS_LOGIT_BYTES
from formulas.layouts import buffer_bytes, input_bytes, parameter_tensors
from formulas.memory import ModelStates
from formulas.precision import activation_bytes_per_element, is_mixed, weight_bytes_per_param
from formulas.spec import RunSpec
from formulas.variants import activation_variant, layer_account, outside_account

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

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "phase": self.phase,
            "moment": self.moment,
            "basis": self.basis,
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
    start = _phase("backward", "backward start (nll_loss and log_softmax gradients)",
                   {**held, "activations": A, "backward": before + 2 * b.logits_fp32})  # fmt: skip
    head = _phase("backward", "output projection's weight gradient",
                  {**held, "activations": A, "backward": before + H * (2 if last else 1)})  # fmt: skip
    candidates = [start, head]
    if b.tied:
        candidates.append(_phase("backward", "tied embedding gradient added out of place",
                                 {**held, "backward": G + 2 * H}))  # fmt: skip
    else:
        candidates.append(_phase("backward", "backward end", {**held, "backward": G}))
    backward = max(candidates, key=lambda p: p.bytes)
    step = _phase("optimizer step", "optimizer update",
                  {**held, "gradients": G, "optimizer step": b.step_copies + b.step_temporaries})  # fmt: skip
    phases = (forward, backward, step)
    top = max(phases, key=lambda p: p.bytes)
    return PeakPrediction(top.bytes, top.phase, top.moment, top.breakdown, phases, b.unmodelled, b.basis)


# --------------------------------------------------------------------------------------------------
# The inputs of the walk, from the spec


def target_device(device: str) -> str:
    """The device a prediction is for: the spec's when it names one, else a GPU (`auto` plans for one)."""
    return device if device in ("cuda", "cpu", "meta") else "cuda"


def _activations(spec: RunSpec, device: str, paper: int) -> tuple[int, int, str | None]:
    """(saved bytes, the loss's bytes per logit, what is not modelled): the implementation's variant where it
    is modelled (`formulas.variants`), else the paper's count with the reason."""
    t, arch = spec.training, spec.model.arch
    try:
        variant = activation_variant(
            arch, impl=spec.measurement.impl, precision=t.precision, attention=t.attention, recompute=t.recompute,
            device=device,
        )  # fmt: skip
    except ValueError as exc:
        return paper, LOSS_LOGIT_BYTES, f"activations: the paper's count ({str(exc).splitlines()[0]})"
    account = layer_account(arch, t.seq, t.batch, variant)
    outside = outside_account(arch, t.seq, t.batch, variant)
    return account.total(arch.n_layers) + outside.total, variant.loss_logit_bytes, None


def step_bytes(spec: RunSpec, states: ModelStates, paper_activations: int) -> StepBytes:
    """The bytes one steady step of the plain trainer handles, for the implementation and device of `spec`."""
    arch, t = spec.model.arch, spec.training
    device = target_device(spec.measurement.device)
    impl = spec.measurement.impl
    e = activation_bytes_per_element(t.precision)
    unmodelled: list[str] = []
    activations, loss_bytes, note = _activations(spec, device, paper_activations)
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
        temporaries = 2 * max(tensors) * state_bytes  # for-loop AdamW: sqrt(v), then its quotient
    else:
        temporaries = 0  # SGD with momentum updates in place
    if t.optimizer == "adam8bit":
        unmodelled.append("optimizer step: bitsandbytes' 8-bit AdamW kernels")
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
        step_copies=4 * sum(tensors) if is_mixed(t.precision) else 0,  # the master step's fp32 gradients
        grad_accum=t.grad_accum,
        unmodelled=tuple(unmodelled),
        basis=basis,
    )


def sum_of_terms(states: ModelStates, activations: int | None, reason: str) -> PeakPrediction:
    """The sum of the terms as a peak, for what the walk does not model: it says why."""
    parts = {"weights": states.weights, "gradients": states.gradients, "optimizer": states.optimizer,
             "zero3 live params": states.zero3_live_params, "activations": activations or 0}  # fmt: skip
    parts = {k: v for k, v in parts.items() if v}
    return PeakPrediction(sum(parts.values()), "none", f"the sum of the terms: {reason}", parts, (), (reason,))


def step_peak(spec: RunSpec, states: ModelStates, paper_activations: int) -> PeakPrediction | None:
    """The predicted peak of a steady training step of `spec`, or None where it is not modelled (no
    architecture, inference, tensor or pipeline parallelism, a DeepSpeed engine)."""
    p = spec.parallel
    if spec.model.arch is None or spec.measurement.mode != "train" or p.tp > 1 or p.pp > 1:
        return None
    if p.zero > 0 or p.gpus > 1:
        return None
    return plain_step_peak(step_bytes(spec, states, paper_activations))
