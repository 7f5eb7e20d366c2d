"""sweep: evaluate many candidate parameter dicts against one shared torch module.

The public API lives here; everything else is reachable but private.
"""

from .errors import ConfigError, SweepError, WeightsError
from .evaluator import CandidatesError, evaluate
from .recipes import Affine, Merge, Noise, Recipe, Slerp
from .stacked import Stacked
from .types import FAILED, INVALID, OK, Invalid
from .validate import check_candidate

__all__ = [
    "evaluate",
    "Affine",
    "Noise",
    "Slerp",
    "Merge",
    "Recipe",
    "Stacked",
    "check_candidate",
    "Invalid",
    "OK",
    "INVALID",
    "FAILED",
    "CandidatesError",
    "ConfigError",
    "SweepError",
    "WeightsError",
]
__version__ = "0.1.0"
