"""Settings (flag names, as in a sweep file or on the command line) → a validated RunSpec.

One function serves `tmath predict`/`measure` and every sweep point, so that a key means the same
thing in both: `model` names a preset or a config.json, and shape keys (layers, hidden, heads, ...)
override the preset's fields or, without a model, define the architecture.
"""

from __future__ import annotations

from dataclasses import fields, replace

from formulas.architecture import Architecture
from formulas.spec import RunSpec
from harness.errors import UsageError

ARCH_KEYS = {
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
"""Setting name → Architecture field. With a `model`, each overrides the preset's value."""

RUN_KEYS = frozenset(f.name for f in fields(RunSpec)) - {"arch"}

SETTING_KEYS = frozenset(ARCH_KEYS) | RUN_KEYS


def resolve_architecture(settings: dict) -> tuple[str, Architecture | None]:
    """The architecture named by `model` (with overrides) or given by the shape keys; None with `params`."""
    from models import presets

    given = {ARCH_KEYS[k]: v for k, v in settings.items() if k in ARCH_KEYS and v is not None}
    model = settings.get("model")
    if settings.get("params") is not None:
        if model or given:
            raise UsageError("--params replaces the architecture: give it without --model or shape settings")
        return "custom", None
    if model:
        base = presets.resolve(str(model))
        # A changed width or head count re-derives the fields that defaulted from it.
        if "hidden" in given and "ffn_hidden" not in given and base.ffn_hidden == 4 * base.hidden:
            given["ffn_hidden"] = None
        if "n_heads" in given and "n_kv_heads" not in given and base.n_kv_heads == base.n_heads:
            given["n_kv_heads"] = None
        return str(model), replace(base, **given)
    missing = [f"--{k}" for k in ("layers", "hidden", "heads") if settings.get(k) is None]
    if missing:
        raise UsageError(f"give --model NAME|PATH, --params N, or the shape: missing {', '.join(missing)}")
    return "custom", Architecture(**given)


def build_spec(settings: dict) -> RunSpec:
    """Validate `settings` and build the RunSpec; any inconsistency is a one-line UsageError.

    Keys are RunSpec field names and the shape keys of ARCH_KEYS; None values mean "default".
    `seq` defaults to the model's positions, at most 2048.
    """
    unknown = sorted(set(settings) - SETTING_KEYS)
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
    try:
        name, arch = resolve_architecture(settings)
        run = {k: v for k, v in settings.items() if k in RUN_KEYS and v is not None and k != "model"}
        if "seq" not in run:
            run["seq"] = min(arch.max_positions, 2048) if arch is not None else 2048
        return RunSpec(arch=arch, model=name, **run)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
