"""Every tensor reachable from a DeepSpeed engine, by term and named component, exactly, by storage.

`Accountant.snapshot()` walks the engine's attributes (and the base optimizer's state), classifies each
storage by the attribute path that reaches it (`_ATTR_RULES`), and sums bytes by (term, component,
placement); `explanations()` reads from DeepSpeed's own bookkeeping what explains a rank's departures from
"divide by N" (padding, boundary parameters, persistent parameters). Where each component lives is listed in
`harness.zero`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.memtrack import unique_storage_bytes
from harness.zero.account import TERMS, Held, Placed


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
TRACKER_CATEGORY = {
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


def is_zero3_param(param) -> bool:
    return hasattr(param, "ds_id")


class Accountant:
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
            elif path[0] == "module" and self.stage == 3 and is_zero3_param(tensor):
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


def totals(held: list[Held]) -> dict[str, Placed]:
    """term → bytes on the device and in host memory."""
    out = {term: {"device": 0, "host": 0} for term in (*TERMS, "buffers")}
    for h in held:
        out[h.term][h.placement] += h.nbytes
    return {term: Placed(**v) for term, v in out.items()}


def live_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`, fake (meta) tensors and None left out."""
    return unique_storage_bytes(t for t in tensors if t is not None and t.device.type != "meta")
