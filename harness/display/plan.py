"""`tmath plan`'s tables: the ranked layouts, their step-time terms, what was rejected, and `--verify`."""

from __future__ import annotations

from rich.table import Table

from harness.display import console
from harness.formatting import gib


def _layout(lay: dict) -> str:
    shard = "fsdp" if lay["fsdp"] else f"zero{lay['zero']}"
    parts = [f"dp{lay['dp']}", f"tp{lay['tp']}" + ("+sp" if lay["sequence_parallel"] else ""), f"pp{lay['pp']}", shard]
    if lay["pp"] > 1:
        parts.append(lay["schedule"] + (f" v{lay['virtual_stages']}" if lay["virtual_stages"] > 1 else ""))
    if lay["recompute"] != "none":
        parts.append(f"rc-{lay['recompute']}")
    if lay["offload"] != "none":
        parts.append("offload")
    return " ".join(parts)


def print_plan(result) -> None:
    r = result.request
    out = console()
    title = (f"{r.model}, seq {r.seq}, global batch {r.global_batch} on {r.gpus} × {r.gpu} "
             f"({r.gpus_per_node} per node): best {len(result.candidates)} of {result.layouts:,} layouts")  # fmt: skip
    table = Table(title=title)
    eager = r.attention == "eager"  # only eager attention has the memory-bound attention term
    terms = ("compute",) + (("attention",) if eager else ()) + ("bubble", "tensor", "pipeline", "data", "optimizer")
    for col in ("#", "layout", "micro", "accum", "max", "peak GiB", "by", "headroom", "step s", "tok/s/GPU", "MFU",
                "compute") + (("attn",) if eager else ()) + ("bubble", "tp", "pp", "dp", "opt"):  # fmt: skip
        table.add_column(col, justify="left" if col == "layout" else "right", no_wrap=col == "layout")
    for i, c in enumerate(result.candidates, 1):
        table.add_row(str(i), _layout(c.layout), str(c.micro_batch), str(c.grad_accum), str(c.max_micro_batch),
                      gib(c.peak_bytes, 1), "screen" if c.peak_model.startswith("formulas.plan") else "walk",
                      gib(c.headroom_bytes, 1), f"{c.step_seconds:.3f}",
                      f"{c.tokens_per_second_per_gpu:,.0f}", f"{c.mfu:.1%}", *(f"{c.terms[k]:.3f}" for k in terms))  # fmt: skip
    out.print(table)
    out.print("max: the largest micro-batch that fits the layout; by: the peak's model (walk: the engine's step walk, "
              "formulas.peak / formulas.ranks; screen: formulas.plan, where no walk models the layout); compute … dp: "
              "step-time terms in seconds (" + ("attn: eager attention's s² traffic at the memory bandwidth; " if eager
              else "") + "tp, pp, dp: their collectives' exposed time; opt: the optimizer step's memory traffic at the memory "
              "bandwidth)")  # fmt: skip
    if not result.candidates:
        out.print("[bold red]no layout fits[/bold red]")
    rejected = ", ".join(f"{k} {v:,}" for k, v in result.rejected.items())
    out.print(
        f"searched {result.searched:,} candidates ({result.layouts:,} layouts × micro-batches); rejected: {rejected}"
    )
    bw = result.bandwidths
    out.print(f"compute: efficiency {result.efficiency:.3f} of the dense peak ({result.efficiency_source}); "
              f"links: {bw['intra_node_gbps']:g} GB/s in node, {bw['node_network_gbps']:g} GB/s per node"
              + (" (assumed)" if bw["network_assumed"] else "") + f", PCIe {bw['pcie_gbps']:g} GB/s; memory "
              f"{gib(result.memory_limit)} GiB less {gib(sum(result.overheads.values()))} GiB fixed overheads"
              + f", memory bandwidth {bw['memory_gbps']:g} GB/s")  # fmt: skip
    if result.candidates and result.candidates[0].train_days is not None:
        out.print(f"time to train {r.tokens:,} tokens with the best: {result.candidates[0].train_days:.1f} days")
    for note in result.unmodelled:
        out.print(f"not modelled: {note}")


def print_verification(checks) -> None:
    table = Table(title="--verify: the busiest rank on fake tensors (tmath measure --device meta)")
    for col in ("layout", "micro", "rank", "planned GiB", "walk GiB", "measured GiB", "planned vs measured", "status"):
        table.add_column(col, justify="left" if col in ("layout", "status") else "right")
    for c in checks:
        table.add_row(_layout(c.layout), str(c.micro_batch), str(c.rank), gib(c.planned_peak),
                      gib(c.walk_peak) if c.walk_peak else "-", gib(c.measured_peak) if c.measured_peak else "-",
                      f"{c.error:+.1%}" if c.error is not None else "-", f"{c.status}: {c.note}")  # fmt: skip
    console().print(table)
