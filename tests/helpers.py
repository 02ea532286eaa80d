"""Records for tests, built from JSON-shaped parts as a measuring process would report them."""

from __future__ import annotations

from formulas.spec import RunSpec
from harness.records import Outcome, Record


def make_record(
    spec: RunSpec,
    *,
    status: str = "ok",
    measured: dict | None = None,
    error: dict | None = None,
    environment: dict | None = None,
    elapsed_s: float | None = None,
) -> Record:
    outcome = Outcome.from_dict(
        {
            "status": status,
            "measured": measured or {},
            "error": error,
            "environment": environment,
            "elapsed_s": elapsed_s,
        }
    )
    return Record.make(spec, outcome)
