"""Report figures and the best-member section of a population trained side by side (studies pbt and search).

Such a study writes one row per member per generation (lineage columns
member, generation, parent, step; the searched hyperparameters as recipe
columns). Its report follows the population over training
(`training.png`), draws the final objective against each searched
hyperparameter (`hyperparameters.png`), and, where members copy each other's
weights (`exploits`: pbt's exploit), the lineage tree with the best member's
hyperparameter schedule (`lineage.png`); the page gets the best member of the
last generation with its schedule from `sweep.analysis.lineage`.

A search is ranked by trial instead (`Trials`): a trial is one configuration
trained from its start, named by the `trial` column where the rows have one
(a search in waves reuses each member slot for a new trial per wave, so a
slot's rows are several trials, never joined into one line) and by the member
otherwise. A trial stopped early (successive halving) has no rows after its
stop; the best trial is the best at its last row among those that ran the
full budget.

Not a study: shared by the study modules that train a population.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..analysis import lineage
from ..plotting import (MAX_FIGURE_WIDTH, MIN_FONT_SIZE, Figure, RunView, Scale, best_index, better, cmap,
                        column_floats, draw_each, escape, figure, fmt, html_table, integer_ticks, label, log_axis,
                        place_labels, point_label, renderer_of, save, status_mask, value_scale)
from ..types import OK

#: Members drawn in training.png (an evenly spaced subset of a larger population, plus the best lineage).
MAX_MEMBERS_DRAWN = 400
#: The lineage tree is drawn for populations up to this size (the schedule panels always).
MAX_TREE_MEMBERS = 256
#: Switches of the best lineage named in training.png.
MAX_SWITCHES_NAMED = 12
#: Largest (generations × members) grid a training report lays its rows on (about 1 GB of arrays).
MAX_GRID_CELLS = 25_000_000
#: Choices of a hyperparameter named in a panel's title.
MAX_CHOICES_NAMED = 6
#: Colours of training.png's and lineage.png's edges: a member continuing its own weights, and an exploit.
CONTINUE_COLOUR = "#9ecae1"
EXPLOIT_COLOUR = "#fd8d3c"
BEST_COLOUR = "#d62728"


@dataclass(frozen=True)
class PopulationFigures:
    """The report's part for a study that trains a population: the figures it may write (`names`), `figures`
    and the page's `page` section, as a study module exposes them (FIGURES, figures, page).

    `exploits`: members copy better members' weights (pbt's exploit); the report then also draws the lineage
    tree (lineage.png) and counts the exploits.
    """

    exploits: bool

    @property
    def names(self) -> Tuple[str, ...]:
        if self.exploits:
            return ("training.png", "lineage.png", "hyperparameters.png")
        return ("training.png", "hyperparameters.png")

    def figures(self, run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
        """training.png, lineage.png (with exploits) and hyperparameters.png."""
        exploits = self.exploits
        drawers = {"training": lambda r, f, n: _training(r, f, n, exploits)}
        if exploits:
            drawers["lineage"] = _lineage_figure
        drawers["hyperparameters"] = lambda r, f, n: _hyperparameters(r, f, n, exploits)
        return draw_each(run, folder, notes, drawers)

    def page(self, run: RunView) -> List[str]:
        """The section on the best member of the last generation (a search's best trial): its value, its
        schedule, and (with exploits) how often members copied."""
        if run.objective is None:
            return []
        return [_best_member(run, self.exploits)]


# --------------------------------------------------------------------------- the rows by trial

#: Lineage columns of a search's rows: the trial a row belongs to and its wave (a search in waves, or
#: Optuna's), the HyperBand bracket, the rung its row decided (null elsewhere) and why a trial stopped there.
TRIAL, WAVE, BRACKET, RUNG, STOPPED = "trial", "wave", "bracket", "rung", "stopped"


@dataclass
class Trials:
    """A search's rows by trial, trials in order of their number (`key`).

    A trial is named by the `trial` column where the rows have one (`numbered`), else by its member. Each
    trial's `rows` are its row indices in the run's table by generation (an ok row wins where a generation
    has several); `last` its last row, where it ended: at the full budget, at a rung that stopped it, or at a
    row that failed. `value` is the objective there (NaN unless ok and finite), `step` its training steps
    there; `full` a trial's full budget in steps (the study's `steps`, else the most any row has).
    """

    key: np.ndarray  # int64
    rows: List[np.ndarray]
    last: np.ndarray  # int64 row indices
    value: np.ndarray
    step: np.ndarray
    member: np.ndarray  # int64
    wave: np.ndarray  # float64: NaN without a wave column
    bracket: np.ndarray  # float64: NaN without a bracket column
    stopped: np.ndarray  # bool: a row of the trial says it stopped (successive halving)
    full: float
    numbered: bool
    best: Optional[int]  # index of the best trial (see `trials`)
    best_among: str  # e.g. "the best of the 4 trials that ran the full 1000 steps with a finite value"

    def __len__(self) -> int:
        return len(self.key)

    @property
    def completed(self) -> np.ndarray:
        """Trials that ran the full budget (not stopped at a rung, however their last row came out)."""
        return ~self.stopped & (self.step >= self.full)

    @property
    def failed(self) -> np.ndarray:
        """Trials whose last row has no value (not ok, or not finite)."""
        return ~np.isfinite(self.value)

    @property
    def waves(self) -> int:
        finite = self.wave[np.isfinite(self.wave)]
        return len(np.unique(finite)) if len(finite) else 1

    @property
    def uniform(self) -> bool:
        """Every trial is a member that ran the full budget: the rows of a plain search, one trial per member."""
        return not self.numbered and bool(self.completed.all())

    def name(self, i: int) -> str:
        """'trial 37' (or 'member 3' for rows without a trial column)."""
        return f"{'trial' if self.numbered else 'member'} {int(self.key[i])}"

    def where(self, i: int) -> str:
        """Where trial i ran, for a sentence: 'member 5, wave 2' ('' for a member)."""
        if not self.numbered:
            return ""
        parts = [f"member {int(self.member[i])}"]
        if np.isfinite(self.wave[i]) and self.waves > 1:
            parts.append(f"wave {int(self.wave[i])}")
        if np.isfinite(self.bracket[i]) and len(np.unique(self.bracket[np.isfinite(self.bracket)])) > 1:
            parts.append(f"bracket {int(self.bracket[i])}")
        return ", ".join(parts)

    def of_row(self, rows: int) -> np.ndarray:
        """The index of the trial of each of the table's `rows` rows (-1 for a row of no trial)."""
        out = np.full(rows, -1, dtype=np.int64)
        for i, own in enumerate(self.rows):
            out[own] = i
        return out


