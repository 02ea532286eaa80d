"""Numbers as people read them: bytes in binary units, counts with SI prefixes, ratios. Integers until here."""

from __future__ import annotations

import math

from formulas.units import GIB, KIB, MIB


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def gib(value: int | float | None, digits: int = 2) -> str:
    return "-" if _missing(value) else f"{value / GIB:,.{digits}f}"


def size(value: int | float | None) -> str:
    """Bytes in the unit that keeps 3-4 significant digits: KiB, MiB or GiB (binary)."""
    if _missing(value):
        return "-"
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(value) >= div:
            return f"{value / div:,.2f} {unit}"
    return f"{value:,.0f} B"


def human(value: float | None, unit: str = "") -> str:
    """1.23e+21 style counts with SI prefixes: 5.07 P, 1.86 E (FLOPs), 124.4 M (params)."""
    if value is None:
        return "-"
    for div, prefix in (
        (1e24, "Y"),
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(value) >= div:
            return f"{value / div:,.2f} {prefix}{unit}"
    return f"{value:,.0f} {unit}".rstrip()


def ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{measured / predicted:.3f}"


def number(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if _missing(value) else f"{value:,.{digits}f}{suffix}"


def significant(value, digits: int = 3) -> str:
    """Three significant digits: 0.000361 on a CPU, 132 on an A100."""
    if _missing(value):
        return "-"
    return f"{value:,.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def error_percent(x: float) -> str:
    """A relative error as a percentage: three decimals, or two significant digits below 0.01% (0.0000021%)."""
    if abs(x) >= 1e-4 or x == 0:
        return f"{x:.3%}"
    decimals = 1 - math.floor(math.log10(abs(100 * x)))
    return f"{100 * x:.{decimals}f}%"
