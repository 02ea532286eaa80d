"""`tmath`: predict, measure, sweep, report, calibrate and check transformer training memory and compute.

Every subcommand reports bad input as one line (`tmath: error: ...`) and exits with status 2.
The `predict` path imports no torch, so it answers in a fraction of a second on any machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace

from formulas.architecture import FAMILIES, MLPS, NORMS, POSITIONS, Architecture
from formulas.spec import RunSpec
from harness.errors import EXIT_USAGE, UsageError

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}

# Flag -> Architecture field. Given with --model, each overrides the preset's value.
ARCH_FLAGS = {
    "layers": "n_layers",
    "hidden": "hidden",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "ffn_hidden": "ffn_hidden",
    "vocab": "vocab",
    "max_positions": "max_positions",
    "dropout": "dropout",
    "position": "position",
    "norm": "norm",
    "mlp": "mlp",
    "family": "family",
}


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

    c = p.add_argument_group("compute budget")
    c.add_argument("--tokens", type=count, help="training tokens D (default 20·P, Chinchilla)")
    c.add_argument("--gpu", default="a100-80gb", help="accelerator (see `tmath gpus`; default a100-80gb)")
    c.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (default: 120 per A100, scaled)")


def architecture_from_args(args: argparse.Namespace) -> tuple[str, Architecture | None]:
    """Resolve --model (with flag overrides) or the shape flags to an Architecture."""
    from models import presets

    given = {field: getattr(args, flag) for flag, field in ARCH_FLAGS.items() if getattr(args, flag) is not None}
    if args.params is not None:
        if args.model or given:
            raise UsageError("--params replaces the architecture: give it without --model or shape flags")
        return "custom", None
    if args.model:
        base = presets.resolve(args.model)
        # A changed width or head count re-derives the fields that defaulted from it.
        if "hidden" in given and "ffn_hidden" not in given and base.ffn_hidden == 4 * base.hidden:
            given["ffn_hidden"] = None
        if "n_heads" in given and "n_kv_heads" not in given and base.n_kv_heads == base.n_heads:
            given["n_kv_heads"] = None
        return args.model, replace(base, **given)
    missing = [f"--{f}" for f in ("layers", "hidden", "heads") if getattr(args, f) is None]
    if missing:
        raise UsageError(f"give --model NAME|PATH, --params N, or the shape: missing {', '.join(missing)}")
    return "custom", Architecture(**given)


def spec_from_args(args: argparse.Namespace, **measure) -> RunSpec:
    """Build and validate the RunSpec; any inconsistency becomes a one-line UsageError."""
    try:
        name, arch = architecture_from_args(args)
        seq = args.seq if args.seq is not None else (min(arch.max_positions, 2048) if arch else 2048)
        return RunSpec(
            arch=arch,
            model=name,
            params=args.params,
            batch=args.batch,
            seq=seq,
            precision=args.precision,
            optimizer=args.optimizer,
            recompute=args.recompute,
            attention=args.attention,
            zero=args.zero,
            gpus=args.gpus,
            tp=args.tp,
            pp=args.pp,
            sequence_parallel=args.sequence_parallel,
            partition_activations=args.partition_activations,
            in_flight=args.in_flight,
            grad_accum=args.grad_accum,
            tokens=args.tokens,
            gpu=args.gpu,
            tflops=args.tflops,
            **measure,
        )
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("predict", help="every memory and compute term from the formulas")
    add_run_args(p)
    p.add_argument("--method", default="korthikanti", choices=("korthikanti", "naive", "naive-mlp4c"))
    p.add_argument("--calibration", help="calibration.json from `tmath calibrate`: apply fitted overheads")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_predict)

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


if __name__ == "__main__":
    sys.exit(main())
