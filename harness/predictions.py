"""Prediction methods: one registry that the record, the display and the report iterate over.

Each method predicts some of the comparable terms (`TERMS`, bytes per GPU) for a run, from its spec and the
device it ran on:

    korthikanti     the harness's formulas: Transformer Math 101's model states, Korthikanti et al. 2022's
                    activations (`formulas.predict`)
    implementation  the same activations plus the measured departures of the model and kernels that ran
                    (`formulas.variants`)
    naive           the Q&A answer: 4·L·C² parameters, no optimizer state, B·N·L·T·(T+2D) activations
    naive-mlp4c     its comment's correction for a 4C-wide MLP
    deepspeed       DeepSpeed's own ZeRO estimator (model states only, ZeRO runs)
    parallel        every rank of a tensor/pipeline/FSDP2 layout as torch's engines split it
                    (`formulas.ranks`): exact shards, Korthikanti's t-rows, in-flight micro-batches

A record keeps each method's prediction under its name (`Record.predicted`), typed by the method's
`summary` class; `Method.terms` reads the comparable terms out of it. A new method is a new entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from formulas.activations import ActivationBreakdown
from formulas.compute import matmul_flops_per_step
from formulas.inference import InferenceMemory
from formulas.peak import PeakPrediction
from formulas.predict import Flops, predict
from formulas.ranks import ParallelPrediction, parallel_prediction
from formulas.spec import MEASURED_DEVICES, RunSpec
from formulas.variants import ImplementationSummary, implementation_summary
from harness.schema import SchemaError, from_json, to_json
from harness.zero.estimator import EstimatorPrediction, deepspeed_estimate

TERM_TITLES: dict[str, str] = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations (all saved)",
    "activations_per_layer": "activations per layer",
    "model_states": "model states (w + g + opt)",
    "host_model_states": "host memory (DeepSpeed offload)",
    "peak": "peak allocated vs the predicted peak (the total, for the formulas)",
    "inference_peak": "inference peak vs 1.2 × weights",
}


@dataclass(frozen=True)
class Terms:
    """One method's answer for each comparable term, bytes per GPU (None: the method has no answer)."""

    weights: float | None = None
    gradients: float | None = None
    optimizer: float | None = None
    activations: float | None = None
    activations_per_layer: float | None = None
    model_states: float | None = None
    host_model_states: float | None = None
    peak: float | None = None
    inference_peak: float | None = None


TERMS: tuple[str, ...] = tuple(f.name for f in fields(Terms))
"""Comparable terms: a measured value (`harness.report.frame`) against each method's."""


# --------------------------------------------------------------------------------------------------
# What each method's prediction holds


@dataclass(frozen=True)
class MemoryTerms:
    """Bytes per GPU by term (`formulas.predict.Prediction.memory_bytes`)."""

    weights: int | None
    gradients: int | None
    optimizer: int | None
    zero3_live_params: int | None
    activations: int | None
    total: int
    peak: int | None = None
    """The step's predicted peak (`formulas.peak`), the same as the `peak` method's."""


@dataclass(frozen=True)
class HostTerms:
    """DeepSpeed offload: bytes per rank in host memory."""

    weights: int
    gradients: int
    optimizer: int
    total: int


@dataclass(frozen=True)
class FormulaPrediction:
    """The harness's formulas for one run (the `korthikanti` method)."""

    params: int
    memory_bytes: MemoryTerms
    flops: Flops
    """`per_step_matmul` is the measured step's: for an inference record, one forward's matmuls."""
    inference: InferenceMemory
    host_memory_bytes: HostTerms | None = None
    activation_bytes: ActivationBreakdown | None = None
    trainable_params: int | None = None
    """`--finetune lora|qlora`: the adapters' parameters (`formulas.finetune.lora_params`)."""


@dataclass(frozen=True)
class NaivePrediction:
    memory_bytes: MemoryTerms


