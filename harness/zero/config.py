"""The DeepSpeed config of a RunSpec, a user's JSON merged over it, and what a DeepSpeed run cannot do."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from formulas.spec import RunSpec
from formulas.zero import STAGE3_LIVE_DEFAULT, BucketSizes
from harness.errors import UsageError


def uses_deepspeed(spec: RunSpec) -> bool:
    """ZeRO, or more than one data-parallel rank: measured through a DeepSpeed engine."""
    return spec.parallel.zero > 0 or spec.parallel.gpus > 1


def _optimizer_section(optimizer: str) -> dict | None:
    """AdamW and SGD as DeepSpeed builds them from its config; None for a client optimizer (8-bit Adam).

    `torch_adam: true` makes DeepSpeed build torch.optim.AdamW (`DeepSpeedEngine.get_optimizer_configuration`)
    instead of FusedAdam or DeepSpeedCPUAdam, which it would JIT-compile (~45 s each on a 2-core CPU, measured here); the
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
    if spec.model.arch is None:
        raise UsageError("a DeepSpeed run needs an architecture (--model or --layers/--hidden/--heads)")
    buckets = BucketSizes.for_hidden(spec.model.arch.hidden)
    zero: dict = {
        "stage": spec.parallel.zero,
        "contiguous_gradients": True,
        "overlap_comm": spec.parallel.zero == 3,  # DeepSpeed's own default (`DeepSpeedZeroConfig.overlap_comm_valid`)
        "reduce_scatter": True,
        "reduce_bucket_size": buckets.reduce_bucket_elements,
        "allgather_bucket_size": buckets.allgather_bucket_elements,
    }
    if spec.parallel.zero == 3:
        zero["stage3_prefetch_bucket_size"] = buckets.prefetch_bucket_elements
        zero["stage3_param_persistence_threshold"] = buckets.param_persistence_threshold
        zero["stage3_max_live_parameters"] = STAGE3_LIVE_DEFAULT
        zero["stage3_max_reuse_distance"] = STAGE3_LIVE_DEFAULT
    pin = (
        spec.measurement.device != "cpu"
    )  # page-locked host buffers for fast copies to a GPU (a no-op on the CPU accelerator)
    if spec.parallel.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if spec.parallel.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict = {
        "train_micro_batch_size_per_gpu": spec.training.batch,
        "gradient_accumulation_steps": spec.training.grad_accum,
        "gradient_clipping": 0.0,  # harness.training.Trainer does not clip either
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
    }
    section = _optimizer_section(spec.training.optimizer)
    if section is not None:
        config["optimizer"] = section
    if spec.training.optimizer != "adamw":
        config["zero_allow_untested_optimizer"] = True  # ZeRO lists Adam(W), Adagrad, Lion as tested
    if spec.parallel.offload_optimizer == "cpu":
        config["zero_force_ds_cpu_optimizer"] = False  # step torch's optimizer on the host, no cpu_adam build
    if spec.training.precision == "bf16-mixed":
        config["bf16"] = {"enabled": True}
    elif spec.training.precision == "fp16-mixed":
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
    if not spec.measurement.deepspeed_config:
        return config
    user = load_user_config(spec.measurement.deepspeed_config)
    merged = deep_merge(config, user)
    for path, flag in _SPEC_OWNED:
        given, ours = _lookup(user, path), _lookup(config, path)
        if given is not None and given != (ours if ours is not None else False):
            raise UsageError(
                f"--deepspeed-config {spec.measurement.deepspeed_config}: {'.'.join(path)} = {json.dumps(given)} contradicts "
                f"the run's settings; set it with {flag} instead"
            )
    return merged


def deepspeed_available() -> bool:
    """Whether DeepSpeed can be imported, without importing it (which takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


def check_deepspeed(spec: RunSpec, device: str) -> None:
    """What a DeepSpeed run of `spec` cannot do on `device`, as one-line errors before anything starts."""
    if not uses_deepspeed(spec):
        return
    what = f"--zero {spec.parallel.zero}" if spec.parallel.zero else f"--gpus {spec.parallel.gpus}"
    if not deepspeed_available():
        raise UsageError(f"{what} measures through DeepSpeed, which is not installed: pip install deepspeed")
    if spec.measurement.mode == "inference":
        raise UsageError(f"{what}: ZeRO and data parallelism are measured for training only (--mode train)")
    if spec.training.precision in ("fp16", "bf16"):
        raise UsageError(
            f"--precision {spec.training.precision}: DeepSpeed keeps an fp32 master copy of 16-bit parameters; "
            f"use --precision {spec.training.precision}-mixed (or fp32) with {what}"
        )
    if device == "cpu" and spec.training.precision == "fp16-mixed":
        raise UsageError("--precision fp16-mixed with DeepSpeed needs CUDA: its CPU accelerator has no fp16 support")
    if device == "cpu" and spec.training.optimizer == "adam8bit":
        raise UsageError("--optimizer adam8bit (bitsandbytes) needs a CUDA device")
    if spec.measurement.deepspeed_config:
        effective_config(spec)
