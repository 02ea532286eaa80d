"""predict(spec): every memory and compute term of a run, each with its source.

This is the calculator behind `tmath predict` and the `predicted` half of every record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from formulas import activations as act
from formulas import compute, hardware
from formulas import finetune as ft
from formulas.architecture import unmodelled_features
from formulas.calibration import Calibration
from formulas.families import code_family
from formulas.finetune_peak import lora_step_peak
from formulas.inference import INFERENCE_OVERHEAD, InferenceMemory, inference_memory
from formulas.memory import ModelStates, add_states, model_state_bytes, params_per_model_shard
from formulas.naive import NAIVE_METHODS, naive_memory, naive_params
from formulas.params import largest_module_params, parameter_count, pipeline_stage_params, routed_expert_params
from formulas.peak import PeakPrediction, engine_unmodelled, step_peak, sum_of_terms, target_device
from formulas.precision import (
    activation_bytes_per_element,
    compute_dtype,
    gradient_bytes_per_param,
    optimizer_bytes_per_param,
    weight_bytes_per_param,
)
from formulas.spec import RunSpec
from formulas.units import ceil_div

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
    per_step_forward: int | None = None
    """One forward over the micro-batch, 2P + 4·L·s·h per token: an inference step's model FLOPs."""
    per_step_matmul: int | None = None
    """The step's matmul FLOPs counted exactly from the architecture (what FlopCounterMode counts); None with
    `--params` only. An inference step is a third of one micro-batch's training matmuls."""


@dataclass(frozen=True)
class Prediction:
    spec: RunSpec
    method: str
    params: int
    """Total parameters as the method counts them (the naive formula's 4·L·C² for the naive methods)."""
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
    exact_params: int
    """P counted exactly from the architecture: what FLOPs, the token budget and time use, whatever the method."""
    peak: PeakPrediction
    """The step's predicted peak (`formulas.peak`); for the naive methods and what the walk does not model
    (`--params` only, a DeepSpeed engine, tensor or pipeline parallelism) the sum of the terms, which says so."""
    device: str
    """The device the prediction is for: `cuda` (a GPU, the default), `cpu` or `meta` (`formulas.peak.target_device`)."""
    calibration: Calibration | None = None
    trainable_params: int | None = None
    """LoRA/QLoRA (`--finetune`): the adapters' parameters, the only ones with gradients and optimizer state."""

    @property
    def total(self) -> int:
        return self.states.total + (self.activations or 0)

    @property
    def overheads(self) -> dict[str, int]:
        """The device's fixed overheads beside the peak: published defaults on a GPU, none on a CPU."""
        return hardware.fixed_overheads(self.gpu) if self.device == "cuda" else {}

    @property
    def calibrated_peak(self) -> int | None:
        """The peak corrected by the calibration's ratio for this device kind and phase (None: no such ratio)."""
        if self.calibration is None:
            return None
        return self.calibration.peak_bytes(self.peak.bytes, self.device, self.peak.phase)

    @property
    def device_need(self) -> int:
        """What the verdict weighs against the GPU's memory: the peak (calibrated when a ratio applies), the
        allocator's reserve (calibrated reserved / allocated) and the fixed overheads (or the calibrated
        context, which measures them together)."""
        peak = self.calibrated_peak if self.calibrated_peak is not None else self.peak.bytes
        if self.calibration is None:
            return peak + sum(self.overheads.values())
        context = self.calibration.context_bytes
        fixed = sum(self.overheads.values()) if context is None or self.device != "cuda" else context
        return round(peak * (self.calibration.reserved_ratio if self.device == "cuda" else 1.0) + fixed)

    @property
    def fits(self) -> bool:
        return self.device_need <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int:
        """The GPU's memory less `device_need` (negative: over by that much)."""
        return self.gpu.memory_bytes - self.device_need

    def memory_bytes(self) -> dict:
        return {
            "weights": self.states.weights,
            "gradients": self.states.gradients,
            "optimizer": self.states.optimizer,
            "zero3_live_params": self.states.zero3_live_params,
            "activations": self.activations,
            "total": self.total,
            "peak": self.peak.bytes,
        }

    def host_memory_bytes(self) -> dict:
        """What DeepSpeed offload keeps in host memory per rank (all 0 without offload)."""
        return {
            "weights": self.states.host_weights,
            "gradients": self.states.host_gradients,
            "optimizer": self.states.host_optimizer,
            "total": self.states.host_total,
        }

    def _active(self) -> dict:
        """`active_params` for a mixture of experts (absent for dense models, whose records stay as they were)."""
        arch = self.spec.model.arch
        if arch is None or not arch.moe or self.spec.model.params is not None:
            return {}
        return {"active_params": parameter_count(arch).active}

    def to_dict(self) -> dict:
        """The public JSON contract of `tmath predict --format json` (documented in the README)."""
        mem = self.memory_bytes()
        out = {
            "model": self.spec.model.name,
            "method": self.method,
            "params": self.params,
            "params_per_gpu": self.params_per_gpu,
            **self._active(),
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
                "per_step_forward": self.flops.per_step_forward,
                "per_step_matmul": self.flops.per_step_matmul,
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
                "chinchilla_tokens": compute.chinchilla_tokens(self.exact_params),
            },
            "hardware": {
                "gpu": self.gpu.name,
                "label": self.gpu.label,
                "memory_bytes": self.gpu.memory_bytes,
                "peak_tflops": self.gpu.peak(compute_dtype(self.spec.training.precision)),
                "tflops_bar": hardware.tflops_bar(self.gpu),
                "fits": self.fits,
                "headroom_bytes": self.headroom_bytes,
                "device_need_bytes": self.device_need,
                "overheads": self.overheads,
                "source": self.gpu.source,
            },
            "inference": {
                "weights": self.inference.weights,
                "overhead_factor": self.inference.overhead_factor,
                "kv_cache": self.inference.kv_cache,
                "total": self.inference.total,
            },
            "parallel": {
                "gpus": self.spec.parallel.gpus,
                "dp": self.spec.parallel.dp,
                "tp": self.spec.parallel.tp,
                "pp": self.spec.parallel.pp,
                "zero": self.spec.parallel.zero,
            },
            "peak": self.peak.to_dict(),
            "device": self.device,
            "calibration": None,
            "trainable_params": self.trainable_params,
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
                "peak_ratio_applied": self.calibration.ratio(self.device, self.peak.phase),
                "device_bytes": self.device_need,
            }
        return out


