"""sweep: evaluate many candidate parameter dicts against one shared torch module.

The public API lives here; everything else is reachable but private.
"""

from .errors import ConfigError, SweepError, WeightsError

#: The public names that need torch, imported on first use: the command line's help, `sweep show` and the
#: config's checks start without torch's import (a second and a half).
_LAZY = {
    "evaluate": "evaluator", "CandidatesError": "evaluator",
    "Affine": "recipes", "Merge": "recipes", "Noise": "recipes", "Recipe": "recipes", "Slerp": "recipes",
    "Stacked": "stacked",
    "FAILED": "types", "INVALID": "types", "OK": "types", "Invalid": "types",
    "check_candidate": "validate",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

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
