"""The local executor: the pending points one at a time on this machine, each in processes of its own."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

from formulas.spec import RunSpec
from harness.launch import Limits, launch
from harness.records import Record, RunError
from harness.results import run_label

Measure = Callable[[RunSpec, Limits], Record]
"""Measures one point: `harness.launch.launch` (tests inject their own)."""


def guarded(spec: RunSpec, limits: Limits, measure: Measure = launch) -> Record:
    """The record of one point, whatever happens: a failure of the harness itself becomes an `error`
    record, so that one bad point never ends a sweep."""
    try:
        return measure(spec, limits)
    except Exception as exc:
        text = str(exc).strip()
        message = f"the harness failed to run the point: {text.splitlines()[0] if text else repr(exc)}"
        error = RunError(type=type(exc).__name__, message=message, traceback_tail=traceback.format_exc()[-4000:])
        return Record.failed(spec, "error", error)


def run(todo, limits: Limits, measure: Measure, progress, record_one, path: Path) -> None:
    """Measure each point and hand its record to `record_one` as it finishes."""
    done = 0
    try:
        for point in todo:
            progress.start(run_label(point.spec))
            record_one(point, guarded(point.spec, limits, measure))
            done += 1
    except KeyboardInterrupt:
        # The runner has already killed the running worker's process group.
        progress.console.print(
            f"interrupted: {done} of {len(todo)} points recorded in {path}; continue with --resume", soft_wrap=True
        )
        raise