def _korthikanti_activations(spec: RunSpec) -> act.ActivationBreakdown:
    t, p = spec.training, spec.parallel
    return act.activation_breakdown(
        spec.model.arch, t.seq, t.batch, elem_bytes=activation_bytes_per_element(t.precision), mask_bytes=MASK_BYTES,
        recompute=t.recompute, attention=t.attention, tp=p.tp, sequence_parallel=p.sequence_parallel,
        partition_activations=p.partition_activations, pp=p.pp, in_flight=p.in_flight,
    )  # fmt: skip


def _lora(spec: RunSpec, states: ModelStates, terms: act.ActivationBreakdown | None, sources: dict):
    """LoRA/QLoRA: the adapters' model states, the paper's layer count with the LoRA terms (frozen linear inputs
    out, adapter inputs and r-wide intermediates in; `formulas.finetune.lora_layer_delta`) and their sources."""
    arch, t = spec.model.arch, spec.training
    family = code_family(arch)
    kw = {"finetune": t.finetune, "precision": t.precision, "optimizer": t.optimizer, "rank": t.lora_rank,
          "targets": t.lora_targets}  # fmt: skip
    states = ft.finetune_states(arch, family, spec.total_params, **kw)
    sources = {**sources, **ft.finetune_sources(arch, family, spec.total_params, **kw)}
    if terms is not None and t.recompute != "full":
        delta = ft.lora_layer_delta(arch, family, t.seq, t.batch, precision=t.precision, rank=t.lora_rank,
                                    dropout=t.lora_dropout, targets=t.lora_targets,
                                    cpu=target_device(spec.measurement.device) == "cpu")  # fmt: skip
        terms = replace(terms, per_layer=terms.per_layer + delta)
        sources["activations"] += (f"; LoRA ({ft.HU}): {delta:+,} B per layer (frozen linears keep no input; "
                                   "each adapter its input copy and r-wide output)")  # fmt: skip
    elif terms is not None:
        sources["activations"] += "; LoRA: the adapters run inside the recomputed blocks (no change)"
    if terms is not None and t.finetune == "qlora":
        sources["activations"] += "; QLoRA: counted as LoRA on a 16-bit base (predicted, not measured)"
    trainable = ft.lora_params(arch, family, t.lora_rank, t.lora_targets)
    return states, terms, sources, trainable


