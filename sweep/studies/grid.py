"""Study kind `grid`: the metrics over a grid of two named directions from a centre.

Candidate (a, b) is centre + a·(A − centre) + b·(B − centre), where A and B
are the two weights files under `directions`; the results columns carry the
directions' names. The candidates travel as one affine recipe: the centre and
the two directions go to each worker once, each batch carries coefficients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..files import resolve_file
from ..plotting import Figure, RunView, cmap, figure, label, metric_title, pivot, save, value_scale
from ..recipes import AffineRows, anchor_set
from ..settings import Section, Text
from ._path import AlphaRange, alpha_values
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, difference, read_weights


class Config(Section):
    """Evaluate centre + a·(A − centre) + b·(B − centre) for every a and b of `steps`."""

    kind: Literal["grid"]
    centre: Text = Field(description="weights file at (0, 0)")
    directions: Dict[str, Text] = Field(description="two weights files by name; each direction is file − centre")
    steps: AlphaRange = Field(description="{start, stop, num} along each direction")

    @field_validator("centre")
    @classmethod
    def _centre(cls, value: str, info: ValidationInfo) -> str:
        return resolve_file(value, info)

    @field_validator("directions")
    @classmethod
    def _directions(cls, value: Dict[str, str], info: ValidationInfo) -> Dict[str, str]:
        if len(value) != 2 or not all(name.isidentifier() for name in value):
            raise ValueError(f"give two directions named like Python identifiers, got {list(value)}")
        return {name: resolve_file(path, info) for name, path in value.items()}


class Grid(StudyBase):
    default_batch_size = 4096

    def __init__(self, config: Config):
        self.steps = alpha_values(config.steps)
        self.columns = {name: pa.float64() for name in config.directions}
        centre = read_weights(config.centre, "study.centre")
        directions = [difference(read_weights(path, f"study.directions.{name}"), centre,
                                 f"study.directions.{name}", "the centre")
                      for name, path in config.directions.items()]
        self.use_anchors(anchor_set(centre, directions))

    def __len__(self) -> int:
        return len(self.steps) ** 2

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        n, names = len(self.steps), list(self.columns)
        for start in range(0, len(self), batch_size):
            ids = np.array([i for i in range(start, min(len(self), start + batch_size)) if i not in skip], np.int64)
            if len(ids):
                coeffs = np.stack([self.steps[ids % n], self.steps[ids // n]], axis=1)
                yield CandidateBatch(ids, {}, RecipeBatch(self.key, AffineRows(coeffs, names)))


def plan(config: Config, context: Optional[StudyContext] = None) -> Grid:
    return Grid(config)


FIGURES = ("grid.png",)


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """grid.png: each metric as a heat map over the two directions, brighter where better."""
    a, b = run.recipe
    fig, axes = figure(len(run.metrics))
    for ax, metric in zip(axes, run.metrics):
        xs, ys, grid = pivot(run.floats(a), run.floats(b), run.floats(metric))
        scale = value_scale(grid, run.mode_of(metric))  # log or clipped where that shows the good values
        image = ax.pcolormesh(xs, ys, grid, shading="nearest", norm=scale.norm(), cmap=cmap(run.mode_of(metric)))
        scale.colorbar(fig, image, ax, run.metric_label(metric, scale))
        ax.set(title=metric_title(run, metric), xlabel=label(a), ylabel=label(b))
    save(fig, folder / "grid.png")
    return [Figure(folder / "grid.png", f"Each metric over {a} × {b}, brighter where better; (0, 0) is the centre.")]


def example(bench: Any) -> Dict[str, Any]:
    return {"kind": "grid", "centre": bench.checkpoint(0), "steps": {"start": -1, "stop": 1, "num": 3},
            "directions": {"sharper": bench.checkpoint(1), "smoother": bench.checkpoint(2)}}
