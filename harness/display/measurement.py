"""`tmath measure`: measured | predicted | measured/predicted for every term of one record."""

from __future__ import annotations

from rich.table import Table

from harness.display import console, run_title
from harness.display.parallel import print_parallel_ranks
from harness.display.ranks import print_ranks
from harness.formatting import human, ratio, size
from harness.predictions import METHODS, NaivePrediction
from harness.records import Record

_CUDA_ROWS = (
    ("peak_reserved", "torch.cuda memory_stats reserved peak"),
    ("peak_active", "torch.cuda memory_stats active peak"),
    ("pre_model_allocated", "allocated before the model (cuBLAS workspace)"),
    ("nvml_used", "NVML device memory used (all processes)"),
)


def print_measurement(record: Record) -> None:
    con = console()
    spec, m = record.spec, record.measured
    mem = m.memory_bytes
    formula = record.prediction("korthikanti")
    pmem = formula.memory_bytes
    device = m.device or spec.measurement.device
    con.print(
        f"[bold]{run_title(spec)}[/bold]  impl {spec.measurement.impl} · device {device} · status {record.status}"
    )
    if record.status != "ok":
        err = record.error
        con.print(f"[red]{record.status}[/red]: {err.type if err else ''}: {err.message if err else ''}")
        for line in ((err.stderr_tail if err else None) or "").strip().splitlines()[-8:]:
            con.print(f"  {line}", markup=False)
    table = Table(
        title="Memory: measured vs predicted (Korthikanti et al. / Transformer Math 101)", title_justify="left"
    )
    for col in ("term", "measured", "predicted", "meas/pred", "how measured"):
        table.add_column(col, justify="left" if col in ("term", "how measured") else "right")
    methods = m.methods
    peak_method = methods.get("peak_allocated", {})
    peak_how = peak_method.get(device, "") if isinstance(peak_method, dict) else peak_method

    def row(term, measured, predicted, how=""):
        table.add_row(term, size(measured), size(predicted), ratio(measured, predicted), how)

    for term in ("weights", "gradients", "optimizer", "activations"):
        row(term, getattr(mem, term), getattr(pmem, term), methods.get(term, ""))
    acts = formula.activation_bytes
    layers = m.activations_by_layer
    if layers and acts is not None:
        median = sorted(layers)[len(layers) // 2]
        row("  per layer (median)", median, acts.per_layer, f"{len(layers)} layers attributed by module hooks")
        row("  embedding + output + loss", mem.activations_other, acts.embedding + acts.output)
    impl = record.prediction("implementation")
    if impl is not None:
        row(
            "  implementation variant",
            mem.activations,
            impl.total,
            f"formulas.variants ({impl.model}, {impl.device}): paper + named departures",
        )
        for name, nbytes in impl.departures.items():
            if nbytes:
                table.add_row(f"    departure: {name}", "-", size(nbytes * spec.model.arch.n_layers), "-", "all layers")
    row("peak allocated (steady step)", mem.peak_allocated, pmem.total, peak_how + "; predicted = sum of terms")
    walked = record.prediction("peak")
    if walked is not None and walked.phase != "none":
        measured_phase = m.peak_phase.get("steady", "?")
        row("  predicted peak (the step walked)", mem.peak_allocated, walked.bytes,
            f"formulas.peak: {walked.phase}, {walked.moment}; measured in {measured_phase}")  # fmt: skip
    steady = m.peak_breakdown.get("steady") or {}
    predicted = walked.breakdown if walked is not None and walked.phase != "none" else {}
    for category in sorted(set(steady) | set(predicted), key=lambda c: -max(steady.get(c, 0), predicted.get(c, 0))):
        if steady.get(category) or predicted.get(category):
            row(f"  at the peak: {category}", steady.get(category), predicted.get(category),
                "live bytes by the phase that made them")  # fmt: skip
    row("peak allocated (first step)", mem.peak_allocated_first_step, pmem.total, "optimizer state created here")
    row("graph retained after forward", mem.graph_retained, pmem.activations, "live bytes after − before forward")
    for key, how in _CUDA_ROWS:
        if getattr(mem, key) is not None:
            table.add_row(key.replace("_", " "), size(getattr(mem, key)), "-", "-", how)
    for method in METHODS:
        naive = record.prediction(method.name)
        if isinstance(naive, NaivePrediction):
            total = naive.memory_bytes.total
            table.add_row(f"total, {method.name} formula", size(mem.peak_allocated), size(total),
                          ratio(mem.peak_allocated, total), "the Q&A seed's formula")  # fmt: skip
    con.print(table)
    if m.ranks and record.prediction("parallel") is not None:
        print_parallel_ranks(record, con)
    elif m.ranks:
        print_ranks(record, con)
    if m.flops_counted is not None:
        con.print(_compute_table(record))


def _compute_table(record: Record) -> Table:
    m, flops = record.measured, record.prediction("korthikanti").flops
    counted = m.flops_counted
    model = flops.per_step_forward if record.spec.measurement.mode == "inference" else flops.per_step_model
    ct = Table(title="Compute", title_justify="left")
    for col in ("quantity", "measured", "formula", "meas/formula", "note"):
        ct.add_column(col, justify="left" if col in ("quantity", "note") else "right")
    ct.add_row("FLOPs per step", human(counted), human(flops.per_step_matmul), ratio(counted, flops.per_step_matmul),
               "FlopCounterMode vs exact matmul count")  # fmt: skip
    ct.add_row("", "", human(model), ratio(counted, model), "vs 6P + 12·L·s·h per token")
    step = m.step_ms
    if step is not None:
        ct.add_row("step time", f"{step.median:,.1f} ms", "-", "-",
                   f"median of {len(step.all)} (min {step.min:,.1f}, max {step.max:,.1f})")  # fmt: skip
        if m.step_mode is not None:
            compiled = f" (compiling step {m.compile_seconds:,.1f} s, untimed)" if m.compile_seconds else ""
            ct.add_row("  timed as", m.step_mode + compiled, "-", "-", "memory and FLOPs: the eager steps")
        t = m.tflops
        ct.add_row("model TFLOP/s", f"{t.model:,.3f}", "-", "-", "6P + attention per token / step time")
        ct.add_row("hardware TFLOP/s", f"{t.hardware:,.3f}", "-", "-", "with recompute work")
        if m.mfu is not None:
            ct.add_row("MFU / HFU", f"{m.mfu:.1%} / {m.hfu:.1%}", "-", "-", f"peak {m.peak_tflops:g} TFLOP/s")
    if m.attention_kernel is not None:
        note = {"eager": "the model's matmuls and softmax", "math": "SDPA's math fallback: scores written out"}
        ct.add_row("attention kernel", m.attention_kernel, "-", "-", note.get(m.attention_kernel, "SDPA's fused op"))
    return ct
