"""The record schema: every committed record loads, round-trips and re-renders; schema 1 is upgraded; a line
that does not fit is refused with the field's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.records import SCHEMA_VERSION, Record, upgrade_v1
from harness.report.build import build_report
from harness.results import read_records
from harness.schema import SchemaError
from harness.specbuild import build_spec
from tests.helpers import make_record

REPO = Path(__file__).resolve().parent.parent
COMMITTED = sorted((REPO / "results").rglob("*.jsonl"))


def test_results_are_committed():
    assert len(COMMITTED) >= 5


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_committed_record_loads_and_round_trips(path):
    read = read_records(path)
    assert read.problems == [] and read.records
    for record in read.records:
        again = Record.from_dict(json.loads(json.dumps(record.to_dict())))
        assert again == record and again.schema_version == SCHEMA_VERSION
        assert record.spec.key() == record.spec_key, "the spec's key is stable across the schema change"


@pytest.mark.parametrize("name", ["departures", "zero-cpu", "reference/cpu-smoke", "peak", "parallel-cpu"])
def test_committed_reports_are_what_their_records_render(tmp_path, monkeypatch, name):
    """report.md of each committed results directory, regenerated from its runs.jsonl, is the committed one."""
    monkeypatch.chdir(REPO)  # the report names its runs.jsonl as given
    results = Path("results") / name
    written = build_report(results, tmp_path)
    assert written["markdown"].read_text() == (results / "report" / "report.md").read_text()


def first_v1(path: str) -> dict:
    return json.loads((REPO / path).read_text().splitlines()[0])


def test_schema_1_is_upgraded_where_values_moved():
    # A schema-1 record (harness 1) as it was committed before the results were measured again with harness 2.
    old = first_v1("tests/fixtures/record-schema1-zero2.json")
    assert "schema_version" not in old
    record = Record.from_dict(old)
    assert record.measured.flops_counted == old["measured"]["flops"]["counted"]
    formula = record.prediction("korthikanti")
    assert formula.flops.per_step_matmul == old["measured"]["flops"]["formula_matmul"]
    assert formula.memory_bytes.total == old["predicted"]["memory_bytes"]["total"]
    assert (
        record.prediction("deepspeed").memory_bytes.gpu
        == old["predicted"]["deepspeed_estimator"]["memory_bytes"]["gpu"]
    )
    rank = record.measured.ranks[1]
    assert rank.measured.memory_bytes.gradients == old["measured"]["ranks"][1]["memory_bytes"]["gradients"]
    assert rank.measured.engine.stage == old["measured"]["ranks"][1]["zero"]["stage"] == 2
    assert upgrade_v1(old)["schema_version"] == SCHEMA_VERSION


def record_json() -> dict:
    spec = build_spec({"layers": 1, "hidden": 32, "heads": 2, "vocab": 64, "seq": 16})
    return make_record(spec, measured={"device": "cpu", "memory_bytes": {"weights": 10}}).to_dict()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda d: d["measured"]["memory_bytes"].update(weights="x"),
            "measured.memory_bytes.weights: expected an integer",
        ),
        (lambda d: d["measured"].update(step_ms={"median": 1.0}), "measured.step_ms.min: missing"),
        (lambda d: d.update(status="great"), "status: expected one of"),
        (lambda d: d.update(colour="blue"), "colour: not a field of a record"),
        (lambda d: d["predicted"].update(oracle={}), "predicted.oracle: not a prediction method"),
        (lambda d: d["predicted"]["korthikanti"]["inference"].update(total=1), "inference.total: 1 is not what"),
        (lambda d: d["measured"].update(engine={"kind": "tpu-pod"}), "measured.engine.kind: 'tpu-pod'"),
        (lambda d: d["spec"].update(batch=0), "spec: batch must be a positive integer"),
        (lambda d: d.update(schema_version=99), "schema_version: 99"),
    ],
)
def test_a_record_that_does_not_fit_names_the_field(edit, field):
    data = record_json()
    Record.from_dict(data)
    edit(data)
    with pytest.raises(SchemaError) as info:
        Record.from_dict(data)
    assert field in str(info.value), str(info.value)
