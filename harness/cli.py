"""`tmath`: predict, measure, sweep, report, calibrate and check transformer training memory and compute.

Every subcommand reports bad input as one line (`tmath: error: ...`) and exits with status 2.
The `predict` path imports no torch, so it answers in a fraction of a second on any machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

from formulas.architecture import FAMILIES, MLPS, NORMS, POSITIONS
from formulas.spec import DEVICES, IMPLS, MODES, OFFLOADS, RunSpec
from harness.errors import EXIT_USAGE, UsageError
from harness.specbuild import SETTING_KEYS, build_spec

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a usage block: errors stay one line."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def count(text: str) -> int:
    """A count such as 7B, 1.5e12, 300e9, 20k or 1_000_000."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 7B, 300e9, 1.5T)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2), 1)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `predict` and `measure` (the RunSpec fields)."""
    m = p.add_argument_group("model (a preset, a config.json, or the shape itself)")
    m.add_argument("--model", help="preset name (see `tmath presets`) or path to a transformers config.json")
    m.add_argument("--params", type=count, help="parameter count alone (model-state terms only), e.g. 7B")
    m.add_argument("--layers", type=int, help="L: transformer blocks")
    m.add_argument("--hidden", type=int, help="h: hidden size")
    m.add_argument("--heads", type=int, help="a: attention heads")
    m.add_argument("--kv-heads", type=int, help="key/value heads (GQA/MQA)")
    m.add_argument("--ffn-hidden", type=int, help="MLP inner width (default 4h)")
    m.add_argument("--vocab", type=int, help="vocabulary size")
    m.add_argument("--max-positions", type=int, help="position-table length")
    m.add_argument("--dropout", type=float, help="dropout probability (0 stores no masks)")
    m.add_argument("--position", choices=POSITIONS, help="position embedding")
    m.add_argument("--norm", choices=NORMS, help="normalisation layer")
    m.add_argument("--mlp", choices=MLPS, help="MLP kind")
    m.add_argument("--family", choices=FAMILIES, help="decoder (GPT) or encoder (BERT)")

    t = p.add_argument_group("training")
    t.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default 1)")
    t.add_argument("--seq", type=int, help="sequence length (default: the model's positions, at most 2048)")
    t.add_argument("--precision", default="bf16-mixed", choices=("fp32", "fp16", "bf16", "fp16-mixed", "bf16-mixed"))
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adam8bit", "sgd"))
    t.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    t.add_argument("--attention", default="eager", choices=("eager", "flash"))
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")

    d = p.add_argument_group("parallelism")
    d.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    d.add_argument("--gpus", type=int, default=1, help="GPUs in the job")
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    d.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    d.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism")
    d.add_argument("--partition-activations", action="store_true", help="ZeRO-R activation partitioning")
    d.add_argument("--in-flight", type=int, help="micro-batches held by the first pipeline stage (default pp)")
    d.add_argument("--offload-optimizer", default="none", choices=OFFLOADS,
                   help="DeepSpeed ZeRO-Offload: optimizer state and fp32 gradients in host memory")  # fmt: skip
    d.add_argument("--offload-params", default="none", choices=OFFLOADS,
                   help="DeepSpeed ZeRO-3 parameter offload to host memory")  # fmt: skip

    c = p.add_argument_group("compute budget")
    c.add_argument("--tokens", type=count, help="training tokens D (default 20·P, Chinchilla)")
    c.add_argument("--gpu", default="a100-80gb", help="accelerator (see `tmath gpus`; default a100-80gb)")
    c.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default: 120 per A100, scaled)")


def spec_from_args(args: argparse.Namespace, **measure) -> RunSpec:
    """The RunSpec of a `predict`/`measure` command line (see harness.specbuild)."""
    settings = {key: getattr(args, key, None) for key in SETTING_KEYS if hasattr(args, key)}
    settings.update(measure)
    return build_spec(settings)


def cmd_predict(args: argparse.Namespace) -> int:
    from formulas.calibration import Calibration
    from formulas.predict import predict
    from harness import display

    spec = spec_from_args(args)
    try:
        calibration = Calibration.load(args.calibration) if args.calibration else None
        prediction = predict(spec, method=args.method, calibration=calibration)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.format == "json":
        print(json.dumps(prediction.to_dict(), indent=2))
    else:
        display.print_prediction(prediction)
    return 0


def measure_options(args: argparse.Namespace) -> dict:
    return {
        "impl": args.impl,
        "mode": args.mode,
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "offload_optimizer": args.offload_optimizer,
        "offload_params": args.offload_params,
        "deepspeed_config": args.deepspeed_config,
    }


