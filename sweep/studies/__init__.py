"""Study kinds: each file defines a `Config` (with a `kind` literal) and `plan(config)`.

A new study is one file here plus one line in `STUDIES`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Dict

from . import checkpoints, interpolate, perturb

STUDIES: Dict[str, ModuleType] = {
    "checkpoints": checkpoints,
    "interpolate": interpolate,
    "perturb": perturb,
}


def plan(study_config):
    """The planned study for a validated `study` config section."""
    return STUDIES[study_config.kind].plan(study_config)
