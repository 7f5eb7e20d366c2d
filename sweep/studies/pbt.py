"""Study kind `pbt`: population-based training of the shared module's architecture.

`population` members train side by side (see `sweep.population`): every
`interval` steps all members are evaluated on the eval data (one row each:
a *generation*); then the bottom `quantile` copy the weights and optimiser
state of a random member of the top quantile (exploit, on the device) and
explore: each searched hyperparameter is resampled with
`resample_probability`, else multiplied by a random one of
`perturbation_factors` (choices move to a neighbour). The defaults are Ray
Tune's (quantile 0.25, factors 1.2 / 0.8, resample 0.25), so results compare.

The study owns every random choice (initial values, exploit, explore) with
one generator seeded by `seed`, so the same config gives the same table; the
workers only carry them out (see `sweep/studies/_training.py`). Kind `search`
(sweep/studies/search.py) is the same training without exploit.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

import numpy as np
from pydantic import Field

from ..errors import ConfigError
from ..population import exploit_pairs
from ..settings import Float
from ._pb2 import PB2Explore
from ._population_figures import PopulationFigures
from ._training import Training, TrainingConfig, example_section, searched
from .base import StudyContext


class Config(TrainingConfig):
    """Population-based training."""

    kind: Literal["pbt"]
    quantile: Float = Field(0.25, gt=0, le=0.5, description="bottom and top fraction of each exploit")
    perturbation_factors: List[Float] = Field(default_factory=lambda: [1.2, 0.8], min_length=1)
    resample_probability: Float = Field(0.25, ge=0, le=1)
    clip: bool = Field(False, description="keep explored values within [low, high] (Ray Tune does not)")
    explore: Literal["perturb", "pb2"] = Field(
        "perturb", description="perturb the donor's values (PBT), or choose them by a GP-UCB bandit (PB2)")


class PBT(Training):
    """Population-based training: between generations the bottom quantile exploits the top and explores."""

    exploit = True

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        self.rng = np.random.default_rng(config.seed)
        dims = searched(config)
        initial = [{n: d.sample(self.rng) for n, d in dims.items()} for _ in range(config.population)]
        super().__init__(config, context, config.population, initial)
        self.pb2: Optional[PB2Explore] = None
        if config.explore == "pb2":
            try:
                self.pb2 = PB2Explore(dims, "max", self.rng)  # the mode is bound later: see `bind`
            except ValueError as e:
                raise ConfigError(f"study.hyperparameters.{e}") from None
        self._starts: Dict[int, float] = {}  # member → the objective it started this generation at
        self._generation = 0

    def bind(self, objective: Optional[str], mode: str, metric_names=()) -> None:
        super().bind(objective, mode, metric_names)
        if self.pb2 is not None:
            self.pb2.sign = 1.0 if mode == "max" else -1.0

    def next_generation(self, scores: Dict[int, float], hyper: Dict[int, Dict[str, float]]) -> List[tuple]:
        """(receiver, donor, explored values) for each member of the bottom quantile, drawn from `self.rng`;
        with PB2 the values come from its bandit, fed this generation's improvements first."""
        c = self.config
        self._generation += 1
        pairs = exploit_pairs(scores, c.quantile, self.mode, self.rng)
        if self.pb2 is not None:
            if self._starts:
                self.pb2.observe(self._generation, self._starts, scores, hyper)
            receivers = {r for r, _ in pairs}
            running = [hyper[m] for m in scores if m not in receivers]
            proposed = self.pb2.propose(self._generation + 1, [scores[d] for _, d in pairs], running)
            self._starts = dict(scores)
            out = []
            for (receiver, donor), values in zip(pairs, proposed):
                self._starts[receiver] = scores[donor]
                out.append((receiver, donor, values))
            return out
        out = []
        for receiver, donor in pairs:
            values = {n: d.explore(hyper[donor][n], self.rng, c.perturbation_factors, c.resample_probability,
                                   clip=c.clip) for n, d in self.dimensions.items()}
            out.append((receiver, donor, values))
        return out


def plan(config: Config, context: Optional[StudyContext] = None) -> PBT:
    return PBT(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """A pbt study of 4 members over 2 generations on the bench's model: one exploit between them."""
    return example_section("pbt", bench, quantile=0.25)


# --------------------------------------------------------------------------- figures

#: The report draws a population whose members copy better members' weights (see `_population_figures`).
REPORT = PopulationFigures(exploits=True)
#: The report figures this study may write.
FIGURES = REPORT.names
figures = REPORT.figures
page = REPORT.page
