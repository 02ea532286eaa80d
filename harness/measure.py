"""Measure one RunSpec in this process: each term the formulas predict, by one protocol on every device.

Protocol (after stas00/ml-engineering's benchmarks):
1. CUDA only: initialise the context and cuBLAS workspace with a small matmul, and record what is
   allocated before the model exists (reported apart, never subtracted).
2. Build the model and the optimizer; record weights and buffers (unique storages).
3. Instrumented first step: activations = unique storages autograd saves during forward
   (`SavedTensorTracker`, parameters and buffers excluded), gradients after backward, optimizer
   state (with the fp32 master copy) after the step, peak allocated over the step.
4. A second step for the steady-state peak (optimizer state now exists from the start), the phase it
   happened in and the live bytes after every op of the step (a timeline, downsampled).
5. A step of its own under `FlopCounterMode` (the first warm-up step, or one more when there is none):
   the counted FLOPs, cross-checked with the formulas. The counter's bookkeeping allocates: it never runs
   during a step whose memory is recorded.
6. The remaining warm-up steps, then `steps` timed steps: CUDA events (perf_counter on CPU) per step, with
   no host sync between them; median, min, max. `--compile` times compiled steps (after one untimed
   compiling step) where the memory steps ran eager.
The engine is the spec's trainer (`harness.trainers`): the same steps for the plain trainer and DeepSpeed.
Peaks: `torch.cuda.max_memory_allocated` on CUDA; on CPU and with fake tensors the exact
`LiveTensorTracker` (a TorchDispatchMode), which is switched off for the timed steps. Python's cyclic
GC is collected before and frozen during the measured steps, so a peak does not depend on its timing.
`--device meta` runs steps 2-5 under FakeTensorMode: shapes without data, nothing allocated.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from formulas.hardware import match_device_name
from formulas.precision import compute_dtype
from formulas.predict import predict
from formulas.spec import RunSpec
from harness.environment import nvml_snapshot
from harness.kernels import AttentionKernels, attention_kernel
from harness.memtrack import LiveTensorTracker, SavedTensorTracker, unique_storage_bytes
from harness.records import Measurement, StepTimes, Throughput, Timeline
from harness.trainers import check_measurable, resolve_device
from harness.trainers.plain import param_dtype
from harness.trainers.protocol import Trainer
from models.build import build_model, make_batch, transformer_blocks
from models.lora import trainable_parameters

Progress = Callable[[str], None]
"""Told what the protocol is doing ("building", "step 2 of 3"): `tmath measure` prints it on stderr."""

MEASUREMENT_METHODS = {
    "weights": "unique parameter storages after the model is built (bytes)",
    "gradients": "unique .grad storages after the first backward",
    "optimizer": "unique optimizer-state storages after the first step, fp32 master copy included",
    "activations": "unique storages saved for backward (saved_tensors_hooks), parameters and buffers excluded",
    "peak_allocated": {
        "cuda": "torch.cuda.max_memory_allocated over a step",
        "cpu": "LiveTensorTracker (TorchDispatchMode over every op) over a step",
        "meta": "LiveTensorTracker under FakeTensorMode over a step",
    },
    "peak_backend_freed": "LiveTensorTracker: bytes live at the steady peak that another thread (a process group's "
    "worker) freed after it, read at the step's end (multi-rank runs: BACKEND_SETTLE_S after it)",
    "step_ms": {
        "cuda": "CUDA events around each step, read after the last (no host sync between steps)",
        "cpu": "time.perf_counter around each step",
    },
    "flops": "torch.utils.flop_counter.FlopCounterMode over a step of its own (the first warm-up step, or an "
    "extra one), never a step whose memory is recorded",
    "peak_phase": "the phase (tracker category) current when the step's peak was reached",
    "attention_kernel": "the fused scaled_dot_product_attention ops dispatched during the FLOP count step "
    "(harness.kernels); none seen: eager attention, or SDPA's math fallback",
    "step_mode": "how the warm-up and timed steps ran: eager (the memory steps' own), or compiled "
    "(torch.compile of the model and its loss, fused AdamW; `--compile`) after one untimed compiling step",
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters in `dtype` directly: `model.to(dtype)` fails on fake parameters (FakeTensorMode:
    "Cannot swap t1 because it has weakref", torch 2.13)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def gc_frozen():
    """Collect, then keep Python's cyclic GC off: a measured peak must not depend on when the collector
    happens to run (torch.utils.checkpoint leaves reference cycles whose storages only GC frees)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _CudaMemory:
    """Allocator statistics (the numbers `torch.cuda.max_memory_allocated` users know); the live tracker
    beside it only labels what the allocator holds, for the peak's breakdown."""

    def __init__(self, tracker: LiveTensorTracker):
        self.tracker = tracker

    def live(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.tracker.reset_peak()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


class _TrackedMemory:
    """The exact live-storage tracker, for CPU and fake tensors (the CPU allocator keeps no statistics)."""

    def __init__(self, tracker: LiveTensorTracker):
        self.tracker = tracker

    def live(self) -> int:
        return self.tracker.live_bytes

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def peak(self) -> int:
        return self.tracker.peak_bytes


def lora_settings(spec: RunSpec) -> dict | None:
    """`models.build.build_model`'s `lora` for the spec (None: full fine-tuning)."""
    t = spec.training
    if t.finetune == "full":
        return None
    return {"rank": t.lora_rank, "alpha": t.lora_alpha, "dropout": t.lora_dropout, "targets": t.lora_targets}


def _quiet(message: str) -> None:
    """Progress goes nowhere unless someone listens."""


BACKEND_SETTLE_S = 0.05
"""Multi-rank runs on the tracker: how long the steady step's end waits (the GIL released) for the process group's
worker threads to let go of what the step has dropped, before `peak_backend_freed` is read."""

_CUDA_PEAKS = {
    "peak_allocated": "allocated_bytes.all.peak",
    "peak_reserved": "reserved_bytes.all.peak",
    "peak_active": "active_bytes.all.peak",
}


def _timed_steps(step, work, n: int, cuda: bool, progress: Progress) -> tuple[list[float], dict]:
    """Per-step milliseconds of `step(work)` and, on CUDA, the largest per-step allocator peaks.

    On CUDA no host sync runs between the timed steps: each step is bracketed by events recorded on the
    stream, the host queues the next step while the device runs this one (as a training loop does), and
    one synchronize after the last step reads them all. The allocator's statistics are the host's view of
    allocations made as kernels are queued, so they need no sync either.
    """
    times: list[float] = []
    stats = dict.fromkeys(_CUDA_PEAKS, 0) if cuda else {}
    events = []
    for i in range(n):
        progress(f"timed step {i + 1} of {n}")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(work)
            end.record()
            events.append((start, end))
            s = torch.cuda.memory_stats()
            for key, stat in _CUDA_PEAKS.items():
                stats[key] = max(stats[key], s.get(stat, 0))
        else:
            t0 = time.perf_counter()
            step(work)
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
        s = torch.cuda.memory_stats()
        stats["num_alloc_retries"] = s.get("num_alloc_retries", 0)
        stats["num_ooms"] = s.get("num_ooms", 0)
    return times, stats


def _finish_timing(measured: Measurement, times: list[float], tokens: int, model_flops: int, hw_flops: int) -> None:
    """Step-time statistics and throughput from the timed steps (nothing when none were timed)."""
    if not times:
        return
    measured.step_ms = StepTimes(median=statistics.median(times), min=min(times), max=max(times), all=times)
    seconds = measured.step_ms.median / 1e3
    measured.tflops = Throughput(
        model=model_flops / seconds / 1e12,
        hardware=hw_flops / seconds / 1e12,
        counted=measured.flops_counted / seconds / 1e12,
    )
    measured.tokens_per_second = tokens / seconds


def _cuda_epilogue(spec: RunSpec, measured: Measurement, cuda_stats: dict, compiled: bool = False) -> None:
    """Allocator peaks of the timed steps, NVML's view, and utilisation against the device's peak.

    Compiled timed steps hold what inductor's graphs save, not what the eager steps measured: their peak is
    kept apart (`peak_allocated_compiled`), never folded into the eager one."""
    mem = measured.memory_bytes
    timed_peak = cuda_stats.pop("peak_allocated", 0)
    if compiled:
        mem.peak_allocated_compiled = timed_peak
    else:
        mem.peak_allocated = max(mem.peak_allocated or 0, timed_peak)
    for key, value in cuda_stats.items():
        setattr(mem, key, value)
    after = nvml_snapshot(torch.cuda.current_device())
    mem.nvml_used = after["memory_used_bytes"] if after else None
    gpu = match_device_name(torch.cuda.get_device_name())
    measured.gpu = gpu.name if gpu else None
    peak = gpu.peak(compute_dtype(spec.training.precision)) if gpu else None
    if peak and measured.tflops is not None:
        measured.peak_tflops = peak
        measured.mfu = measured.tflops.model / peak
        measured.hfu = measured.tflops.hardware / peak


def _warm_cuda(dtype: torch.dtype, mem) -> None:
    """Create the CUDA context and cuBLAS workspace before the model, and record what they hold."""
    torch.cuda.init()
    warm = torch.randn(256, 256, device="cuda", dtype=dtype)
    (warm @ warm).sum().item()
    del warm
    torch.cuda.synchronize()
    mem.pre_model_allocated = torch.cuda.memory_allocated()
    mem.pre_model_reserved = torch.cuda.memory_reserved()
    before = nvml_snapshot(torch.cuda.current_device())
    mem.nvml_used_before_model = before["memory_used_bytes"] if before else None


def measure(spec: RunSpec, measured: Measurement | None = None, progress: Progress | None = None) -> Measurement:
    """Run the protocol for `spec` and return its Measurement.

    `measured` is filled phase by phase: pass one in to keep what was measured when a later phase fails.
    """
    measured = measured if measured is not None else Measurement()
    progress = progress or _quiet
    device = resolve_device(spec.measurement.device)
    entry = check_measurable(spec, device)
    cuda, fake = device == "cuda", device == "meta"
    torch_device = "cuda" if cuda else "cpu"
    dtype = param_dtype(spec.training.precision)
    arch = spec.model.arch
    inference = spec.measurement.mode == "inference"
    measured.device, measured.mode, measured.trainer = device, spec.measurement.mode, entry.name
    measured.methods = dict(MEASUREMENT_METHODS)
    mem = measured.memory_bytes
    torch.manual_seed(0)
    if cuda:
        _warm_cuda(dtype, mem)
    prediction = predict(spec)

    with contextlib.ExitStack() as outer:
        if fake:
            outer.enter_context(FakeTensorMode())
        with contextlib.ExitStack() as tracked:
            tracker = tracked.enter_context(LiveTensorTracker(category="model"))
            probe = _CudaMemory(tracker) if cuda else _TrackedMemory(tracker)
            progress(f"building {spec.model.name} ({spec.measurement.impl}) on {device}")
            with default_dtype(dtype):
                model = build_model(
                    arch, impl=spec.measurement.impl, attention=spec.training.attention,
                    recompute=spec.training.recompute, device=torch_device, dtype=dtype, lora=lora_settings(spec),
                )  # fmt: skip
            generator = None if fake else torch.Generator(device=torch_device).manual_seed(0)
            t = spec.training
            batches = [
                make_batch(arch, t.batch, t.seq, device=torch_device, generator=generator, impl=spec.measurement.impl)
                for _ in range(1 if inference else t.grad_accum * spec.parallel.n_microbatches)
            ]
            trainer: Trainer = entry.load()(model, spec, device_type=torch_device, probe=probe)
            tracker.track(*model.parameters(), category="weights")
            tracker.track(*model.buffers(), category="buffers")
            tracker.track(*(t for b in batches for t in b.values()), category="inputs")
            tracker.track(*trainer.optimizer_tensors(), category="optimizer")
            if spec.training.finetune != "full":
                measured.trainable_params = trainable_parameters(model)
            mem.weights = trainer.weight_bytes()
            mem.buffers = trainer.buffer_bytes()
            mem.inputs = unique_storage_bytes(t for b in batches for t in b.values())
            mem.after_model = probe.live()
            if inference:
                progress("inference forward")
                _inference_steps(spec, measured, trainer, batches[0], probe)
            else:
                _first_steps(measured, trainer, batches, probe, transformer_blocks(model), progress)
                trainer.finish(measured)
        step = trainer.infer if inference else trainer.train_step
        work = batches[0] if inference else batches
        warmup = spec.measurement.warmup
        progress("FLOP count step" + (" (the first warm-up step)" if warmup and not fake else ""))
        with FlopCounterMode(display=False) as counter, AttentionKernels() as kernels:
            step(work)
        measured.flops_counted = int(counter.get_total_flops())
        measured.attention_kernel = attention_kernel(kernels.ops, spec.training.attention)
        if fake:
            return measured
        measured.step_mode = "eager"
        if spec.measurement.compile:
            progress("compiling (torch.compile: the first compiled step, untimed)")
            measured.step_mode = trainer.compile()
            measured.compile_seconds = _untimed(step, work, cuda)
        for i in range(1, warmup):
            progress(f"warm-up step {i + 1} of {warmup}")
            step(work)
        times, cuda_stats = _timed_steps(step, work, spec.measurement.steps, cuda, progress)
    tokens = t.batch * t.seq * len(work if not inference else [work])
    if inference:
        forward = prediction.flops.per_step_model // (3 * t.grad_accum)
        _finish_timing(measured, times, tokens, forward, forward)
    else:
        _finish_timing(measured, times, tokens, prediction.flops.per_step_model, prediction.flops.per_step_hardware)
    if cuda:
        _cuda_epilogue(spec, measured, cuda_stats, compiled=spec.measurement.compile)
    return measured


def _untimed(step, work, cuda: bool) -> float:
    """Seconds of one step run to completion (the compiling one)."""
    t0 = time.perf_counter()
    step(work)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _forward_backward(trainer: Trainer, batches: list[dict], tracker: LiveTensorTracker) -> None:
    """Every micro-batch's forward and backward, labelled by phase: by the trainer itself when it schedules
    them (a pipeline interleaves them and labels each stage's forward and backward as they run)."""
    if trainer.schedules_microbatches:
        tracker.category = "activations"
        trainer.forward_backward(batches)
        return
    for batch in batches:
        tracker.category = "activations"
        loss = trainer.forward(batch)
        tracker.category = "backward"
        trainer.backward(loss)
        del loss


def _phased_step(trainer: Trainer, batches: list[dict], tracker: LiveTensorTracker) -> None:
    """One training step with the live tracker labelling what each phase allocates, so that a peak
    splits into weights, optimizer state, activations, backward allocations and so on."""
    _forward_backward(trainer, batches, tracker)
    tracker.track(*(p.grad for p in trainer.model.parameters() if p.grad is not None), category="gradients")
    tracker.category = "optimizer step"
    trainer.step()
    tracker.track(*trainer.optimizer_tensors(), category="optimizer")
    tracker.category = "other"


def _first_steps(measured: Measurement, trainer: Trainer, batches, probe, blocks, progress: Progress) -> None:
    """Step 1 instrumented (activations, gradients, optimizer state, first-step peak); step 2 gives the
    steady-state peak, its phase and the step's timeline."""
    mem = measured.memory_bytes
    tracker = probe.tracker
    saved = SavedTensorTracker(exclude=trainer.model, modules=blocks)
    progress("first step (activations, gradients, optimizer state)")
    with gc_frozen():
        probe.reset_peak()
        if trainer.schedules_microbatches:
            # A pipeline's forwards and backwards interleave inside its schedule: the trainer counts what its
            # stages save itself (per micro-batch, and the most alive at once) and reports it in `finish`.
            _forward_backward(trainer, batches, tracker)
        else:
            before_forward = probe.live()
            tracker.category = "activations"
            with saved:
                loss = trainer.forward(batches[0])
            mem.graph_retained = probe.live() - before_forward
            tracker.category = "backward"
            trainer.backward(loss)
            del loss
            for batch in batches[1:]:
                trainer.backward(trainer.forward(batch))
        mem.gradients = trainer.gradient_bytes()
        tracker.track(*(p.grad for p in trainer.model.parameters() if p.grad is not None), category="gradients")
        tracker.category = "optimizer step"
        trainer.step()
        mem.peak_allocated_first_step = probe.peak()
        first_breakdown = dict(tracker.peak_snapshot)
        first_phase = tracker.peak_category
    mem.optimizer = trainer.optimizer_bytes()
    # Also registers AdamW's `step` counters, which torch.tensor(0.) creates without a dispatched op.
    tracker.track(*trainer.optimizer_tensors(), category="optimizer")
    tracker.category = "other"

    by_layer = [saved.bytes_by_module.get(name, 0) for name, _ in blocks]
    mem.activations = saved.total_bytes
    mem.activations_layers = sum(by_layer)
    mem.activations_other = saved.total_bytes - sum(by_layer)
    measured.activations_by_layer = by_layer
    measured.activations_by_dtype = {str(k).removeprefix("torch."): v for k, v in saved.bytes_by_dtype.items()}
    measured.saved_parameter_bytes = saved.excluded_bytes

    progress("steady step (peak)")
    with gc_frozen():
        probe.reset_peak()
        tracker.record_timeline()
        _phased_step(trainer, batches, tracker)
        tracker.record_timeline(False)
        mem.peak_allocated = probe.peak()
        if isinstance(probe, _TrackedMemory):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                time.sleep(BACKEND_SETTLE_S)  # a process group's thread may still hold a buffer the step dropped
            mem.peak_backend_freed = tracker.peak_backend_freed
        measured.peak_breakdown = {"first_step": first_breakdown, "steady": dict(tracker.peak_snapshot)}
        measured.peak_phase = {"first_step": first_phase, "steady": tracker.peak_category}
    measured.timeline = Timeline.downsample(tracker.timeline)


def _inference_steps(spec: RunSpec, measured: Measurement, trainer: Trainer, batch, probe) -> None:
    """One no-grad forward (a prefill: logits and, for transformers decoders, the KV cache kept alive):
    its peak against Transformer Math 101's 1.2 × weights + KV cache."""
    mem = measured.memory_bytes
    probe.tracker.category = "activations"
    with gc_frozen():
        probe.reset_peak()
        output = trainer.infer(batch)
        mem.peak_allocated = probe.peak()
        measured.peak_breakdown = {"inference": dict(probe.tracker.peak_snapshot)}
        measured.peak_phase = {"inference": probe.tracker.peak_category}
    mem.kv_cache = unique_storage_bytes(_cache_tensors(output))
    mem.output = probe.live() - mem.after_model
    del output
    # Transformer Math 101's "Model Memory" is everything the model holds: weights and buffers.
    model_bytes = mem.weights + mem.buffers
    measured.inference_overhead = mem.peak_allocated / model_bytes if model_bytes else None


def _cache_tensors(output):
    """Key/value tensors of a transformers output's `past_key_values` (none for the reference models)."""
    cache = getattr(output, "past_key_values", None)
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: DynamicCache.layers[i].keys / .values
        return [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return [t for pair in cache for t in pair]
