"""Settings (flag names, as in a sweep file or on the command line) → a validated RunSpec.

One function serves `tmath predict`/`measure` and every sweep point, so that a key means the same
thing in both: `model` names a preset or a config.json, and the shape settings (layers, hidden, heads,
...) override the preset's fields or, without a model, define the architecture. The settings themselves,
their types and defaults, are `formulas.spec.settings()`; this module only resolves the model.
"""

from __future__ import annotations

from dataclasses import replace

from formulas.architecture import Architecture
from formulas.spec import RunSpec, settings
from harness.errors import UsageError
from models import presets


def _shape(given: dict) -> dict:
    """Shape settings → Architecture fields (`layers` → `n_layers`)."""
    index = settings()
    return {index[k].field: v for k, v in given.items() if index[k].owner is Architecture}


def resolve_architecture(given: dict) -> tuple[str, Architecture | None]:
    """The architecture named by `model` (with overrides) or given by the shape settings; None with `params`."""
    shape = _shape({k: v for k, v in given.items() if v is not None})
    model = given.get("model")
    if given.get("params") is not None:
        if model or shape:
            raise UsageError("--params replaces the architecture: give it without --model or shape settings")
        return "custom", None
    if model:
        base = presets.resolve(str(model))
        # A changed width or head count re-derives the fields that defaulted from it.
        if "hidden" in shape and "ffn_hidden" not in shape and base.ffn_hidden == 4 * base.hidden:
            shape["ffn_hidden"] = None
        if "n_heads" in shape and "n_kv_heads" not in shape and base.n_kv_heads == base.n_heads:
            shape["n_kv_heads"] = None
        if (
            ("hidden" in shape or "n_heads" in shape)
            and base.head_dim is not None
            and base.head_dim * base.n_heads == base.hidden
        ):
            shape["head_dim"] = None
        return str(model), replace(base, **shape)
    missing = [f"--{k}" for k in ("layers", "hidden", "heads") if given.get(k) is None]
    if missing:
        raise UsageError(f"give --model NAME|PATH, --params N, or the shape: missing {', '.join(missing)}")
    return "custom", Architecture(**shape)


def build_spec(given: dict) -> RunSpec:
    """Validate `given` and build the RunSpec; any inconsistency is a one-line UsageError.

    Keys are setting names (`formulas.spec.settings()`) and `extra`; None values mean "default". `seq`
    defaults to the model's positions, at most 2048.
    """
    index = settings()
    unknown = sorted(set(given) - set(index) - {"extra"})
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
    try:
        name, arch = resolve_architecture(given)
        run = {k: v for k, v in given.items() if v is not None and (k == "extra" or index[k].owner is not Architecture)}
        run["model"] = name
        if "seq" not in run:
            run["seq"] = min(arch.max_positions, 2048) if arch is not None else 2048
        return RunSpec.build(arch=arch, **run)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
