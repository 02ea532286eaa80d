"""`tmath predict`, `tmath presets` and `tmath gpus` as terminal tables."""

from __future__ import annotations

from rich.table import Table

from formulas.hardware import tflops_bar
from formulas.interconnect import interconnect
from formulas.params import parameter_count
from formulas.variants import implementation_summary
from harness.display import console, run_title
from harness.formatting import gib, human

_OVERHEAD_SOURCES = {
    "cuda_context": "CUDA context, lazy module loading (pytorch/pytorch#86509); outside the allocator",
    "cublas_workspace": "cuBLAS workspace, CUBLAS_WORKSPACE_CONFIG :4096:2:16:8 (ATen CublasHandlePool.cpp)",
    "cublaslt_workspace": "cuBLASLt workspace by GPU generation (ATen CUDABlas.cpp, pytorch/pytorch#120925)",
}


def print_rank_predictions(pred) -> None:
    """The per-rank prediction of a tensor/pipeline/FSDP2 layout (`formulas.ranks`): one row per distinct
    rank (ranks that hold the same bytes are listed together)."""
    con = console()
    table = Table(title=f"Per rank as torch's engines split it ({pred.engine}; formulas/ranks.py)",
                  title_justify="left")  # fmt: skip
    for col in ("ranks", "place", "params", "weights", "gradients", "optimizer", "activations / micro-batch",
                "in flight", "peak", "peak's moment"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("ranks", "place", "peak's moment") else "right")
    groups: dict[tuple, list] = {}
    for r in pred.ranks:
        key = (
            r.parameter_elements,
            r.weights,
            r.gradients,
            r.optimizer,
            r.activations,
            r.activations_in_flight,
            r.peak,
        )
        groups.setdefault(key, []).append(r)
    for rs in groups.values():
        r = rs[0]
        place = f"pp {r.coords['pp']}" + (f" stages {','.join(map(str, r.stages))}" if r.stages else "")
        flight = f"{gib(r.activations_in_flight)} ({r.in_flight_microbatches})" if r.stages else "-"
        table.add_row(",".join(str(x.rank) for x in rs), place, human(r.parameter_elements), gib(r.weights),
                      gib(r.gradients), gib(r.optimizer), gib(r.activations), flight, gib(r.peak),
                      r.peak_basis)  # fmt: skip
    con.print(table)
    busiest = pred.busiest
    con.print(f"Busiest rank: {busiest.rank}, peak {gib(busiest.peak)} GiB. GiB = 2^30 bytes. Not modelled: "
              + "; ".join(pred.unmodelled))  # fmt: skip


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
        lora_hf = spec.training.finetune != "full" and spec.measurement.impl == "hf"
        impl = implementation_summary(spec, pred.device) if lora_hf else None
        if impl is not None:
            table.add_row("  as transformers saves them", gib(impl.total), f"{impl.total:,}",
                          f"the implementation variant ({impl.model}, {pred.device}) with LoRA's terms "
                          "(formulas.variants, formulas.finetune): what `tmath measure` compares to the byte")  # fmt: skip
            for note in impl.unmeasured:
                table.add_row("    not modelled", "", "", note)
    table.add_row("[bold]total[/bold]", f"[bold]{gib(pred.total)}[/bold]", f"{pred.total:,}", "sum of the terms above")
    host = pred.host_memory_bytes()
    if host["total"]:
        parts = ", ".join(
            f"{term} {gib(host[term])} GiB" for term in ("weights", "gradients", "optimizer") if host[term]
        )
        table.add_row(
            "host memory (offload)", gib(host["total"]), f"{host['total']:,}", f"per rank, not on the GPU: {parts}"
        )
    peak = pred.peak
    table.add_section()
    where = f"{peak.phase}: {peak.moment}" if peak.phase != "none" else peak.moment
    table.add_row("[bold]peak[/bold]", f"[bold]{gib(peak.bytes)}[/bold]", f"{peak.bytes:,}",
                  f"the step's largest live set (formulas.peak), {where}")  # fmt: skip
    if peak.basis:
        table.add_row("  predicted for", "", "", peak.basis)
    for category, nbytes in sorted(peak.breakdown.items(), key=lambda kv: -kv[1]) if peak.phase != "none" else ():
        table.add_row(f"  at the peak: {category}", gib(nbytes), f"{nbytes:,}", "")
    for note in peak.unmodelled:
        table.add_row("  not modelled", "", "", note)
    if pred.calibrated_peak is not None:
        ratio = pred.calibration.ratio(pred.device, peak.phase)
        table.add_row("calibrated peak", gib(pred.calibrated_peak), f"{pred.calibrated_peak:,}",
                      f"peak × {ratio:.4f} ({pred.device}, {peak.phase}; {pred.calibration.source})")  # fmt: skip
    elif pred.calibration is not None:
        table.add_row("calibrated peak", "-", "-", f"the calibration has no {pred.device} ratio: the peak as predicted")
    for name, nbytes in pred.overheads.items():
        if pred.calibration is None or pred.calibration.context_bytes is None:
            table.add_row(f"+ {name.replace('_', ' ')}", gib(nbytes), f"{nbytes:,}", _OVERHEAD_SOURCES[name])
    if pred.calibration is not None and pred.device == "cuda":
        context = pred.calibration.context_bytes
        table.add_row("+ reserve and context (calibrated)", "", "",
                      f"× {pred.calibration.reserved_ratio:.3f} reserved / allocated"
                      + (f", + {gib(context)} GiB context (NVML − reserved)" if context is not None else ""))  # fmt: skip
    table.add_row("[bold]device need[/bold]", f"[bold]{gib(pred.device_need)}[/bold]", f"{pred.device_need:,}",
                  "what the verdict weighs against the GPU's memory")  # fmt: skip
    con.print(table)
    gpu = pred.gpu
    verdict = "[green]fits[/green]" if pred.fits else "[red]does not fit[/red]"
    con.print(
        f"{gpu.label} ({gib(gpu.memory_bytes, 0)} GiB): {verdict}, headroom {gib(pred.headroom_bytes)} GiB"
        + (" (calibrated)" if pred.calibration is not None else " (predicted peak + fixed overheads)")
    )

    f, c = pred.flops, pred.cost
    ct = Table(title="Compute", title_justify="left")
    ct.add_column("quantity")
    ct.add_column("value", justify="right")
    ct.add_column("source")
    exact = "" if pred.params == pred.exact_params else f"; FLOPs and time use the exact P, {pred.exact_params:,}"
    ct.add_row("parameters P", f"{pred.params:,}", f"{pred.params_per_gpu:,} per model shard{exact}")
    arch = spec.model.arch
    moe = arch is not None and arch.moe and spec.model.params is None
    flop_p = "P"
    if moe:
        active = parameter_count(arch).active
        ct.add_row("active parameters", f"{active:,}", f"{arch.experts_per_token} of {arch.experts} routed experts per "
                   f"token in {arch.moe_layers} MoE layers (Fedus et al. 2021): FLOPs and time use them")  # fmt: skip
        flop_p = "P_active"
    if pred.trainable_params is not None:
        ct.add_row("trainable P (adapters)", f"{pred.trainable_params:,}",
                   f"--finetune {spec.training.finetune}: {pred.trainable_params / pred.exact_params:.3%} of P; the "
                   "FLOPs below are full training's (a frozen weight's gradient GEMM is skipped: not modelled)")  # fmt: skip
    ct.add_row("FLOPs per token", human(f.per_token_model), f"6{flop_p} + 12·L·s·h (full s×s attention)")
    ct.add_row(
        "FLOPs per step (model)",
        human(f.per_step_model),
        f"{spec.training.batch}×{spec.training.seq}×{spec.training.grad_accum} tokens",
    )
    ct.add_row("FLOPs per step (hardware)", human(f.per_step_hardware), f"+ recompute {spec.training.recompute}")
    ct.add_row("training tokens D", human(c.tokens), "given" if spec.budget.tokens else "Chinchilla 20·P")
    ct.add_row("training FLOPs C", f"{c.flops:.3e}", f"Transformer Math 101: C = 6·{flop_p}·D")
    ct.add_row("achieved TFLOP/s per GPU", f"{c.tflops_per_gpu:,.1f}", pred.tflops_source)
    ct.add_row("time", f"{c.days:,.2f} days", f"C / ({c.gpus} GPU{'' if c.gpus == 1 else 's'} × achieved)")
    ct.add_row("GPU-hours", f"{c.gpu_hours:,.0f}", "")
    ct.add_row("PetaFLOP-days", f"{c.pf_days:,.2f}", "C / (10¹⁵ × 86 400)")
    inf = pred.inference
    ct.add_row(
        "inference memory",
        f"{gib(inf.total)} GiB",
        f"{inf.overhead_factor:g} × weights"
        + (
            f" + KV cache {gib(inf.kv_cache)} GiB (b={spec.training.batch}, s={spec.training.seq})"
            if inf.kv_cache
            else ""
        ),
    )
    con.print(ct)