def trials(run: RunView) -> Optional[Trials]:
    """The run's rows by trial (computed once per run); None, with a page warning, when they cannot be laid
    out so."""
    return run.once("trials", _trials_or_warning)


def _trials_or_warning(run: RunView) -> Optional[Trials]:
    if run.objective is None:
        return None
    try:
        return _trials(run)
    except Exception as e:  # the page still shows the counts, the table and the errors
        run.warnings.append(f"could not follow the trials: {type(e).__name__}: {e}")
        return None


def stopped_rows(table: pa.Table) -> np.ndarray:
    """Which rows say a trial stopped there (a non-empty `stopped`)."""
    if STOPPED not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    column = table.column(STOPPED)
    said = pc.is_valid(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        said = pc.and_(said, pc.greater(pc.utf8_length(column), 0))
    return np.asarray(pc.fill_null(said, False).to_numpy(zero_copy_only=False), dtype=bool)


def _trials(run: RunView) -> Optional[Trials]:
    table = run.table
    missing = [c for c in ("member", "generation") if c not in table.column_names]
    if missing:
        run.warnings.append(f"the results have no {', '.join(missing)} column: not the rows of a {run.kind} "
                            f"study; no trials")
        return None
    numbered = TRIAL in table.column_names
    member, generation = column_floats(table, "member"), column_floats(table, "generation")
    key = column_floats(table, TRIAL) if numbered else member
    valid = np.isfinite(key) & np.isfinite(member) & np.isfinite(generation)
    if not valid.any():
        run.warnings.append("no row names its trial and generation: no trials")
        return None
    index = np.flatnonzero(valid)
    ok = status_mask(table, OK)
    # by trial, then generation, an ok row first; one row per (trial, generation)
    order = np.lexsort((~ok[index], generation[index], key[index]))
    index = index[order]
    k, g = key[index], generation[index]
    first = np.ones(len(index), dtype=bool)
    first[1:] = (k[1:] != k[:-1]) | (g[1:] != g[:-1])
    index, k = index[first], k[first]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    rows = np.split(index, starts[1:])
    last = np.array([r[-1] for r in rows], dtype=np.int64)
    objective = column_floats(table, run.objective)
    value = np.where(ok[last], objective[last], np.nan)
    value[~np.isfinite(value)] = np.nan
    steps = column_floats(table, "step")
    step = steps[last]
    stops = stopped_rows(table)
    stopped = np.array([bool(stops[r].any()) for r in rows], dtype=bool)
    full = getattr(run.study, "steps", None)
    if not isinstance(full, (int, float)) or isinstance(full, bool) or not full > 0:
        finite = steps[np.isfinite(steps)]
        full = float(finite.max()) if len(finite) else math.inf
    result = Trials(key=k[starts].astype(np.int64), rows=rows, last=last, value=value, step=step,
                    member=member[last].astype(np.int64), wave=column_floats(table, WAVE)[last],
                    bracket=column_floats(table, BRACKET)[last], stopped=stopped, full=float(full),
                    numbered=numbered, best=None, best_among="")
    # The best: among the trials that ran the full budget; a trial stopped at a rung was judged on fewer steps.
    completed = result.completed & np.isfinite(value)
    what = "trial" if numbered else "member"
    if completed.any():
        pool = completed
        early = bool(stopped.any() or not result.completed.all())  # some trials ended before the full budget
        result.best_among = _those(int(pool.sum()), what, f"that ran the full {fmt(full)} steps" if early else "")
    else:
        pool = np.isfinite(value)
        if pool.any():
            run.warnings.append(f"no {what} that ran the full {fmt(full)} steps has a finite {run.objective} at "
                                f"its end: the best is among those that ended earlier")
        result.best_among = _those(int(pool.sum()), what, "", "at their last row")
    result.best = best_index(np.where(pool, value, np.nan), run.mode)
    return result


def _those(count: int, noun: str, which: str, where: str = "") -> str:
    """'the best of the 4 trials that ran the full 1000 steps with a finite value', or 'the only trial with a
    finite value'."""
    which = f" {which}" if which else ""
    where = f" {where}" if where else ""
    if count == 1:
        return f"the only {noun}{which} with a finite value{where}"
    return f"the best of the {count} {noun}s{which} with a finite value{where}"


# --------------------------------------------------------------------------- the rows by member and generation


@dataclass
class Population:
    """A training study's rows on a (generation, member) grid.

    `row[g, m]` is the index in the run's table of member m's row at generation g (-1 where none; where a
    pair has several rows an ok one wins); `value` its objective (NaN unless ok and finite), `step` its
    training steps, `parent` its parent (-1 where none) and `trial` its trial (NaN where the rows have no
    trial column). `last` and `best` locate the best row: the best member of the last generation, or for a
    search (`trials`) the last row of its best trial; `chain` is its lineage, for a search the trial's rows.
    """

    row: np.ndarray
    value: np.ndarray
    step: np.ndarray
    parent: np.ndarray
    trial: np.ndarray
    last: Optional[int]  # the generation of the best row (pbt: the last generation with a finite objective)
    best: Optional[int]  # the member of the best row
    chain: List[Dict[str, Any]]  # lineage(best, last): generation 0 first; empty when broken
    exploits: int  # rows (distinct member and generation) with parent ≠ member
    trials: Optional[Trials] = None  # a search's rows by trial

    @property
    def generations(self) -> int:
        return self.row.shape[0]

    @property
    def members(self) -> int:
        return self.row.shape[1]

    @property
    def present(self) -> np.ndarray:
        return self.row >= 0

    @property
    def by_trial(self) -> bool:
        """A search whose trials are not simply its members at the full budget (waves, halving, Optuna)."""
        return self.trials is not None and not self.trials.uniform

    def best_value(self) -> float:
        return float(self.value[self.last, self.best]) if self.best is not None else math.nan

    def best_name(self) -> str:
        """'member 3', or for a search by trial 'trial 37'."""
        if self.by_trial and self.trials is not None and self.trials.best is not None:
            return self.trials.name(self.trials.best)
        return f"member {self.best}"

    def switches(self) -> List[int]:
        """Positions k ≥ 1 of the chain where the row continued from another member (an exploit)."""
        return [k for k in range(1, len(self.chain)) if self.chain[k]["member"] != self.chain[k - 1]["member"]]


def population(run: RunView, exploits: bool = True) -> Optional[Population]:
    """The run's rows by generation and member (computed once per run); None, with a page warning, when
    they cannot be laid out so. Without `exploits` (a search) the best row is the best trial's last."""
    return run.once(f"population:{exploits}", lambda r: _population_or_warning(r, exploits))


def _population_or_warning(run: RunView, exploits: bool) -> Optional[Population]:
    if run.objective is None:
        return None
    try:
        return _population(run, exploits)
    except Exception as e:  # the page still shows the counts, the table and the errors
        run.warnings.append(f"could not follow the population by member and generation: {type(e).__name__}: {e}")
        return None


def _population(run: RunView, exploits: bool) -> Optional[Population]:
    """The rows of a population study by generation and member, the best member of the last generation
    (a search: the best trial) and its lineage; None (and a warning) when the table lacks the lineage
    columns."""
    warnings = run.warnings
    missing = [c for c in ("member", "generation", "parent") if c not in run.table.column_names]
    if missing:
        warnings.append(f"the results have no {', '.join(missing)} column: not the rows of a {run.kind} study; "
                        f"no training figures")
        return None
    table = run.table
    member, generation = column_floats(table, "member"), column_floats(table, "generation")
    valid = np.isfinite(member) & np.isfinite(generation) & (member >= 0) & (generation >= 0)
    if not valid.any():
        warnings.append("no row names its member and generation: no training figures")
        return None
    m, g = member[valid].astype(np.int64), generation[valid].astype(np.int64)
    cells = (int(g.max()) + 1) * (int(m.max()) + 1)
    if cells > MAX_GRID_CELLS:
        warnings.append(f"members 0…{int(m.max())} × generations 0…{int(g.max())} are {cells} cells, more than "
                        f"{MAX_GRID_CELLS}: no training figures")
        return None
    index = np.flatnonzero(valid)
    ok = status_mask(table, OK)[valid]
    row = np.full((int(g.max()) + 1, int(m.max()) + 1), -1, dtype=np.int64)
    order = np.argsort(ok, kind="stable")  # ok rows last: the ok row of a pair wins
    row[g[order], m[order]] = index[order]
    present = row >= 0
    at = np.where(present, row, 0)
    value = np.where(present & status_mask(table, OK)[at], column_floats(table, run.objective)[at], np.nan)
    value[~np.isfinite(value)] = np.nan
    step = np.where(present, column_floats(table, "step")[at], np.nan)
    trial = np.where(present, column_floats(table, TRIAL)[at], np.nan)
    parents = column_floats(table, "parent")[at]
    parent = np.where(present & np.isfinite(parents), np.nan_to_num(parents, nan=-1), -1).astype(np.int64)
    members = np.arange(row.shape[1])
    exploits_count = int((present & (parent >= 0) & (parent != members[None, :])).sum())
    pop = Population(row=row, value=value, step=step, parent=parent, trial=trial, last=None, best=None, chain=[],
                     exploits=exploits_count)
    if not exploits:
        return _best_trial(run, pop)
    finite_generations = np.flatnonzero(np.isfinite(value).any(axis=1))
    last = int(finite_generations[-1]) if len(finite_generations) else None
    best = best_index(value[last], run.mode) if last is not None else None
    pop.last, pop.best = last, best
    if last is not None and last < row.shape[0] - 1:
        warnings.append(f"the last generation ({row.shape[0] - 1}) has no ok row with a finite {run.objective}: "
                        f"the best member and the last-generation figures are from generation {last}")
    if best is not None:
        try:
            pop.chain = lineage(table, best, last)
        except ValueError as e:
            warnings.append(f"the lineage of the best member ({best}) cannot be followed: {e}")
        _check_findings(run, "best_member", best, f"the results rank member {best} first in generation {last} "
                                                  f"by {run.objective} ({better(run.mode)})")
    return pop


def _best_trial(run: RunView, pop: Population) -> Population:
    """A search's population with its best row: the last row of the best trial, whose rows are its chain."""
    found = trials(run)
    pop.trials = found
    if found is None or found.best is None:
        return pop
    i = found.best
    last_row = int(found.last[i])
    pop.last = int(column_floats(run.table, "generation")[last_row])
    pop.best = int(found.member[i])
    pop.chain = run.table.take(pa.array(found.rows[i], pa.int64())).to_pylist()
    if found.numbered:
        _check_findings(run, "best_trial", int(found.key[i]), f"the results rank trial {int(found.key[i])} first "
                                                              f"({found.best_among}) by {run.objective} "
                                                              f"({better(run.mode)})", noun="trial")
    else:  # a search without waves names its trials by member (trial m is member m)
        for name in ("best_member", "best_trial"):
            _check_findings(run, name, pop.best, f"the results rank member {pop.best} first ({found.best_among}) "
                                                 f"by {run.objective} ({better(run.mode)})")
    return pop


def _check_findings(run: RunView, name: str, best: int, ranked: str, noun: str = "member") -> None:
    """A page warning when run.json's findings name another best `noun` (under `name`) than the results."""
    found = (run.record.get("findings") or {}).get(name) if isinstance(run.record, dict) else None
    if isinstance(found, float) and found.is_integer():
        found = int(found)
    if isinstance(found, int) and not isinstance(found, bool) and found != best:
        run.warnings.append(f"run.json's findings name {noun} {found} as the best, but {ranked}")


def searched(run: RunView) -> Tuple[List[str], List[str]]:
    """(searched hyperparameters with a results column, the log-uniform ones among them), in config order.
    Constants have no column: every member used the config's value."""
    return run.once("searched", _searched)


def _searched(run: RunView) -> Tuple[List[str], List[str]]:
    space = getattr(run.study, "hyperparameters", None)
    if not isinstance(space, dict):
        return [], []
    hyper = [n for n, v in space.items()
             if getattr(v, "distribution", None) is not None and n in run.table.column_names]
    return hyper, [n for n in hyper if getattr(space[n], "distribution", None) == "loguniform"]


def _chain_values(chain: List[Dict[str, Any]], name: str) -> np.ndarray:
    """Column `name` along a chain as float64 (a hyperparameter was used whatever the row's status)."""
    values = [row.get(name) for row in chain]
    return np.array([np.nan if v is None or isinstance(v, (str, bool)) else float(v) for v in values],
                    dtype=np.float64)


def _chain_objective(run: RunView, chain: List[Dict[str, Any]]) -> np.ndarray:
    """The objective along a chain (NaN at rows that are not ok or not finite)."""
    values = np.array([np.nan if row.get("status", OK) != OK or row.get(run.objective) is None
                       else float(row[run.objective]) for row in chain], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _drawn_members(pop: Population) -> np.ndarray:
    if pop.members <= MAX_MEMBERS_DRAWN:
        return np.arange(pop.members)
    return np.unique(np.linspace(0, pop.members - 1, MAX_MEMBERS_DRAWN).round().astype(np.int64))


def _edges(pop: Population, members: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(generation, member, parent, exploit) of every row at generation ≥ 1 of `members` whose parent has
    a row at the generation before, of the same trial (a search in waves starts a new trial in the slot at
    each wave: its first row continues nothing) and at fewer steps."""
    if pop.generations < 2 or not len(members):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(0, dtype=bool)
    g, m = np.meshgrid(np.arange(1, pop.generations), members, indexing="ij")
    g, m = g.ravel(), m.ravel()
    p = pop.parent[g, m]
    keep = pop.present[g, m] & (p >= 0) & (p < pop.members)
    g, m, p = g[keep], m[keep], p[keep]
    keep = pop.present[g - 1, p]
    g, m, p = g[keep], m[keep], p[keep]
    before, after = pop.trial[g - 1, p], pop.trial[g, m]
    keep = ~(np.isfinite(before) & np.isfinite(after) & (before != after))
    keep &= ~(pop.step[g - 1, p] >= pop.step[g, m])  # a slot that started again (NaN steps are drawn nowhere)
    g, m, p = g[keep], m[keep], p[keep]
    return g, m, p, p != m


def _crowding(members: int) -> Tuple[float, float]:
    """(alpha, line width factor) of the population's lines: a crowd of lines is drawn fainter and thinner."""
    return float(np.clip(3.0 / math.sqrt(max(members, 1)), 0.08, 0.8)), (1.0 if members <= 50 else 0.6)


def _median_by_step(step: np.ndarray, value: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, the median value at each): over every finite (step, value) pair, grouped by step. A
    population's generation is one step for all its members; a search in waves has each step once per wave."""
    step, value = step.ravel(), value.ravel()
    keep = np.isfinite(step) & np.isfinite(value)
    step, value = step[keep], value[keep]
    if not len(step):
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((value, step))
    step, value = step[order], value[order]
    starts = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
    ends = np.r_[starts[1:], len(step)]
    medians = np.array([float(np.median(value[a:b])) for a, b in zip(starts, ends)])
    return step[starts], medians


def _range_text(run: RunView, name: str) -> str:
    """' (searched in [low, high])' or ' (choices a, b, …)' of a hyperparameter, for a title."""
    space = getattr(run.study, "hyperparameters", None) or {}
    spec = space.get(name) if isinstance(space, dict) else None
    values = getattr(spec, "values", None)
    if getattr(spec, "distribution", None) == "choice" and values:
        shown = ", ".join(fmt(v) for v in list(values)[:MAX_CHOICES_NAMED])
        return f"\n(choices {shown}{', …' if len(values) > MAX_CHOICES_NAMED else ''})"
    low, high = getattr(spec, "low", None), getattr(spec, "high", None)
    if low is None or high is None:
        return ""
    return f"\n(searched {getattr(spec, 'distribution', '')} in [{fmt(low)}, {fmt(high)}])"


# --------------------------------------------------------------------------- training.png


def _training(run: RunView, folder: Path, notes: List[str], exploits: bool) -> List[Figure]:
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    pop = population(run, exploits)
    if pop is None or pop.best is None:
        return []
    drawn = _drawn_members(pop)
    best_value = pop.best_value()
    tr = pop.trials if pop.by_trial else None
    if tr is not None and tr.best is not None:
        where = tr.where(tr.best)
        notes.append(f"best {tr.name(tr.best)}{f' ({where})' if where else ''}: {run.objective} = {fmt(best_value)} "
                     f"after {fmt(tr.step[tr.best])} steps ({better(run.mode)}), {tr.best_among}")
    else:
        notes.append(f"best member of the last generation (generation {pop.last}, step "
                     f"{fmt(pop.step[pop.last, pop.best])}): member {pop.best}, {run.objective} = {fmt(best_value)} "
                     f"({better(run.mode)}), of {int(np.isfinite(pop.value[pop.last]).sum())} members with a finite "
                     f"value")
    if exploits:
        notes.append(f"exploits: {pop.exploits} rows continued from another member's weights (parent ≠ member); "
                     f"the best member's lineage switched members {len(pop.switches())} times")

    fig, (ax,) = figure(1, width=MAX_FIGURE_WIDTH, height=5.0)
    g, m, p, exploit = _edges(pop, drawn)
    x0, y0 = pop.step[g - 1, p], pop.value[g - 1, p]
    x1, y1 = pop.step[g, m], pop.value[g, m]
    fine = np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
    segments = np.stack([np.column_stack([x0, y0]), np.column_stack([x1, y1])], axis=1)
    alpha, thin = _crowding(len(drawn))
    handles = []
    own_label = ("a member continuing its own weights" if exploits else
                 "a trial (one line each)" if tr is not None else "a member (one line each)")
    for on, colour, width, text in ((fine & ~exploit, CONTINUE_COLOUR, 0.9, own_label),
                                    (fine & exploit, EXPLOIT_COLOUR, 1.0,
                                     "exploit: from the donor's point to the member's")):
        if on.any():
            ax.add_collection(LineCollection(segments[on], colors=colour, linewidths=width * thin, alpha=alpha,
                                             zorder=1))
            handles.append(Line2D([], [], color=colour, lw=1.5, label=text))
    if exploits:  # the jump itself: from the member's own point to the donor's, at the evaluation that decided it
        own = pop.value[g - 1, m]
        jump = fine & exploit & np.isfinite(own) & np.isfinite(pop.step[g - 1, m])
        if jump.any():
            jumps = np.stack([np.column_stack([pop.step[g - 1, m], own]), np.column_stack([x0, y0])], axis=1)
            ax.add_collection(LineCollection(jumps[jump], colors=EXPLOIT_COLOUR, linewidths=0.9 * thin,
                                             alpha=alpha, linestyles=":", zorder=1))
            handles.append(Line2D([], [], color=EXPLOIT_COLOUR, lw=1.2, ls=":",
                                  label="the jump: from the member's own point to the donor's"))
    xs, ys = pop.step[:, drawn].ravel(), pop.value[:, drawn].ravel()
    ax.plot(xs, ys, ".", ms=2.5, color=CONTINUE_COLOUR, alpha=min(1.0, alpha + 0.2), zorder=1)
    median_step, median = _median_by_step(pop.step, pop.value)
    stops = tr is not None and bool(tr.stopped.any())
    handles += ax.plot(median_step, median, "--", color="0.3", lw=1.3, zorder=3,
                       label="median of the trials still training" if stops else
                       "median over the trials at each step" if tr is not None else "population median")
    chain_steps = _chain_values(pop.chain, "step")
    chain_values = _chain_objective(run, pop.chain)
    named: List[Any] = []  # the exploits' labels
    if len(pop.chain):
        handles += ax.plot(chain_steps, chain_values, "-o", color=BEST_COLOUR, lw=2.4, ms=3.5, zorder=5,
                           label=f"best {pop.best_name()}" + ("'s lineage" if exploits else "")
                           + f" (final {fmt(best_value)})")
        switches = pop.switches()
        if switches:
            handles += ax.plot(chain_steps[switches], chain_values[switches], "D", ms=6, mfc="white",
                               mec=BEST_COLOUR, mew=1.6, zorder=6, label="exploit along the lineage")
            for k in switches[:MAX_SWITCHES_NAMED]:
                if np.isfinite(chain_values[k]):
                    named.append(point_label(ax, f"m{pop.chain[k - 1]['member']}→m{pop.chain[k]['member']}",
                                             (chain_steps[k], chain_values[k]), fontsize=MIN_FONT_SIZE,
                                             color=BEST_COLOUR, zorder=6,
                                             bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none",
                                                       alpha=0.85)))
    else:
        ax.plot(pop.step[pop.last, pop.best], best_value, "*", ms=14, color=BEST_COLOUR, mec="black", zorder=6)
    # The axis follows the population: the values drawn, clipped at the bad end where a few stragglers
    # (the first evaluations, a diverged member) would squeeze the rest into a band.
    shown_values = pop.value[:, drawn].ravel()  # the best lineage's points are rows of these too
    scale = value_scale(shown_values, run.mode)
    ax.autoscale_view()
    scale.axis(ax, "y", shown_values)
    ax.set_xlabel("training step")
    ax.set_ylabel(run.metric_label(run.objective, scale))
    shown = "" if len(drawn) == pop.members else f"; {len(drawn)} of {pop.members} members drawn"
    if tr is not None:
        size = (f"{len(tr)} trial{'s' if len(tr) != 1 else ''}"
                + (f" in {tr.waves} waves of {pop.members}" if tr.waves > 1 else ""))
    else:
        size = f"{pop.members} members, {pop.generations} generations"
    ax.set_title(f"{label(run.name)}: {label(run.objective)} of every {'trial' if tr is not None else 'member'} "
                 f"over training, {better(run.mode)} ({size}{shown})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize=MIN_FONT_SIZE + 1, loc="outside lower center", ncol=2, frameon=False)
    place_labels(ax, named, hide=True)  # an exploit label that would cover another is left out
    path = folder / "training.png"
    save(fig, path)
    zoom = (f" The {run.objective} axis is {scale.note}: the points beyond it are counted at its edge."
            if scale.clipped else "")
    shown_how = (f". An evenly spaced {len(drawn)} of the {pop.members} member{' slot' if tr is not None else ''}s "
                 f"are drawn." if shown else ".")
    if tr is not None:
        waves = ("; each wave's trials start afresh in the members' slots, so a slot's trials are separate lines"
                 if tr.waves > 1 else "")
        ended = ("; a line that ends early is a trial stopped at a rung of successive halving (halving.png)"
                 if stops else "")
        caption = (f"{run.objective} of every trial ({configurations(run, len(tr), tr.waves, pop.members)}) at "
                   f"each evaluation against its training steps. One light line per trial{waves}{ended}; the "
                   f"dashed line is the median over the trials at each step"
                   + (" (those still training)" if stops else "")
                   + f" and the bold red line the best trial ({tr.name(tr.best)}, {tr.best_among})"
                   + shown_how + zoom)
        return [Figure(path, caption)]
    how = ("Each generation's segment runs from the parent's point at the previous evaluation to the member's "
           "point, so an exploit (orange) jumps from the donor's curve; " if exploits else
           "One light line per member; ")
    source = f" ({configurations(run, pop.members, 1, pop.members)})" if not exploits else ""
    caption = (f"{run.objective} of every member{source} at each evaluation against its training steps. {how}the "
               f"dashed line is the population's median and the bold red line "
               + (f"the lineage of the best member of the last generation (member {pop.best})" if exploits else
                  f"the best member of the last generation (member {pop.best})")
               + (", diamonds where it continued from another member (named m<from>→m<to> where the names "
                  "do not overlap)" if exploits else "")
               + shown_how + zoom)
    return [Figure(path, caption)]


def configurations(run: RunView, count: int, waves: int, members: int) -> str:
    """Where a search's configurations came from, for a caption: '64 configurations drawn at random in 4 waves
    of 16, trained side by side'."""
    method = str(getattr(run.study, "method", ""))
    sampler = getattr(getattr(run.study, "sampler", None), "name", None) or "TPESampler"
    source = {"random": f"{count} configurations drawn at random",
              "grid": f"the {count} combinations of the grid",
              "optuna": f"{count} configurations proposed by Optuna's {sampler}"}.get(method, f"{count} configurations")
    return source + (f" in {waves} waves of {members}" if waves > 1 else "") + ", trained side by side"


# --------------------------------------------------------------------------- lineage.png


def _lineage_figure(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    from matplotlib.figure import Figure as Canvas

    pop = population(run, True)
    if pop is None or pop.best is None:
        return []
    hyper, log_hyper = searched(run)
    tree = pop.members <= MAX_TREE_MEMBERS
    schedule = bool(hyper) and bool(pop.chain)
    if not tree:
        notes.append(f"lineage tree not drawn: {pop.members} members, more than {MAX_TREE_MEMBERS}")
    if not tree and not schedule:
        return []
    k = max(1, len(hyper)) if schedule else 1
    width = MAX_FIGURE_WIDTH  # the page's width: wider, and the page would shrink its text
    tree_height = min(12.0, max(4.0, 0.24 * pop.members + 1.8)) if tree else 0.0
    schedule_height = 3.3 if schedule else 0.0
    fig = Canvas(figsize=(width, tree_height + schedule_height), layout="constrained")
    ratios = [h for h in (tree_height, schedule_height) if h]
    grid = fig.add_gridspec(len(ratios), k, height_ratios=ratios)
    colours = None
    if tree:
        colours = _tree(run, pop, fig, fig.add_subplot(grid[0, :]))
    if schedule:
        _schedule(run, pop, [fig.add_subplot(grid[len(ratios) - 1, j]) for j in range(len(hyper))])
    size = f" ({pop.members} members × {pop.generations} generations, {pop.exploits} exploits)"
    fig.suptitle(f"{label(run.name)}: lineage of the population{size} and the best member's schedule"
                 if tree and schedule else f"{label(run.name)}: " +
                 (f"lineage of the population{size}" if tree else "the best member's schedule"), fontsize=11)
    path = folder / "lineage.png"
    save(fig, path)
    parts = []
    if tree:
        how = f", {colours.note}" if colours is not None and colours.note else ""
        parts.append(f"Top: one dot per member (y) and generation (x), coloured by {run.objective} (brighter is "
                     f"better{how}); an edge joins "
                     f"each row to its parent's row at the generation before: grey where the member continued its "
                     f"own weights, orange where it copied another member's (exploit; {pop.exploits} in all). The "
                     f"best member's lineage is red.")
    if schedule:
        logs = [n for n in hyper if n in log_hyper]
        parts.append(f"{'Bottom' if tree else 'Panels'}: the best member's hyperparameters along its lineage, one "
                     f"value per generation; orange dotted lines mark where the lineage continued from another "
                     f"member" + (f"; log scale for {', '.join(logs)}" if logs else "") + ".")
    return [Figure(path, " ".join(parts))]


def _tree(run: RunView, pop: Population, fig: Any, ax: Any) -> Scale:
    """The lineage tree on `ax`; returns the scale of its colours."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    members = np.arange(pop.members)
    g, m, p, exploit = _edges(pop, members)
    segments = np.stack([np.column_stack([g - 1, p]), np.column_stack([g, m])], axis=1).astype(np.float64)
    handles = []
    alpha, thin = _crowding(pop.members)
    if (~exploit).any():
        ax.add_collection(LineCollection(segments[~exploit], colors="0.8", linewidths=0.9 * thin, zorder=1))
        handles.append(Line2D([], [], color="0.7", lw=1.2, label="continues its own weights"))
    if exploit.any():
        ax.add_collection(LineCollection(segments[exploit], colors=EXPLOIT_COLOUR, linewidths=1.3 * thin,
                                         alpha=min(0.9, alpha + 0.15), zorder=2))
        handles.append(Line2D([], [], color=EXPLOIT_COLOUR, lw=1.5, label="exploit: copies the parent's weights"))
    gg, mm = np.nonzero(pop.present)
    values = pop.value[gg, mm]
    finite = np.isfinite(values)
    size = float(np.clip(900.0 / max(pop.members, 1), 6.0, 40.0))
    scale = value_scale(values[finite], run.mode)
    dots = ax.scatter(gg[finite], mm[finite], c=values[finite], s=size, cmap=cmap(run.mode), norm=scale.norm(),
                      zorder=3, edgecolors="none")
    scale.colorbar(fig, dots, ax, run.metric_label(run.objective, scale), pad=0.01, aspect=30)
    if (~finite).any():
        handles += [ax.scatter(gg[~finite], mm[~finite], s=size, marker="x", color="0.45", zorder=3,
                               label="not ok or not finite")]
    if pop.chain:
        cg = np.array([row["generation"] for row in pop.chain], dtype=np.float64)
        cm = np.array([row["member"] for row in pop.chain], dtype=np.float64)
        handles += ax.plot(cg, cm, "-", color=BEST_COLOUR, lw=2.6, zorder=4,
                           label=f"best member {pop.best}'s lineage")
        ax.scatter(cg, cm, s=size * 1.6, facecolors="none", edgecolors=BEST_COLOUR, linewidths=1.4, zorder=5)
    ax.annotate(f"best: member {pop.best}\n{label(run.objective)} {fmt(pop.best_value())}",
                (pop.last, pop.best), xytext=(8, 0), textcoords="offset points", va="center", fontsize=MIN_FONT_SIZE,
                color=BEST_COLOUR, annotation_clip=False,
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))
    ax.set_xlim(-0.6, pop.generations - 0.4 + max(0.9, 0.13 * pop.generations))  # room for the label
    ax.set_ylim(-0.8, pop.members - 0.2)
    integer_ticks(ax.xaxis, pop.generations)
    integer_ticks(ax.yaxis, pop.members)
    ax.set_xlabel(f"generation (evaluated every {fmt(getattr(run.study, 'interval', None)) or '?'} steps)")
    ax.set_ylabel("member")
    ax.legend(handles=handles, fontsize=MIN_FONT_SIZE, loc="lower left", bbox_to_anchor=(0.0, 1.005),
              ncol=len(handles), frameon=False, borderaxespad=0.0)
    return scale


def _schedule(run: RunView, pop: Population, axes: List[Any]) -> None:
    hyper, log_hyper = searched(run)
    generations = np.array([row["generation"] for row in pop.chain], dtype=np.float64)
    switches = pop.switches()
    for ax, name in zip(axes, hyper):
        values = _chain_values(pop.chain, name)
        log = name in log_hyper and bool(np.all(values[np.isfinite(values)] > 0))
        ax.plot(generations, values, "-", drawstyle="steps-mid", color="C0", lw=1.6, zorder=3)
        ax.plot(generations, values, "o", ms=3.5, color="C0", zorder=4)
        for k, s in enumerate(switches):
            ax.axvline(generations[s] - 0.5, color=EXPLOIT_COLOUR, ls=":", lw=1.4, zorder=2,
                       label="continued from another member" if k == 0 else None)
        if log:
            log_axis(ax, "y", values)
        ax.set_xlim(-0.6, max(generations.max() if len(generations) else 0.0, 0.0) + 0.6)
        integer_ticks(ax.xaxis, int(generations.max()) + 1 if len(generations) else 1)
        ax.set_xlabel("generation")
        ax.set_ylabel(label(name) + (" (log scale)" if log else ""))
        ax.set_title(f"best member {pop.best}: {label(name)} along its lineage{_range_text(run, name)}", fontsize=10)
        ax.grid(alpha=0.3)
        if switches:
            ax.legend(fontsize=MIN_FONT_SIZE, loc="best")


# --------------------------------------------------------------------------- hyperparameters.png


def _hyperparameters(run: RunView, folder: Path, notes: List[str], exploits: bool) -> List[Figure]:
    pop = population(run, exploits)
    if pop is None or pop.best is None:
        return []
    hyper, log_hyper = searched(run)
    if not hyper:
        notes.append("no hyperparameter is searched (every one is a constant): no hyperparameters figure")
        return []
    tr = pop.trials if pop.by_trial else None
    last = pop.last
    if tr is not None:  # one point per trial, at its last row
        rows, values, hollow, best = tr.last, tr.value, tr.stopped, tr.best
        who = "trial"
        best_text = f"the best trial ({int(tr.key[best])}"
    else:  # one point per member of the last generation
        rows, values, hollow, best = pop.row[last], pop.value[last], np.zeros(pop.members, dtype=bool), pop.best
        who = "member"
        best_text = f"the best member ({pop.best}"
    present = rows >= 0
    at = np.where(present, rows, 0)
    fig, axes = figure(len(hyper), width=5.0, height=4.0)
    handles: List[Any] = []
    named: List[Tuple[Any, Any]] = []
    for ax, name in zip(axes, hyper):
        x = np.where(present, column_floats(run.table, name)[at], np.nan)
        keep = np.isfinite(x) & np.isfinite(values)
        log = name in log_hyper and bool(np.all(x[keep] > 0))
        full, early = keep & ~hollow, keep & hollow
        whole = (f"a trial that ran the full {fmt(tr.full)} steps ({int(full.sum())})" if hollow.any() else
                 f"a {who} ({int(keep.sum())} with a finite {label(run.objective)})")
        drawn = [ax.scatter(x[full], values[full], s=26, color="C0", alpha=0.8, edgecolors="none", zorder=3,
                            label=whole)]
        if early.any():
            drawn.append(ax.scatter(x[early], values[early], s=26, facecolors="none", edgecolors="C0", linewidths=1.0,
                                    alpha=0.8, zorder=3, label=f"a trial stopped at a rung ({int(early.sum())}; "
                                                               f"hollow: its value there, after fewer steps)"))
        handles = list(drawn)
        if keep[best]:
            star = ax.plot(x[best], values[best], "*", ms=15, color=BEST_COLOUR, mec="black", zorder=4,
                           label=f"{best_text}; {label(run.objective)} {fmt(values[best])})")
            named.append((ax, point_label(ax, f"{label(name)} = {fmt(x[best])}", (x[best], values[best]),
                                          fontsize=MIN_FONT_SIZE, color=BEST_COLOUR,
                                          bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                                                    alpha=0.8))))
            handles += star
        ax.margins(y=0.08)
        if log:
            log_axis(ax, "x", x[keep])
        scale = value_scale(values[keep], run.mode)
        scale.axis(ax, "y", values[keep])
        ax.set_xlabel(label(name) + (" (log scale)" if log else "")
                      + (" in the last generation" if exploits else ""))
        ax.set_ylabel(f"final {run.metric_label(run.objective, scale)}")
        ax.set_title(f"final {label(run.objective)} vs {label(name)}{_range_text(run, name)}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=MIN_FONT_SIZE + 1, frameon=False)
    when = "at its last evaluation" if tr is not None else f"at the last generation ({last})"
    fig.suptitle(f"{label(run.name)}: each {who}'s {label(run.objective)} {when} against its hyperparameters "
                 f"({better(run.mode)})", fontsize=11)
    renderer = renderer_of(fig) if named else None
    for ax, text in named:  # beside the star, off the other members' dots
        place_labels(ax, [text], renderer=renderer)
    path = folder / "hyperparameters.png"
    save(fig, path)
    logs = [n for n in hyper if n in log_hyper]
    log_text = f"; log scale for {', '.join(logs)}" if logs else ""
    if tr is not None:
        stops = ("; hollow points are trials stopped at a rung, drawn at their value there (after fewer steps)"
                 if tr.stopped.any() else "")
        return [Figure(path, f"{run.objective} of every trial at its last evaluation against its values{stops}; "
                             f"the red star is the best trial ({tr.name(tr.best)}, {tr.best_among})"
                             f"{log_text}.")]
    which = ("the value each member used in the last generation (pbt changes them along the way; lineage.png "
             "has the best member's schedule)" if exploits else "each member's value")
    return [Figure(path, f"{run.objective} of every member at the last generation ({last}) against {which}; the red "
                         f"star is the best member{log_text}.")]


# --------------------------------------------------------------------------- the page's section


def _best_member(run: RunView, exploits: bool) -> str:
    """The page's section on the best member: its value, its schedule, and how often members copied. A
    search by trial (waves, halving, Optuna) gets its best trial: its values and its evaluations."""
    pop = population(run, exploits)
    if pop is not None and pop.by_trial:
        return _best_trial_section(run, pop)
    head = "<h2>Best member</h2>\n"
    if pop is None:
        return head + "<p>The rows could not be laid out by member and generation (see the warnings).</p>\n"
    if pop.best is None:
        return head + f"<p>No member has an ok row with a finite {escape(run.objective)}.</p>\n"
    step = pop.step[pop.last, pop.best]
    parts = [head, f'<p id="best-member">Member <b>{pop.best}</b>: {escape(run.objective)} = '
                   f"<b>{escape(fmt(pop.best_value()))}</b> ({escape(better(run.mode))}) at generation {pop.last}"
                   + (f", step {escape(fmt(step))}" if np.isfinite(step) else "")
                   + f", the best of the {int(np.isfinite(pop.value[pop.last]).sum())} members with a finite value "
                     f"in the last generation."]
    if run.run_dir is not None and (run.run_dir / "best.safetensors").is_file():
        parts.append(" Its weights: <code>best.safetensors</code> in the run folder.")
    parts.append("</p>\n")
    if exploits:
        parts.append(f'<p id="exploits">Exploits: <b>{pop.exploits}</b> rows continued from another member\'s '
                     f"weights (parent ≠ member) over the run; the best member's lineage switched members "
                     f"{len(pop.switches())} times.</p>\n")
    if not pop.chain:
        return "".join(parts) + "<p>Its lineage cannot be followed (see the warnings).</p>\n"
    hyper, _ = searched(run)
    columns = ["generation", "step", "member"] + hyper + [run.objective]
    parts.append("<p>Its schedule: the rows of its lineage, generation 0 first. <i>member</i> is the member whose "
                 "row (and weights) the lineage passes through at that generation"
                 + (", so it changes where the lineage continued from another member" if exploits else "")
                 + f"; the hyperparameters are the values used during that generation and {escape(run.objective)} the "
                   f"value at its end.</p>\n")
    parts.append(html_table(columns, _chain_rows(run, pop.chain, columns), "schedule") + "\n")
    return "".join(parts)


def _chain_rows(run: RunView, chain: List[Dict[str, Any]], columns: List[str]) -> List[List[Any]]:
    """The rows of `chain` under `columns` (the objective last: null where the row is not ok or not finite)."""
    objective = _chain_objective(run, chain)
    return [[row.get(c) for c in columns[:-1]] + [None if not np.isfinite(value) else float(value)]
            for row, value in zip(chain, objective)]


def _best_trial_section(run: RunView, pop: Population) -> str:
    """The page's section on a search's best trial: where it ran, its value, its values and its evaluations."""
    tr = pop.trials
    head = "<h2>Best trial</h2>\n"
    if tr is None or tr.best is None:
        return head + f"<p>No trial has an ok last row with a finite {escape(run.objective)}.</p>\n"
    i = tr.best
    hyper, _ = searched(run)
    last = run.table.slice(int(tr.last[i]), 1).to_pylist()[0]
    where = tr.where(i)
    values = ", ".join(f"{escape(n)} = {escape(fmt(last.get(n)))}" for n in hyper)
    parts = [head, f'<p id="best-trial">{"Trial" if tr.numbered else "Member"} <b>{int(tr.key[i])}</b>'
                   + (f" ({escape(where)})" if where else "")
                   + f": {escape(run.objective)} = <b>{escape(fmt(tr.value[i]))}</b> ({escape(better(run.mode))}) "
                     f"after {escape(fmt(tr.step[i]))} steps, {escape(tr.best_among)}."
                   + (f" Its values: {values}." if values else "")]
    if run.run_dir is not None and (run.run_dir / "best.safetensors").is_file():
        parts.append(" Its weights: <code>best.safetensors</code> in the run folder.")
    parts.append("</p>\n")
    columns = ["generation", "step", "member"] + hyper + [run.objective]
    parts.append("<p>Its evaluations, first to last: the generation counts evaluation rounds over the whole "
                 "search, the step this trial's own training.</p>\n")
    parts.append(html_table(columns, _chain_rows(run, pop.chain, columns), "schedule") + "\n")
    return "".join(parts)
