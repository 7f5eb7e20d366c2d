"""Study kinds: each file defines a `Config` (with a `kind` literal) and `plan(config)`.

A new study is one file here plus one line in `STUDIES`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Dict

from . import align, checkpoints, interpolate, landscape, merge, pbt, perturb, search

STUDIES: Dict[str, ModuleType] = {
    "checkpoints": checkpoints,
    "interpolate": interpolate,
    "perturb": perturb,
    "landscape": landscape,
    "merge": merge,
    "align": align,
    "pbt": pbt,
    "search": search,
}


def plan(study_config, context=None):
    """The planned study for a validated `study` config section (`context`: a `StudyContext`)."""
    return STUDIES[study_config.kind].plan(study_config, context)
