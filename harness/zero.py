"""DeepSpeed ZeRO: an engine built from a RunSpec, and an exact per-rank account of what it holds.

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) shards model states over the N data-parallel ranks:
stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the parameters. Transformer
Math 101 turns that into "divide by N"; DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) assume 16-bit parameters and Adam whatever the run. What a rank
really holds is neither: flat buffers padded for alignment, the whole gradient of a parameter that
straddles a partition boundary, an fp32 master copy even for fp32 parameters, reduce buckets,
persistent (never partitioned) small parameters, parameters gathered for the module in use.

This module
- builds the DeepSpeed config from the spec (`deepspeed_config`), deep-merges a user's JSON over it,
- runs the engine behind the `harness.training.Trainer` interface (`DeepSpeedTrainer`), so that the
  protocol of `harness.measure` runs unchanged, and
- accounts every tensor DeepSpeed holds by term (weights, gradients, optimizer, extras) and by named
  component, found by walking the engine's attributes; the sum is checked against the live-storage
  total (`residual_bytes`), so nothing is left unaccounted.

Where each component lives (deepspeed 0.19.8):
- ZeRO-1/2, `runtime/zero/stage_1_and_2.py`, `DeepSpeedZeroOptimizer`: parameters are views into
  `bit16_groups_flat` (one flat buffer per group, padded to a multiple of 2·N elements); the fp32
  master partition `single_partition_of_fp32_groups` is what the base optimizer steps; after backward
  `grads_in_partition` holds the reduced gradients of every parameter that overlaps the rank's partition
  (`copy_grads_in_partition`), viewed by `averaged_gradients` with zero `_zero_padding` tensors; during
  backward the IPG bucket (`setup_buckets`: `reduce_bucket_size` elements, two with `overlap_comm`)
  gathers gradients for `average_tensor`. ZeRO-1 keeps every full gradient until the end of backward
  (`reduce_gradients`), ZeRO-2 reduces bucket by bucket during backward.
- ZeRO-3, `runtime/zero/stage3.py`, `DeepSpeedZeroOptimizer_Stage3`, and
  `runtime/zero/partition_parameters.py`: each parameter keeps `ds_tensor`, its ceil(numel/N)-element
  partition in the defragmented `lp_param_buffer`; parameters below `stage3_param_persistence_threshold`
  elements stay whole on every rank (`persistent_parameters`); others are gathered per module
  (`PartitionedParameterCoordinator`, prefetching `stage3_prefetch_bucket_size` elements) and freed by
  assigning an empty `param.data` once `stage3_max_live_parameters` are live or the parameter is not
  reused within `stage3_max_reuse_distance` (both 1e9 by default: a small model stays gathered through
  the forward); `grad_partitions_flat_buffer` holds the gradient partitions;
  `fp32_partitioned_groups_flat` the master; the IPG bucket lives for the engine's life.
- ZeRO-0: the base optimizer, or for 16-bit parameters `runtime/fp16/unfused_optimizer.py`
  (`FP16_UnfusedOptimizer`: an fp32 copy per parameter in `fp32_groups`).
- bf16 with ZeRO-1 and fp32 gradient accumulation (a user's `data_types.grad_accum_dtype`):
  `runtime/bf16_optimizer.py` (`BF16_Optimizer`: a full-size fp32 gradient buffer
  `fp32_groups_gradients_flat`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from formulas.params import largest_module_params
from formulas.precision import is_mixed
from formulas.spec import RunSpec
from harness.errors import UsageError
from harness.training import Trainer, make_torch_optimizer, unique_storage_bytes

TERMS: tuple[str, ...] = ("weights", "gradients", "optimizer", "extras")
"""Model-state terms of the formulas, plus what DeepSpeed holds that no formula term names."""

SETTLE_S = 2.0
"""Longest wait for communication threads to release a finished collective's tensors (see `_residual`)."""

STAGE3_LIVE_DEFAULT = 10**9
"""DeepSpeed's `stage3_max_live_parameters` and `stage3_max_reuse_distance` (elements). With them a model
under 1e9 parameters may stay gathered for a whole forward: ZeRO-3's live parameters are then most of the
model, not the largest layer that Transformer Math 101 and DeepSpeed's estimator assume. We keep the
defaults (what users run) and write them into the config, so that a --deepspeed-config can lower them."""

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BucketSizes:
    """ZeRO communication buffer sizes, in elements, scaled with the hidden size h.

    DeepSpeed's defaults (5e8-element reduce and all-gather buckets, `runtime/zero/config.py`) are
    sized for billion-parameter models: a 5e8-element fp32 bucket is 2 GB whatever the model. We use
    the rule transformers' DeepSpeed integration applies for "auto" (`integrations/deepspeed.py`,
    `HfTrainerDeepSpeedConfig.trainer_config_finalize`): reduce bucket h², prefetch bucket 0.9·h²,
    persistence threshold 10·h; the stage 1/2 all-gather bucket follows the reduce bucket.
    """

    reduce_bucket_elements: int
    """`reduce_bucket_size`: gradients reduced per collective (the IPG bucket)."""
    allgather_bucket_elements: int
    """`allgather_bucket_size` (stage 1/2): updated parameters all-gathered per collective."""
    prefetch_bucket_elements: int
    """`stage3_prefetch_bucket_size`: parameters ZeRO-3 fetches ahead of the module that needs them."""
    param_persistence_threshold: int
    """`stage3_param_persistence_threshold`: ZeRO-3 keeps parameters with fewer elements whole on every rank."""

    @classmethod
    def for_hidden(cls, hidden: int) -> BucketSizes:
        square = hidden * hidden
        return cls(
            reduce_bucket_elements=square,
            allgather_bucket_elements=square + square % 2,  # DeepSpeed asserts a multiple of 2
            prefetch_bucket_elements=int(0.9 * square),
            param_persistence_threshold=10 * hidden,
        )


