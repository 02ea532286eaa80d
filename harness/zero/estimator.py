"""DeepSpeed's own model-state estimators, called for a RunSpec: the third column of the per-rank table."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from formulas.params import largest_module_params
from formulas.spec import RunSpec
from harness.zero.config import deepspeed_available


@dataclass(frozen=True)
class EstimatorBytes:
    gpu: int
    """Per GPU."""
    cpu: int
    """Per node, in host memory."""


@dataclass(frozen=True)
class EstimatorPrediction:
    """What DeepSpeed's estimator said for a run (the `deepspeed` prediction method)."""

    function: str
    memory_bytes: EstimatorBytes
    args: dict
    """The arguments it was called with."""
    assumes: str
    terms: dict[str, int] = field(default_factory=dict)
    """Its per-term split where its comment gives one (bytes per GPU)."""


@contextlib.contextmanager
def _quiet_logging():
    """Warnings off while DeepSpeed is imported (it logs "Setting accelerator to CPU" on machines without GPUs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def deepspeed_estimate(spec: RunSpec) -> EstimatorPrediction | None:
    """DeepSpeed's model-state estimate for `spec` (None below stage 2, without DeepSpeed or an architecture).

    `estimate_zero2_model_states_mem_needs` (stage_1_and_2.py) and `estimate_zero3_model_states_mem_needs`
    (stage3.py) are the arithmetic behind the `*_all_cold` functions, which only print: per GPU
    2·P + 18·P/N (zero2; "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit") and 4·largest_layer + 18·P/N (zero3), whatever the precision and optimizer.
    DeepSpeed ships no stage-1 estimator. We call them with the spec's `gpus` over its `nodes`, offload flags from the spec, `zero_init=False` (the model is built whole and
    partitioned by the engine) and DeepSpeed's default `additional_buffer_factor=1.5`.
    """
    if spec.parallel.zero < 2 or spec.model.arch is None or not deepspeed_available():
        return None
    try:
        with _quiet_logging():  # importing DeepSpeed logs its accelerator detection
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:  # a broken installation: no third column, the run itself reports why
        return None
    nodes = spec.parallel.nodes
    per_node = spec.parallel.gpus // nodes
    params = spec.total_params
    if spec.parallel.zero == 2:
        args = {
            "total_params": params,
            "num_gpus_per_node": per_node,
            "num_nodes": nodes,
            "cpu_offload": spec.parallel.offload_optimizer == "cpu",
            "additional_buffer_factor": 1.5,
        }
        cpu, gpu = estimate_zero2_model_states_mem_needs(**args)
        function, terms = "estimate_zero2_model_states_mem_needs", {}
        if not args["cpu_offload"]:
            n = per_node * nodes
            # The split DeepSpeed's comment gives: 16-bit params whole; 16- and 32-bit grads, master and m, v / N.
            terms = {"weights": 2 * params, "gradients": int(6 * params / n), "optimizer": int(12 * params / n)}
    else:
        args = {
            "total_params": params,
            "largest_layer_params": largest_module_params(spec.model.arch),
            "num_gpus_per_node": per_node,
            "num_nodes": nodes,
            "cpu_offload": spec.parallel.offload_optimizer == "cpu",
            "cpu_offload_params": spec.parallel.offload_params == "cpu",
            "zero_init": False,
            "additional_buffer_factor": 1.5,
        }
        cpu, gpu, largest = estimate_zero3_model_states_mem_needs(**args)
        function, terms = "estimate_zero3_model_states_mem_needs", {"zero3_live_params": int(largest)}
    return EstimatorPrediction(
        function=function,
        memory_bytes=EstimatorBytes(gpu=int(gpu), cpu=int(cpu)),
        args=args,
        assumes="16-bit parameters and Adam (2 + 16 bytes/param), whatever the run's precision and optimizer",
        terms=terms,
    )
