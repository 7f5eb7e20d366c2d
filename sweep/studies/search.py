"""Study kind `search`: hyperparameter search with every configuration trained side by side.

The machinery of `pbt` without exploit: `method: random` draws `population`
configurations from the space (seeded by `seed`); `method: grid` trains
every combination of the grid (every choice and integer, `num` points of a
continuous range, log-spaced for loguniform), and the population is the
grid's size. Every `interval` steps each member is evaluated: one row per
member per generation, as in `pbt`.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Literal, Optional

import numpy as np
from pydantic import Field

from ..errors import ConfigError
from ._population_figures import PopulationFigures
from ._training import MAX_POPULATION, Training, TrainingConfig, example_section, searched
from .base import StudyContext


class Config(TrainingConfig):
    """Random or grid search, trained side by side."""

    kind: Literal["search"]
    method: Literal["random", "grid"] = Field("random", description="random draws, or every combination")


class Search(Training):
    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        dims = searched(config)
        if config.method == "grid":
            axes = [d.grid(config.hyperparameters[n].num) for n, d in dims.items()]
            size = int(np.prod([len(a) for a in axes])) if axes else 1
            if size > MAX_POPULATION:
                raise ConfigError(f"study.hyperparameters: the grid has {size} combinations, more than {MAX_POPULATION}")
            initial = [dict(zip(dims, combo)) for combo in itertools.product(*axes)]
            population = len(initial)
            if "population" in config.model_fields_set and config.population != population:
                raise ConfigError(f"study.population: the grid has {population} combinations, the config asks for "
                                  f"{config.population}; leave population out with method: grid")
        else:
            rng = np.random.default_rng(config.seed)
            initial = [{n: d.sample(rng) for n, d in dims.items()} for _ in range(config.population)]
            population = config.population
        super().__init__(config, context, population, initial)


def plan(config: Config, context: Optional[StudyContext] = None) -> Search:
    return Search(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """A random search of 4 members over 2 generations on the bench's model."""
    return example_section("search", bench, method="random")


# --------------------------------------------------------------------------- figures

#: The report draws a population whose members train side by side, never copying each other
#: (see `_population_figures`).
REPORT = PopulationFigures(exploits=False)
#: The report figures this study may write.
FIGURES = REPORT.names
figures = REPORT.figures
page = REPORT.page
