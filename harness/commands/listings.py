"""`tmath presets` and `tmath gpus`: the named architectures and the accelerator table."""

from __future__ import annotations

import json
from dataclasses import asdict

from formulas.hardware import GPUS, tflops_bar
from formulas.interconnect import interconnect
from formulas.params import parameter_count
from harness.display.prediction import print_gpus, print_presets
from models.presets import PRESETS, hub_names, resolve


def add_arguments(p) -> None:
    p.add_argument("--format", default="table", choices=("table", "json"))


def run_presets(args) -> int:
    named = [*PRESETS.items(), *((name, resolve(name)) for name in hub_names())]  # the presets, then models/hub
    rows = [(name, arch, parameter_count(arch).total) for name, arch in named]
    if args.format == "json":
        print(json.dumps({n: {"params": p, **a.to_dict()} for n, a, p in rows}, indent=2))
    else:
        print_presets(rows)
    return 0


def run_gpus(args) -> int:
    if args.format == "json":
        out = {
            g.name: {
                "label": g.label,
                "memory_bytes": g.memory_bytes,
                "memory_gbps": g.memory_gbps,
                "peak_tflops": g.peak_tflops,
                "tflops_bar": tflops_bar(g),
                "source": g.source,
                "interconnect": asdict(interconnect(g.name)),
            }
            for g in GPUS.values()
        }
        print(json.dumps(out, indent=2))
    else:
        print_gpus(list(GPUS.values()))
    return 0
