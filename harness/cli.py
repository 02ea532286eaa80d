"""`tmath`: predict, measure, sweep, report, calibrate and check transformer training memory and compute.

Every subcommand reports bad input as one line (`tmath: error: ...`) and exits with status 2. Only the
module of the command that runs is imported (`harness.commands`), so `tmath predict` answers in a fraction
of a second on any machine, without torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness.errors import EXIT_USAGE, UsageError

COMMANDS: dict[str, tuple[str, str, str]] = {
    "predict": ("harness.commands.predict", "run", "every memory and compute term from the formulas"),
    "measure": ("harness.commands.measure", "run", "run the configuration and measure every term next to its prediction"),
    "sweep": ("harness.commands.sweep", "run", "run a sweep file, each point in its own subprocess, records to results/<sweep>/"),
    "report": ("harness.commands.report", "run", "Markdown and HTML report with plots from a results directory"),
    "calibrate": ("harness.commands.calibrate", "run", "fit overhead factors from measured runs (calibration.json)"),
    "check": ("harness.commands.check", "run", "exit 0 when every ok run clears a TFLOP/s bar, else 1 listing the failures"),
    "plan": ("harness.commands.plan", "run", "the layouts that fit a cluster, their largest micro-batch and step time, best first"),
    "presets": ("harness.commands.listings", "run_presets", "list the named architectures"),
    "gpus": ("harness.commands.listings", "run_gpus", "list the accelerators with their peaks and sources"),
}  # fmt: skip
"""name → (module, function, help). The module is imported only when its command runs."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a usage block: errors stay one line."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed, and the arguments of `command` (or of all, for None)."""
    parser = _Parser(prog="tmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, function, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=getattr(module, function))
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_command(argv)).parse_args(argv)
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