def cmd_measure(args: argparse.Namespace) -> int:
    from harness import display
    from harness.measure import check_measurable, resolve_device
    from harness.record import append_jsonl
    from harness.runner import default_max_memory_bytes, run_point
    from harness.zero import uses_deepspeed

    options = measure_options(args)
    if args.hostfile:
        from harness.distributed import hostfile_nodes

        options["extra"] = {"nodes": len(hostfile_nodes(args.hostfile))}
    spec = spec_from_args(args, **options)
    device = resolve_device(spec.device)
    check_measurable(spec, device)
    limit = default_max_memory_bytes() if device in ("cpu", "meta") else None
    if uses_deepspeed(spec):  # ZeRO or several ranks: one process per rank through a launcher
        from harness.distributed import run_distributed

        record = run_distributed(spec, timeout=args.timeout, argv=sys.argv, max_memory_bytes=limit,
                                 launcher=args.launcher, hostfile=args.hostfile)  # fmt: skip
    else:
        record = run_point(spec, timeout=args.timeout, argv=sys.argv, max_memory_bytes=limit)
    if args.out:
        append_jsonl(args.out, record)
    if args.format == "json":
        print(json.dumps(record, indent=2))
    else:
        display.print_measurement(record)
    return 0 if record["status"] == "ok" else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from formulas.params import parameter_count
    from harness import display
    from models.presets import PRESETS

    rows = [(name, arch, parameter_count(arch).total) for name, arch in PRESETS.items()]
    if args.format == "json":
        print(json.dumps({n: {"params": p, **a.to_dict()} for n, a, p in rows}, indent=2))
    else:
        display.print_presets(rows)
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    from formulas.hardware import GPUS, tflops_bar
    from harness import display

    if args.format == "json":
        out = {
            g.name: {
                "label": g.label,
                "memory_bytes": g.memory_bytes,
                "peak_tflops": g.peak_tflops,
                "tflops_bar": tflops_bar(g),
                "source": g.source,
            }
            for g in GPUS.values()
        }
        print(json.dumps(out, indent=2))
    else:
        display.print_gpus(list(GPUS.values()))
    return 0


MODULE_COMMANDS = (
    ("sweep", "harness.sweep", "run a sweep file, each point in its own subprocess, records to results/<sweep>/"),
    ("report", "harness.report", "Markdown and HTML report with plots from a results directory"),
    ("calibrate", "harness.calibrate", "fit overhead factors from measured runs (calibration.json)"),
    ("check", "harness.check", "exit 0 when every ok run clears a TFLOP/s bar, else 1 listing the failures"),
)
"""Subcommands in their own modules: each exposes add_arguments(parser) and run(args) -> int, and keeps
heavy imports (torch, pandas, matplotlib) inside functions so that `tmath predict` stays fast."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("predict", help="every memory and compute term from the formulas")
    add_run_args(p)
    p.add_argument("--method", default="korthikanti", choices=("korthikanti", "naive", "naive-mlp4c"))
    p.add_argument("--calibration", help="calibration.json from `tmath calibrate`: apply fitted overheads")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("measure", help="run the configuration and measure every term next to its prediction")
    add_run_args(p)
    g = p.add_argument_group("measurement")
    g.add_argument("--impl", default="reference", choices=IMPLS, help="reference modules or transformers models")
    g.add_argument("--device", default="auto", choices=DEVICES, help="meta: fake tensors, nothing allocated")
    g.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    g.add_argument("--timeout", type=float, help="seconds before the run is killed (status timeout)")
    g.add_argument("--mode", default="train", choices=MODES, help="train step, or inference (forward only)")
    g.add_argument("--deepspeed-config", help="JSON merged over the generated DeepSpeed config")
    g.add_argument("--launcher", default="torchrun", choices=("torchrun", "deepspeed"),
                   help="starts the ranks of a --zero/--gpus run (default torchrun, one node)")  # fmt: skip
    g.add_argument("--hostfile", help="DeepSpeed hostfile for several nodes (with --launcher deepspeed)")
    g.add_argument("--out", help="append the record to this JSONL file")
    g.add_argument("--format", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_measure)

    for name, module_name, help_text in MODULE_COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    p = sub.add_parser("presets", help="list the named architectures")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("gpus", help="list the accelerators with their peaks and sources")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_gpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid input"
        print(f"tmath: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tmath: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) went away: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
