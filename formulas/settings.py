"""Typed settings: one frozen dataclass per concept, a docstring under each field, checked from its type.

The dataclasses of `formulas.spec` (and `formulas.architecture.Architecture`) are the one source of every
setting: its name (the CLI flag, the sweep-file key and the record's JSON key are the same word), its type
(a `Literal` gives the choices), its default, its bounds (`bounded`) and its help (the docstring written
under the field, as torchtitan's `JobConfig` does). `check_fields` validates an instance from exactly
that, so no choice or range is restated anywhere else; the CLI (`harness.flags`) and the sweep-file
model (`harness.sweep.file`) are generated from the same fields.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

KEY = "key"
"""Field metadata: the setting's name where it differs from the field's (`n_layers` is `layers`)."""
MINIMUM, MAXIMUM = "minimum", "maximum"
"""Field metadata: inclusive bounds of a number. Integers default to a minimum of 1."""
COUNT = "count"
"""Field metadata: given as a count with a suffix on the command line (7B, 300e9, 1.5T)."""


def bounded(default: Any = dataclasses.MISSING, *, key: str | None = None, minimum=None, maximum=None,
            count: bool = False) -> Any:  # fmt: skip
    """A dataclass field with the setting's metadata (its docstring stays under it)."""
    metadata = {k: v for k, v in ((KEY, key), (MINIMUM, minimum), (MAXIMUM, maximum)) if v is not None}
    if count:
        metadata[COUNT] = True
    return dataclasses.field(default=default, metadata=metadata)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (what `help` shows)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen binary): help falls back to the field's name
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (they are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def choices(tp: Any) -> tuple | None:
    """The values of a `Literal` type (optional or not), else None."""
    tp, _ = unwrap_optional(tp)
    return get_args(tp) if get_origin(tp) is Literal else None


def setting_name(f: dataclasses.Field) -> str:
    return f.metadata.get(KEY, f.name)


def _number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _check_number(name: str, value: Any, tp: type, meta) -> None:
    low, high = meta.get(MINIMUM, 1 if tp is int else None), meta.get(MAXIMUM)
    valid = _number(value, tp) and value == value  # NaN is no number of anything
    if tp is int:
        if not valid or value < low:
            word = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer of at least {low}")
            raise ValueError(f"{name} must be {word}, got {value!r}")
    elif not valid or (value < low if low is not None else not value > 0):
        raise ValueError(f"{name} must be {'positive' if low is None else f'at least {low:g}'}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high:,}, got {value:,}: is it a typo?")


def check_value(name: str, value: Any, tp: Any, metadata: dict | dataclasses.Field | None = None) -> None:
    """Raise ValueError, naming the setting, when `value` does not fit the field's type and bounds."""
    meta = metadata.metadata if isinstance(metadata, dataclasses.Field) else (metadata or {})
    tp, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return
        raise ValueError(f"{name} must be given")
    allowed = choices(tp)
    if allowed is not None:
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if tp in (int, float):
        _check_number(name, value, tp, meta)
        return
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {value!r}")


def check_fields(obj: Any) -> None:
    """Validate every field of a dataclass instance against its annotation and metadata."""
    types_ = field_types(type(obj))
    for f in dataclasses.fields(obj):
        check_value(setting_name(f), getattr(obj, f.name), types_[f.name], f)
