"""The sweep file: its schema (pydantic, generated from the settings of `formulas.spec`), and its expansion
into validated points.

    name: cpu-smoke            # results go to results/<name>/ unless --out (default: the file's stem)
    description: ...           # free text
    defaults: {model: gpt2, layers: 2, seq: 128, batch: 2, precision: fp32, device: auto}
    grid:                      # cartesian product of the axes (in file order), each point merged over defaults
      recompute: [none, selective, full]
      impl: [reference, hf]
    exclude:                   # drop the grid points that match every key of one entry
      - {impl: hf, recompute: selective}
    points:                    # explicit points, merged over defaults, appended after the grid
      - {model: bert-base-uncased, layers: 2, seq: 128}
    timeout: 900               # seconds per point (--timeout wins; default 1800)
    max_memory: 8GiB           # host address-space cap per CPU/meta point (default 85% of RAM)

Every key of `defaults`, `grid`, `points` and `exclude` is a setting (`formulas.spec.settings()`: a RunSpec
field or a shape setting such as `layers`); hyphens in keys are read as underscores. The file's structure
and its setting names are checked by the pydantic model; each point's values by `RunSpec` itself, once,
after expansion (so an error names the point). All of it before anything runs, each violation one line
naming the file and the key or point: unknown keys, a grid axis that is not a non-empty list, an
`exclude` entry that matches no grid point, a point that cannot be measured on this machine, and two
points that are the same run (same `RunSpec.key()`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, PositiveFloat, TypeAdapter, ValidationError, create_model

from formulas.spec import RunSpec, settings
from harness.errors import UsageError
from harness.specbuild import build_spec
from harness.trainers import check_measurable, resolve_device

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


@cache
def _settings_model() -> type[BaseModel]:
    """A mapping of settings: every setting optional, nothing else allowed. Values are RunSpec's to check."""
    fields = {key: (Any, None) for key in settings()}
    return create_model("Settings", __config__=ConfigDict(extra="forbid"), **fields)


@cache
def _grid_model() -> type[BaseModel]:
    axis = Annotated[list[Any], Field(min_length=1)]
    fields = {key: (axis | None, None) for key in settings()}
    return create_model("Grid", __config__=ConfigDict(extra="forbid"), **fields)


@cache
def _file_model() -> type[BaseModel]:
    settings_model = _settings_model()
    return create_model(
        "SweepFile",
        __config__=ConfigDict(extra="forbid"),
        name=(Annotated[str, Field(pattern=NAME_PATTERN)] | None, None),
        description=(str | None, None),
        defaults=(settings_model | None, None),
        grid=(_grid_model() | None, None),
        exclude=(list[settings_model] | None, None),
        points=(list[settings_model] | None, None),
        timeout=(PositiveFloat | None, None),
        max_memory=(ByteSize | None, None),
    )


FILE_KEYS: tuple[str, ...] = ("name", "description", "defaults", "grid", "points", "exclude", "timeout", "max_memory")


def parse_size(text, where: str) -> int:
    """Bytes from `8GiB`, `512MiB`, `16GB` or a plain integer (bytes), via pydantic's ByteSize."""
    if isinstance(text, bool):
        raise UsageError(f"{where}: not a size: {text!r} (examples: 8GiB, 512MiB, 16GB)")
    try:
        value = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise UsageError(f"{where}: not a size: {text!r} (examples: 8GiB, 512MiB, 16GB)") from None
    if value < 1:
        raise UsageError(f"{where}: size must be positive, got {text!r}")
    return value


