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

from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..files import resolve_file, resolve_files
from ..lazy import torch
from ..plotting import (MIN_FONT_SIZE, Figure, RunView, Scale, best_index, cmap, figure, fmt, label, metric_title,
                        pivot, pivot_counts, save, value_scale)
from ..errors import ConfigError
from ..recipes import AffineRows, anchor_set
from ..settings import Int, Section, Text
from ._path import AlphaRange, alpha_values
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, difference, read_weights

#: Largest grid one landscape may ask for.
MAX_POINTS = 100_000_000


class Config(Section):
    """Evaluate a 1-D line (`x`) or a 2-D grid (`x` × `y`) around `center`."""

    kind: Literal["landscape"]
    center: Optional[Text] = Field(
        None, description="weights file or checkpoint folder at (0, 0) (default: the model's own weights)")
    directions: Union[Literal["random"], List[Text]] = Field(
        "random", description="'random', or one or two weights files or checkpoint folders: d_i = file_i − center")
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


def example(bench: Any) -> Dict[str, Any]:
    """A 3 × 3 plane of random directions around one of the bench's checkpoints."""
    return {"kind": "landscape", "center": bench.checkpoint(0), "x": {"start": -1.0, "stop": 1.0, "num": 3},
            "y": {"start": -1.0, "stop": 1.0, "num": 3}, "seed": 0}


# --------------------------------------------------------------------------- figures

#: The report figures this study may write.
FIGURES = ("landscape.png",)
#: Contour levels of a 2-D landscape.
CONTOUR_LEVELS = 16


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """landscape.png: each metric over the plane (contours) or along the line, with the models and the best
    point marked; the best point and the value at each mark are Summary lines."""
    x = run.floats("x")
    y = run.floats("y")
    two_d = "y" in run.ok.column_names and bool(np.isfinite(y).any())
    xlabel, ylabel = _landscape_axes(run)
    marks = _landscape_marks(run, two_d)
    objective_values = run.floats(run.objective)
    best = best_index(objective_values, run.mode)
    if best is not None:
        at = f"x = {fmt(x[best])}" + (f", y = {fmt(y[best])}" if two_d else "")
        notes.append(f"best {run.objective}: {fmt(objective_values[best])} at {at}")
    for mx, my, name in marks:
        on = np.isclose(x, mx) & (np.isclose(y, my) if two_d else True)
        if on.any() and np.isfinite(objective_values[on]).any():
            notes.append(f"{run.objective} at {name}: {fmt(np.nanmean(objective_values[on]))}")
    if two_d:
        return [_landscape_2d(run, folder, x, y, marks, xlabel, ylabel)]
    fig, axes = figure(len(run.metrics))
    scales = []
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        xs, _, grid = pivot(x, np.zeros_like(x), values)
        line = grid[0] if grid.size else np.zeros(0)
        ax.plot(xs, line, "-o", ms=3, color="C0", label="the metric along the line")
        lo, hi = (xs.min(), xs.max()) if len(xs) else (0.0, 0.0)
        shown = [(mx, name) for mx, _, name in marks if lo <= mx <= hi]
        for mx, _ in shown:
            ax.axvline(mx, color="0.4", ls=":", lw=1)
        if shown:  # named on a top axis, where no curve runs over them
            top = ax.secondary_xaxis("top")
            top.set_ticks([mx for mx, _ in shown], labels=[name for _, name in shown], fontsize=MIN_FONT_SIZE + 1)
        best_i = best_index(line, run.mode_of(metric)) if grid.size else None
        if best_i is not None:
            ax.plot(xs[best_i], line[best_i], "*", ms=13, color="C3", mec="black", label="best point", zorder=4)
        scale = value_scale(line, run.mode_of(metric))
        scale.axis(ax, "y", line)
        scales.append(scale)
        ax.set_title(metric_title(run, metric), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(run.metric_label(metric, scale))
        ax.grid(alpha=0.3)
    fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside lower center", ncol=2, frameon=False,
               fontsize=MIN_FONT_SIZE + 1)
    fig.suptitle(f"{label(run.name)}: the loss landscape along one direction", fontsize=11)
    path = folder / "landscape.png"
    save(fig, path)
    return [Figure(path, f"Each metric along the 1-D slice (x); dotted lines (named above the panel) mark "
                         f"{', '.join(m[2] for m in marks)}; the star is the best point"
                         f"{_scale_words(run, scales)}.")]


