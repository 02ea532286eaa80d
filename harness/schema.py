"""JSON ↔ typed dataclasses for records: one `to_json`, one `from_json`, errors that name the field.

`from_json(cls, data)` checks every value against the field's annotation (int, float, str, bool, Literal,
`T | None`, `list[T]`, `dict[str, T]`, nested dataclasses, and `dict`/`Any` for free-form JSON such as a
DeepSpeed config) and raises `SchemaError("measured.memory_bytes.weights: expected an integer, got 'x'")`.
Unknown keys are errors too: a record that does not match the schema is never half-read. Values are kept
as they were written (an int in a float field stays an int), so a record renders the same after a round
trip. `to_json` drops None fields; a reader treats a missing field as None. A dataclass may name
properties in `DERIVED` (a total): they are written beside the fields, and on reading each must equal the
property recomputed from the fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin


class SchemaError(ValueError):
    """A JSON value that does not fit the record schema; the message starts with the field's dotted path."""


class Tagged:
    """Base of a family of record types told apart by a `kind` field (an engine's per-rank report).

    `resolve(kind)` maps a kind to its class; subclasses set `KINDS` on the base to a callable that returns
    {kind: class}, so that the registry can live where the kinds are declared (`harness.trainers`).
    """

    kind: str

    @classmethod
    def resolve(cls, kind: str) -> type:
        raise SchemaError(f"unknown kind {kind!r}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_json(value: Any) -> Any:
    """A dataclass tree as JSON-ready dicts and lists (None fields left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        if isinstance(value, Tagged):
            out["kind"] = value.kind
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is not None:
                out[f.name] = to_json(v)
        for name in getattr(value, "DERIVED", ()):
            out[name] = to_json(getattr(value, name))
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, expected: str, value: Any) -> SchemaError:
    return SchemaError(f"{where or 'record'}: expected {expected}, got {_describe(value)}")


def from_json(tp: Any, data: Any, where: str = "") -> Any:
    """`data` read as type `tp`; SchemaError naming the field (`where`) when it does not fit."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return from_json(inner[0], data, where)
        for option in inner:  # a union of plain types: the first that fits
            try:
                return from_json(option, data, where)
            except SchemaError:
                continue
        raise _fail(where, " or ".join(getattr(a, "__name__", str(a)) for a in inner), data)
    if tp is Any or tp is object:
        return data
    if data is None:
        raise SchemaError(f"{where or 'record'}: missing (null)")
    if origin is Literal:
        if data not in get_args(tp) or isinstance(data, bool) != isinstance(get_args(tp)[0], bool):
            raise _fail(where, "one of " + ", ".join(map(repr, get_args(tp))), data)
        return data
    if origin is list or tp is list:
        if not isinstance(data, list):
            raise _fail(where, "a list", data)
        (item,) = get_args(tp) or (Any,)
        return [from_json(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is tuple:
        if not isinstance(data, list):
            raise _fail(where, "a list", data)
        args = get_args(tp)
        item = args[0] if args else Any
        return tuple(from_json(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict or tp is dict:
        if not isinstance(data, dict):
            raise _fail(where, "an object", data)
        _, value_type = get_args(tp) or (str, Any)
        return {k: from_json(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail(where, "true or false", data)
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _fail(where, "an integer", data)
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise _fail(where, "a number", data)
        return data
    if tp is str:
        if not isinstance(data, str):
            raise _fail(where, "text", data)
        return data
    if isinstance(tp, type) and issubclass(tp, Tagged) and not dataclasses.is_dataclass(tp):  # the family: dispatch
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise _fail(f"{where}.kind" if isinstance(data, dict) else where, "an object with a kind", data)
        body = {k: v for k, v in data.items() if k != "kind"}
        return from_json(tp.resolve(data["kind"]), body, where)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, data, where)
    raise TypeError(f"{where}: no reader for {tp!r}")


def _dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise _fail(where, "an object", data)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived = getattr(cls, "DERIVED", ())
    unknown = [k for k in data if k not in known and k not in derived]
    if unknown:
        raise SchemaError(f"{where + '.' if where else ''}{unknown[0]}: not a field of {cls.__name__}")
    hints = _hints(cls)
    values = {}
    for name, f in known.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            values[name] = from_json(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if type(None) in get_args(hints[name]):
                values[name] = None
            else:
                raise SchemaError(f"{path}: missing")
    obj = cls(**values)
    for name in derived:
        if name in data and data[name] != getattr(obj, name):
            path = f"{where}.{name}" if where else name
            raise SchemaError(f"{path}: {data[name]!r} is not what the fields give ({getattr(obj, name)!r})")
    return obj
