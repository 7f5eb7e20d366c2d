"""Study kind `interpolate`: the path through two or more checkpoints, straight or spherical.

With endpoints E_0 … E_{n−1}, `alpha` runs along the path: alpha = j is E_j,
alpha = j + t (0 ≤ t ≤ 1) is E_j + t·(E_{j+1} − E_j) (`method: linear`) or
the per-tensor SLERP between them (`method: slerp`), and alphas below 0 or
above n − 1 extend the first or last segment. The candidates travel as one
recipe: the endpoints go to each worker once, each batch carries alphas.

The endpoints themselves are evaluated too (added after the configured
alphas when those miss them; `barrier: false` leaves them out), so the loss barrier — the most the path rises
above the straight chord between its endpoints' values — is a summary metric
(`barrier_<metric>`). `align: weight_matching` first permutes each endpoint's
hidden units to match the one before it (Git Re-Basin), saving the aligned
checkpoints under `<run>/aligned/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..files import resolve_files
from ..lazy import torch
from ..plotting import (Figure, RunView, alpha_label, barrier_line, draw_path, figure, label, metric_title,
                        path_barrier, path_legend, place_labels, renderer_of, save, shade_extrapolation,
                        value_scale)
from ..errors import ConfigError
from ..model import write_weights_file
from ..recipes import AffineRows, AnchorSet, Rows, SlerpRows, anchor_set
from ..settings import Int, Section, Text
from ._path import (MAX_ALPHAS, AlphaRange, Alphas, PathRows, alpha_values, in_module_order, load_endpoints,
                    path_coefficients, with_endpoints)
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext


class Config(Section):
    """Evaluate the path through `endpoints` at each alpha."""

    kind: Literal["interpolate"]
    endpoints: List[Text] = Field(min_length=2,
                                  description="weights files or checkpoint folders along the path, in order")
    alphas: Alphas = Field(description="a list of alphas, or {start, stop, num}")
    method: Literal["linear", "slerp"] = Field("linear", description="straight lines, or per-tensor SLERP")
    align: Literal["none", "weight_matching"] = Field(
        "none", description="permute each endpoint's hidden units to match the one before it first")
    align_seed: Int = Field(0, ge=0, lt=2**31, description="seed of the weight matching's visiting order")
    barrier: bool = Field(True, description="also evaluate the endpoints the alphas miss, for the loss barrier")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, values: List[str], info: ValidationInfo) -> List[str]:
        return resolve_files(values, info)

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: Union[AlphaRange, List[float]]) -> Union[AlphaRange, List[float]]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one alpha")
        if isinstance(v, list) and len(v) > MAX_ALPHAS:
            raise ValueError(f"at most {MAX_ALPHAS} alphas")
        return v


def path_rows(method: str, alphas: np.ndarray, segments: int, extra: Dict[str, np.ndarray]) -> Rows:
    """The rows for `alphas` along a path of `segments` segments, straight or spherical."""
    if method == "slerp":
        j = np.clip(np.floor(alphas), 0, segments - 1).astype(np.int64)
        return SlerpRows(j, alphas - j, extra)
    return AffineRows(path_coefficients(alphas, segments), [f"segment_{j}" for j in range(segments)], extra)


def path_anchors(method: str, endpoints: List[Dict[str, torch.Tensor]]) -> AnchorSet:
    """Straight paths carry the base and the differences; spherical ones the points themselves."""
    base = endpoints[0]
    floating = [k for k in base if base[k].is_floating_point()]
    if method == "slerp":
        return anchor_set(base, [{k: nxt[k] for k in floating} for nxt in endpoints[1:]])
    return anchor_set(base, [{k: b[k] - a[k] for k in floating} for a, b in zip(endpoints, endpoints[1:])])


def aligned_chain(endpoints: List[Dict[str, torch.Tensor]], seed: int, context: Optional[StudyContext],
                  names: List[str]) -> List[Dict[str, torch.Tensor]]:
    """Each endpoint permuted to match the (already aligned) one before it; saved under `<run>/aligned/`."""
    from ..align import AlignError, align  # loads scipy: only when a study aligns

    artifacts = context.artifacts if context is not None else None
    endpoints = [in_module_order(e, context) for e in endpoints]
    out = [endpoints[0]]
    for i in range(1, len(endpoints)):
        try:
            aligned, _ = align(out[-1], endpoints[i], seed=seed)
        except AlignError as e:
            raise ConfigError(f"study.align: endpoint {i}: {e}") from None
        out.append(aligned)
        if artifacts is not None:
            write_weights_file(aligned, artifacts / "aligned" / f"{i:02d}-{Path(names[i]).stem}.safetensors")
    return out


class Interpolate(StudyBase):
    columns = {"alpha": pa.float64()}
    default_batch_size = 4096

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        endpoints = load_endpoints(config.endpoints)
        if config.align == "weight_matching":
            endpoints = aligned_chain(endpoints, config.align_seed, context, config.endpoints)
        self.segments = len(endpoints) - 1
        self.alphas = alpha_values(config.alphas)
        if config.barrier:
            self.alphas = with_endpoints(self.alphas, self.segments)
        self.method = config.method
        self.use_anchors(path_anchors(config.method, endpoints))
        self.rows = PathRows()

    def __len__(self) -> int:
        return len(self.alphas)


    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        todo = np.array([i for i in range(len(self)) if i not in skip], dtype=np.int64) if skip else np.arange(len(self))
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            rows = path_rows(self.method, self.alphas[ids], self.segments, {"alpha": self.alphas[ids]})
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))

    def observe(self, table: pa.Table) -> None:
        self.rows.add(table, ["alpha", *self.metric_names])

    def summarise(self) -> Dict[str, float]:
        return self.rows.barriers(list(self.metric_names), self.objective, self.mode, self.segments)


def plan(config: Config, context: Optional[StudyContext] = None) -> Interpolate:
    return Interpolate(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """The straight path between two of the bench's checkpoints at 5 alphas."""
    return {"kind": "interpolate", "endpoints": [bench.checkpoint(0), bench.checkpoint(1)],
            "alphas": {"start": 0.0, "stop": 1.0, "num": 5}}