def _landscape_marks(run: RunView, two_d: bool) -> List[Tuple[float, float, str]]:
    """The named points of the plane: the models its directions point to, or the centre of random directions."""
    directions = getattr(run.study, "directions", None)
    if isinstance(directions, (list, tuple)):
        marks = [(0.0, 0.0, "model 0"), (1.0, 0.0, "model 1")]
        return marks + [(0.0, 1.0, "model 2")] if two_d else marks
    return [(0.0, 0.0, "the centre")]


def _landscape_axes(run: RunView) -> Tuple[str, str]:
    if isinstance(getattr(run.study, "directions", None), (list, tuple)):
        return "x (model 0 → model 1)", "y (model 0 → model 2)"
    return "x (first direction)", "y (second direction)"


def _scale_words(run: RunView, scales: List[Scale]) -> str:
    """'; log scale for loss' and the like: which metric got which scale, for a caption."""
    notes: Dict[str, List[str]] = {}
    for metric, scale in zip(run.metrics, scales):
        if scale.note:
            notes.setdefault(scale.note, []).append(metric)
    return "".join(f"; {note} for {', '.join(metrics)}" for note, metrics in notes.items())


#: Markers of the named points of a plane (the centre or model 0, model 1, model 2), in `_landscape_marks` order.
MARK_SHAPES = ("o", "s", "^")


def _landscape_2d(run: RunView, folder: Path, x: np.ndarray, y: np.ndarray, marks: List[Tuple[float, float, str]],
                  xlabel: str, ylabel: str) -> Figure:
    from matplotlib.lines import Line2D

    fig, axes = figure(len(run.metrics), width=4.6, height=4.0)
    scales, most = [], 1
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        xs, ys, grid = pivot(x, y, values)
        most = max(most, int(pivot_counts(x, y, values).max(initial=1)))
        finite = grid[np.isfinite(grid)]
        mode = run.mode_of(metric)
        scale = value_scale(finite, mode)
        scales.append(scale)
        if len(xs) < 2 or len(ys) < 2 or finite.size < 4:
            keep = np.isfinite(values) & np.isfinite(x) & np.isfinite(y)
            drawn = ax.scatter(x[keep], y[keep], c=values[keep], cmap=cmap(mode), norm=scale.norm(), s=25)
            scale.colorbar(fig, drawn, ax, run.metric_label(metric, scale))
        else:
            levels = scale.levels(CONTOUR_LEVELS)
            masked = np.ma.masked_invalid(grid)
            filled = ax.contourf(xs, ys, masked, levels=levels, norm=scale.norm(), cmap=cmap(mode),
                                 extend=scale.extend)
            lines = ax.contour(xs, ys, masked, levels=levels[::3], colors="white", linewidths=0.6, norm=scale.norm())
            ax.clabel(lines, fmt=lambda v: f"{v:.3g}", fontsize=MIN_FONT_SIZE, colors="white")
            scale.colorbar(fig, filled, ax, run.metric_label(metric, scale), format="%.3g")
            best = best_index(grid.ravel(), mode)
            if best is not None:
                j, i = divmod(best, len(xs))
                ax.plot(xs[i], ys[j], "*", ms=15, color="C3", mec="white", zorder=5)
        x_lo, x_hi, y_lo, y_hi = np.nanmin(x), np.nanmax(x), np.nanmin(y), np.nanmax(y)
        for (mx, my, _), shape in zip(marks, MARK_SHAPES):
            if x_lo <= mx <= x_hi and y_lo <= my <= y_hi:
                ax.plot(mx, my, shape, ms=8, mfc="white", mec="black", zorder=5)
        ax.set_title(metric_title(run, metric), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    handles = [Line2D([], [], ls="", marker=shape, ms=8, mfc="white", mec="black", label=name)
               for (_, _, name), shape in zip(marks, MARK_SHAPES)]
    handles.append(Line2D([], [], ls="", marker="*", ms=13, color="C3", mec="black",
                          label="best point of each panel"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
               fontsize=MIN_FONT_SIZE + 1)
    fig.suptitle(f"{label(run.name)}: the landscape over the plane", fontsize=11)
    path = folder / "landscape.png"
    save(fig, path)
    per_point = "one value per grid point" if most == 1 else f"the mean of up to {most} values per grid point"
    return Figure(path, f"Contours of each metric over the (x, y) plane ({per_point}), brighter where better, "
                        f"with {', '.join(m[2] for m in marks)} and the best point marked"
                        f"{_scale_words(run, scales)}.")
