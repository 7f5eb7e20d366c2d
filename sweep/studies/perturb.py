"""Study kind `perturb`: `count` seeded Gaussian perturbations of a base.

Candidate k is base + sigma·ε(seed · 2**32 + k), ε read from the shared
noise table (`sweep.noise`; `sweep.Noise.epsilon` rebuilds one candidate's
ε alone), so the same config gives the same candidates on any run, worker
and device. Batches carry only seeds.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..files import resolve_file
from ..recipes import NoiseRows, anchor_set
from ..settings import Float, Int, Section, Text
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, read_weights

#: Largest `count` one sweep may ask for.
MAX_COUNT = 1_000_000_000
#: Candidate k of a sweep with `seed` reads the noise of seed `seed * SEED_STRIDE + k`.
SEED_STRIDE = 2**32


class Config(Section):
    """Evaluate `count` perturbations base + sigma·N(0, I)."""

    kind: Literal["perturb"]
    base: Optional[Text] = Field(None, description="weights file to perturb (default: the model's own weights)")
    sigma: Float = Field(gt=0, description="standard deviation of the noise (a finite number)")
    count: Int = Field(ge=1, le=MAX_COUNT, description="how many perturbations")
    seed: Int = Field(0, ge=0, lt=2**31, description="the sweep's seed")

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

    def __len__(self) -> int:
        return self.count


    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        for start in range(0, self.count, batch_size):
            ids = np.arange(start, min(self.count, start + batch_size), dtype=np.int64)
            if skip:
                ids = ids[[i not in skip for i in ids.tolist()]]
                if not len(ids):
                    continue
            rows = NoiseRows(self.seed * SEED_STRIDE + ids, self.sigma)
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))


def plan(config: Config, context: Optional[StudyContext] = None) -> Perturb:
    return Perturb(config)


def example(bench: Any) -> Dict[str, Any]:
    """Six small perturbations of one of the bench's checkpoints."""
    return {"kind": "perturb", "base": bench.checkpoint(0), "sigma": 0.01, "count": 6, "seed": 0}
