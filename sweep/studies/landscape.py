"""Study kind `landscape`: the loss surface on a line or a plane through a point.

Candidate (x, y) is centre + x·d_0 + y·d_1. The directions are either random
with the normalisation of Li et al. 2018 ("Visualizing the Loss Landscape of
Neural Nets"), drawn from `seed`, or given as checkpoints: `directions:
[b, c]` makes the plane through the centre and b and c (d_i = file_i −
centre), so the three models sit at (0, 0), (1, 0) and (0, 1).

Random directions follow the paper's reference code: each tensor of the
direction starts as N(0, 1); with `normalization: filter`, every filter (row
along the first dimension) is rescaled to the norm of the centre's filter;
`layer` rescales whole tensors, `none` leaves them. One-dimensional tensors
(biases, BatchNorm weights and statistics) get zero with `ignore: biasbn`,
else the centre's own values (the reference code's choice). Only parameters
move unless `buffers: true` (the paper's "states": BatchNorm running
statistics move too).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..files import resolve_file, resolve_files
from ..settings import Int, Section, Text
from ..errors import ConfigError
from ..recipes import AffineRows, anchor_set
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, difference, read_weights
from .interpolate import AlphaRange, alpha_values

#: Largest grid one landscape may ask for.
MAX_POINTS = 100_000_000


class Config(Section):
    """Evaluate a 1-D line (`x`) or a 2-D grid (`x` × `y`) around `center`."""

    kind: Literal["landscape"]
    center: Optional[Text] = Field(None, description="weights file at (0, 0) (default: the model's own weights)")
    directions: Union[Literal["random"], List[Text]] = Field(
        "random", description="'random', or one or two weights files: d_i = file_i − center")
    x: AlphaRange = Field(description="{start, stop, num} along the first direction")
    y: Optional[AlphaRange] = Field(None, description="{start, stop, num} along the second (omit for a line)")
    normalization: Literal["filter", "layer", "none"] = Field("filter", description="random directions only")
    ignore: Literal["biasbn", "none"] = Field("biasbn", description="zero 1-D tensors of random directions")
    buffers: bool = Field(False, description="random directions also move floating buffers (BatchNorm statistics)")
    seed: Int = Field(0, ge=0, lt=2**31, description="seed of the random directions")

    @field_validator("center")
    @classmethod
    def _center(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        return resolve_file(v, info)

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: Union[str, List[str]], info: ValidationInfo) -> Union[str, List[str]]:
        if isinstance(v, str):
            return v
        if not 1 <= len(v) <= 2:
            raise ValueError(f"give one or two weights files (a line or a plane), got {len(v)}")
        return resolve_files(v, info)

    @model_validator(mode="after")
    def _shape(self) -> "Config":
        dims = 2 if self.y is not None else 1
        if isinstance(self.directions, list) and len(self.directions) != dims:
            raise ValueError(f"directions: {len(self.directions)} files make a {'plane' if len(self.directions) == 2 else 'line'}, "
                             f"so {'give y: {{start, stop, num}}' if dims == 1 else 'leave out y'}")
        if self.x.num * (self.y.num if self.y is not None else 1) > MAX_POINTS:
            raise ValueError(f"x.num × y.num is more than {MAX_POINTS} points")
        return self


def random_direction(center: Dict[str, torch.Tensor], names: List[str], generator: torch.Generator,
                     normalization: str, ignore: str) -> Dict[str, torch.Tensor]:
    """One direction over `names`, normalised against `center` as Li et al.'s reference code does."""
    out = {}
    for name in names:
        w = center[name].detach().to(torch.float32)
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        if normalization == "filter":
            d = d * (w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)).reshape((-1,) + (1,) * (w.dim() - 1))
        elif normalization == "layer":
            d = d * (w.norm() / (d.norm() + 1e-10))
        out[name] = d
    return out


class Landscape(StudyBase):
    default_batch_size = 4096

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        self.xs = alpha_values(config.x)
        self.ys = alpha_values(config.y) if config.y is not None else None
        self.columns = {"x": pa.float64()} if self.ys is None else {"x": pa.float64(), "y": pa.float64()}
        center = self._center(config, context)
        if config.directions == "random":
            directions = self._random(config, center, context)
        else:
            directions = [difference(read_weights(path, f"study.directions[{i}]"), center,
                                     f"study.directions[{i}]", "the centre")
                          for i, path in enumerate(config.directions)]
        self.use_anchors(anchor_set(center, directions))

    @staticmethod
    def _center(config: Config, context: Optional[StudyContext]) -> Dict[str, torch.Tensor]:
        if config.center is not None:
            return read_weights(config.center, "study.center")
        if context is None:
            raise ConfigError("study.center: give a weights file (no model to take the centre from here)")
        return {k: v.detach().clone() for k, v in context.module().state_dict().items()}

    def _random(self, config: Config, center: Dict[str, torch.Tensor],
                context: Optional[StudyContext]) -> List[Dict[str, torch.Tensor]]:
        # Drawn in name order: a weights file's keys come back in no fixed order.
        floating = sorted(k for k, v in center.items() if v.is_floating_point())
        if not config.buffers:
            if context is None:
                raise ConfigError("study.buffers: telling parameters from buffers needs the model")
            params = {n for n, _ in context.module().named_parameters()}
            floating = [k for k in floating if k in params]
        generator = torch.Generator().manual_seed(config.seed)
        count = 2 if self.ys is not None else 1
        return [random_direction(center, floating, generator, config.normalization, config.ignore)
                for _ in range(count)]

    def __len__(self) -> int:
        return len(self.xs) * (len(self.ys) if self.ys is not None else 1)


    def coordinates(self, ids: np.ndarray) -> np.ndarray:
        """[k, D] (x, y) of candidate ids: row-major over the grid, x fastest."""
        if self.ys is None:
            return self.xs[ids][:, None]
        return np.stack([self.xs[ids % len(self.xs)], self.ys[ids // len(self.xs)]], axis=1)

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        for start in range(0, len(self), batch_size):
            ids = np.arange(start, min(len(self), start + batch_size), dtype=np.int64)
            if skip:
                ids = ids[[i not in skip for i in ids.tolist()]]
                if not len(ids):
                    continue
            coeffs = self.coordinates(ids)
            names = list(self.columns)
            rows = AffineRows(coeffs, names, {n: coeffs[:, d] for d, n in enumerate(names)})
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))


def plan(config: Config, context: Optional[StudyContext] = None) -> Landscape:
    return Landscape(config, context)