def _heaviest_stage(spec: RunSpec) -> int | None:
    """With pipeline parallelism and an architecture: the parameters per tensor-parallel rank of the heaviest
    stage (embedding first, output layer last), else None (P / (TP · PP))."""
    arch, p = spec.model.arch, spec.parallel
    if p.pp == 1 or arch is None or spec.model.params is not None:
        return None
    return -(-max(pipeline_stage_params(arch, p.pp)) // p.tp)


def _unmodelled_peak(spec: RunSpec) -> str:
    """Why the step's peak is the sum of the terms for `spec` (the walk does not model it yet)."""
    p = spec.parallel
    if spec.model.arch is None:
        return "no architecture (--params): no activations to walk"
    if unmodelled_features(spec.model.arch):
        return f"activations of {', '.join(unmodelled_features(spec.model.arch))} are not modelled yet"
    if p.tp > 1 or p.pp > 1 or p.dp_shard == "fsdp2":
        return (
            "tensor, pipeline and FSDP2 layouts: the per-rank prediction (`formulas.parallel`, the `parallel` "
            "method) walks tensor-parallel steps; this per-GPU formula does not"
        )
    if spec.measurement.mode != "train":
        return "inference is not a training step"
    if spec.training.finetune != "full":
        return f"--finetune {spec.training.finetune}: the walk is of one process"
    return engine_unmodelled(spec) or "not walked"


def _activation_expression(spec: RunSpec) -> str:
    """The per-layer expression in the paper's notation, with the run's element sizes filled in."""
    e, m = activation_bytes_per_element(spec.training.precision), MASK_BYTES if spec.model.arch.dropout > 0 else 0
    a = spec.model.arch
    standard = a.mlp == "gelu" and a.ffn_hidden == 4 * a.hidden and a.n_kv_heads == a.n_heads and a.q_width == a.hidden
    t = f", t={spec.parallel.tp}" if spec.parallel.tp > 1 else ""
    if spec.training.recompute == "full":
        return f"{e}·sbh{t}"
    if a.moe:
        return (f"generalised per tensor (e={e} B, m={m} B, {a.mlp}, kv_heads={a.n_kv_heads}; MoE: {a.experts_per_token} "
                f"of {a.experts} experts, dropless, as transformers' grouped_mm experts keep them){t}")  # fmt: skip
    if not standard:
        return f"generalised per tensor (e={e} B, m={m} B, {a.mlp}, kv_heads={a.n_kv_heads}){t}"
    base = 16 * e + 2 * m
    if spec.training.recompute == "selective":
        return f"sbh·{base}{t}"
    if spec.training.attention == "flash":
        return f"sbh·{base} + 4·asb (flash log-sum-exp){t}"
    return f"sbh·({base} + {2 * e + m}·as/h){t}"


def _sources(spec: RunSpec, method: str) -> dict:
    p = spec.training.precision
    if method != "korthikanti":
        return {
            "weights": f"Q&A seed: {'7' if method == 'naive-mlp4c' else '4'}·L·C² params × {weight_bytes_per_param(p)} B",
            "gradients": "Q&A seed: gradients = model",
            "optimizer": "Q&A seed: not counted",
            "activations": "Q&A seed: B·N·L·T·(T+" + ("5D)" if method == "naive-mlp4c" else "2D)") + " elements",
        }
    shard = "P/(TP·PP)" if spec.parallel.tp * spec.parallel.pp > 1 else "P"
    if _heaviest_stage(spec) is not None:
        shard = f"the heaviest of {spec.parallel.pp} pipeline stages ({_heaviest_stage(spec):,} params per TP rank)"
    weights = f"{TM101}: {weight_bytes_per_param(p)} B/param × {shard}" + (
        f" / {spec.parallel.dp} (ZeRO-3)" if spec.parallel.zero >= 3 else ""
    )
    grad_bytes = gradient_bytes_per_param(p, spec.training.grad_dtype)
    main = " (fp32 main gradients, Megatron-LM)" if spec.training.grad_dtype == "fp32" else ""
    grads = f"{TM101}: {grad_bytes} B/param{main} × {shard}" + (
        f" / {spec.parallel.dp} (ZeRO-2)" if spec.parallel.zero >= 2 else ""
    )
    optim = f"{TM101}: {optimizer_bytes_per_param(spec.training.optimizer, p)} B/param × {shard}" + (
        f" / {spec.parallel.dp} (ZeRO-1)" if spec.parallel.zero >= 1 else ""
    )
    if spec.parallel.offload_optimizer != "none":
        optim += "; on the host (ZeRO-Offload, Ren et al. 2021)"
        grads += "; + fp32 partition 4 B/param / N on the host" + (
            "" if spec.parallel.zero >= 3 else ", none left on the GPU"
        )
    if spec.parallel.offload_params != "none":
        weights += "; on the host (ZeRO-Infinity, Rajbhandari et al. 2021)"
    if spec.parallel.ep > 1:
        ep, edp = spec.parallel.ep, spec.parallel.dp // spec.parallel.ep
        note = (f"; routed experts ({routed_expert_params(spec.model.arch):,} params) / ep {ep}, not tensor-split, "
                f"ZeRO over the {edp} expert-data-parallel ranks (DeepSpeed-MoE; measured per rank through transformers: "
                "results/moe)")  # fmt: skip
        weights, grads, optim = weights + note, grads + note, optim + note
    sources = {"weights": weights, "gradients": grads, "optimizer": optim}
    if spec.parallel.zero >= 3:
        sources["zero3_live_params"] = f"{TM101}: ZeRO-3 live params (largest module, DeepSpeed estimator)"
    if spec.model.arch is not None and unmodelled_features(spec.model.arch):
        sources["activations"] = (f"not modelled yet for {', '.join(unmodelled_features(spec.model.arch))} "
                                  "(parameters, model states and FLOPs are exact)")  # fmt: skip
    elif spec.model.arch is not None:
        sources["activations"] = (
            f"{KORTHIKANTI} Table 2: {_activation_expression(spec)} per layer × L; + embedding, output, loss"
        )
    return sources


def predict(spec: RunSpec, method: str = "korthikanti", calibration: Calibration | None = None) -> Prediction:
    """Every term of the run's memory and compute, per GPU, by `method`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "korthikanti" and spec.model.arch is None:
        raise ValueError(f"method {method} needs an architecture (layers, hidden, heads), not only --params")
    gpu = hardware.get_gpu(spec.budget.gpu)
    params = spec.total_params
    arch = spec.model.arch if spec.model.params is None else None
    t, p = spec.training, spec.parallel

    terms = None
    if method == "korthikanti":
        routed = routed_expert_params(arch) if arch is not None and p.ep > 1 else 0
        states = model_state_bytes(
            # FSDP2 shards like ZeRO-3 (parameters, gradients and optimizer state over dp, a unit gathered whole).
            params - routed, precision=t.precision, optimizer=t.optimizer,
            zero=3 if p.dp_shard == "fsdp2" else p.zero, dp=p.dp, tp=p.tp, pp=p.pp,
            largest_module_params=largest_module_params(arch) if arch is not None else 0,
            offload_optimizer=p.offload_optimizer != "none", offload_params=p.offload_params != "none",
            grad_dtype=t.grad_dtype, shard_params=_heaviest_stage(spec),
        )  # fmt: skip
        if routed:
            # Expert parallelism: each rank holds E/ep of every MoE layer's experts, not tensor-split; ZeRO shards
            # them over the dp/ep ranks that hold the same experts (DeepSpeed-MoE's expert-data-parallel group).
            states = add_states(states, model_state_bytes(
                ceil_div(routed, p.ep), precision=t.precision, optimizer=t.optimizer, zero=p.zero, dp=p.dp // p.ep,
                grad_dtype=t.grad_dtype))  # fmt: skip
        if arch is not None and not unmodelled_features(arch):
            terms = _korthikanti_activations(spec)
        sources, trainable = _sources(spec, method), None
        if t.finetune != "full":
            states, terms, sources, trainable = _lora(spec, states, terms, sources)
        activation = terms.total if terms is not None else None
        counted = params
        on_host = target_device(spec.measurement.device) == "cpu"
        peak, why = None, _unmodelled_peak(spec)
        if terms is not None or arch is None:
            try:
                peak = (step_peak if trainable is None else lora_step_peak)(spec, states, activation)
            except ValueError as exc:  # the implementation's saved tensors are not measured (formulas.families)
                why = str(exc)
        peak = peak or sum_of_terms(states, activation, why, host=on_host)
    else:
        mlp4c = method == "naive-mlp4c"
        elem = weight_bytes_per_param(t.precision)
        states, activation = naive_memory(spec.model.arch, t.seq, t.batch, elem, mlp4c=mlp4c)
        counted = naive_params(spec.model.arch, mlp4c)
        peak = sum_of_terms(states, activation, "the naive formula sums its terms")
        sources, trainable = _sources(spec, method), None

    tokens_per_step = t.batch * t.seq * t.grad_accum
    # A mixture of experts computes with the parameters a token passes through (Fedus et al. 2021, §2).
    flop_params = parameter_count(arch).active if arch is not None and arch.moe else params
    per_token = compute.training_flops_per_token(flop_params, arch, t.seq)
    per_token_hw = per_token + compute.recompute_flops_per_token(flop_params, t.recompute, arch, t.seq)
    budget = spec.budget.tokens if spec.budget.tokens is not None else compute.chinchilla_tokens(params)
    if calibration is not None and spec.budget.tflops is None:
        tflops, tflops_source = calibration.achieved_tflops(gpu, t.precision)
    elif spec.budget.tflops is not None:
        tflops, tflops_source = spec.budget.tflops, "given (--tflops)"
    else:
        tflops, tflops_source = hardware.default_tflops(gpu, t.precision)
    cost = compute.training_cost(flop_params, budget, p.gpus, tflops)
    flops = Flops(
        per_token_model=per_token,
        per_step_model=per_token * tokens_per_step,
        per_step_hardware=per_token_hw * tokens_per_step,
        training_total=cost.flops,
        training_total_with_attention=per_token * budget,
        per_step_forward=compute.forward_flops_per_token(flop_params, arch, t.seq) * t.batch * t.seq,
        per_step_matmul=(
            compute.matmul_flops_per_step(arch, t.batch, t.seq, t.recompute) * t.grad_accum
            if arch is not None
            else None
        ),
    )
    infer = inference_memory(
        params,
        weight_bytes_per_param(t.precision),
        arch=arch,
        batch=t.batch,
        context=t.seq,
        overhead_factor=calibration.inference_overhead if calibration is not None else INFERENCE_OVERHEAD,
    )
    return Prediction(
        spec=spec,
        method=method,
        params=counted,
        params_per_gpu=params_per_model_shard(counted, p.tp, p.pp),
        states=states,
        activations=activation,
        activation_terms=terms,
        flops=flops,
        cost=cost,
        tflops_source=tflops_source,
        gpu=gpu,
        inference=infer,
        sources=sources,
        exact_params=params,
        peak=peak,
        device=target_device(spec.measurement.device),
        calibration=calibration,
        trainable_params=trainable,
    )
