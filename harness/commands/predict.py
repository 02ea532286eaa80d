"""Every memory and compute term of a run from the formulas, per GPU, each with its source."""

from __future__ import annotations

import json

from formulas.calibration import Calibration
from formulas.predict import METHODS, predict
from harness.display.prediction import print_prediction
from harness.errors import UsageError
from harness.flags import add_run_settings, spec_from_args

SECTIONS = ("model", "training", "parallel", "budget")


def add_arguments(p) -> None:
    add_run_settings(p, SECTIONS, also=("impl", "device"))
    out = p.add_argument_group("prediction")
    out.add_argument("--method", default="korthikanti", choices=METHODS, help="formula (default korthikanti)")
    out.add_argument("--calibration", metavar="FILE", help="calibration.json from `tmath calibrate`: apply its factors")
    out.add_argument("--format", default="table", choices=("table", "json"))


def run(args) -> int:
    spec = spec_from_args(args)
    try:
        calibration = Calibration.load(args.calibration) if args.calibration else None
        prediction = predict(spec, method=args.method, calibration=calibration)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.format == "json":
        print(json.dumps(prediction.to_dict(), indent=2))
    else:
        print_prediction(prediction)
    return 0
