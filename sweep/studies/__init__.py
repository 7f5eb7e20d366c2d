"""The study registry: a kind of study is one module here plus one line in `STUDIES`.

A study module provides:
- `Config(Section)` with `kind: Literal["<kind>"]`: its `study:` config section;
- `plan(config, context) -> Study`: the planned study (`base.StudyBase` gives the defaults): its
  `fields()` (results columns with roles), `anchors()`, `len()`, `default_batch_size`,
  `batches(batch_size, skip)` yielding `CandidateBatch`es or `WAIT` (every row so far reaches
  `observe` first), `bind`, `observe`, `summarise()`, `resumable` / `not_resumable`, `population`,
  `saved_members()`;
- `example(bench) -> dict`: the `study:` section of a tiny working config (the contract tests run it);
- optionally `figures(run, folder, notes)` with `FIGURES` (the PNG names it may write), and
  `page(run)` (extra HTML sections of the report).
Code that several studies share lives in private modules (`_path`, `_training`, …), never in another
study's module. The driver, the CLI, the report and the tests know studies only through this registry.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Optional

from . import align, checkpoints, grid, interpolate, landscape, merge, pbt, perturb, search
from .base import Study, StudyContext

STUDIES: Dict[str, ModuleType] = {
    "checkpoints": checkpoints,
    "interpolate": interpolate,
    "perturb": perturb,
    "landscape": landscape,
    "merge": merge,
    "align": align,
    "pbt": pbt,
    "search": search,
    "grid": grid,
}


def plan(study_config: Any, context: Optional[StudyContext] = None) -> Study:
    """The planned study for a validated `study` config section (`context`: what planning may need beyond it)."""
    return STUDIES[study_config.kind].plan(study_config, context)