# --------------------------------------------------------------------------- figures

#: The report figures this study may write.
FIGURES = ("interpolate.png",)


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """interpolate.png: each metric along the path through the endpoints, with its barrier (also a Summary line)."""
    segments = _path_segments(run.study)
    alpha = run.floats("alpha")
    fig, axes = figure(len(run.metrics))
    labels = []
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        mode = run.mode_of(metric)
        bar = path_barrier(alpha, values, segments, mode)
        shade_extrapolation(ax, alpha, segments)
        labels.append(draw_path(ax, alpha, values, segments, bar, color="C0", label="the metric along the path",
                                ends=[f"E{j}" for j in range(segments + 1)]))
        scale = value_scale(values, mode)
        scale.axis(ax, "y", values)
        ax.set_title(metric_title(run, metric), fontsize=10)
        ax.set_xlabel(alpha_label(segments))
        ax.set_ylabel(run.metric_label(metric, scale))
        ax.grid(alpha=0.3)
        notes.append(barrier_line(metric, mode, bar, run.objective))
    path_legend(fig, axes[0], alpha, segments)
    fig.suptitle(f"{label(run.name)}: metrics along the interpolation path", fontsize=11)
    renderer = renderer_of(fig)  # the layout, once: the labels are left out of it
    for ax, texts in zip(axes, labels):
        place_labels(ax, texts, renderer=renderer)
    path = folder / "interpolate.png"
    save(fig, path)
    ends = getattr(run.study, "endpoints", None) or []
    names = ", ".join(f"E{j} = {Path(str(e)).name}" for j, e in enumerate(ends))
    how = "spherical (SLERP)" if getattr(run.study, "method", "linear") == "slerp" else "straight"
    caption = (f"Each metric along the {how} path through the endpoints ({names or 'endpoints at integer α'}): "
               f"dots mark the endpoints, dashed parts are extrapolated, the dotted line is the chord between "
               f"endpoints and the arrow marks the barrier (largest worsening over the chord).")
    return [Figure(path, caption)]


def _path_segments(study: Any) -> int:
    """Segments of the configured path: one fewer than its endpoints (1 when the config names none)."""
    endpoints = getattr(study, "endpoints", None)
    try:
        return max(1, len(endpoints) - 1)
    except TypeError:
        return 1
