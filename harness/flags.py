"""Command-line flags generated from the settings of `formulas.spec` (one source for names, types and help).

Every RunSpec section becomes an argument group, every setting a flag named after it (`grad_accum` is
`--grad-accum`): a `Literal` gives the choices, a bool a switch, a count (`--params 7B`) a suffix parser;
the help is the docstring under the field. Flags default to None, so that an absent flag takes the
dataclass's own default in `build_spec`: no default is restated here.

A small generator rather than a library (tyro, typer): tyro's flags are `--training.batch` and its errors
are multi-line panels, while `tmath` keeps the flat names that sweep files use and one-line errors.
"""

from __future__ import annotations

import argparse
import re

from formulas.spec import SECTIONS, RunSpec, Setting, settings
from harness.specbuild import build_spec

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def count(text: str) -> int:
    """A count such as 7B, 1.5e12, 300e9, 20k or 1_000_000."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 7B, 300e9, 1.5T)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2), 1)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def _help(s: Setting) -> str:
    text = s.help
    # A shape setting overrides the preset's value, so the dataclass default is not what an absent flag means.
    if s.section != "model" and s.default not in (None, False) and "default" not in text:
        text += f" (default {s.default})"
    return text.replace("%", "%%")


def add_setting(group, s: Setting) -> None:
    """One setting as one flag."""
    options: dict = {"dest": s.key, "default": None, "help": _help(s)}
    if s.choices is not None:
        options.update(choices=s.choices, type=type(s.choices[0]))
    elif s.type in (bool, bool | None):
        # A switch that is on by default is turned off with --no-<name> (`--no-reshard-after-forward`).
        options["action"] = argparse.BooleanOptionalAction if s.default is True else "store_true"
    elif s.count:
        options.update(type=count, metavar="N")
    else:
        base = next((t for t in (int, float, str) if s.type in (t, t | None)), str)
        options.update(type=base, metavar=s.key.upper() if base is str else None)
    if options.get("metavar") is None:
        options.pop("metavar", None)
    group.add_argument(s.flag, **options)


def add_run_settings(parser: argparse.ArgumentParser, sections: tuple[str, ...], also: tuple[str, ...] = ()) -> None:
    """An argument group per RunSpec section, a flag per setting; `also` names single settings of other
    sections (`tmath predict` takes the measurement's `impl` and `device`: the implementation it predicts for)."""
    for section in sections:
        title = (SECTIONS[section].__doc__ or section).strip().splitlines()[0]
        group = parser.add_argument_group(title)
        for s in settings().values():
            if s.section == section:
                add_setting(group, s)
    if also:
        group = parser.add_argument_group("implementation and device the prediction is for")
        for key in also:
            add_setting(group, settings()[key])


def spec_from_args(args: argparse.Namespace, **given) -> RunSpec:
    """The RunSpec of a command line: the settings it has flags for, plus `given` (see harness.specbuild)."""
    values = {key: getattr(args, key) for key in settings() if hasattr(args, key)}
    return build_spec({**values, **given})
