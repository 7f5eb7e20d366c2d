"""What the population studies (`pbt`, `search`) share: their config, and the study that trains a population
generation by generation. Not a study kind itself (not registered).

A planned `Training` study carries a `PopulationPlan` (`population`): the
driver starts the members on its workers from it, then runs the study's
rounds like any other study's. Round g is one batch of every member (ids
`g * size + m`) whose source is a `Train`: the exploits and explored values
decided after the rows of round g − 1 (a `WAIT` lies between rounds), then
`interval` training steps, then one evaluation row per member.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from .. import check_cache
from ..errors import ConfigError
from ..lazy import torch
from ..model import import_callable
from ..population import OPTIMIZERS, Dimension, PopulationPlan, Train, loss_keywords
from ..settings import Float, ImportPath, Int, Kwargs, Section
from .base import WAIT, CandidateBatch, StudyBase, StudyContext, Wait

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


def searched(config: TrainingConfig) -> Dict[str, Dimension]:
    """The searched hyperparameters of a training config, by name (the constants left out)."""
    return {n: v.dimension(n) for n, v in config.hyperparameters.items() if isinstance(v, Distribution)}


def _imported(spec: str, field: str) -> Any:
    """The function at `spec`; a ConfigError naming `field` when it does not import."""
    try:
        return import_callable(spec)
    except Exception as e:  # noqa: BLE001 - the user's import error is theirs to read
        raise ConfigError(f"{field}: {e}") from None


def _loss_keywords(spec: str) -> Optional[List[str]]:
    """The keywords the loss at `spec` takes besides (output, y), sorted; None when it takes any."""
    accepted = loss_keywords(_imported(spec, "study.loss"))
    return sorted(accepted) if accepted is not None else None


def batch_norms(module: Any) -> List[str]:
    """The class names of the module's batch-norm layers, in the module's order."""
    return [type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def best_member(scores: Dict[int, Optional[float]], mode: str) -> Optional[int]:
    """The member with the best finite score (the lowest id among equals); None when no score is finite.

    A NaN or ±inf score is never best, whatever the mode: a loss of −inf is a
    diverged member, not the winner.
    """
    finite = {m: v for m, v in scores.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    pick = max if mode == "max" else min
    return pick(sorted(finite), key=lambda m: finite[m])


class Training(StudyBase):
    """A planned population study: every member trained `interval` steps, then evaluated (one generation),
    `steps / interval` times; `next_generation` decides the exploits between generations (none here).

    The best member of the last generation (finite scores only) is the finding
    and is saved as `best.safetensors`.
    """

    exploit = False
    lineage = ("member", "generation", "parent", "step")
    resumable = False
    not_resumable = "the members' weights lived on its workers"
    #: the file the best member of the last generation is saved to, in the run folder
    BEST_FILE = "best.safetensors"

    def __init__(self, config: TrainingConfig, context: Optional[StudyContext], population: int,
                 initial: List[Dict[str, float]]):
        self.config = config
        self.size = population
        self.generations = config.steps // config.interval
        self.interval = config.interval
        self.dimensions = searched(config)
        self.constants = {n: float(v) for n, v in config.hyperparameters.items() if not isinstance(v, Distribution)}
        # What needs the user's code imported is a fact of the checks before a run, kept with them
        # (`sweep.check_cache`): a run whose checks were kept imports neither that code nor torch here.
        accepted = check_cache.fact(f"keywords of the loss {config.loss}", lambda: _loss_keywords(config.loss))
        check_cache.fact(f"imports {config.train.loader}",
                         lambda: callable(_imported(config.train.loader, "study.train.loader")))
        known = set(OPTIMIZERS[config.optimizer])
        for name in config.hyperparameters:
            if name not in known and accepted is not None and name not in accepted:
                raise ConfigError(
                    f"study.hyperparameters.{name}: neither a hyperparameter of {config.optimizer} "
                    f"({', '.join(sorted(known))}) nor a keyword of the loss {config.loss}")
        if context is not None:
            norms = check_cache.fact("batch-norm layers of the module", lambda: batch_norms(context.module()))
            if norms:
                raise ConfigError(f"model.factory: the module has {norms[0]} layers, whose training forward "
                                  f"updates running statistics; population training needs a module without")
        self.initial = initial
        self.columns: Dict[str, pa.DataType] = {"member": pa.int64(), "generation": pa.int64(),
                                                "parent": pa.int64(), "step": pa.int64()}
        for name, dim in self.dimensions.items():
            self.columns[name] = pa.int64() if dim.integer else pa.float64()
        self.hyper_names = list(self.dimensions)
        hyper = {n: [c] * population for n, c in self.constants.items()}
        for n in self.dimensions:
            hyper[n] = [h[n] for h in initial]
        self.population = PopulationPlan(
            size=population, optimizer=config.optimizer, loss=config.loss, loader=config.train.loader,
            loader_kwargs=dict(config.train.kwargs), hyper=hyper,
            seeds=None if config.init == "model" else [config.seed * SEED_STRIDE + m for m in range(population)])
        # A generation is one batch of every member (cut by shard on the workers), whatever the batch size.
        self.default_batch_size = population
        self._scores: Dict[int, Dict[int, float]] = {}  # generation → member → objective (NaN: not ok)

    def __len__(self) -> int:
        return self.size * self.generations

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[Union[CandidateBatch, Wait]]:
        """Generation g: one batch of every member (`batch_size` does not apply), then (with exploit) `WAIT`:
        the exploits of the next generation are decided from the rows of this one. Nothing can be skipped: the members'
        weights are not in the rows."""
        if skip:
            raise ValueError(f"a {self.config.kind} study cannot skip candidates: {self.not_resumable}")
        size = self.size
        members = list(range(size))
        current = {m: {n: values[m] for n, values in self.population.hyper.items()} for m in members}
        parents: List[int] = list(members)
        donors: List[Optional[int]] = [None] * size
        explored: List[Optional[Dict[str, float]]] = [None] * size
        for g in range(self.generations):
            yield CandidateBatch(ids=np.arange(size, dtype=np.int64) + g * size,
                                 columns=self._columns(g, parents, current),
                                 source=Train(list(members), donors, explored, [self.interval] * size))
            if g == self.generations - 1:
                return
            parents, donors, explored = list(members), [None] * size, [None] * size
            if self.exploit:  # without exploit nothing waits for a generation's rows: the workers go straight on
                yield WAIT
                scores = self._scores.pop(g, {})
                moves = self.next_generation({m: scores.get(m, math.nan) for m in members}, current)
                for receiver, donor, values in moves:
                    parents[receiver] = donors[receiver] = donor
                    explored[receiver] = values
                    current[receiver] = {**current[donor], **values}

    def _columns(self, generation: int, parents: Sequence[int], current: Dict[int, Dict[str, float]]
                 ) -> Dict[str, List[Any]]:
        """Each member's row in generation `generation`: who it continued from, its steps, its searched values."""
        size = self.size
        columns: Dict[str, List[Any]] = {
            "member": list(range(size)),
            "generation": [generation] * size,
            "parent": list(parents),
            "step": [(generation + 1) * self.interval] * size,
        }
        for name in self.hyper_names:
            integer = pa.types.is_integer(self.columns[name])
            columns[name] = [int(current[m][name]) if integer else float(current[m][name]) for m in range(size)]
        return columns

    def observe(self, table: pa.Table) -> None:
        """Each member's objective in its generation (NaN where the row is not ok: ranked last, never best).
        Without exploit only the last generation's are kept (the best member is all they are read for)."""
        if table.num_rows == 0:
            return
        for m, g, v in zip(table.column("member").to_pylist(), table.column("generation").to_pylist(),
                           self._values(table)):
            if self.exploit or g == self.generations - 1:
                self._scores.setdefault(g, {})[m] = v

    def _values(self, table: pa.Table) -> List[float]:
        """Each row's objective; NaN where the row is not ok or has none."""
        ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_pylist()
        values = (table.column(self.objective).to_pylist() if self.objective in table.column_names
                  else [None] * table.num_rows)
        return [v if okay and v is not None else math.nan for okay, v in zip(ok, values)]

    def next_generation(self, scores: Dict[int, float], hyper: Dict[int, Dict[str, float]]) -> List[tuple]:
        """(receiver, donor, new hyperparameter values) for each exploit; none without exploit."""
        return []

    def _best(self) -> Optional[int]:
        return best_member(self._scores.get(self.generations - 1, {}), self.mode)

    def summarise(self) -> Dict[str, float]:
        """The best member of the last generation and its objective (nothing when no score is finite)."""
        best = self._best()
        if best is None:
            return {}
        return {"best_member": float(best), f"best_member_{self.objective}": self._scores[self.generations - 1][best]}

    def saved_members(self) -> Dict[str, int]:
        best = self._best()
        return {} if best is None else {self.BEST_FILE: best}


def example_section(kind: str, bench: Any, **extra: Any) -> Dict[str, Any]:
    """The `study:` section of a tiny training study on the bench's model: 4 members, 2 generations."""
    return {"kind": kind, "population": 4, "steps": 4, "interval": 2,
            "train": {"loader": bench.train_loader}, "loss": bench.loss, "optimizer": "sgd",
            "hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.01, "high": 0.1}, "momentum": 0.5},
            "seed": 0, **extra}
