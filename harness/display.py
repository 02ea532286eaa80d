"""Terminal tables (rich). Numbers stay integers until here; GiB = 2**30 bytes."""

from __future__ import annotations

import shutil

from rich.console import Console
from rich.table import Table

GIB = 2**30


def console() -> Console:
    """A console that does not squeeze tables when stdout is a pipe or a file."""
    width = shutil.get_terminal_size((140, 40)).columns
    return Console(width=max(width, 140), soft_wrap=False, highlight=False)


def gib(value: int | float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value / GIB:,.{digits}f}"


def human(value: float | None, unit: str = "") -> str:
    """1.23e+21 style counts with SI prefixes: 5.07 P, 1.86 E (FLOPs), 124.4 M (params)."""
    if value is None:
        return "-"
    for div, prefix in (
        (1e24, "Y"),
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(value) >= div:
            return f"{value / div:,.2f} {prefix}{unit}"
    return f"{value:,.0f} {unit}".rstrip()


def ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{measured / predicted:.3f}"


def run_title(spec) -> str:
    """One line naming the configuration: model, precision, optimizer, layout, shape."""
    parts = [spec.model if spec.arch is not None else f"{human(spec.params)} params"]
    parts.append(spec.precision)
    parts.append(spec.optimizer)
    layout = f"ZeRO-{spec.zero}" if spec.zero else "no ZeRO"
    layout += f", {spec.gpus} GPU{'s' if spec.gpus > 1 else ''} (dp {spec.dp}"
    layout += f", tp {spec.tp}" if spec.tp > 1 else ""
    layout += f", pp {spec.pp}" if spec.pp > 1 else ""
    parts.append(layout + ")")
    if spec.arch is not None:
        parts.append(f"b={spec.batch} s={spec.seq}")
        parts.append(f"recompute {spec.recompute}, {spec.attention} attention")
    return " · ".join(parts)


def print_prediction(pred) -> None:
    con = console()
    spec = pred.spec
    con.print(f"[bold]{run_title(spec)}[/bold]  (method: {pred.method})")
    mem = pred.memory_bytes()
    table = Table(title="Memory per GPU", title_justify="left")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("source")
    for term in ("weights", "gradients", "optimizer", "zero3_live_params", "activations"):
        if term == "zero3_live_params" and not mem[term]:
            continue
        value = mem[term]
        source = pred.sources.get(term, "unknown without an architecture (--params)")
        table.add_row(term, gib(value), "-" if value is None else f"{value:,}", source)
    terms = pred.activation_terms
    if terms is not None:
        stage = "" if terms.stage == "only" else f" ({terms.stage} pipeline stage)"
        held = f" × {terms.in_flight} micro-batches" if terms.in_flight > 1 else ""
        table.add_row(
            "  of which layers",
            gib(terms.layers_total),
            f"{terms.layers_total:,}",
            f"{terms.layers} layers × {terms.per_layer:,} B{held}{stage}",
        )
        table.add_row(
            "  embedding", gib(terms.embedding * terms.in_flight), f"{terms.embedding * terms.in_flight:,}", ""
        )
        table.add_row("  output + loss", gib(terms.output), f"{terms.output:,}", "")
    table.add_row("[bold]total[/bold]", f"[bold]{gib(pred.total)}[/bold]", f"{pred.total:,}", "sum of the terms above")
    host = pred.host_memory_bytes()
    if host["total"]:
        parts = ", ".join(
            f"{term} {gib(host[term])} GiB" for term in ("weights", "gradients", "optimizer") if host[term]
        )
        table.add_row(
            "host memory (offload)", gib(host["total"]), f"{host['total']:,}", f"per rank, not on the GPU: {parts}"
        )
    if pred.calibration is not None:
        table.add_row(
            "calibrated peak",
            gib(pred.calibrated_peak),
            f"{pred.calibrated_peak:,}",
            f"α·total + β (α={pred.calibration.peak_alpha:.3f}, β={gib(pred.calibration.peak_beta)} GiB)",
        )
        dev = pred.calibration.device_bytes(pred.total)
        table.add_row(
            "calibrated device",
            gib(dev),
            f"{dev:,}",
            f"peak × {pred.calibration.reserved_ratio:.3f} reserved + {gib(pred.calibration.context_bytes)} GiB context",
        )
    con.print(table)
    gpu = pred.gpu
    verdict = "[green]fits[/green]" if pred.fits else "[red]does not fit[/red]"
    con.print(
        f"{gpu.label} ({gib(gpu.memory_bytes, 0)} GiB): {verdict}, headroom {gib(gpu.memory_bytes - pred.total)} GiB"
        + (" (calibrated)" if pred.calibration is not None else " (formula total; measure or calibrate for overheads)")
    )

    f, c = pred.flops, pred.cost
    ct = Table(title="Compute", title_justify="left")
    ct.add_column("quantity")
    ct.add_column("value", justify="right")
    ct.add_column("source")
    ct.add_row("parameters P", f"{pred.params:,}", f"{pred.params_per_gpu:,} per model shard")
    ct.add_row("FLOPs per token", human(f.per_token_model), "6P + 12·L·s·h (full s×s attention)")
    ct.add_row("FLOPs per step (model)", human(f.per_step_model), f"{spec.batch}×{spec.seq}×{spec.grad_accum} tokens")
    ct.add_row("FLOPs per step (hardware)", human(f.per_step_hardware), f"+ recompute {spec.recompute}")
    ct.add_row("training tokens D", human(c.tokens), "given" if spec.tokens else "Chinchilla 20·P")
    ct.add_row("training FLOPs C", f"{c.flops:.3e}", "Transformer Math 101: C = 6·P·D")
    ct.add_row("achieved TFLOP/s per GPU", f"{c.tflops_per_gpu:,.1f}", pred.tflops_source)
    ct.add_row("time", f"{c.days:,.2f} days", f"C / ({c.gpus} GPUs × achieved)")
    ct.add_row("GPU-hours", f"{c.gpu_hours:,.0f}", "")
    ct.add_row("PetaFLOP-days", f"{c.pf_days:,.2f}", "C / (10¹⁵ × 86 400)")
    inf = pred.inference
    ct.add_row(
        "inference memory",
        f"{gib(inf.total)} GiB",
        f"{inf.overhead_factor:g} × weights"
        + (f" + KV cache {gib(inf.kv_cache)} GiB (b={spec.batch}, s={spec.seq})" if inf.kv_cache else ""),
    )
    con.print(ct)


def print_presets(rows) -> None:
    table = Table(title="Presets")
    for col in ("name", "params", "L", "h", "a", "kv", "ffn", "vocab", "layout"):
        table.add_column(col, justify="left" if col in ("name", "layout") else "right")
    for name, a, params in rows:
        layout = f"{a.family}, {a.position}, {a.norm}, {a.mlp}" + ("" if a.tied_embeddings else ", untied")
        table.add_row(
            name,
            f"{params:,}",
            str(a.n_layers),
            str(a.hidden),
            str(a.n_heads),
            str(a.n_kv_heads),
            str(a.ffn_hidden),
            str(a.vocab),
            layout,
        )
    console().print(table)


def print_gpus(gpus) -> None:
    from formulas.hardware import tflops_bar

    table = Table(title="Accelerators (dense peak TFLOP/s)")
    for col in ("name", "label", "GiB", "fp32", "tf32", "fp16", "bf16", "fp8", "115-bar", "source"):
        table.add_column(col, justify="left" if col in ("name", "label", "source") else "right")
    for g in gpus:
        peaks = [
            f"{g.peak_tflops[k]:g}" if k in g.peak_tflops else "-" for k in ("fp32", "tf32", "fp16", "bf16", "fp8")
        ]
        table.add_row(g.name, g.label, f"{g.memory_gib:g}", *peaks, f"{tflops_bar(g):.1f}", g.source)
    console().print(table)


def size(value: int | float | None) -> str:
    """Bytes in the unit that keeps 3-4 significant digits: KiB, MiB or GiB (binary)."""
    if value is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= div:
            return f"{value / div:,.2f} {unit}"
    return f"{value:,.0f} B"


def print_measurement(record: dict) -> None:
    """Measured | predicted | measured/predicted for every term of one record."""
    from formulas.spec import RunSpec

    con = console()
    spec = RunSpec.from_dict(record["spec"])
    m, p = record["measured"], record["predicted"]
    mem, pmem = m.get("memory_bytes", {}), p["memory_bytes"]
    device = m.get("device", spec.device)
    con.print(f"[bold]{run_title(spec)}[/bold]  impl {spec.impl} · device {device} · status {record['status']}")
    if record["status"] != "ok":
        err = record.get("error") or {}
        con.print(f"[red]{record['status']}[/red]: {err.get('type', '')}: {err.get('message', '')}")
        tail = (err.get("stderr_tail") or "").strip().splitlines()[-8:]
        for line in tail:
            con.print(f"  {line}", markup=False)
    table = Table(
        title="Memory: measured vs predicted (Korthikanti et al. / Transformer Math 101)", title_justify="left"
    )
    for col in ("term", "measured", "predicted", "meas/pred", "how measured"):
        table.add_column(col, justify="left" if col in ("term", "how measured") else "right")
    methods = m.get("methods", {})
    peak_method = methods.get("peak_allocated", {})
    peak_how = peak_method.get(device, "") if isinstance(peak_method, dict) else peak_method

    def row(term, measured, predicted, how=""):
        table.add_row(term, size(measured), size(predicted), ratio(measured, predicted), how)

    row("weights", mem.get("weights"), pmem["weights"], methods.get("weights", ""))
    row("gradients", mem.get("gradients"), pmem["gradients"], methods.get("gradients", ""))
    row("optimizer", mem.get("optimizer"), pmem["optimizer"], methods.get("optimizer", ""))
    row("activations", mem.get("activations"), pmem["activations"], methods.get("activations", ""))
    acts = p.get("activation_bytes") or {}
    layers = m.get("activations_by_layer") or []
    if layers and acts:
        median = sorted(layers)[len(layers) // 2]
        row("  per layer (median)", median, acts.get("per_layer"), f"{len(layers)} layers attributed by module hooks")
        row(
            "  embedding + output + loss",
            mem.get("activations_other"),
            acts.get("embedding", 0) + acts.get("output", 0),
        )
    impl = p.get("implementation")
    if impl:
        row(
            "  implementation variant",
            mem.get("activations"),
            impl["total"],
            f"formulas.variants ({impl['model']}, {impl['device']}): paper + named departures",
        )
        for name, nbytes in impl["departures"].items():
            if nbytes:
                table.add_row(f"    departure: {name}", "-", size(nbytes * spec.arch.n_layers), "-", "all layers")
    row(
        "peak allocated (steady step)",
        mem.get("peak_allocated"),
        pmem["total"],
        peak_how + "; predicted = sum of terms",
    )
    steady = (m.get("peak_breakdown") or {}).get("steady") or {}
    for category, nbytes in sorted(steady.items(), key=lambda kv: -kv[1]):
        if nbytes:
            table.add_row(
                f"  at the peak: {category}", size(nbytes), "-", "-", "live bytes by the phase that made them"
            )
    row(
        "peak allocated (first step)",
        mem.get("peak_allocated_first_step"),
        pmem["total"],
        "optimizer state created here",
    )
    row(
        "graph retained after forward",
        mem.get("graph_retained"),
        pmem["activations"],
        "live bytes after − before forward",
    )
    for key, how in (
        ("peak_reserved", "torch.cuda memory_stats reserved peak"),
        ("peak_active", "torch.cuda memory_stats active peak"),
        ("pre_model_allocated", "allocated before the model (cuBLAS workspace)"),
        ("nvml_used", "NVML device memory used (all processes)"),
    ):
        if mem.get(key) is not None:
            table.add_row(key.replace("_", " "), size(mem[key]), "-", "-", how)
    for name, by_naive in ((k, v) for k, v in p.items() if k.startswith("naive")):
        table.add_row(f"total, {name.replace('_', '-')} formula", size(mem.get("peak_allocated")),
                      size(by_naive["memory_bytes"]["total"]),
                      ratio(mem.get("peak_allocated"), by_naive["memory_bytes"]["total"]), "the Q&A seed's formula")  # fmt: skip
    con.print(table)
    if m.get("ranks"):
        print_ranks(record, con)

    flops = m.get("flops")
    if flops:
        ct = Table(title="Compute", title_justify="left")
        for col in ("quantity", "measured", "formula", "meas/formula", "note"):
            ct.add_column(col, justify="left" if col in ("quantity", "note") else "right")
        ct.add_row("FLOPs per step", human(flops["counted"]), human(flops["formula_matmul"]),
                   ratio(flops["counted"], flops["formula_matmul"]), "FlopCounterMode vs exact matmul count")  # fmt: skip
        ct.add_row("", "", human(flops["model_per_step"]), ratio(flops["counted"], flops["model_per_step"]),
                   "vs 6P + 12·L·s·h per token")  # fmt: skip
        step = m.get("step_ms")
        if step:
            ct.add_row("step time", f"{step['median']:,.1f} ms", "-", "-",
                       f"median of {len(step['all'])} (min {step['min']:,.1f}, max {step['max']:,.1f})")  # fmt: skip
            t = m["tflops"]
            ct.add_row("model TFLOP/s", f"{t['model']:,.3f}", "-", "-", "6P + attention per token / step time")
            ct.add_row("hardware TFLOP/s", f"{t['hardware']:,.3f}", "-", "-", "with recompute work")
            if m.get("mfu") is not None:
                ct.add_row(
                    "MFU / HFU", f"{m['mfu']:.1%} / {m['hfu']:.1%}", "-", "-", f"peak {m['peak_tflops']:g} TFLOP/s"
                )
        con.print(ct)


def _held(rank: dict, snapshot: str, term: str) -> list[dict]:
    snap = ((rank.get("zero") or {}).get("snapshots") or {}).get(snapshot) or {}
    return [h for h in snap.get("held", []) if h["term"] == term and h["nbytes"]]


def _rank_notes(rank: dict, spec) -> dict[str, str]:
    """What explains each term's difference from the formula, from the rank's measured account."""
    zero = rank.get("zero") or {}
    ex = zero.get("explained_bytes") or {}
    host = zero.get("host_bytes") or {}
    notes: dict[str, list[str]] = {
        "weights": [],
        "gradients": [],
        "optimizer": [],
        "live": [],
        "extras": [],
        "host": [f"{term} {size(nbytes)}" for term, nbytes in host.items() if nbytes],
    }
    if ex.get("weights_alignment_padding_bytes"):
        notes["weights"].append(f"alignment padding {size(ex['weights_alignment_padding_bytes'])}")
    if ex.get("weights_persistent_parameter_bytes"):
        threshold = (zero.get("buckets") or {}).get("param_persistence_threshold")
        notes["weights"].append(
            f"persistent params {size(ex['weights_persistent_parameter_bytes'])} (< {threshold} elements, whole)"
        )
    if ex.get("weights_gather_padding_bytes"):
        notes["weights"].append(f"all-gather padding {size(ex['weights_gather_padding_bytes'])}")
    if ex.get("weights_partition_padding_bytes"):
        notes["weights"].append(f"partition padding {size(ex['weights_partition_padding_bytes'])}")
    if ex.get("gradients_boundary_parameter_bytes"):
        notes["gradients"].append(f"boundary params {size(ex['gradients_boundary_parameter_bytes'])}")
    for h in _held(rank, "after_backward", "gradients"):
        if "padding" in h["name"]:
            notes["gradients"].append(f"padding {size(h['nbytes'])}")
    if ex.get("gradients_before_reduction_bytes") is not None:
        notes["gradients"].append(f"full {size(ex['gradients_before_reduction_bytes'])} until reduced at backward end")
    if spec.precision == "fp32":
        master = sum(h["nbytes"] for h in _held(rank, "steady", "optimizer") if "master" in h["name"])
        if master:
            notes["optimizer"].append(f"fp32 master {size(master)} (kept for fp32 params too)")
    if ex.get("zero3_gathered_forward_max_bytes") is not None:
        z = (zero.get("config") or {}).get("zero_optimization") or {}
        notes["live"].append(
            f"gathered at a forward (backward max {size(ex.get('zero3_gathered_backward_max_bytes'))}); "
            f"stage3_max_live_parameters {z.get('stage3_max_live_parameters', 10**9):.3g}, "
            f"max_reuse_distance {z.get('stage3_max_reuse_distance', 10**9):.3g}"
        )
    for h in _held(rank, "steady", "extras"):
        notes["extras"].append(f"{h['name']} {size(h['nbytes'])}")
    if ex.get("reduce_bucket_bytes_max"):
        notes["extras"].append(f"IPG bucket during backward {size(ex['reduce_bucket_bytes_max'])}")
    return {k: "; ".join(v) for k, v in notes.items()}


def print_ranks(record: dict, con: Console | None = None) -> None:
    """Per rank × term: measured, the formula, DeepSpeed's estimator, and what explains the differences."""
    from formulas.spec import RunSpec

    con = con or console()
    spec = RunSpec.from_dict(record["spec"])
    m, p = record["measured"], record["predicted"]
    pmem = p["memory_bytes"]
    est = p.get("deepspeed_estimator") or {}
    est_terms = est.get("terms") or {}
    est_name = est.get("function", "no DeepSpeed estimator below stage 2")
    table = Table(
        title=f"Model states per rank (ZeRO-{spec.zero}, {m.get('world_size', len(m['ranks']))} ranks): "
        f"measured vs formula vs DeepSpeed's {est_name}",
        title_justify="left",
    )
    for col in ("rank", "term", "measured", "formula", "meas/formula", "DeepSpeed", "meas/DS", "named differences"):
        table.add_column(col, justify="left" if col in ("term", "named differences") else "right")
    for rank in m["ranks"]:
        mem = rank.get("memory_bytes")
        if not mem:
            table.add_row(str(rank["rank"]), f"[red]{rank['status']}[/red]", *["-"] * 5, "no measurement")
            continue
        notes = _rank_notes(rank, spec)
        live_formula = pmem.get("zero3_live_params") or 0
        states = sum(mem.get(k) or 0 for k in ("weights", "gradients", "optimizer", "zero3_live_params", "zero_extras"))
        formula_states = sum(pmem.get(k) or 0 for k in ("weights", "gradients", "optimizer")) + live_formula
        rows = [
            ("weights", mem.get("weights"), pmem["weights"], est_terms.get("weights"), notes["weights"]),
            ("gradients", mem.get("gradients"), pmem["gradients"], est_terms.get("gradients"), notes["gradients"]),
            ("optimizer", mem.get("optimizer"), pmem["optimizer"], est_terms.get("optimizer"), notes["optimizer"]),
        ]
        if spec.zero == 3:
            rows.append(("zero-3 live params", mem.get("zero3_live_params"), live_formula,
                         est_terms.get("zero3_live_params"), notes["live"]))  # fmt: skip
        rows.append(("ZeRO buffers (extras)", mem.get("zero_extras"), None, None, notes["extras"]))
        rows.append(("model states", states, formula_states, (est.get("memory_bytes") or {}).get("gpu"),
                     "sum of the rows above; DeepSpeed: its per-GPU total"))  # fmt: skip
        if mem.get("host_model_states") or spec.offload_optimizer != "none" or spec.offload_params != "none":
            rows.append(("host (offloaded)", mem.get("host_model_states"), (p.get("host_memory_bytes") or {}).get("total"),
                         (est.get("memory_bytes") or {}).get("cpu"), notes["host"] or "DeepSpeed: per-node CPU estimate"))  # fmt: skip
        rows.append(("activations", mem.get("activations"), pmem.get("activations"), None, ""))
        rows.append(("peak allocated", mem.get("peak_allocated"), pmem.get("total"), None, "steady step"))
        for i, (term, measured, formula, ds, note) in enumerate(rows):
            table.add_row(str(rank["rank"]) if i == 0 else "", term, size(measured), size(formula),
                          ratio(measured, formula), size(ds), ratio(measured, ds), note)  # fmt: skip
        table.add_section()
    con.print(table)
    ranks = [r for r in m["ranks"] if r.get("zero")]
    if not ranks:
        return
    zero = ranks[0]["zero"]
    b = zero.get("buckets") or {}
    con.print(
        f"DeepSpeed {zero.get('optimizer_class')} over {zero.get('base_optimizer_class')}; buckets (elements): "
        f"reduce {b.get('reduce_bucket_elements')}, all-gather {b.get('allgather_bucket_elements')}"
        + (
            f", prefetch {b.get('prefetch_bucket_elements')}, persistence threshold {b.get('param_persistence_threshold')}"
            if spec.zero == 3
            else ""
        )
        + f"; overlap_comm {b.get('overlap_comm')}"
    )
    parts = []
    for r in ranks:
        shown = []
        for name, snap in r["zero"].get("snapshots", {}).items():
            phases = ", ".join(f"{c} {size(b)}" for c, b in (snap.get("residual_by_phase") or {}).items() if b)
            shown.append(f"{name} {size(snap.get('residual_bytes'))}" + (f" ({phases})" if phases else ""))
        parts.append(f"rank {r['rank']}: " + ", ".join(shown))
    con.print("Unaccounted (live bytes − everything walked in the engine): " + "; ".join(parts))
