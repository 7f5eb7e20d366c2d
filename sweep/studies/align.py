"""Study kind `align`: a model's path to a reference, before and after permutation alignment.

`model`'s hidden units are permuted to match `reference`'s by weight
matching (Ainsworth et al. 2023, Git Re-Basin) — the function stays the
same — and the permuted model is saved as `<run>/aligned/<model>.safetensors`.
The candidates are both straight paths at `alphas`: `path = original`
(reference → model) and `path = aligned` (reference → permuted model), so the
summary holds the barrier of each (`original_barrier_<metric>`,
`aligned_barrier_<metric>`).

Weight matching here permutes plain networks only: a chain of Linear / Conv
layers with the biases and norms between them (an MLP, a plain CNN). A model
with embeddings, attention, transposed linears (transformers' `Conv1D`) or
tied weights — a GPT, a BERT, a ViT — is refused before any work starts, with
a ConfigError that names the modules that make it so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..errors import ConfigError
from ..files import resolve_file
from ..lazy import torch
from ..plotting import (Figure, RunView, barrier_line, draw_path, figure, fmt, label, metric_title, path_barrier,
                        path_legend, place_labels, renderer_of, save, shade_extrapolation, value_scale)
from ..model import write_weights_file
from ..recipes import AffineRows, anchor_set
from ..settings import Float, Int, Section, Text
from ._path import AlphaRange, PathRows, alpha_values, in_module_order, load_endpoints, with_endpoints
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext

PATHS = ("original", "aligned")
#: Modules named in the refusal of a model that is not plain (the rest are counted).
MAX_NAMED_MODULES = 3


class Config(Section):
    """Align `model` to `reference`, then evaluate both straight paths at `alphas`."""

    kind: Literal["align"]
    reference: Text = Field(description="the weights file whose units stay where they are")
    model: Text = Field(description="the weights file whose hidden units are permuted")
    method: Literal["weight_matching"] = "weight_matching"
    alphas: Union[AlphaRange, List[Float]] = Field(
        default_factory=lambda: AlphaRange(start=0.0, stop=1.0, num=21),
        description="points along each path (default 21 from 0 to 1)")
    seed: Int = Field(0, ge=0, lt=2**31, description="seed of the weight matching's visiting order")
    max_iter: Int = Field(100, ge=1, le=100_000, description="most passes of weight matching")

    @field_validator("reference", "model")
    @classmethod
    def _file(cls, v: str, info: ValidationInfo) -> str:
        return resolve_file(v, info)


class Align(StudyBase):
    columns = {"path": pa.string(), "alpha": pa.float64()}
    default_batch_size = 4096

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        from ..align import AlignError, align  # loads scipy: only when a study aligns

        if context is not None:
            refuse_non_plain(context.module())
        reference, model = (in_module_order(e, context) for e in
                            load_endpoints([config.reference, config.model], field="study.reference/model"))
        try:
            aligned, info = align(reference, model, max_iter=config.max_iter, seed=config.seed)
        except AlignError as e:
            raise ConfigError(f"study.model: {e}") from None
        self.info = info
        if context is not None and context.artifacts is not None:
            self.saved: Optional[Path] = context.artifacts / "aligned" / f"{Path(config.model).stem}.safetensors"
            write_weights_file(aligned, self.saved)
        else:
            self.saved = None
        # Direction 0 leads to the model as it is, direction 1 to the aligned model.
        floating = [k for k in reference if reference[k].is_floating_point()]
        self.use_anchors(anchor_set(reference, [{k: other[k] - reference[k] for k in floating}
                                                for other in (model, aligned)]))
        self.alphas = with_endpoints(alpha_values(config.alphas), 1)
        self.rows = PathRows()

    def __len__(self) -> int:
        return 2 * len(self.alphas)


    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        """Ids 0 … K−1 are the original path, K … 2K−1 the aligned one."""
        k = len(self.alphas)
        ids = np.arange(2 * k, dtype=np.int64)
        if skip:
            ids = ids[[i not in skip for i in ids.tolist()]]
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            path = part // k
            alpha = self.alphas[part % k]
            coeffs = np.zeros((len(part), 2))
            coeffs[np.arange(len(part)), path] = alpha
            extra = {"path": np.array([PATHS[p] for p in path.tolist()], dtype=object), "alpha": alpha}
            rows = AffineRows(coeffs, ["original", "aligned"], extra)
            yield CandidateBatch(part, {}, RecipeBatch(self.key, rows))

    def observe(self, table: pa.Table) -> None:
        self.rows.add(table, ["path", "alpha", *self.metric_names])

    def summarise(self) -> Dict[str, float]:
        out: Dict[str, float] = {"align_similarity_before": self.info.similarity_before,
                                 "align_similarity_after": self.info.similarity_after}
        for path in PATHS:
            out.update(self.rows.barriers(list(self.metric_names), self.objective, self.mode, 1,
                                          path=path, prefix=f"{path}_"))
        return out


def not_plain(module: torch.nn.Module) -> Dict[str, List[str]]:
    """What keeps `module` from being a plain chain of Linear / Conv layers: what each kind of obstacle is →
    the modules (or parameters) that are one, in the module's order; empty when nothing does. Found:
    embeddings, attention (`nn.MultiheadAttention`, or a module whose class name says Attention; its own
    children are not looked at), transposed linears (transformers' `Conv1D`) and tied parameters. Residual
    connections do not show in the modules and are not found."""
    found: Dict[str, List[str]] = {}
    inside: List[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        kind = type(sub).__name__
        if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            found.setdefault(f"embeddings ({kind})", []).append(name or "the model")
        elif isinstance(sub, torch.nn.MultiheadAttention) or "attention" in kind.lower():
            found.setdefault(f"attention ({kind})", []).append(name or "the model")
            inside.append(name)
        elif kind == "Conv1D" and type(sub).__module__.startswith("transformers"):
            found.setdefault(f"linear layers that store their weight input-first ({kind})", []).append(name)
    first: Dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            found.setdefault("tied weights", []).append(f"{name} = {first[id(parameter)]}")
        else:
            first[id(parameter)] = name
    return found


def refuse_non_plain(module: torch.nn.Module) -> None:
    """Raise ConfigError, saying why and what align supports, when `module` is not a plain network."""
    found = not_plain(module)
    if not found:
        return
    parts = []
    for what, names in found.items():
        shown = ", ".join(names[:MAX_NAMED_MODULES]) + (f" and {len(names) - MAX_NAMED_MODULES} more"
                                                         if len(names) > MAX_NAMED_MODULES else "")
        parts.append(f"{what}: {shown}")
    raise ConfigError(
        f"study.kind: align permutes the hidden units of a plain network by weight matching: a chain of Linear / "
        f"Conv layers with the biases and norms between them (an MLP or a plain CNN). The model is a "
        f"{type(module).__name__}, which is not one; it has {'; '.join(parts)}. Embeddings, attention heads, "
        f"residual streams and tied weights need a permutation spec written for the architecture, which sweep "
        f"does not have. Interpolate or merge these checkpoints without alignment (study kind interpolate, merge "
        f"or landscape) instead.")


def plan(config: Config, context: Optional[StudyContext] = None) -> Align:
    return Align(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """One of the bench's checkpoints aligned to another, both paths at 3 alphas."""
    return {"kind": "align", "reference": bench.checkpoint(0), "model": bench.checkpoint(1),
            "alphas": {"start": 0.0, "stop": 1.0, "num": 3}}


# --------------------------------------------------------------------------- figures

#: The report figures this study may write.
FIGURES = ("align.png",)


#: How the legend names each path.
PATH_NAMES = {"original": "original: B as trained", "aligned": "aligned: B's units permuted to match A"}


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """align.png: each metric along the path from A to B, as trained and aligned, with each path's barrier."""
    alpha = run.floats("alpha")
    paths = run.texts("path")
    names = [p for p in PATHS if (paths == p).any()]
    names += sorted({p for p in paths if p is not None and p not in names})
    fig, axes = figure(len(run.metrics))
    labels = []
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        mode = run.mode_of(metric)
        shade_extrapolation(ax, alpha, 1)
        heights, texts = [], []
        for i, name in enumerate(names):
            on = paths == name
            bar = path_barrier(alpha[on], values[on], 1, mode)
            heights.append(f"{label(name)} {'n/a' if bar is None else fmt(bar.height)}")
            # Both paths start at A, and end at B or B permuted (the same function): the first names them.
            texts += draw_path(ax, alpha[on], values[on], 1, bar, color=f"C{i}",
                               label=label(PATH_NAMES.get(name, name)), ends=["A", "B"] if i == 0 else ["", ""])
            notes.append(barrier_line(metric, mode, bar, run.objective, prefix=f"{name} path: "))
        labels.append(texts)
        scale = value_scale(values, mode)
        scale.axis(ax, "y", values)
        ax.set_title(f"{metric_title(run, metric)}\nbarrier: {', '.join(heights)}", fontsize=10)
        ax.set_xlabel("α (model A at 0, model B at 1)")
        ax.set_ylabel(run.metric_label(metric, scale))
        ax.grid(alpha=0.3)
    path_legend(fig, axes[0], alpha, 1)
    fig.suptitle(f"{label(run.name)}: the path between two models before and after permutation alignment",
                 fontsize=11)
    renderer = renderer_of(fig)  # the layout, once: the labels are left out of it
    for ax, texts in zip(axes, labels):
        place_labels(ax, texts, renderer=renderer)
    path = folder / "align.png"
    save(fig, path)
    caption = ("Each metric along the straight path from model A to model B, with B as trained ('original') and "
               "with B's units permuted to match A ('aligned'); the arrows mark each path's barrier over its chord, "
               "and the panel titles give the heights.")
    return [Figure(path, caption)]
