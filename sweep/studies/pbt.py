"""Study kind `pbt`: population-based training of the shared module's architecture.

`population` members train side by side (see `sweep.population`): every
`interval` steps all members are evaluated on the eval data (one row each:
a *generation*); then the bottom `quantile` copy the weights and optimiser
state of a random member of the top quantile (exploit, on the device) and
explore: each searched hyperparameter is resampled with
`resample_probability`, else multiplied by a random one of
`perturbation_factors` (choices move to a neighbour). The defaults are Ray
Tune's (quantile 0.25, factors 1.2 / 0.8, resample 0.25), so results compare.

The driver owns every random choice (initial values, exploit, explore) with
one generator seeded by `seed`, so the same config gives the same table.
Kind `search` (sweep/studies/search.py) is the same training without exploit.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator

from ..settings import Float, ImportPath, Int, Kwargs, Section
from ..errors import ConfigError
from ..population import OPTIMIZERS, Dimension, exploit_pairs, loss_keywords
from .base import StudyBase, StudyContext

#: Member m of a study with `seed` starts from the factory run under torch seed `seed * SEED_STRIDE + m`.
SEED_STRIDE = 2**32
MAX_POPULATION = 1_000_000
MAX_STEPS = 100_000_000


class Distribution(Section):
    """A searched hyperparameter: uniform / loguniform in [low, high], int in [low, high], or choice."""

    distribution: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[Float] = None
    high: Optional[Float] = None
    values: Optional[List[Union[Int, Float]]] = None
    num: Int = Field(5, ge=1, le=10_000, description="grid points of a continuous range (search: grid)")

    @model_validator(mode="after")
    def _bounds(self) -> "Distribution":
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("a choice needs `values`, a non-empty list of numbers")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes `values`, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"{self.distribution} takes low and high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.distribution} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, got low={self.low:g}, high={self.high:g}")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low:g}")
        if self.distribution == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("int needs whole-number low and high")
        return self

    def dimension(self, name: str) -> Dimension:
        return Dimension(name, self.distribution, self.low if self.low is not None else 0.0,
                         self.high if self.high is not None else 0.0, tuple(self.values or ()))


class TrainLoader(Section):
    loader: ImportPath = Field(description="'package.module:function' returning a list of (x, y) training batches")
    kwargs: Kwargs = Field(default_factory=dict)


class TrainingConfig(Section):
    """What `pbt` and `search` share: the training, the optimiser and the hyperparameter space."""

    population: Int = Field(16, ge=1, le=MAX_POPULATION, description="members trained side by side")
    steps: Int = Field(ge=1, le=MAX_STEPS, description="training steps of every member")
    interval: Int = Field(ge=1, le=MAX_STEPS, description="steps between evaluations (one generation)")
    train: TrainLoader
    loss: ImportPath = Field(description="'package.module:function': (output, y, **hyperparameters) -> scalar")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    hyperparameters: Dict[str, Union[Float, Distribution]] = Field(
        description="optimiser and loss hyperparameters: a constant, or {distribution, low, high | values}")
    init: Literal["random", "model"] = Field(
        "random", description="each member from the factory under its own seed, or all from the model's weights")
    seed: Int = Field(0, ge=0, lt=2**31, description="seeds the members' starts and every random choice")

    @model_validator(mode="after")
    def _shape(self) -> "TrainingConfig":
        if self.steps % self.interval:
            raise ValueError(f"steps ({self.steps}) must be a multiple of interval ({self.interval})")
        return self


class Config(TrainingConfig):
    """Population-based training."""

    kind: Literal["pbt"]
    quantile: Float = Field(0.25, gt=0, le=0.5, description="bottom and top fraction of each exploit")
    perturbation_factors: List[Float] = Field(default_factory=lambda: [1.2, 0.8], min_length=1)
    resample_probability: Float = Field(0.25, ge=0, le=1)
    clip: bool = Field(False, description="keep explored values within [low, high] (Ray Tune does not)")


class Training(StudyBase):
    """A planned training study: the driver runs it generation by generation (`workers/training.py`)."""

    trains = True
    exploit = False
    default_batch_size = 1

    def __init__(self, config: TrainingConfig, context: Optional[StudyContext], population: int,
                 initial: List[Dict[str, float]]):
        from ..model import import_callable

        self.config = config
        self.population = population
        self.generations = config.steps // config.interval
        self.interval = config.interval
        self.dimensions = {n: v.dimension(n) for n, v in config.hyperparameters.items() if isinstance(v, Distribution)}
        self.constants = {n: float(v) for n, v in config.hyperparameters.items() if not isinstance(v, Distribution)}
        try:
            loss = import_callable(config.loss)
        except Exception as e:  # noqa: BLE001 - the user's import error is theirs to read
            raise ConfigError(f"study.loss: {e}") from None
        try:
            import_callable(config.train.loader)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"study.train.loader: {e}") from None
        accepted = loss_keywords(loss)
        known = set(OPTIMIZERS[config.optimizer])
        for name in config.hyperparameters:
            if name not in known and accepted is not None and name not in accepted:
                raise ConfigError(
                    f"study.hyperparameters.{name}: neither a hyperparameter of {config.optimizer} "
                    f"({', '.join(sorted(known))}) nor a keyword of the loss {config.loss}")
        if context is not None:
            norms = [type(m).__name__ for m in context.module().modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            if norms:
                raise ConfigError(f"model.factory: the module has {norms[0]} layers, whose training forward "
                                  f"updates running statistics; population training needs a module without")
        self.initial = initial
        self.columns: Dict[str, pa.DataType] = {"member": pa.int64(), "generation": pa.int64(),
                                                "parent": pa.int64(), "step": pa.int64()}
        for name, dim in self.dimensions.items():
            self.columns[name] = pa.int64() if dim.integer else pa.float64()
        self.hyper_names = list(self.dimensions)

    def __len__(self) -> int:
        return self.population * self.generations


    def batches(self, batch_size: int, skip: frozenset = frozenset()):
        raise TypeError("a training study runs generation by generation, not in batches")

    def hyper_values(self) -> Dict[str, List[float]]:
        """Every member's starting value of every hyperparameter (constants included)."""
        out = {n: [c] * self.population for n, c in self.constants.items()}
        for n in self.dimensions:
            out[n] = [h[n] for h in self.initial]
        return out

    def seed_of(self, member: int) -> int:
        return self.config.seed * SEED_STRIDE + member

    def next_generation(self, scores: Dict[int, float], hyper: Dict[int, Dict[str, float]]
                        ) -> List[tuple]:
        """(receiver, donor, new hyperparameters) for each exploit; none without exploit."""
        return []


class PBT(Training):
    exploit = True

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        self.rng = np.random.default_rng(config.seed)
        dims = {n: v.dimension(n) for n, v in config.hyperparameters.items() if isinstance(v, Distribution)}
        initial = [{n: d.sample(self.rng) for n, d in dims.items()} for _ in range(config.population)]
        super().__init__(config, context, config.population, initial)

    def next_generation(self, scores: Dict[int, float], hyper: Dict[int, Dict[str, float]]) -> List[tuple]:
        c = self.config
        out = []
        for receiver, donor in exploit_pairs(scores, c.quantile, self.mode, self.rng):
            values = {n: d.explore(hyper[donor][n], self.rng, c.perturbation_factors, c.resample_probability,
                                   clip=c.clip) for n, d in self.dimensions.items()}
            out.append((receiver, donor, values))
        return out


def plan(config: Config, context: Optional[StudyContext] = None) -> PBT:
    return PBT(config, context)
