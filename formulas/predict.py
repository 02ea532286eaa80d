"""predict(spec): every memory and compute term of a run, each with its source.

This is the calculator behind `tmath predict` and the `predicted` half of every record.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas import activations as act
from formulas import compute, hardware
from formulas.calibration import Calibration
from formulas.inference import InferenceMemory, inference_memory
from formulas.memory import ModelStates, model_state_bytes, params_per_model_shard
from formulas.naive import NAIVE_METHODS, naive_memory, naive_params
from formulas.params import largest_module_params
from formulas.precision import (
    activation_bytes_per_element,
    compute_dtype,
    gradient_bytes_per_param,
    optimizer_bytes_per_param,
    weight_bytes_per_param,
)
from formulas.spec import RunSpec

METHODS: tuple[str, ...] = ("korthikanti", *NAIVE_METHODS)

MASK_BYTES = 1
"""Dropout masks are 1-byte bools on CUDA (and in the reference models, which use native_dropout)."""

TM101 = "Transformer Math 101"
KORTHIKANTI = "Korthikanti et al. 2022"


@dataclass(frozen=True)
class Flops:
    """FLOP counts. A step is one optimizer step of one data-parallel replica: batch·seq·grad_accum tokens."""

    per_token_model: int
    """6P + 12·L·s·h (2P forward + 4P backward + attention; full s×s matrix)."""
    per_step_model: int
    per_step_hardware: int
    """Model FLOPs plus the forward work that activation recomputation repeats."""
    training_total: int
    """C = 6·P·D over the token budget (Transformer Math 101; no attention term)."""
    training_total_with_attention: int
    """(6P + 12·L·s·h)·D: the same budget with the attention term."""


@dataclass(frozen=True)
class Prediction:
    spec: RunSpec
    method: str
    params: int
    """P: total parameters of the model (the naive method's own count for naive methods)."""
    params_per_gpu: int
    """Parameters per model shard: P / (TP × PP)."""
    states: ModelStates
    activations: int | None
    """Activation bytes on the busiest GPU; None when only `--params` is known."""
    activation_terms: act.ActivationBreakdown | None
    flops: Flops
    cost: compute.TrainingCost
    tflops_source: str
    gpu: hardware.GPU
    inference: InferenceMemory
    sources: dict
    calibration: Calibration | None = None

    @property
    def total(self) -> int:
        return self.states.total + (self.activations or 0)

    @property
    def calibrated_peak(self) -> int | None:
        return None if self.calibration is None else self.calibration.peak_bytes(self.total)

    @property
    def fits(self) -> bool:
        """Whether the predicted total (calibrated device total when calibrated) fits the GPU."""
        need = self.total if self.calibration is None else self.calibration.device_bytes(self.total)
        return need <= self.gpu.memory_bytes

    def memory_bytes(self) -> dict:
        return {
            "weights": self.states.weights,
            "gradients": self.states.gradients,
            "optimizer": self.states.optimizer,
            "zero3_live_params": self.states.zero3_live_params,
            "activations": self.activations,
            "total": self.total,
        }

    def host_memory_bytes(self) -> dict:
        """What DeepSpeed offload keeps in host memory per rank (all 0 without offload)."""
        return {
            "weights": self.states.host_weights,
            "gradients": self.states.host_gradients,
            "optimizer": self.states.host_optimizer,
            "total": self.states.host_total,
        }

    def to_dict(self) -> dict:
        """The public JSON contract of `tmath predict --format json` (documented in the README)."""
        mem = self.memory_bytes()
        out = {
            "model": self.spec.model,
            "method": self.method,
            "params": self.params,
            "params_per_gpu": self.params_per_gpu,
            "memory_bytes": mem,
            "memory_gib": {k: (None if v is None else v / hardware.GIB) for k, v in mem.items()},
            "host_memory_bytes": self.host_memory_bytes(),
            "activation_bytes": None,
            "sources": self.sources,
            "flops": {
                "per_token_model": self.flops.per_token_model,
                "per_step_model": self.flops.per_step_model,
                "per_step_hardware": self.flops.per_step_hardware,
                "training_total": self.flops.training_total,
                "training_total_with_attention": self.flops.training_total_with_attention,
            },
            "training": {
                "tokens": self.cost.tokens,
                "gpus": self.cost.gpus,
                "tflops_per_gpu": self.cost.tflops_per_gpu,
                "tflops_source": self.tflops_source,
                "seconds": self.cost.seconds,
                "days": self.cost.days,
                "gpu_hours": self.cost.gpu_hours,
                "pf_days": self.cost.pf_days,
                "chinchilla_tokens": compute.chinchilla_tokens(self.params),
            },
            "hardware": {
                "gpu": self.gpu.name,
                "label": self.gpu.label,
                "memory_bytes": self.gpu.memory_bytes,
                "peak_tflops": self.gpu.peak(compute_dtype(self.spec.precision)),
                "tflops_bar": hardware.tflops_bar(self.gpu),
                "fits": self.fits,
                "headroom_bytes": self.gpu.memory_bytes - self.total,
                "source": self.gpu.source,
            },
            "inference": {
                "weights": self.inference.weights,
                "overhead_factor": self.inference.overhead_factor,
                "kv_cache": self.inference.kv_cache,
                "total": self.inference.total,
            },
            "parallel": {
                "gpus": self.spec.gpus,
                "dp": self.spec.dp,
                "tp": self.spec.tp,
                "pp": self.spec.pp,
                "zero": self.spec.zero,
            },
            "calibration": None,
            "spec": self.spec.to_dict(),
        }
        terms = self.activation_terms
        if terms is not None:
            out["activation_bytes"] = {
                "per_layer": terms.per_layer,
                "layers": terms.layers,
                "in_flight": terms.in_flight,
                "embedding": terms.embedding,
                "output": terms.output,
                "stage": terms.stage,
                "total": terms.total,
            }
        if self.calibration is not None:
            out["calibration"] = {
                **self.calibration.to_dict(),
                "peak_allocated_bytes": self.calibrated_peak,
                "device_bytes": self.calibration.device_bytes(self.total),
            }
        return out


def default_tflops(gpu: hardware.GPU, precision: str) -> tuple[float, str]:
    """Achieved TFLOP/s when none is given: Transformer Math 101's ~120 TFLOP/s per A100.

    Expressed as its fraction of the A100's dense bf16 peak (120/312 = 38.5%) and applied to
    `gpu`'s peak for the run's dtype.
    """
    dtype = compute_dtype(precision)
    peak = gpu.peak(dtype)
    if peak is None:
        raise ValueError(f"{gpu.label} has no {dtype} units: choose another --precision or --gpu")
    fraction = hardware.RULE_OF_THUMB_A100 / hardware.A100_REFERENCE_TFLOPS
    source = (
        f"{TM101} rule of thumb: {hardware.RULE_OF_THUMB_A100:g} TFLOP/s per A100 = {fraction:.1%} "
        f"of peak, applied to the {gpu.label} {dtype} peak of {peak:g}"
    )
    return fraction * peak, source


def _korthikanti_activations(spec: RunSpec) -> act.ActivationBreakdown:
    return act.activation_breakdown(
        spec.arch,
        spec.seq,
        spec.batch,
        elem_bytes=activation_bytes_per_element(spec.precision),
        mask_bytes=MASK_BYTES,
        recompute=spec.recompute,
        attention=spec.attention,
        tp=spec.tp,
        sequence_parallel=spec.sequence_parallel,
        partition_activations=spec.partition_activations,
        pp=spec.pp,
        in_flight=spec.in_flight,
    )


def _activation_expression(spec: RunSpec) -> str:
    """The per-layer expression in the paper's notation, with the run's element sizes filled in."""
    e, m = activation_bytes_per_element(spec.precision), MASK_BYTES if spec.arch.dropout > 0 else 0
    a = spec.arch
    standard = a.mlp == "gelu" and a.ffn_hidden == 4 * a.hidden and a.n_kv_heads == a.n_heads
    t = f", t={spec.tp}" if spec.tp > 1 else ""
    if spec.recompute == "full":
        return f"{e}·sbh{t}"
    if not standard:
        return f"generalised per tensor (e={e} B, m={m} B, {a.mlp}, kv_heads={a.n_kv_heads}){t}"
    base = 16 * e + 2 * m
    if spec.recompute == "selective":
        return f"sbh·{base}{t}"
    if spec.attention == "flash":
        return f"sbh·{base} + 4·asb (flash log-sum-exp){t}"
    return f"sbh·({base} + {2 * e + m}·as/h){t}"


def _sources(spec: RunSpec, method: str) -> dict:
    p = spec.precision
    if method != "korthikanti":
        return {
            "weights": f"Q&A seed: {'7' if method == 'naive-mlp4c' else '4'}·L·C² params × {weight_bytes_per_param(p)} B",
            "gradients": "Q&A seed: gradients = model",
            "optimizer": "Q&A seed: not counted",
            "activations": "Q&A seed: B·N·L·T·(T+" + ("5D)" if method == "naive-mlp4c" else "2D)") + " elements",
        }
    shard = "P/(TP·PP)" if spec.tp * spec.pp > 1 else "P"
    weights = f"{TM101}: {weight_bytes_per_param(p)} B/param × {shard}" + (
        f" / {spec.dp} (ZeRO-3)" if spec.zero >= 3 else ""
    )
    grads = f"{TM101}: {gradient_bytes_per_param(p)} B/param × {shard}" + (
        f" / {spec.dp} (ZeRO-2)" if spec.zero >= 2 else ""
    )
    optim = f"{TM101}: {optimizer_bytes_per_param(spec.optimizer, p)} B/param × {shard}" + (
        f" / {spec.dp} (ZeRO-1)" if spec.zero >= 1 else ""
    )
    if spec.offload_optimizer != "none":
        optim += "; on the host (ZeRO-Offload, Ren et al. 2021)"
        grads += "; + fp32 partition 4 B/param / N on the host" + ("" if spec.zero >= 3 else ", none left on the GPU")
    if spec.offload_params != "none":
        weights += "; on the host (ZeRO-Infinity, Rajbhandari et al. 2021)"
    sources = {"weights": weights, "gradients": grads, "optimizer": optim}
    if spec.zero >= 3:
        sources["zero3_live_params"] = f"{TM101}: ZeRO-3 live params (largest module, DeepSpeed estimator)"
    if spec.arch is not None:
        sources["activations"] = (
            f"{KORTHIKANTI} Table 2: {_activation_expression(spec)} per layer × L; + embedding, output, loss"
        )
    return sources


def predict(spec: RunSpec, method: str = "korthikanti", calibration: Calibration | None = None) -> Prediction:
    """Every term of the run's memory and compute, per GPU, by `method`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "korthikanti" and spec.arch is None:
        raise ValueError(f"method {method} needs an architecture (layers, hidden, heads), not only --params")
    gpu = hardware.get_gpu(spec.gpu)
    params = spec.total_params
    arch = spec.arch if spec.params is None else None

    terms = None
    if method == "korthikanti":
        states = model_state_bytes(
            params,
            precision=spec.precision,
            optimizer=spec.optimizer,
            zero=spec.zero,
            dp=spec.dp,
            tp=spec.tp,
            pp=spec.pp,
            largest_module_params=largest_module_params(arch) if arch is not None else 0,
            offload_optimizer=spec.offload_optimizer != "none",
            offload_params=spec.offload_params != "none",
        )
        if arch is not None:
            terms = _korthikanti_activations(spec)
        activation = terms.total if terms is not None else None
        shown_params = params
    else:
        mlp4c = method == "naive-mlp4c"
        states, activation = naive_memory(
            spec.arch, spec.seq, spec.batch, weight_bytes_per_param(spec.precision), mlp4c=mlp4c
        )
        shown_params = naive_params(spec.arch, mlp4c)

    tokens_per_step = spec.batch * spec.seq * spec.grad_accum
    per_token = compute.training_flops_per_token(params, arch, spec.seq)
    per_token_hw = per_token + compute.recompute_flops_per_token(params, spec.recompute, arch, spec.seq)
    budget = spec.tokens if spec.tokens is not None else compute.chinchilla_tokens(params)
    if calibration is not None and spec.tflops is None:
        tflops, tflops_source = calibration.achieved_tflops(gpu, spec.precision)
    elif spec.tflops is not None:
        tflops, tflops_source = spec.tflops, "given (--tflops)"
    else:
        tflops, tflops_source = default_tflops(gpu, spec.precision)
    cost = compute.training_cost(params, budget, spec.gpus, tflops)
    flops = Flops(
        per_token_model=per_token,
        per_step_model=per_token * tokens_per_step,
        per_step_hardware=per_token_hw * tokens_per_step,
        training_total=cost.flops,
        training_total_with_attention=per_token * budget,
    )
    wbytes = weight_bytes_per_param(spec.precision)
    infer = inference_memory(
        params,
        wbytes,
        arch=arch,
        batch=spec.batch,
        context=spec.seq,
        overhead_factor=calibration.inference_overhead if calibration is not None else 1.2,
    )
    return Prediction(
        spec=spec,
        method=method,
        params=shown_params,
        params_per_gpu=params_per_model_shard(params, spec.tp, spec.pp),
        states=states,
        activations=activation,
        activation_terms=terms,
        flops=flops,
        cost=cost,
        tflops_source=tflops_source,
        gpu=gpu,
        inference=infer,
        sources=_sources(spec, method),
        calibration=calibration,
    )