def print_presets(rows) -> None:
    table = Table(title="Presets")
    for col in ("name", "params", "L", "h", "a", "kv", "ffn", "vocab", "layout"):
        table.add_column(col, justify="left" if col in ("name", "layout") else "right")
    for name, a, params in rows:
        layout = f"{a.family}, {a.position}, {a.norm}, {a.mlp}" + ("" if a.tied_embeddings else ", untied")
        if a.model_type:
            moe = f", {a.experts_per_token} of {a.experts} experts" if a.moe else ""
            layout = f"{a.model_type} config{moe}: " + layout
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
    table = Table(title="Accelerators (dense peak TFLOP/s; memory GiB and bandwidth GB/s)")
    for col in ("name", "label", "GiB", "GB/s", "fp32", "tf32", "fp16", "bf16", "fp8", "115-bar", "source"):
        table.add_column(col, justify="left" if col in ("name", "label", "source") else "right")
    for g in gpus:
        peaks = [
            f"{g.peak_tflops[k]:g}" if k in g.peak_tflops else "-" for k in ("fp32", "tf32", "fp16", "bf16", "fp8")
        ]
        table.add_row(g.name, g.label, f"{g.memory_gib:g}", f"{g.memory_gbps:g}", *peaks, f"{tflops_bar(g):.1f}",
                      g.source)  # fmt: skip
    console().print(table)
    links = Table(title="Interconnects (datasheet GB/s per direction; `tmath plan` uses them)")
    for col in ("name", "in node", "link", "host (PCIe)", "node network", "network", "source"):
        links.add_column(col, justify="right" if col in ("in node", "host (PCIe)", "node network") else "left")
    for g in gpus:
        ic = interconnect(g.name)
        links.add_row(g.name, f"{ic.intra_node_gbps:g}", ic.intra_node_kind, f"{ic.pcie_gbps:g}",
                      f"{ic.node_network_gbps:g}", ic.node_network_kind, ic.source)  # fmt: skip
    console().print(links)