def _where(loc: tuple) -> str:
    """pydantic's location as the file writes it: `grid.recompute`, `points[2]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(path: Path, error: dict, data: dict) -> str:
    """One pydantic error as the one line a user can act on."""
    loc, kind = tuple(error["loc"]), error["type"]
    where = _where(loc)
    value = error.get("input")
    if kind == "extra_forbidden" and len(loc) == 1:
        unknown = [str(k) for k in data if k not in FILE_KEYS]
        return f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(FILE_KEYS)})"
    if kind == "extra_forbidden":
        return (
            f"{path}: {_where(loc[:-1])}: unknown setting {loc[-1]!r} "
            "(settings are RunSpec fields and layers/hidden/heads/...)"
        )
    if loc and loc[0] == "grid" and len(loc) == 2:
        return f"{path}: {where} must be a non-empty list of values, got {value!r}"
    if loc == ("name",):
        return f"{path}: name must be a plain directory name (letters, digits, . _ -), got {value!r}"
    if loc == ("description",):
        return f"{path}: description must be text"
    if loc and loc[0] == "timeout":
        return f"{path}: timeout must be a positive number of seconds, got {value!r}"
    if loc and loc[0] == "max_memory":
        return f"{path}: max_memory: not a size: {value!r} (examples: 8GiB, 512MiB, 16GB)"
    if kind in ("model_type", "dict_type") or (loc and loc[-1] in ("defaults", "grid")):
        return f"{path}: {where} must be a mapping of settings, got {type(value).__name__}"
    if kind == "list_type":
        return f"{path}: {where} must be a list of mappings, got {type(value).__name__}"
    return f"{path}: {where}: {error['msg']}"


@dataclass(frozen=True)
class Point:
    """One expanded point: where it came from in the file, its settings, and its validated spec."""

    origin: str
    """`grid point 3 (recompute=full, impl=hf)` or `points[2]`: how errors and listings name it."""
    settings: dict
    spec: RunSpec


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    points: tuple[Point, ...]
    description: str = ""
    timeout: float | None = None
    """Per-point time limit in seconds from the file (None: the CLI's or the default)."""
    max_memory_bytes: int | None = None
    """Address-space cap per CPU/meta point from the file (None: 85% of this machine's memory)."""


def _normalise(mapping, where: str) -> dict:
    """Setting keys with `_` for `-` (a key given both ways is an error)."""
    if not isinstance(mapping, dict):
        return mapping  # the model says what it should be
    out: dict = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise UsageError(f"{where}: setting {key!r} is given twice (with - and with _)")
        out[name] = value
    return out


def _describe(given: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in given.items())


def _grid_points(path: Path, defaults: dict, axes: dict, rules: list[dict]) -> list[tuple[str, dict]]:
    for i, rule in enumerate(rules):
        if not rule:
            raise UsageError(f"{path}: exclude[{i}] is empty (it would drop every grid point)")
    used = [False] * len(rules)
    points = []
    for n, combo in enumerate(itertools.product(*axes.values())):
        chosen = dict(zip(axes, combo, strict=True))
        given = {**defaults, **chosen}
        hits = [i for i, rule in enumerate(rules) if all(k in given and given[k] == v for k, v in rule.items())]
        for i in hits:
            used[i] = True
        if not hits:
            points.append((f"grid point {n} ({_describe(chosen)})", given))
    for i, rule in enumerate(rules):
        if not used[i]:
            raise UsageError(f"{path}: exclude[{i}] ({_describe(rule)}) matches no grid point")
    return points


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read sweep file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a sweep file is a YAML mapping with keys {', '.join(FILE_KEYS)}")
    return data


def load_sweep(path: str | Path, *, check_device: bool = False, remote: bool = False) -> Sweep:
    """Read, expand and validate a sweep file; any problem is a one-line UsageError naming the file.

    check_device: also check that every point can be measured here (imports torch); `remote`
    checks it for a GPU node instead (Slurm: the device is on the compute node, not here).
    """
    path = Path(path)
    data = _read(path)
    for key in ("defaults", "grid"):
        data[key] = _normalise(data.get(key), f"{path}: {key}")
    for key in ("points", "exclude"):
        if isinstance(data.get(key), list):
            data[key] = [_normalise(m, f"{path}: {key}[{i}]") for i, m in enumerate(data[key])]
    try:
        model = _file_model().model_validate(data)
    except ValidationError as exc:
        raise UsageError(_message(path, exc.errors()[0], data)) from None
    # The model has checked the structure and the setting names; the mappings themselves keep the file's
    # order (a grid is expanded in the order its axes are written).
    defaults = data.get("defaults") or {}

    name = model.name if model.name is not None else path.stem
    if model.name is None and not re.fullmatch(NAME_PATTERN, name):
        raise UsageError(f"{path}: name must be a plain directory name (letters, digits, . _ -), got {name!r}")
    if model.exclude and model.grid is None:
        raise UsageError(f"{path}: exclude applies to grid points, but the file has no grid")
    raw = []
    if model.grid is not None:
        raw = _grid_points(path, defaults, data["grid"], list(data.get("exclude") or []))
    for i, point in enumerate(data.get("points") or []):
        raw.append((f"points[{i}]", {**defaults, **point}))
    if not raw:
        raise UsageError(f"{path}: no points (give a grid, points, or both)")

    points: list[Point] = []
    seen: dict[str, str] = {}
    for origin, point_settings in raw:
        try:
            spec = build_spec(point_settings)
            spec = spec.replace(extra={**spec.extra, "sweep": name})
        except UsageError as exc:
            raise UsageError(f"{path}: {origin}: {exc}") from None
        key = spec.key()
        if key in seen:
            raise UsageError(f"{path}: {origin} is the same run as {seen[key]} (spec key {key}): remove one")
        seen[key] = origin
        points.append(Point(origin, point_settings, spec))

    max_memory = None if model.max_memory is None else parse_size(int(model.max_memory), f"{path}: max_memory")
    sweep = Sweep(name, path, tuple(points), model.description or "", model.timeout, max_memory)
    if check_device:
        check_points(sweep, remote=remote)
    return sweep


def check_points(sweep: Sweep, *, remote: bool = False) -> None:
    """What the harness cannot measure (no CUDA here, tensor parallelism, ...), before any run."""
    for point in sweep.points:
        spec = point.spec
        try:
            if remote:
                device = "cuda" if spec.measurement.device in ("auto", "cuda") else spec.measurement.device
            else:
                device = resolve_device(spec.measurement.device)
            check_measurable(spec, device)
        except (UsageError, ValueError) as exc:
            raise UsageError(f"{sweep.path}: {point.origin}: {str(exc).splitlines()[0]}") from None