def _formula(spec: RunSpec, device: str | None) -> FormulaPrediction:
    p = predict(spec)
    flops, arch, t = p.flops, spec.model.arch, spec.training
    if spec.measurement.mode == "inference" and arch is not None:
        flops = replace(flops, per_step_matmul=matmul_flops_per_step(arch, t.batch, t.seq) // 3)
    host = p.host_memory_bytes()
    return FormulaPrediction(
        params=p.params,
        memory_bytes=MemoryTerms(**p.memory_bytes()),
        flops=flops,
        inference=p.inference,
        host_memory_bytes=HostTerms(**host),
        activation_bytes=p.activation_terms,
        trainable_params=p.trainable_params,
    )


def _naive(name: str) -> Callable[[RunSpec, str | None], NaivePrediction | None]:
    def run(spec: RunSpec, device: str | None) -> NaivePrediction | None:
        if spec.model.arch is None:
            return None
        mem = predict(spec, method=name).memory_bytes()
        return NaivePrediction(from_json(MemoryTerms, mem, f"predicted.{name}.memory_bytes"))

    return run


# --------------------------------------------------------------------------------------------------
# Reading the comparable terms out of a prediction


def _inference(spec: RunSpec) -> bool:
    return spec.measurement.mode == "inference"


def _offloaded(spec: RunSpec) -> bool:
    return spec.parallel.offload_optimizer != "none" or spec.parallel.offload_params != "none"


def _states(w, g, o) -> float | None:
    return w + g + o if None not in (w, g, o) else None


def _memory_terms(mem: MemoryTerms, spec: RunSpec) -> dict:
    """weights always; the training terms and the total (as the peak) only for training runs."""
    if _inference(spec):
        return {"weights": mem.weights}
    return {
        "weights": mem.weights,
        "gradients": mem.gradients,
        "optimizer": mem.optimizer,
        "activations": mem.activations,
        "model_states": _states(mem.weights, mem.gradients, mem.optimizer),
        "peak": mem.total,
    }


def _formula_terms(p: FormulaPrediction, spec: RunSpec, device: str) -> Terms:
    if _inference(spec):
        return Terms(weights=p.memory_bytes.weights, inference_peak=p.inference.total)
    out = _memory_terms(p.memory_bytes, spec)
    host = p.host_memory_bytes.total if p.host_memory_bytes is not None and _offloaded(spec) else None
    out["host_model_states"] = host
    if device == "cpu":
        # On a CPU run the offloaded states share the one memory that the live-bytes tracker sees.
        out["peak"] += host or 0
    out["activations_per_layer"] = p.activation_bytes.per_layer if p.activation_bytes is not None else None
    return Terms(**out)


def _naive_terms(p: NaivePrediction, spec: RunSpec, device: str) -> Terms:
    out = _memory_terms(p.memory_bytes, spec)
    n_layers = spec.model.arch.n_layers if spec.model.arch is not None else None
    if out.get("activations") is not None and n_layers:
        # The naive formula is L times one layer's count, with nothing outside the layers.
        out["activations_per_layer"] = out["activations"] / n_layers
    return Terms(**out)


def _implementation_terms(p: ImplementationSummary, spec: RunSpec, device: str) -> Terms:
    if _inference(spec):
        return Terms()
    # The same mean over layers as the measured column (the first layer also keeps per-forward tables).
    per_layer = sum(p.layers) / len(p.layers) if p.layers else None
    return Terms(activations=p.total, activations_per_layer=per_layer)


def _peak(spec: RunSpec, device: str | None) -> PeakPrediction | None:
    """The step's predicted peak for the device the run was measured on (`formulas.peak`)."""
    if spec.model.arch is None or spec.measurement.mode != "train":
        return None
    if device in MEASURED_DEVICES:
        spec = spec.replace(device=device)
    return predict(spec).peak


def _peak_terms(p: PeakPrediction, spec: RunSpec, device: str) -> Terms:
    """The peak, and the model states the walk holds (the engine's own, per rank)."""
    if _inference(spec):
        return Terms()
    w, g, o = (p.states.get(k) for k in ("weights", "gradients", "optimizer"))
    return Terms(weights=w, gradients=g, optimizer=o, model_states=_states(w, g, o), peak=p.bytes)


def _estimator_terms(p: EstimatorPrediction, spec: RunSpec, device: str) -> Terms:
    if _inference(spec):
        return Terms()
    return Terms(model_states=p.memory_bytes.gpu)


def _parallel(spec: RunSpec, device: str | None) -> ParallelPrediction | None:
    return parallel_prediction(spec, device if device in MEASURED_DEVICES else spec.measurement.device)


def _parallel_terms(p: ParallelPrediction, spec: RunSpec, device: str) -> Terms:
    """Each term's maximum over the ranks, as `measured.memory_bytes` keeps the measured ones."""

    def top(name: str) -> int:
        return max(getattr(r, name) for r in p.ranks)

    per_layer = max(r.per_layer for r in p.ranks)
    states = max(r.weights + r.gradients + r.optimizer for r in p.ranks)
    return Terms(weights=top("weights"), gradients=top("gradients"), optimizer=top("optimizer"),
                 activations=top("activations"), activations_per_layer=per_layer, model_states=states,
                 peak=top("peak"))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Method:
    name: str
    column: str
    """Prefix of the method's columns in the flat table (`predicted_weights_bytes`)."""
    summary: type
    """The type of its prediction in a record."""
    predict: Callable[[RunSpec, str | None], Any]
    """(spec, measured device) → its prediction, or None where the method does not apply."""
    terms: Callable[[Any, RunSpec, str], Terms]
    """(its prediction, spec, device) → the comparable terms."""
    description: str = ""
    """What it is, for the report's legend."""


METHODS: tuple[Method, ...] = (
    Method("korthikanti", "predicted", FormulaPrediction, _formula, _formula_terms,
           "the harness's formulas"),
    Method("implementation", "implementation", ImplementationSummary, lambda s, d: implementation_summary(s, d),
           _implementation_terms,
           "the same plus the measured departures of the model and kernels that ran (`formulas/variants.py`, "
           "activations only)"),
    Method("naive", "naive", NaivePrediction, _naive("naive"), _naive_terms,
           "the Q&A answer (4·L·C² params, no optimizer state, B·N·L·T·(T+2D) activations)"),
    Method("naive-mlp4c", "naive_mlp4c", NaivePrediction, _naive("naive-mlp4c"), _naive_terms,
           "its 4C-MLP correction"),
    Method("deepspeed", "deepspeed", EstimatorPrediction, lambda s, d: deepspeed_estimate(s), _estimator_terms,
           "DeepSpeed's ZeRO estimator (model states, ZeRO runs only)"),
    Method("peak", "peak", PeakPrediction, _peak, _peak_terms,
           "the step's peak walked phase by phase for the implementation and device that ran (`formulas/peak.py`; "
           "where the walk does not reach, the sum of the terms)"),
    Method("parallel", "parallel", ParallelPrediction, _parallel, _parallel_terms,
           "every rank of a tensor/pipeline/FSDP2 layout as torch's engines split it (`formulas/ranks.py`); "
           "the busiest rank's terms"),
)  # fmt: skip
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}


def predict_all(spec: RunSpec, device: str | None) -> dict[str, Any]:
    """Every method's prediction for a run measured on `device` (None where a method does not apply)."""
    return {m.name: m.predict(spec, device) for m in METHODS}


def terms_of(method: Method, prediction: Any, spec: RunSpec, device: str) -> Terms:
    return Terms() if prediction is None else method.terms(prediction, spec, device)


def predictions_to_json(predicted: dict[str, Any]) -> dict:
    return {name: to_json(p) for name, p in predicted.items()}


def predictions_from_json(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SchemaError("predicted: expected an object")
    out = {}
    for name, value in data.items():
        if name not in BY_NAME:
            raise SchemaError(f"predicted.{name}: not a prediction method ({', '.join(BY_NAME)})")
        out[name] = from_json(BY_NAME[name].summary | None, value, f"predicted.{name}")
    return out
