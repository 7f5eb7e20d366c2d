"""Study kind `perturb`: `count` seeded Gaussian perturbations of a base, and the base itself.

Candidate k is base + sigma·ε(seed · 2**32 + k), ε read from the shared
noise table (`sweep.noise`; `sweep.Noise.epsilon` rebuilds one candidate's
ε alone), so the same config gives the same candidates on any run, worker
and device. Batches carry only seeds. Unless `base_row: false`, the
unperturbed base is evaluated too, as candidate `count` with a null `seed`:
the reference every perturbation is read against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..files import resolve_file
from ..lazy import torch
from ..plotting import Figure, RunView, fmt, histogram
from ..recipes import NoiseRows, Prepared, anchor_set
from ..settings import Float, Int, Section, Text
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, read_weights

#: Largest `count` one sweep may ask for.
MAX_COUNT = 1_000_000_000
#: Candidate k of a sweep with `seed` reads the noise of seed `seed * SEED_STRIDE + k`.
SEED_STRIDE = 2**32


class Config(Section):
    """Evaluate `count` perturbations base + sigma·N(0, I)."""

    kind: Literal["perturb"]
    base: Optional[Text] = Field(
        None, description="weights file or checkpoint folder to perturb (default: the model's own weights)")
    sigma: Float = Field(gt=0, description="standard deviation of the noise (a finite number)")
    count: Int = Field(ge=1, le=MAX_COUNT, description="how many perturbations")
    seed: Int = Field(0, ge=0, lt=2**31, description="the sweep's seed")
    base_row: bool = Field(True, description="evaluate the unperturbed base too, as the last row (seed null)")

    @field_validator("base")
    @classmethod
    def _base(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        return resolve_file(v, info)


class Perturb(StudyBase):
    columns = {"seed": pa.int64()}
    default_batch_size = 4096

    def __init__(self, config: Config):
        base = read_weights(config.base, "study.base") if config.base is not None else None
        self.use_anchors(anchor_set(base, []))
        self.count = config.count
        self.sigma = config.sigma
        self.seed = config.seed
        self.base_row = config.base_row

    def __len__(self) -> int:
        return self.count + int(self.base_row)

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        for start in range(0, self.count, batch_size):
            ids = np.arange(start, min(self.count, start + batch_size), dtype=np.int64)
            if skip:
                ids = ids[[i not in skip for i in ids.tolist()]]
                if not len(ids):
                    continue
            rows = NoiseRows(self.seed * SEED_STRIDE + ids, self.sigma)
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))
        if self.base_row and self.count not in skip:
            yield CandidateBatch(np.array([self.count], np.int64), {}, RecipeBatch(self.key, BaseRow()))


@dataclass
class BaseRow:
    """The recipe's base alone, unperturbed: one row whose `seed` is null."""

    def __len__(self) -> int:
        return 1

    def slice(self, start: int, stop: int) -> "BaseRow":
        if len(range(1)[start:stop]) != 1:
            raise ValueError("the base row cannot be split")
        return self

    def columns(self) -> Dict[str, pa.Array]:
        return {"seed": pa.nulls(1, pa.int64())}

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        if out is None:
            out = torch.empty((1, base.numel()), dtype=torch.float32, device=device)
        return out.copy_(base.unsqueeze(0))

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        return prepared.absmax["base"].reshape(1)  # the base's own magnitude; inf (checked) when it is not finite


def plan(config: Config, context: Optional[StudyContext] = None) -> Perturb:
    return Perturb(config)


def example(bench: Any) -> Dict[str, Any]:
    """Six small perturbations of one of the bench's checkpoints."""
    return {"kind": "perturb", "base": bench.checkpoint(0), "sigma": 0.01, "count": 6, "seed": 0}


# --------------------------------------------------------------------------- figures

#: The report figures this study may write.
FIGURES = ("objective.png",)


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """objective.png: the objective over the perturbations, with the unperturbed base's value as a dashed line
    when the run knows it (a row without a seed, or `base_<objective>` among run.json's findings)."""
    base = base_value(run, run.objective)
    sigma = getattr(run.study, "sigma", None)
    detail = f" (base + {fmt(sigma)}·N(0, I))" if sigma is not None else ""
    what = "perturbations" + detail
    if base is None:
        notes.append(f"the unperturbed base's {run.objective} is not in this run's results: the histogram has no "
                     f"reference line")
        return histogram(run, folder, notes, what="perturbations", detail=detail)
    values = run.floats(run.objective)
    worse = values > base if run.mode == "min" else values < base
    finite = np.isfinite(values) & np.isfinite(run.floats("seed"))
    notes.append(f"the base's {run.objective}: {fmt(base)}; {int((worse & finite).sum())} of {int(finite.sum())} "
                 f"{what} are worse")
    return histogram(run, folder, notes, reference=(base, "unperturbed base"), what="perturbations",
                     rows=np.isfinite(run.floats("seed")), detail=detail)


def base_value(run: RunView, metric: str) -> Optional[float]:
    """The unperturbed base's `metric`: its row (the one ok row without a seed), else run.json's
    `findings.base_<metric>`; None when the run has neither."""
    values = run.floats(metric)
    row = ~np.isfinite(run.floats("seed")) & np.isfinite(values)
    if row.any():
        return float(values[row][0])
    found = (run.record.get("findings") or {}).get(f"base_{metric}") if isinstance(run.record, dict) else None
    if isinstance(found, (int, float)) and not isinstance(found, bool) and np.isfinite(found):
        return float(found)
    return None