def uses_deepspeed(spec: RunSpec) -> bool:
    """ZeRO, or more than one data-parallel rank: measured through a DeepSpeed engine."""
    return spec.zero > 0 or spec.gpus > 1


def _optimizer_section(optimizer: str) -> dict | None:
    """AdamW and SGD as DeepSpeed builds them from its config; None for a client optimizer (8-bit Adam).

    `torch_adam: true` makes DeepSpeed build torch.optim.AdamW (`DeepSpeedEngine.get_optimizer_configuration`)
    instead of FusedAdam or DeepSpeedCPUAdam, which it would JIT-compile (~45 s each, PLATFORM.md); the
    hyper-parameters are those of `harness.training.make_torch_optimizer`.
    """
    if optimizer == "adamw":
        return {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}}
    if optimizer == "sgd":
        return {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}
    return None


def deepspeed_config(spec: RunSpec) -> dict:
    """The DeepSpeed config of `spec` before a user's file is merged over it.

    Precision: `bf16-mixed`/`fp16-mixed` enable DeepSpeed's bf16/fp16 mode, which keeps 16-bit model
    parameters and an fp32 master copy in the optimizer: the accounting of `harness.training.Trainer`.
    Recomputation is the model's own (`torch.utils.checkpoint` inside the blocks), not DeepSpeed's
    activation-checkpointing API.
    """
    if spec.arch is None:
        raise UsageError("a DeepSpeed run needs an architecture (--model or --layers/--hidden/--heads)")
    buckets = BucketSizes.for_hidden(spec.arch.hidden)
    zero: dict = {
        "stage": spec.zero,
        "contiguous_gradients": True,
        "overlap_comm": spec.zero == 3,  # DeepSpeed's own default (`DeepSpeedZeroConfig.overlap_comm_valid`)
        "reduce_scatter": True,
        "reduce_bucket_size": buckets.reduce_bucket_elements,
        "allgather_bucket_size": buckets.allgather_bucket_elements,
    }
    if spec.zero == 3:
        zero["stage3_prefetch_bucket_size"] = buckets.prefetch_bucket_elements
        zero["stage3_param_persistence_threshold"] = buckets.param_persistence_threshold
        zero["stage3_max_live_parameters"] = STAGE3_LIVE_DEFAULT
        zero["stage3_max_reuse_distance"] = STAGE3_LIVE_DEFAULT
    pin = spec.device != "cpu"  # page-locked host buffers for fast copies to a GPU (a no-op on the CPU accelerator)
    if spec.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if spec.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict = {
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": 0.0,  # harness.training.Trainer does not clip either
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
    }
    section = _optimizer_section(spec.optimizer)
    if section is not None:
        config["optimizer"] = section
    if spec.optimizer != "adamw":
        config["zero_allow_untested_optimizer"] = True  # ZeRO lists Adam(W), Adagrad, Lion as tested
    if spec.offload_optimizer == "cpu":
        config["zero_force_ds_cpu_optimizer"] = False  # step torch's optimizer on the host, no cpu_adam build
    if spec.precision == "bf16-mixed":
        config["bf16"] = {"enabled": True}
    elif spec.precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`: nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_config(path: str) -> dict:
    """A user's DeepSpeed JSON, or a one-line UsageError naming what is wrong with it."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--deepspeed-config {path}: no such file")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--deepspeed-config {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--deepspeed-config {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--deepspeed-config {path}: expected a JSON object, got {type(data).__name__}")
    return data


_SPEC_OWNED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("zero_optimization", "stage"), "--zero"),
    (("train_micro_batch_size_per_gpu",), "--batch"),
    (("gradient_accumulation_steps",), "--grad-accum"),
    (("bf16", "enabled"), "--precision"),
    (("fp16", "enabled"), "--precision"),
)
"""Settings the record's spec (and so the prediction beside the measurement) states: a user's file may
not contradict them."""


def _lookup(config: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def effective_config(spec: RunSpec) -> dict:
    """The generated config with the user's `--deepspeed-config` deep-merged over it.

    Anything else may be overridden (buckets, offload details, optimizer, ...); the settings in
    `_SPEC_OWNED` must agree with the flags, or the prediction would describe another run.
    """
    config = deepspeed_config(spec)
    if not spec.deepspeed_config:
        return config
    user = load_user_config(spec.deepspeed_config)
    merged = deep_merge(config, user)
    for path, flag in _SPEC_OWNED:
        given, ours = _lookup(user, path), _lookup(config, path)
        if given is not None and given != (ours if ours is not None else False):
            raise UsageError(
                f"--deepspeed-config {spec.deepspeed_config}: {'.'.join(path)} = {json.dumps(given)} contradicts "
                f"the run's settings; set it with {flag} instead"
            )
    return merged


def deepspeed_available() -> bool:
    """Whether DeepSpeed can be imported, without importing it (which takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def check_deepspeed(spec: RunSpec, device: str) -> None:
    """What a DeepSpeed run of `spec` cannot do on `device`, as one-line errors before anything starts."""
    if not uses_deepspeed(spec):
        return
    what = f"--zero {spec.zero}" if spec.zero else f"--gpus {spec.gpus}"
    if not deepspeed_available():
        raise UsageError(f"{what} measures through DeepSpeed, which is not installed: pip install deepspeed")
    if spec.mode == "inference":
        raise UsageError(f"{what}: ZeRO and data parallelism are measured for training only (--mode train)")
    if spec.precision in ("fp16", "bf16"):
        raise UsageError(
            f"--precision {spec.precision}: DeepSpeed keeps an fp32 master copy of 16-bit parameters; "
            f"use --precision {spec.precision}-mixed (or fp32) with {what}"
        )
    if device == "cpu" and spec.precision == "fp16-mixed":
        raise UsageError("--precision fp16-mixed with DeepSpeed needs CUDA: its CPU accelerator has no fp16 support")
    if device == "cpu" and spec.optimizer == "adam8bit":
        raise UsageError("--optimizer adam8bit (bitsandbytes) needs a CUDA device")
    if spec.deepspeed_config:
        effective_config(spec)


# --------------------------------------------------------------------------------------------------
# DeepSpeed's own estimators (the third column)


@contextlib.contextmanager
def _quiet_logging():
    """Warnings off while DeepSpeed is imported (it logs "Setting accelerator to CPU" on machines without GPUs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def deepspeed_estimate(spec: RunSpec) -> dict | None:
    """DeepSpeed's model-state estimate for `spec` (None below stage 2, without DeepSpeed or an architecture).

    `estimate_zero2_model_states_mem_needs` (stage_1_and_2.py) and `estimate_zero3_model_states_mem_needs`
    (stage3.py) are the arithmetic behind the `*_all_cold` functions, which only print: per GPU
    2·P + 18·P/N (zero2; "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit") and 4·largest_layer + 18·P/N (zero3), whatever the precision and optimizer.
    DeepSpeed ships no stage-1 estimator. We call them with one node of `gpus` GPUs (or
    `spec.extra["nodes"]`), offload flags from the spec, `zero_init=False` (the model is built whole and
    partitioned by the engine) and DeepSpeed's default `additional_buffer_factor=1.5`.
    """
    if spec.zero < 2 or spec.arch is None or not deepspeed_available():
        return None
    try:
        with _quiet_logging():  # importing DeepSpeed logs its accelerator detection
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:  # a broken installation: no third column, the run itself reports why
        return None
    nodes = int(spec.extra.get("nodes", 1)) if isinstance(spec.extra, dict) else 1
    per_node = max(spec.gpus // nodes, 1)
    params = spec.total_params
    if spec.zero == 2:
        args = {
            "total_params": params,
            "num_gpus_per_node": per_node,
            "num_nodes": nodes,
            "cpu_offload": spec.offload_optimizer == "cpu",
            "additional_buffer_factor": 1.5,
        }
        cpu, gpu = estimate_zero2_model_states_mem_needs(**args)
        out = {"memory_bytes": {"gpu": int(gpu), "cpu": int(cpu)}, "function": "estimate_zero2_model_states_mem_needs"}
        if not args["cpu_offload"]:
            n = per_node * nodes
            # The split DeepSpeed's comment gives: 16-bit params whole; 16- and 32-bit grads, master and m, v / N.
            out["terms"] = {"weights": 2 * params, "gradients": int(6 * params / n), "optimizer": int(12 * params / n)}
    else:
        args = {
            "total_params": params,
            "largest_layer_params": largest_module_params(spec.arch),
            "num_gpus_per_node": per_node,
            "num_nodes": nodes,
            "cpu_offload": spec.offload_optimizer == "cpu",
            "cpu_offload_params": spec.offload_params == "cpu",
            "zero_init": False,
            "additional_buffer_factor": 1.5,
        }
        cpu, gpu, largest = estimate_zero3_model_states_mem_needs(**args)
        out = {
            "memory_bytes": {"gpu": int(gpu), "cpu": int(cpu)},
            "function": "estimate_zero3_model_states_mem_needs",
            "terms": {"zero3_live_params": int(largest)},
        }
    out["args"] = args
    out["assumes"] = "16-bit parameters and Adam (2 + 16 bytes/param), whatever the run's precision and optimizer"
    return out


# --------------------------------------------------------------------------------------------------
# Accounting: every tensor reachable from the engine, by term and named component


@dataclass(frozen=True)
class Held:
    """Bytes of one named component that a rank holds, after dedup by storage."""

    term: str
    """weights | gradients | optimizer | extras | buffers."""
    name: str
    """What it is, in DeepSpeed's words where it has some."""
    placement: str
    """device (the accelerator) | host (offloaded to CPU memory)."""
    nbytes: int
    tensors: int


@dataclass(frozen=True)
class _Rule:
    term: str
    name: str
    offloaded_by: str | None = None
    """Which offload option puts it in host memory: optimizer | params | None (always on the device)."""


# Attribute names of DeepSpeed's optimizers (stage_1_and_2.py, stage3.py, bf16_optimizer.py,
# fp16/unfused_optimizer.py, fp16/fused_optimizer.py) → what the tensors under them are.
_ATTR_RULES: dict[str, _Rule] = {
    **dict.fromkeys(
        (
            "bit16_groups_flat",
            "parallel_partitioned_bit16_groups",
            "bit16_groups",
            "round_robin_bit16_groups",
            "fp16_groups",
            "fp16_groups_flat",
            "bf16_groups",
            "bf16_groups_flat",
            "bf16_partitioned_groups",
        ),
        _Rule("weights", "parameters (flat 16/32-bit buffer)"),
    ),
    **dict.fromkeys(
        (
            "fp16_partitioned_groups",
            "fp16_partitioned_groups_flat",
            "lp_param_buffer",
            "param_groups_fp16_flat_cpu_memory",
        ),
        _Rule("weights", "parameter partitions (ds_tensor)", "params"),
    ),
    **dict.fromkeys(
        (
            "single_partition_of_fp32_groups",
            "fp32_partitioned_groups_flat",
            "fp32_groups",
            "fp32_groups_flat",
            "fp32_groups_flat_partition",
        ),
        _Rule("optimizer", "fp32 master weights", "optimizer"),
    ),
    **dict.fromkeys(
        (
            "averaged_gradients",
            "grads_in_partition",
            "all_grad_tensors",
            "grad_partitions_flat_buffer",
            "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
        ),
        _Rule("gradients", "reduced gradient partition"),
    ),
    **dict.fromkeys(
        ("fp32_groups_gradients", "fp32_groups_gradients_flat", "fp32_groups_gradient_flat_partition"),
        _Rule("gradients", "fp32 gradient accumulation buffer (BF16_Optimizer)"),
    ),
    **dict.fromkeys(
        ("offload_gradient_dict", "accumulated_grads_in_cpu"),
        _Rule("gradients", "fp32 gradient partition (optimizer offload)", "optimizer"),
    ),
    **dict.fromkeys(
        ("ipg_buckets", "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer"),
        _Rule("extras", "IPG reduce bucket"),
    ),
    "temp_grad_buffer_for_gpu_offload": _Rule("extras", "offload staging buffer (largest parameter, device)"),
    "temp_grad_buffer_for_cpu_offload": _Rule(
        "extras", "offload staging buffer (largest parameter, host)", "optimizer"
    ),
    "param_buffer_of_bit16_for_cpu_offload_groups": _Rule(
        "extras", "offload 16-bit copy of the updated partition (host)", "optimizer"
    ),
    "lp_param_contiguous_pin_buffer": _Rule("extras", "offload_states pinned copy", "params"),
    "lp_grad_partitions_flat_pin_buffers": _Rule("extras", "offload_states pinned copy", "params"),
    "norm_for_param_grads": _Rule("extras", "per-parameter gradient norms"),
    "_global_grad_norm": _Rule("extras", "scalars (gradient norm, overflow flag)"),
    "inf_or_nan_tracker": _Rule("extras", "scalars (gradient norm, overflow flag)"),
}
_TRACKER_CATEGORY = {
    "buffers": "buffers",
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer",
    "extras": "zero buffers",
}
"""Term → the live tracker's category (harness.measure labels weights, gradients, optimizer the same way)."""
_PRIORITY = {"buffers": 0, "weights": 1, "optimizer": 2, "gradients": 3, "extras": 4}


def _walk(roots: list[tuple[tuple[str, ...], object]]) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path, tensor) for every tensor reachable from `roots` through DeepSpeed objects, containers and
    torch optimizers; a tensor also leads to its `.grad`, `.ds_tensor` (ZeRO-3 partition) and `.grad_accum`."""
    import torch

    seen: set[int] = set()
    stack = list(reversed(roots))
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path, obj
            for attr in ("grad", "ds_tensor", "grad_accum"):
                child = (obj.grad if obj.is_leaf else None) if attr == "grad" else getattr(obj, attr, None)
                if isinstance(child, torch.Tensor):
                    stack.append(((*path, attr), child))
            continue
        if isinstance(obj, torch.nn.Module):
            continue  # the model's own tensors are roots of their own
        if isinstance(obj, dict):
            stack.extend(((*path, str(k) if isinstance(k, (str, int)) else "[key]"), v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            stack.extend(((*path, str(i)), v) for i, v in enumerate(obj))
        elif isinstance(obj, torch.optim.Optimizer):
            stack.append(((*path, "optimizer_state"), obj.state))
            stack.append(((*path, "param_groups"), obj.param_groups))
        elif (type(obj).__module__ or "").startswith("deepspeed") and hasattr(obj, "__dict__"):
            stack.extend(((*path, k), v) for k, v in vars(obj).items())


def _rule(path: tuple[str, ...], tensor) -> _Rule:
    """The classification of a tensor reached by `path` (see `_ATTR_RULES`)."""
    if getattr(tensor, "_zero_padding", False):
        return _Rule("gradients", "alignment padding (zero tensors)")
    if path[-1] == "grad_accum":
        return _Rule("gradients", "fp32 gradient accumulator (param.grad_accum)")
    if path[-1] == "ds_tensor":
        return _Rule("weights", "parameter partitions (ds_tensor)", "params")
    if path[-1] == "grad":
        owner = _rule(path[:-1], None)
        if owner.term == "optimizer":
            return _Rule("gradients", "fp32 gradient partition (master .grad)", "optimizer")
        return _Rule("gradients", "gradients (param.grad)")
    if path[0] == "module":
        return _Rule("weights", "parameters")
    for attr in path:
        if attr in _ATTR_RULES:
            return _ATTR_RULES[attr]
        if attr == "optimizer_state":
            return _Rule("optimizer", "optimizer state (exp_avg, exp_avg_sq, step / momentum)", "optimizer")
        if attr == "param_groups":
            return _Rule("optimizer", "fp32 master weights", "optimizer")
    return _Rule("extras", "other: " + re.sub(r"\.\d+", "[i]", ".".join(path)))


def _zero_stage3_param(param) -> bool:
    return hasattr(param, "ds_id")


class _Accountant:
    """Walks an engine and sums what it holds by (term, component, placement), exactly, by storage."""

    def __init__(self, engine, config: dict, accelerator_device: str):
        self.engine = engine
        self.accelerator_device = accelerator_device
        self.stage = engine.zero_optimization_stage()
        zero = config.get("zero_optimization") or {}
        self.offloaded = {
            "optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") != "none",
            "params": (zero.get("offload_param") or {}).get("device", "none") != "none",
        }

    def roots(self) -> list[tuple[tuple[str, ...], object]]:
        module = self.engine.module
        roots: list[tuple[tuple[str, ...], object]] = [(("buffers", n), b) for n, b in module.named_buffers()]
        roots += [(("module", n), p) for n, p in module.named_parameters()]
        roots.append((("optimizer",), self.engine.optimizer))
        skip = {"module", "optimizer", "_modules", "_parameters", "_buffers", "basic_optimizer", "client_optimizer"}
        roots += [(("engine", k), v) for k, v in vars(self.engine).items() if k not in skip]
        return roots

    def _placement(self, rule: _Rule, tensor) -> str:
        if tensor.device.type == "cpu" and self.accelerator_device != "cpu":
            return "host"
        return "host" if rule.offloaded_by and self.offloaded[rule.offloaded_by] else "device"

    def walk(self) -> dict[int, tuple[_Rule, str, object]]:
        """storage key → (rule, placement, a tensor on it), the rule of highest priority among all paths."""
        best: dict[int, tuple[_Rule, str, object]] = {}
        for path, tensor in _walk(self.roots()):
            if tensor.device.type == "meta":
                continue  # round_robin_bit16_meta: shape records, no memory
            if path[0] == "buffers":
                rule = _Rule("buffers", "module buffers")
            elif path[0] == "module" and self.stage == 3 and _zero_stage3_param(tensor):
                persistent = getattr(tensor, "ds_persist", False)
                rule = _Rule(
                    "weights", "persistent parameters (whole on every rank)" if persistent else "gathered parameters"
                )
            else:
                rule = _rule(path, tensor)
            key = tensor.untyped_storage()._cdata
            held = best.get(key)
            if held is None or _PRIORITY[rule.term] < _PRIORITY[held[0].term]:
                best[key] = (rule, self._placement(rule, tensor), tensor)
        return best

    def snapshot(self) -> tuple[list[Held], dict[str, list]]:
        """The held components, and one tensor per storage by term (to register with a live tracker)."""
        best = self.walk()
        sums: dict[tuple[str, str, str], list[int]] = {}
        by_term: dict[str, list] = {}
        for rule, placement, tensor in best.values():
            entry = sums.setdefault((rule.term, rule.name, placement), [0, 0])
            entry[0] += tensor.untyped_storage().nbytes()
            entry[1] += 1
            by_term.setdefault(rule.term, []).append(tensor)
        held = [Held(t, n, p, b, c) for (t, n, p), (b, c) in sums.items() if b]  # not ZeRO-3's empty placeholders
        held.sort(key=lambda h: (_PRIORITY[h.term], -h.nbytes))
        return held, by_term

    # ---- what explains the differences from "divide by N" (exact, from DeepSpeed's own bookkeeping) ----
    def explanations(self) -> dict[str, int]:
        opt = self.engine.optimizer
        out: dict[str, int] = {}
        if self.stage in (1, 2) and hasattr(opt, "bit16_groups_flat"):
            out.update(self._stage12(opt))
        elif self.stage == 3 and hasattr(opt, "fp16_partitioned_groups_flat"):
            out.update(self._stage3(opt))
        return out

    def _stage12(self, opt) -> dict[str, int]:
        """Alignment padding of the flat parameter buffer; parts of boundary parameters outside the partition."""
        import torch.distributed as dist

        padding_elements = boundary_elements = partition_elements = 0
        elem = opt.bit16_groups_flat[0].element_size()
        for i, flat in enumerate(opt.bit16_groups_flat):
            params = opt.round_robin_bit16_groups[i]
            padding_elements += flat.numel() - sum(p.numel() for p in params)
            rank = dist.get_rank(group=opt.real_dp_process_group[i])
            size = int(opt.partition_size[i])
            start, end = size * rank, size * (rank + 1)
            partition_elements += size
            for p, offset in zip(params, opt.round_robin_bit16_offsets[i], strict=True):
                overlap = max(0, min(end, offset + p.numel()) - max(start, offset))
                if overlap:
                    boundary_elements += p.numel() - overlap
        return {
            "weights_alignment_padding_bytes": padding_elements * elem,
            "gradients_boundary_parameter_bytes": boundary_elements * elem,
            "partition_elements": partition_elements,
        }

    def _stage3(self, opt) -> dict[str, int]:
        """Padding of the per-parameter partitions (ceil(numel/N) each), and the persistent parameters: their
        own bytes, and the padding of the all-gather buffer they live in (N·ceil(numel/N) elements)."""
        import torch.distributed as dist

        rank = dist.get_rank(group=opt.dp_process_group)
        padding = persistent = gather_padding = 0
        seen: set[int] = set()
        for group in opt.fp16_groups:
            for p in group:
                part, elem = p.ds_tensor.ds_numel, p.ds_tensor.element_size()
                padding += max(0, min(part, (rank + 1) * part - p.ds_numel)) * elem
                if getattr(p, "ds_persist", False):
                    persistent += p.ds_numel * elem
                    storage = p.data.untyped_storage()
                    if p.data.numel() and storage._cdata not in seen:
                        seen.add(storage._cdata)
                        gather_padding += storage.nbytes() - p.ds_numel * elem
        return {
            "weights_partition_padding_bytes": padding,
            "weights_persistent_parameter_bytes": persistent,
            "weights_gather_padding_bytes": gather_padding,
        }


def _totals(held: list[Held]) -> dict[str, dict[str, int]]:
    """term → {device, host} bytes."""
    out = {term: {"device": 0, "host": 0} for term in (*TERMS, "buffers")}
    for h in held:
        out[h.term][h.placement] += h.nbytes
    return out


# --------------------------------------------------------------------------------------------------
# The engine behind the Trainer interface


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str) -> None:
    """The default process group: NCCL on CUDA, gloo on CPU.

    Under a launcher (torchrun, deepspeed) RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are
    set; a single process sets them itself, or `deepspeed.initialize` tries MPI discovery (PLATFORM.md).
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


class DeepSpeedTrainer:
    """`harness.training.Trainer`'s interface over a DeepSpeed engine, with the per-rank account.

    The term methods return device bytes (what a GPU holds); host bytes of offloaded state are in the
    account (`finish_measurement`). Snapshots are taken where the protocol asks: weights after the engine
    is built, gradients after the last backward of a step, optimizer state after the step.
    """

    def __init__(self, model, spec: RunSpec, *, device_type: str, probe=None):
        import deepspeed
        import torch

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed(device_type)
        self.spec = spec
        self.model = model
        self.device_type = device_type
        self.probe = probe
        self.mixed = is_mixed(spec.precision)
        self.config = effective_config(spec)
        # Live bytes that are not the model's (the inputs): the residual's baseline. The exact live tracker,
        # not the CUDA allocator, on every device: it counts host (offloaded) storages too, unrounded, as
        # the walk does.
        own = _unique_bytes([*model.parameters(), *model.buffers()])
        self._baseline = (probe.tracker.live_bytes - own) if probe is not None else 0
        params = [p for p in model.parameters() if p.requires_grad]
        client = None if "optimizer" in self.config else make_torch_optimizer(spec.optimizer, params, device_type)
        previous = probe.tracker.category if probe is not None else None
        if probe is not None:
            probe.tracker.category = "engine init"  # what the walk misses is named by the phase that made it
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=client, config=self.config
            )
        finally:
            if probe is not None:
                probe.tracker.category = previous
        self.stage = self.engine.zero_optimization_stage()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self._micro = 0
        self._account = _Accountant(self.engine, self.config, device_type)
        self.snapshots: dict[str, dict] = {}
        self._before_reduction: int | None = None
        self._bucket_bytes_max = 0
        self._gathered = {"forward": 0, "backward": 0}
        self._sampling = True
        self._hooks: list = []
        self._instrument()
        self._snapshot("after_init")

    # ---- instrumentation: full gradients before ZeRO-1 reduces them, buckets, ZeRO-3 gathered params ----
    def _instrument(self) -> None:
        opt = self.engine.optimizer
        if hasattr(opt, "reduce_gradients") and self.stage == 1:
            original = opt.reduce_gradients

            def reduce_gradients(*args, **kwargs):
                if self._sampling and self._before_reduction is None:
                    self._before_reduction = _unique_bytes(p.grad for p in self.model.parameters())
                return original(*args, **kwargs)

            opt.reduce_gradients = reduce_gradients
        if hasattr(opt, "setup_buckets"):
            setup = opt.setup_buckets

            def setup_buckets(*args, **kwargs):
                out = setup(*args, **kwargs)
                if self._sampling:
                    held = _unique_bytes(t for b in opt.ipg_buckets.values() for t in b.buffer)
                    self._bucket_bytes_max = max(self._bucket_bytes_max, held)
                return out

            opt.setup_buckets = setup_buckets
        if self.stage == 3:
            for module in self.model.modules():
                self._hooks.append(module.register_forward_pre_hook(lambda *_: self._sample_gathered("forward")))
            for p in self.model.parameters():
                if p.requires_grad:
                    self._hooks.append(
                        p.register_post_accumulate_grad_hook(lambda *_: self._sample_gathered("backward"))
                    )

    def _sample_gathered(self, phase: str) -> None:
        """Bytes of ZeRO-3 parameters gathered whole right now (the module in use and those prefetched),
        persistent ones excluded: the `zero3_live_params` term."""
        if not self._sampling:
            return
        live = _unique_bytes(
            p.data for p in self.model.parameters() if p.data.numel() and not getattr(p, "ds_persist", False)
        )
        self._gathered[phase] = max(self._gathered[phase], live)

    @contextlib.contextmanager
    def _zero3_saved_parameters(self):
        """Let autograd save ZeRO-3 parameters as themselves while a saved-tensor tracker is active.

        Without hooks autograd keeps a leaf parameter itself, so when ZeRO-3 releases it (an empty
        `param.data`) the gathered storage is freed and backward re-gathers it. A tracker's pack hook
        (`SavedTensorTracker`) keeps a detached alias instead, which would pin every gathered storage until
        backward: the whole model. These inner hooks hand parameters back as they are and pass every other
        tensor to the tracker; parameters are model state, not activations, so the tracker need not see them.

        The tracker also keys the parameters it excludes by storage address, taken before the forward: the
        empty placeholders ZeRO-3 leaves in `param.data`. Gathering replaces and frees them, and an activation
        allocated at a freed address would be taken for a parameter; holding them for the forward prevents that.
        """
        import torch

        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if self.stage != 3 or top is None:
            yield
            return
        placeholders = [p.data for p in self.model.parameters()]  # noqa: F841 (held, not used)
        outer_pack, outer_unpack = top

        def pack(t):
            return (True, t) if _zero_stage3_param(t) else (False, outer_pack(t))

        def unpack(packed):
            is_param, value = packed
            return value if is_param else outer_unpack(value)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    # ---- the Trainer interface ----
    def forward(self, batch: dict):
        with self._zero3_saved_parameters():
            return self.engine(**batch)

    def backward(self, loss) -> None:
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed counts the micro-step and steps nothing

    def step(self) -> None:
        self.engine.step()
        self._micro = 0

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    train_step = Trainer.train_step  # the same micro-batch loop, over the engine's forward, backward and step

    def infer(self, batch: dict):
        raise UsageError("DeepSpeed runs are measured in training mode only")

    def weight_bytes(self) -> int:
        return self.snapshots["after_init"]["totals"]["weights"]["device"]

    def buffer_bytes(self) -> int:
        return _unique_bytes(self.model.buffers())

    def gradient_bytes(self) -> int:
        return self._snapshot("after_backward")["totals"]["gradients"]["device"]

    def optimizer_tensors(self) -> list:
        best = self._account.walk()
        return [t for rule, _, t in best.values() if rule.term == "optimizer"]

    def optimizer_bytes(self) -> int:
        return self._snapshot("after_step")["totals"]["optimizer"]["device"]

    # ---- the account ----
    def _snapshot(self, name: str) -> dict:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()  # collectives in flight still hold their buffers
        held, by_term = self._account.snapshot()
        if self.probe is not None:
            # Tensors made without a dispatched op (torch.tensor(...): AdamW's step) are invisible to the live
            # tracker until registered; after this the residual is what it saw and the walk did not find.
            # Each storage is labelled with its term, so that a peak's breakdown names DeepSpeed's buffers.
            for term, tensors in by_term.items():
                self.probe.tracker.track(*tensors, category=_TRACKER_CATEGORY[term])
        totals = _totals(held)
        walked = sum(v for t in totals.values() for v in t.values())
        snap = {"totals": totals, "held": [asdict(h) for h in held], "residual_bytes": None}
        if self.probe is not None:
            snap["residual_bytes"], snap["settle_ms"] = self._residual(walked)
            # Live storages the walk did not reach keep the label of the phase that allocated them.
            named = {*_TRACKER_CATEGORY.values(), "inputs", "model"}  # "model": built before the engine
            snap["residual_by_phase"] = {c: b for c, b in self.probe.tracker.snapshot().items() if c not in named}
        self.snapshots[name] = snap
        return snap

    def _residual(self, walked: int) -> tuple[int, float]:
        """Live bytes not walked, once the communication threads have let go of the last collective's tensors.

        A gloo (or NCCL) work object references its tensors until its worker thread releases it, which can be
        a moment after the collective has completed for the caller: under CPU contention the last bucket of
        a backward was seen alive that way. Wait up to `SETTLE_S` for such transients; what remains is real.
        """
        tracker = self.probe.tracker
        residual = tracker.live_bytes - self._baseline - walked
        t0 = time.perf_counter()
        while residual > 0 and time.perf_counter() - t0 < SETTLE_S:
            time.sleep(0.005)
            residual = tracker.live_bytes - self._baseline - walked
        return residual, round((time.perf_counter() - t0) * 1e3, 1)

    def finish_measurement(self, measured: dict) -> None:
        """Record the account in `measured["zero"]` and set the terms to the steady state (after a step)."""
        self._sampling = False
        for handle in self._hooks:
            handle.remove()
        final = self._snapshot("steady")
        mem = measured["memory_bytes"]
        totals = final["totals"]
        mem["weights"] = totals["weights"]["device"]
        mem["zero3_live_params"] = self._gathered["forward"] if self.stage == 3 else 0
        mem["zero_extras"] = totals["extras"]["device"]
        mem["host_model_states"] = sum(totals[t]["host"] for t in TERMS)
        explanations = self._account.explanations()
        if self._before_reduction is not None:
            explanations["gradients_before_reduction_bytes"] = self._before_reduction
        explanations["reduce_bucket_bytes_max"] = self._bucket_bytes_max
        if self.stage == 3:
            explanations["zero3_gathered_forward_max_bytes"] = self._gathered["forward"]
            explanations["zero3_gathered_backward_max_bytes"] = self._gathered["backward"]
        zero_cfg = self.config.get("zero_optimization", {})
        measured["zero"] = {
            "stage": self.stage,
            "rank": self.rank,
            "world_size": self.world_size,
            "optimizer_class": type(self.engine.optimizer).__name__,
            "base_optimizer_class": type(getattr(self.engine, "basic_optimizer", None)).__name__,
            "config": self.config,
            "buckets": {
                "reduce_bucket_elements": zero_cfg.get("reduce_bucket_size"),
                "allgather_bucket_elements": zero_cfg.get("allgather_bucket_size"),
                "prefetch_bucket_elements": zero_cfg.get("stage3_prefetch_bucket_size"),
                "param_persistence_threshold": zero_cfg.get("stage3_param_persistence_threshold"),
                "overlap_comm": bool(getattr(self.engine, "zero_overlap_comm", lambda: False)()),
            },
            "explained_bytes": explanations,
            "snapshots": self.snapshots,
            "host_bytes": {t: totals[t]["host"] for t in TERMS},
        }
        measured["methods"] = {
            **measured.get("methods", {}),
            "weights": "bytes DeepSpeed holds for parameters after a step (flat buffers with padding; ZeRO-3 "
            "partitions, persistent and gathered parameters), device only",
            "gradients": "bytes DeepSpeed holds for gradients after the last backward of a step (reduced "
            "partitions, param.grad, padding), device only",
            "optimizer": "bytes of the fp32 master partition and the base optimizer's state after a step",
            "zero3_live_params": "largest bytes of gathered, non-persistent ZeRO-3 parameters seen at any "
            "module's forward",
            "zero": "every tensor reachable from the engine, deduplicated by storage, by term and component; "
            "residual_bytes = live bytes − bytes before the engine − walked bytes",
        }


def _unique_bytes(tensors) -> int:
    return unique_storage_bytes(t for t in tensors if t is not None and t.device.type != "meta")


__all__ = [
    "BucketSizes",
    "DeepSpeedTrainer",
    "Held",
    "check_deepspeed",
    "deep_merge",
    "deepspeed_config",
    "deepspeed_estimate",
    "effective_config",
    "load_user_config",
    "uses_deepspeed",
]
