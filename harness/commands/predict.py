"""Every memory and compute term of a run from the formulas, per GPU, each with its source."""

from __future__ import annotations

import json

from formulas.calibration import Calibration
from formulas.peak import target_device
from formulas.predict import METHODS, predict
from formulas.ranks import parallel_prediction
from harness.display.prediction import print_prediction, print_rank_predictions
from harness.errors import UsageError
from harness.flags import add_run_settings, spec_from_args
from harness.schema import to_json

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
    per_rank = parallel_prediction(spec, target_device(spec.measurement.device))
    if args.format == "json":
        out = prediction.to_dict()
        if per_rank is not None:
            out["per_rank"] = to_json(per_rank)
        print(json.dumps(out, indent=2))
    else:
        print_prediction(prediction)
        if per_rank is not None:
            print_rank_predictions(per_rank)
    return 0
