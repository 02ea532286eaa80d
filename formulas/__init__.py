"""transformer-math formulas: a pure calculator (no torch) for transformer training memory and compute.

Sources: EleutherAI, *Transformer Math 101* (2023); Korthikanti et al. 2022, *Reducing Activation
Recomputation in Large Transformer Models* (arXiv:2205.05198); Rajbhandari et al. 2020, *ZeRO*.
"""

from formulas.architecture import Architecture
from formulas.calibration import Calibration
from formulas.params import ParameterCount, parameter_count
from formulas.predict import METHODS, Prediction, predict
from formulas.spec import RunSpec

__all__ = [
    "METHODS",
    "Architecture",
    "Calibration",
    "ParameterCount",
    "Prediction",
    "RunSpec",
    "parameter_count",
    "predict",
]
