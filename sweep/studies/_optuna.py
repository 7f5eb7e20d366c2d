"""Optuna's samplers proposing a search's trials through its ask/tell interface.

A wave of `population` trials is asked for at once, trained side by side,
told each value every evaluation (`trial.report`, so Optuna's dashboard draws
their curves) and told its end: the last objective of a trial that ran its
full budget (COMPLETE), the value it stopped with at a rung (PRUNED: TPE uses
a pruned trial's intermediate values), or FAIL when its row was not ok. The
next wave is asked for only after that, so the sampler learns from every
trial before it.

The study lives in Optuna's storage: in memory by default, or the SQLite / RDB
URL the user names (`storage`), under `study_name`; an existing study of that
name is continued (its trials inform the sampler) when its direction agrees.
Optuna is an optional extra: without it a config naming it fails, saying so.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..population import Dimension

#: What a config says to install for model-based search.
EXTRA = "pip install 'sweep[optuna]'"


def optuna_module() -> Any:
    """`optuna`, or a ConfigError naming the extra when it is not installed or fails to import."""
    try:
        import optuna
    except ImportError as e:
        raise ConfigError(f"study.method: optuna needs the optuna extra, which is not installed ({e}): "
                          f"{EXTRA}") from None
    except Exception as e:  # noqa: BLE001 - a broken install says what broke
        raise ConfigError(f"study.method: optuna is installed but fails to import ({type(e).__name__}: {e}): "
                          f"reinstall it with {EXTRA}") from None
    return optuna


def make_sampler(name: str, kwargs: Dict[str, Any], seed: int) -> Any:
    """The Optuna sampler `name` (a class of `optuna.samplers`) built with `kwargs`; `seed` is passed when the
    sampler takes one and `kwargs` does not set it."""
    optuna = optuna_module()
    samplers = sorted(n for n in dir(optuna.samplers) if n.endswith("Sampler") and not n.startswith("_"))
    cls = getattr(optuna.samplers, name, None)
    if cls is None or name not in samplers:
        raise ConfigError(f"study.sampler.name: no Optuna sampler {name!r}; Optuna {optuna.__version__} has "
                          f"{', '.join(samplers)}")
    arguments = dict(kwargs)
    try:
        takes = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = {}
    if "seed" in takes and "seed" not in arguments:
        arguments["seed"] = seed
    try:
        return cls(**arguments)
    except Exception as e:  # noqa: BLE001 - the sampler's own message names the argument
        raise ConfigError(f"study.sampler: {name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())}) "
                          f"failed: {type(e).__name__}: {e}") from None


def check_sampler(name: str, kwargs: Dict[str, Any], seed: int, dims: Dict[str, Dimension]) -> None:
    """A ConfigError, before any work, when the sampler cannot propose this space: a name Optuna does not
    have, arguments it refuses, a package it needs that is not installed (CmaEsSampler's `cmaes`), a space
    it cannot search (BruteForceSampler over a continuous range). A trial is asked of a copy of it on a
    study in memory and told it failed."""
    optuna = optuna_module()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_study = optuna.create_study(sampler=make_sampler(name, kwargs, seed))
    proposals = Proposals(dims, trial_study)
    try:
        # Two trials, the first told complete: a sampler that models the space (CMA-ES) starts on the second.
        (number, _), = proposals.ask(1)
        trial_study.tell(proposals.trials.pop(number), 0.0)
        proposals.ask(1)
    except Exception as e:  # noqa: BLE001 - the sampler's own words name what it lacks
        hint = f" (pip install {e.name})" if isinstance(e, ImportError) and getattr(e, "name", None) else ""
        raise ConfigError(f"study.sampler: {name} cannot propose this search's space: "
                          f"{type(e).__name__}: {e}{hint}") from None
    finally:
        for number in list(proposals.trials):
            trial_study.tell(proposals.trials.pop(number), state=optuna.trial.TrialState.FAIL)


class Proposals:
    """An Optuna study, asked for trials by waves and told how they went."""

    def __init__(self, dims: Dict[str, Dimension], study: Any):
        self.optuna = optuna_module()
        self.dims = dims
        self.study = study
        self.trials: Dict[int, Any] = {}  # trial number → its FrozenTrial-to-be (an optuna.Trial)

    @classmethod
    def open(cls, dims: Dict[str, Dimension], mode: str, sampler: Any, storage: Optional[str],
             study_name: str) -> "Proposals":
        """The Optuna study `study_name` in `storage` (created, or continued when its direction agrees)."""
        optuna = optuna_module()
        direction = "maximize" if mode == "max" else "minimize"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(storage=storage, sampler=sampler, study_name=study_name,
                                        direction=direction, load_if_exists=True)
        except Exception as e:  # noqa: BLE001 - a bad URL, an unreachable database
            raise ConfigError(f"study.storage: Optuna could not open {storage!r}: {type(e).__name__}: {e}") from None
        if study.direction.name.lower() != direction:
            raise ConfigError(f"study.study_name: the Optuna study {study_name!r} in {storage} is to "
                              f"{study.direction.name.lower()}; this search's objective is to {direction}: "
                              f"name another study")
        return cls(dims, study)

    def ask(self, count: int) -> List[Tuple[int, Dict[str, float]]]:
        """`count` new trials: (number, {name: value}) each."""
        out = []
        for _ in range(count):
            trial = self.study.ask()
            values = {}
            for name, d in self.dims.items():
                if d.distribution == "choice":
                    values[name] = float(trial.suggest_categorical(name, list(d.values)))
                elif d.distribution == "int":
                    values[name] = float(trial.suggest_int(name, int(d.low), int(d.high)))
                else:
                    values[name] = float(trial.suggest_float(name, d.low, d.high, log=d.distribution == "loguniform"))
            self.trials[trial.number] = trial
            out.append((trial.number, values))
        return out

    def report(self, number: int, value: float, step: int) -> None:
        if math.isfinite(value):
            self.trials[number].report(float(value), step)

    def tell(self, number: int, value: float, pruned: bool) -> None:
        """The trial's end: pruned at a rung, else complete with `value` (FAIL when it is not finite)."""
        state = self.optuna.trial.TrialState
        trial = self.trials.pop(number)
        if not math.isfinite(value):
            self.study.tell(trial, state=state.FAIL)
        elif pruned:
            self.study.tell(trial, state=state.PRUNED)
        else:
            self.study.tell(trial, float(value))

    def abandon(self) -> None:
        """Trials asked for but never told (the sweep stopped): told FAIL so the study does not keep them
        running."""
        for number in list(self.trials):
            self.study.tell(self.trials.pop(number), state=self.optuna.trial.TrialState.FAIL)
