"""Study kind `search`: hyperparameter search with every configuration trained side by side.

The machinery of `pbt` without exploit. `method: random` draws `trials`
configurations from the space (seeded by `seed`); `method: grid` trains
every combination of the grid (every choice and integer, `num` points of a
continuous range, log-spaced for loguniform), and the population is the
grid's size; `method: optuna` has an Optuna sampler (TPE by default, any of
`optuna.samplers` by name) propose them through its ask/tell interface
(`sweep/studies/_optuna.py`). Every `interval` steps each member is
evaluated: one row per member per generation, as in `pbt`.

`population` members train at once. With more `trials` than that, the trials
come in waves of `population`: a wave's trials start afresh in the members'
slots (weights from the factory under the trial's seed, optimiser state
zeroed) once the wave before has ended; an Optuna sampler is told every
trial of a wave before it proposes the next.

With `halving`, members stop at rungs (`sweep/studies/_halving.py`:
synchronous successive halving, HyperBand with brackets): a stopped member's
rows leave the stacked population, so each later step trains and evaluates
fewer rows. The row at which a member stopped says why (`stopped`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Iterator, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..population import MODEL_START, Train
from ..settings import Int, Kwargs, Section, Text
from ._halving import HalvingConfig, Rungs
from ._search_figures import SearchFigures
from ._training import MAX_POPULATION, SEED_STRIDE, Training, TrainingConfig, example_section, searched
from .base import WAIT, CandidateBatch, StudyContext, Wait

MAX_TRIALS = 10_000_000


class SamplerConfig(Section):
    """An Optuna sampler by its class name in `optuna.samplers`, and its arguments."""

    name: Text = Field("TPESampler", description="a class of optuna.samplers: TPESampler, GPSampler, CmaEsSampler, …")
    kwargs: Kwargs = Field(default_factory=dict, description="its arguments; seed defaults to study.seed")


class Config(TrainingConfig):
    """Random, grid or model-based search, trained side by side; optionally halved at rungs."""

    kind: Literal["search"]
    method: Literal["random", "grid", "optuna"] = Field(
        "random", description="random draws, every combination, or an Optuna sampler's proposals")
    trials: Optional[Int] = Field(None, ge=1, le=MAX_TRIALS,
                                  description="configurations in all, in waves of `population`; default population")
    halving: Optional[HalvingConfig] = Field(None, description="stop the worst members at rungs (successive halving)")
    sampler: Optional[SamplerConfig] = Field(None, description="method optuna: the sampler (default TPESampler)")
    storage: Optional[Text] = Field(None, description="method optuna: an Optuna storage URL; default in memory")
    study_name: Optional[Text] = Field(None, description="method optuna: the Optuna study's name; default the config's")

    @model_validator(mode="after")
    def _method_fields(self) -> "Config":
        if self.method != "optuna":
            for name in ("sampler", "storage", "study_name"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for method optuna; this search's method is {self.method}")
        if self.method == "grid" and self.trials is not None:
            raise ValueError("trials is for methods random and optuna: a grid's trials are its combinations")
        return self


class Search(Training):
    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        dims = searched(config)
        self.method = config.method
        self.draws: List[Dict[str, float]] = []
        if config.method == "grid":
            axes = [d.grid(config.hyperparameters[n].num) for n, d in dims.items()]
            size = int(np.prod([len(a) for a in axes])) if axes else 1
            if size > MAX_POPULATION:
                raise ConfigError(f"study.hyperparameters: the grid has {size} combinations, more than {MAX_POPULATION}")
            self.draws = [dict(zip(dims, combo)) for combo in itertools.product(*axes)]
            population = len(self.draws)
            if "population" in config.model_fields_set and config.population != population:
                raise ConfigError(f"study.population: the grid has {population} combinations, the config asks for "
                                  f"{config.population}; leave population out with method: grid")
            trials = population
        else:
            population = config.population
            trials = config.trials if config.trials is not None else population
            if config.method == "random":
                rng = np.random.default_rng(config.seed)
                self.draws = [{n: d.sample(rng) for n, d in dims.items()} for _ in range(trials)]
            else:
                from ._optuna import check_sampler

                sampler = config.sampler or SamplerConfig()
                check_sampler(sampler.name, dict(sampler.kwargs), config.seed, dims)  # fails before any work
            population = min(population, trials)
        # Until a sampler proposes them, the members' values are the space's lowest (every round sets its own).
        placeholder = {n: float(d.values[0]) if d.distribution == "choice" else float(d.low) for n, d in dims.items()}
        initial = self.draws[:population] if self.draws else [dict(placeholder) for _ in range(population)]
        super().__init__(config, context, population, initial)
        self.trial_count = trials
        self.sizes = [min(population, trials - start) for start in range(0, trials, population)]
        self.waved = len(self.sizes) > 1 or config.method == "optuna"
        self.rungs: List[Optional[Rungs]] = [None] * len(self.sizes)
        if config.halving is not None:
            try:
                self.rungs = [Rungs(config.halving, config.steps, config.interval, n, fewer_brackets=w > 0)
                              for w, n in enumerate(self.sizes)]
            except ValueError as e:
                raise ConfigError(f"study.{e}") from None
        # The columns: the lineage of pbt's rows, then the trial and wave, then the rungs; then the values.
        values = {n: self.columns.pop(n) for n in self.hyper_names}
        lineage = ["member", "generation", "parent", "step"]
        if self.waved:
            self.columns.update(trial=pa.int64(), wave=pa.int64())
            lineage += ["trial", "wave"]
        if config.halving is not None:
            self.columns.update(bracket=pa.int64(), rung=pa.int64(), stopped=pa.string())
            lineage += ["bracket", "rung", "stopped"]
        self.columns.update(values)
        self.lineage = tuple(lineage)
        self.proposals: Any = None
        self.sweep_name = context.name if context is not None else "sweep"
        # What the rounds decided: the members that go on, and each trial's end.
        self._going_on: List[int] = []
        self._slots: Dict[int, Dict[str, Any]] = {}  # member → {trial, values, bracket} in the current wave
        self._rung_rows: Dict[int, Optional[int]] = {}  # member → the rung its row of the round being made decides
        self.ends: Dict[int, Dict[str, Any]] = {}  # trial → {member, wave, value, step, stopped, values}
        self.member_steps = 0

    # ------------------------------------------------------------------- rows

    def __len__(self) -> int:
        return sum(r.rows(self.interval, self.config.steps) if r is not None else n * self.generations
                   for r, n in zip(self.rungs, self.sizes))

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[Union[CandidateBatch, Wait]]:
        """Wave by wave, generation by generation: one batch of every member still going on, then `WAIT` (the
        rows settle the rungs and tell the sampler before the next round is made)."""
        if skip:
            raise ValueError(f"a {self.config.kind} study cannot skip candidates: {self.not_resumable}")
        try:
            yield from self._waves()
        except BaseException:  # the sweep stopped (or the driver closed this generator): no trial stays running
            if self.proposals is not None:
                self.proposals.abandon()
            raise

    def _waves(self) -> Iterator[Union[CandidateBatch, Wait]]:
        c = self.config
        size = self.size
        for w, n in enumerate(self.sizes):
            first_trial = w * size
            if self.method == "optuna":
                if self.proposals is None:
                    self.proposals = self._open_proposals()
                proposed = self.proposals.ask(n)
            else:
                proposed = [(first_trial + i, self.draws[first_trial + i]) for i in range(n)]
            rungs = self.rungs[w]
            self._slots = {m: {"trial": number, "values": values, "index": first_trial + m,
                               "bracket": rungs.bracket[m] if rungs is not None else None}
                           for m, (number, values) in enumerate(proposed)}
            self._going_on = list(range(n))
            for g in range(self.generations):
                members = list(self._going_on)
                step = (g + 1) * self.interval
                fresh = g == 0 and (w > 0 or self.method == "optuna")
                starts = None
                if g == 0 and w > 0:
                    starts = [MODEL_START if c.init == "model" else c.seed * SEED_STRIDE + self._slots[m]["index"]
                              for m in members]
                hyper = [dict(self._slots[m]["values"]) for m in members] if fresh else [None] * len(members)
                self._rung_rows = {m: rungs.rung_at(self._slots[m]["bracket"], step) if rungs is not None else None
                                   for m in members}
                generation = w * self.generations + g
                yield CandidateBatch(
                    ids=np.asarray(members, dtype=np.int64) + generation * size,
                    columns=self._round_columns(members, generation, step, w),
                    source=Train(members, [None] * len(members), hyper, [self.interval] * len(members),
                                 starts=starts, retire=True))
                self.member_steps += self.interval * len(members)
                if w == len(self.sizes) - 1 and g == self.generations - 1:
                    return
                # The next round waits for this one's rows only when they decide something: a rung (who goes
                # on), or the end of a sampler's wave (what it proposes next). Else the workers go straight on.
                decides = any(rung is not None for rung in self._rung_rows.values())
                if decides or (g == self.generations - 1 and self.method == "optuna"):
                    yield WAIT

    def _open_proposals(self) -> Any:
        from ._optuna import Proposals, make_sampler

        c = self.config
        sampler = c.sampler or SamplerConfig()
        return Proposals.open(self.dimensions, self.mode, make_sampler(sampler.name, dict(sampler.kwargs), c.seed),
                              c.storage, c.study_name or self.sweep_name)

    def _round_columns(self, members: List[int], generation: int, step: int, wave: int) -> Dict[str, List[Any]]:
        columns: Dict[str, List[Any]] = {
            "member": list(members),
            "generation": [generation] * len(members),
            "parent": list(members),
            "step": [step] * len(members),
        }
        if self.waved:
            columns["trial"] = [self._slots[m]["trial"] for m in members]
            columns["wave"] = [wave] * len(members)
        if self.config.halving is not None:
            columns["bracket"] = [self._slots[m]["bracket"] for m in members]
            columns["rung"] = [self._rung_rows[m] for m in members]
        for name in self.hyper_names:
            integer = pa.types.is_integer(self.columns[name])
            columns[name] = [int(self._slots[m]["values"][name]) if integer else float(self._slots[m]["values"][name])
                             for m in members]
        return columns

    # ------------------------------------------------------------------- what a round decides

    def settle(self, table: pa.Table) -> pa.Table:
        """A round's rows: the sampler is told each member's value; at a rung the members of each bracket
        there are ranked and the worst stop (their row says why); at the end of a wave every trial's end is
        told and kept."""
        if table.num_rows == 0 or not (self.waved or self.config.halving is not None):
            return table
        # Everything is read from the rows themselves: rounds that decide nothing are not waited for, so the
        # study may already be making a later round (of a later wave) when this one lands.
        members = table.column("member").to_pylist()
        step = table.column("step")[0].as_py()
        wave = self._wave_of(table)
        trials = table.column("trial").to_pylist() if "trial" in table.column_names else members
        values = self._values(table)
        stopped: Dict[int, str] = {}
        rungs = self.rungs[wave]
        if rungs is not None:
            brackets: Dict[tuple, Dict[int, float]] = {}
            for m, bracket, rung, value in zip(members, table.column("bracket").to_pylist(),
                                               table.column("rung").to_pylist(), values):
                if rung is not None:
                    brackets.setdefault((bracket, rung), {})[m] = value
            for (bracket, rung), scores in sorted(brackets.items()):
                for decision in rungs.decide(bracket, rung, scores, self.mode):
                    if not decision.goes_on:
                        stopped[decision.member] = decision.reason or ""
        last = step == self.config.steps
        for i, (m, trial, value) in enumerate(zip(members, trials, values)):
            if self.proposals is not None:
                self.proposals.report(trial, value, step)
            if m in stopped or last:
                row = {n: table.column(n)[i].as_py() for n in self.hyper_names}
                self.ends[trial] = {"member": m, "wave": wave, "value": value, "step": step,
                                    "stopped": m in stopped, "values": row}
                if self.proposals is not None:
                    self.proposals.tell(trial, value, pruned=m in stopped)
        if stopped:  # a rung's round is always waited for: the members going on are still this wave's
            self._going_on = [m for m in self._going_on if m not in stopped]
        if self.config.halving is not None:
            column = pa.array([stopped.get(m) for m in members], pa.string())
            table = table.append_column("stopped", column) if "stopped" not in table.column_names else \
                table.set_column(table.schema.get_field_index("stopped"), "stopped", column)
        return table

    def _wave_of(self, table: pa.Table) -> int:
        return int(table.column("generation")[0].as_py()) // self.generations

    # ------------------------------------------------------------------- the outcome

    def _best_end(self) -> Optional[int]:
        """The trial with the best value among those that ran the full budget (finite values only)."""
        finished = {t: e["value"] for t, e in self.ends.items()
                    if not e["stopped"] and e["value"] is not None and math.isfinite(e["value"])}
        if not finished:
            return None
        pick = max if self.mode == "max" else min
        return pick(sorted(finished), key=lambda t: finished[t])

    def summarise(self) -> Dict[str, float]:
        if not (self.waved or self.config.halving is not None):
            return super().summarise()
        out: Dict[str, float] = {"trials_finished": float(sum(not e["stopped"] for e in self.ends.values())),
                                 "trials_stopped": float(sum(e["stopped"] for e in self.ends.values())),
                                 "member_steps": float(self.member_steps)}
        best = self._best_end()
        if best is not None:
            out["best_trial"] = float(best)
            out[f"best_trial_{self.objective}"] = self.ends[best]["value"]
        return out

    def saved_members(self) -> Dict[str, int]:
        """The best trial's weights, when they are still on the workers: it ran in the last wave."""
        if not (self.waved or self.config.halving is not None):
            return super().saved_members()
        best = self._best_end()
        if best is None or self.ends[best]["wave"] != len(self.sizes) - 1:
            return {}
        return {self.BEST_FILE: self.ends[best]["member"]}


def plan(config: Config, context: Optional[StudyContext] = None) -> Search:
    return Search(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """A random search of 4 members over 2 generations on the bench's model."""
    return example_section("search", bench, method="random")


# --------------------------------------------------------------------------- figures

#: The report draws a population whose members train side by side, never copying each other, with the
#: rungs and budget of halving and the trials of waves (see `_search_figures`).
REPORT = SearchFigures()
#: The report figures this study may write.
FIGURES = REPORT.names
figures = REPORT.figures
page = REPORT.page
