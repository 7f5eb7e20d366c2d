"""Study kind `merge`: merges and soups of N models fine-tuned from one base.

With task vectors τ_i = model_i − base:
- `task_arithmetic`: base + λ·Σ_i τ_i (Ilharco et al. 2023), or base + Σ_i λ_i·τ_i
  with `per_model: true`;
- `ties`: base + λ·(disjoint mean of the trimmed, sign-elected τ_i) (Yadav et al. 2023);
- `dare`: base + Σ_i λ_i·DARE(τ_i), each entry kept with probability `density`
  and rescaled by 1/density (Yu et al. 2024); `dare_ties` elects signs over the
  DARE'd vectors like TIES;
- `uniform_soup`: the mean of the models; `greedy_soup` (Wortsman et al. 2022):
  the models by their own objective, best first, each added to the soup only
  when the soup's objective on the eval data improves.

The base and each model alone are rows too (`method` base / model). λ and
density come from a grid (every combination) or `search: random` (`samples`
draws per method, uniform between the smallest and largest value given).
Everything but the greedy soup is planned up front; the greedy soup is
decided round by round as its rows land (and replayed from them on resume).
It ranks the models by their own rows: when a model's row is not ok (or its
objective is not finite) the soup stops there, its planned ids become invalid
rows that say why, and the summary's `greedy_soup_stopped` names the model.
Rows of task arithmetic and the soups travel as one Affine recipe over the
task vectors; TIES and DARE as MergeRows over the same anchors.

`tradeoff` names metrics that pull against each other (each model's loss on
its own data: `[loss_email, loss_asyncio, loss_json]`): the report then draws
every candidate in each pair of them with the Pareto front
(merge-tradeoff.png) and lists the candidates no other beats on all of them.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..files import resolve_file, resolve_files
from ..plotting import (CHAR_WIDTH, MAX_COLUMNS, MAX_FIGURE_WIDTH, MIN_FONT_SIZE, Figure, RunView, Scale, best_index,
                        better, cmap, column_floats, draw_each, escape, figure, fmt, histogram, html_table, label,
                        log_axis, pivot, pivot_counts, place_labels, point_label, renderer_of, save, status_mask,
                        thin_ticks, value_scale)
from ..errors import ConfigError
from ..recipes import AffineRows, MergeRows, Rows, anchor_set
from ..settings import Float, Int, Section, Text
from ..types import OK, Invalid
from ._path import AlphaRange, alpha_values
from .base import WAIT, CandidateBatch, RecipeBatch, StudyBase, StudyContext, Wait, difference, read_weights

METHODS = ("task_arithmetic", "ties", "dare", "dare_ties", "uniform_soup", "greedy_soup")
#: Methods whose rows vary the density.
SPARSE = ("ties", "dare", "dare_ties")
#: Largest number of planned rows.
MAX_ROWS = 10_000_000
#: Row r of a DARE method reads its masks from the noise table at seed `seed * SEED_STRIDE + candidate id`.
SEED_STRIDE = 2**32
#: Most metrics in `tradeoff`: the figure draws each pair of them (4 metrics, 6 panels).
MAX_TRADEOFF_METRICS = 4


class Config(Section):
    """Merge `models` (fine-tuned from `base`) by each of `methods`."""

    kind: Literal["merge"]
    base: Text = Field(description="the weights file the models were fine-tuned from")
    models: List[Text] = Field(min_length=2, description="the fine-tuned weights files")
    methods: List[Literal[METHODS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["task_arithmetic", "ties", "dare", "uniform_soup", "greedy_soup"],
        min_length=1, description=f"any of {', '.join(METHODS)}")
    lambdas: Union[AlphaRange, List[Float]] = Field(
        default_factory=lambda: AlphaRange(start=0.2, stop=1.0, num=5),
        description="scaling coefficients λ: a list, or {start, stop, num}")
    densities: Union[AlphaRange, List[Float]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
        description="fractions kept by TIES / DARE, in (0, 1]")
    search: Literal["grid", "random"] = Field("grid", description="every combination, or `samples` random draws")
    samples: Int = Field(32, ge=1, le=MAX_ROWS, description="draws per method with search: random")
    per_model: bool = Field(False, description="one λ per model (task_arithmetic and dare)")
    seed: Int = Field(0, ge=0, lt=2**31, description="seeds DARE's masks and the random search")
    tradeoff: List[Text] = Field(
        default_factory=list, max_length=MAX_TRADEOFF_METRICS,
        description=f"2 to {MAX_TRADEOFF_METRICS} metrics the report draws against each other with their Pareto "
                    f"front (e.g. each model's loss on its own data); none by default")

    @field_validator("tradeoff")
    @classmethod
    def _tradeoff(cls, v: List[str]) -> List[str]:
        if len(v) == 1:
            raise ValueError(f"a trade-off needs 2 to {MAX_TRADEOFF_METRICS} metrics, got only {v[0]!r}; "
                             f"add the metrics it pulls against, or leave tradeoff out")
        if len(set(v)) != len(v):
            raise ValueError(f"each metric once, got {v}")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: str, info: ValidationInfo) -> str:
        return resolve_file(v, info)

    @field_validator("models")
    @classmethod
    def _models(cls, values: List[str], info: ValidationInfo) -> List[str]:
        return resolve_files(values, info)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: List[str]) -> List[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each method once, got {v}")
        return v

    @field_validator("lambdas", "densities")
    @classmethod
    def _values(cls, v: Union[AlphaRange, List[float]], info: ValidationInfo) -> Union[AlphaRange, List[float]]:
        values = alpha_values(v)
        if not len(values):
            raise ValueError("give at least one value")
        if info.field_name == "densities" and ((values <= 0) | (values > 1)).any():
            raise ValueError(f"densities must lie in (0, 1], got {values.min():g} … {values.max():g}")
        return v

    @model_validator(mode="after")
    def _per_model(self) -> "Config":
        if self.per_model and {"ties", "dare_ties"} & set(self.methods):
            raise ValueError("per_model: TIES scales its sign-elected merge by one λ; per-model λ is for "
                             "task_arithmetic and dare (run ties in a study of its own)")
        return self


@dataclass
class Unmade:
    """Candidates the study can no longer make: each becomes an invalid row with `reason` as its error."""

    reason: str
    count: int

    def candidates(self) -> List[Invalid]:
        return [Invalid(self.reason)] * self.count

    def slice(self, start: int, stop: int) -> "Unmade":
        return Unmade(self.reason, max(0, min(stop, self.count) - start))


@dataclass
class Plan:
    """One method's planned rows: its coefficients, and which recipe makes them."""

    method: str
    lambdas: np.ndarray  # [k] or [k, N]
    densities: np.ndarray  # [k] (NaN where unused)


class MergeStudy(StudyBase):
    default_batch_size = 256

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        base = read_weights(config.base, "study.base")
        self.n = len(config.models)
        self.use_anchors(anchor_set(base, [difference(read_weights(path, f"study.models[{i}]"), base,
                                                      f"study.models[{i}]", "the base")
                                           for i, path in enumerate(config.models)]))
        self.config = config
        self.per_model = config.per_model
        self.columns: Dict[str, pa.DataType] = {"method": pa.string(), "lambda": pa.float64()}
        if self.per_model:
            self.columns.update({f"lambda_{i}": pa.float64() for i in range(self.n)})
        self.columns.update({"density": pa.float64(), "seed": pa.int64(), "soup": pa.string()})
        self.plans = self._plans(config)
        # Ids: base, the models, then each planned method's rows, then the greedy soup's rounds.
        self.offsets: List[int] = []
        count = 1 + self.n
        for p in self.plans:
            self.offsets.append(count)
            count += len(p.densities)
        self.greedy = "greedy_soup" in config.methods
        self.greedy_start = count
        # The greedy soup: N − 1 candidate soups, then the final soup as a row of its own.
        self.total = count + (self.n if self.greedy else 0)
        if self.total > MAX_ROWS:
            raise ConfigError(f"study: {self.total} rows is more than {MAX_ROWS}; fewer lambdas, densities or samples")
        self.scores: Dict[int, float] = {}
        #: why a model's own row gives the greedy soup no score, by the model's candidate id
        self.unranked: Dict[int, str] = {}

    def _plans(self, config: Config) -> List[Plan]:
        lambdas, densities = alpha_values(config.lambdas), alpha_values(config.densities)
        rng = np.random.default_rng(config.seed)
        plans = []
        for method in config.methods:
            if method in ("uniform_soup", "greedy_soup"):
                if method == "uniform_soup":
                    plans.append(Plan(method, np.full(1, 1.0 / self.n), np.full(1, np.nan)))
                continue
            per_model = self.per_model and method in ("task_arithmetic", "dare")
            sparse = method in SPARSE
            if config.search == "grid":
                den_grid = densities if sparse else np.full(1, np.nan)
                size = len(lambdas) ** (self.n if per_model else 1) * len(den_grid)
                if size > MAX_ROWS:
                    raise ConfigError(f"study: the grid of {method} has {size} rows, more than {MAX_ROWS}; "
                                      f"fewer lambdas or densities, or search: random")
                lam_grid = (np.array(list(itertools.product(lambdas, repeat=self.n))) if per_model
                            else lambdas)
                idx = np.array(list(itertools.product(range(len(lam_grid)), range(len(den_grid)))))
                plans.append(Plan(method, lam_grid[idx[:, 0]], den_grid[idx[:, 1]]))
            else:
                k = config.samples
                shape = (k, self.n) if per_model else (k,)
                lam = rng.uniform(lambdas.min(), lambdas.max(), size=shape)
                den = rng.uniform(densities.min(), densities.max(), size=k) if sparse else np.full(k, np.nan)
                plans.append(Plan(method, lam, den))
        return plans

    def __len__(self) -> int:
        return self.total

    def bind(self, objective: Optional[str], mode: str, metric_names: Sequence[str] = ()) -> None:
        """As every study; and `tradeoff` must name metrics the metrics function returns (checked now, once
        the workers have said which, before any candidate is evaluated)."""
        super().bind(objective, mode, metric_names)
        unknown = [m for m in self.config.tradeoff if m not in metric_names]
        if unknown and metric_names:
            raise ConfigError(f"study.tradeoff: {', '.join(map(repr, unknown))} "
                              f"{'is not a metric' if len(unknown) == 1 else 'are not metrics'}: the metrics "
                              f"function returns {', '.join(metric_names)}; name the metrics to draw against each "
                              f"other from those")

    # -- rows -------------------------------------------------------------------
    def _affine(self, ids: np.ndarray, methods: Sequence[str], coeffs: np.ndarray, lam: Optional[np.ndarray],
                soups: Sequence[Optional[str]]) -> CandidateBatch:
        k = len(ids)
        extra: Dict[str, np.ndarray] = {
            "method": np.array(list(methods), dtype=object),
            "lambda": lam if lam is not None and lam.ndim == 1 else nulls(k),
            "soup": np.array(list(soups), dtype=object),
        }
        if self.per_model:
            for i in range(self.n):
                extra[f"lambda_{i}"] = coeffs[:, i] if lam is not None and lam.ndim == 2 else nulls(k)
        rows = AffineRows(coeffs, [f"model_{i}" for i in range(self.n)], extra)
        return CandidateBatch(ids, {}, RecipeBatch(self.key, rows))

    def _plan_batch(self, plan: Plan, offset: int, ids: np.ndarray) -> CandidateBatch:
        local = ids - offset
        lam, den = plan.lambdas[local], plan.densities[local]
        k = len(ids)
        if plan.method in ("task_arithmetic", "uniform_soup"):
            coeffs = lam if lam.ndim == 2 else np.repeat(lam[:, None], self.n, axis=1)
            soup = "+".join(str(i) for i in range(self.n)) if plan.method == "uniform_soup" else None
            return self._affine(ids, [plan.method] * k, coeffs, lam if plan.method == "task_arithmetic" else None,
                                [soup] * k)
        seeds = self.config.seed * SEED_STRIDE + ids
        extra: Dict[str, np.ndarray] = {
            "method": np.array([plan.method] * k, dtype=object),
            "lambda": lam if lam.ndim == 1 else nulls(k),
            "density": den,
            "seed": seeds if plan.method != "ties" else nulls(k),
        }
        if self.per_model:
            for i in range(self.n):
                extra[f"lambda_{i}"] = lam[:, i] if lam.ndim == 2 else nulls(k)
        rows: Rows = MergeRows(plan.method, lam, den, seeds, extra)
        return CandidateBatch(ids, {}, RecipeBatch(self.key, rows))

    def _soup_batch(self, candidate: int, members: Sequence[int], method: str) -> CandidateBatch:
        coeffs = np.zeros((1, self.n))
        coeffs[0, list(members)] = 1.0 / len(members)
        return self._affine(np.array([candidate], np.int64), [method], coeffs, None,
                            ["+".join(str(i) for i in sorted(members))])

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[Union[CandidateBatch, Wait]]:
        def todo(ids: np.ndarray) -> np.ndarray:
            return ids[[i not in skip for i in ids.tolist()]] if skip else ids

        fixed = todo(np.arange(1 + self.n, dtype=np.int64))
        for start in range(0, len(fixed), batch_size):
            ids = fixed[start : start + batch_size]
            coeffs = np.zeros((len(ids), self.n))
            coeffs[ids > 0, ids[ids > 0] - 1] = 1.0
            soups = [None if i == 0 else str(i - 1) for i in ids.tolist()]
            methods = ["base" if i == 0 else "model" for i in ids.tolist()]
            yield self._affine(ids, methods, coeffs, None, soups)
        for plan, offset in zip(self.plans, self.offsets):
            ids = todo(np.arange(offset, offset + len(plan.densities), dtype=np.int64))
            for start in range(0, len(ids), batch_size):
                yield self._plan_batch(plan, offset, ids[start : start + batch_size])
        if self.greedy:
            yield from self._greedy(batch_size, skip)

    def _greedy(self, batch_size: int, skip: frozenset) -> Iterator[Union[CandidateBatch, Wait]]:
        """Wortsman et al.'s greedy soup: one round per model after the best, then the final soup."""
        yield WAIT
        order = self._ranked([1 + i for i in range(self.n)])
        if order is None:
            # A model's own row is not ok: no ranking, no soup. Its ids become rows that say why.
            yield from self._unmade(self._stopped(), batch_size, skip)
            return
        soup = [order[0] - 1]
        best = self.scores[order[0]]
        for step, candidate_model in enumerate(order[1:]):
            candidate = self.greedy_start + step
            trial = soup + [candidate_model - 1]
            if candidate not in skip:
                yield self._soup_batch(candidate, trial, "greedy_step")
                yield WAIT
            score = self.scores.get(candidate)
            if score is not None and self._better(score, best):
                soup, best = trial, score
        final = self.greedy_start + self.n - 1
        if final not in skip:
            yield self._soup_batch(final, soup, "greedy_soup")

    def _unmade(self, reason: str, batch_size: int, skip: frozenset) -> Iterator[CandidateBatch]:
        """The greedy soup's rounds and final soup as invalid rows with `reason` (those not already done)."""
        ids = [i for i in range(self.greedy_start, self.greedy_start + self.n) if i not in skip]
        final = self.greedy_start + self.n - 1
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            methods = ["greedy_soup" if i == final else "greedy_step" for i in part]
            yield CandidateBatch(np.array(part, np.int64), {"method": methods, "soup": [None] * len(part)},
                                 Unmade(reason, len(part)))

    def _stopped(self) -> str:
        """Why the greedy soup stopped: the models its ranking lacks, each with its row's status and error."""
        why = []
        for i in range(1, 1 + self.n):
            if i in self.scores:
                continue
            name = f"model {i - 1} ({Path(self.config.models[i - 1]).name}, candidate {i})"
            why.append(f"{name} {self.unranked.get(i, 'has no row')}")
        objective = self.objective or "objective"
        which = "that model" if len(why) == 1 else "those models"
        return (f"greedy soup stopped: {'; '.join(why)}. The soup ranks the models by their own {objective}, so "
                f"every model's row must be ok with a finite {objective}: fix {which} or leave "
                f"{'it' if len(why) == 1 else 'them'} out of study.models")

    def _ranked(self, ids: List[int]) -> Optional[List[int]]:
        if any(i not in self.scores for i in ids):
            return None
        reverse = self.mode == "max"
        # Best first; equal scores keep the models' order.
        return sorted(ids, key=lambda i: (-self.scores[i] if reverse else self.scores[i], i))

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def observe(self, table: pa.Table) -> None:
        ids = table.column("candidate_id").to_pylist()
        status = table.column("status").to_pylist()
        n = len(ids)
        errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
        # A batch that failed as a whole carries no metric columns.
        has_values = self.objective is not None and self.objective in table.column_names
        values = table.column(self.objective).to_pylist() if has_values else [None] * n
        for i, s, e, v in zip(ids, status, errors, values):
            if not (i <= self.n or i >= self.greedy_start):
                continue
            if s == OK and v is not None and np.isfinite(v):
                self.scores[i] = float(v)
            elif 1 <= i <= self.n:
                self.unranked[i] = (f"row was {s}: {e}" if s != OK else
                                    f"row was ok but its {self.objective or 'objective'} is "
                                    f"{'missing' if v is None else v}")

    def summarise(self) -> Dict[str, Any]:
        """The final greedy soup's objective, or `greedy_soup_stopped`: why there is none."""
        if not self.greedy:
            return {}
        final = self.greedy_start + self.n - 1
        out: Dict[str, Any] = {}
        if any(1 + i not in self.scores for i in range(self.n)):
            out["greedy_soup_stopped"] = self._stopped()
        elif final in self.scores and self.objective is not None:
            out[f"greedy_soup_{self.objective}"] = self.scores[final]
        return out


def nulls(k: int) -> np.ndarray:
    """A column of k nulls (a value the row's method does not use)."""
    return np.full(k, None, dtype=object)


def plan(config: Config, context: Optional[StudyContext] = None) -> MergeStudy:
    return MergeStudy(config, context)


def example(bench: Any) -> Dict[str, Any]:
    """Two of the bench's checkpoints merged into a third: task arithmetic, TIES and the greedy soup (a WAIT
    round: its step waits for the models' own rows)."""
    return {"kind": "merge", "base": bench.checkpoint(0), "models": [bench.checkpoint(1), bench.checkpoint(2)],
            "methods": ["task_arithmetic", "ties", "greedy_soup"], "lambdas": [0.5, 1.0], "densities": [0.5]}


# --------------------------------------------------------------------------- figures

#: The report figures this study may write (and the objective's histogram).
FIGURES = ("merge.png", "merge-summary.png", "merge-tradeoff.png", "objective.png")
#: Per-model coefficients of a random search over them: columns lambda_0 … lambda_{N-1}.
PER_MODEL_LAMBDA = re.compile(r"lambda_([0-9]+)")
#: Merge methods drawn as heat maps over lambda × density.
GRID_METHODS = ("ties", "dare", "dare_ties")
#: Heat map cells are annotated with their values up to this many rows and columns (and only where the text fits).
MAX_ANNOTATED_GRID = 12
#: Height (inches) of a heat map's row of merge.png (each heat map spans the figure's width, so its cells have
#: room for their numbers), and of a row of the other panels.
HEAT_MAP_HEIGHT, PANEL_HEIGHT = 3.4, 3.6


def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """merge.png (the objective over each method's coefficients), merge-summary.png (base, models, soups and
    each method's best), merge-tradeoff.png (with `study.tradeoff`: each pair of its metrics and the Pareto
    front) and the objective's histogram; each method's best row is a Summary line."""
    return draw_each(run, folder, notes, {"merge": _merge_figures, "trade-off": _tradeoff_figure,
                                          "histogram": histogram})


def page(run: RunView) -> List[str]:
    """With `study.tradeoff`: the Pareto-optimal candidates over its metrics, as a table."""
    return _pareto_section(run)


def merge_grid(table: pa.Table, method: str, objective: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lambdas, densities, values) of one merge method: values[j, i] is the mean objective at
    (lambdas[i], densities[j]) over the ok rows with a finite objective (several seeds share a cell);
    NaN where no such row. Rows with per-model coefficients (lambda_0 …) are not on the grid."""
    rows = _grid_rows(table, method)
    return pivot(column_floats(rows, "lambda"), column_floats(rows, "density"), column_floats(rows, objective))


def _grid_rows(table: pa.Table, method: str) -> pa.Table:
    methods = np.array(table.column("method").to_pylist() if "method" in table.column_names
                       else [None] * table.num_rows, dtype=object)
    keep = status_mask(table) & (methods == method) & ~_per_model_rows(table)
    return table.filter(pa.array(keep))


def _per_model_columns(table: pa.Table) -> List[str]:
    found = [(int(m.group(1)), name) for name in table.column_names if (m := PER_MODEL_LAMBDA.fullmatch(name))]
    return [name for _, name in sorted(found)]


def _per_model_rows(table: pa.Table) -> np.ndarray:
    """Rows whose per-model coefficients are set (a random search over lambda_0 … lambda_{N−1})."""
    columns = _per_model_columns(table)
    if not columns:
        return np.zeros(table.num_rows, dtype=bool)
    return np.isfinite(column_floats(table, columns[0]))


def _merge_rows(run: RunView) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(methods, objective values, candidate ids) of the ok rows."""
    return run.texts("method"), run.floats(run.objective), run.floats("candidate_id")


def _merge_params(run: RunView, i: int) -> str:
    parts = []
    for name in ("lambda", "density", "seed"):
        value = run.floats(name)[i]
        if np.isfinite(value):
            parts.append(f"{'λ' if name == 'lambda' else name} = {fmt(value if name != 'seed' else int(value))}")
    for name in _per_model_columns(run.ok):
        value = run.floats(name)[i]
        if np.isfinite(value):
            parts.append(f"λ{name[len('lambda_'):]} = {fmt(value)}")
    soup = run.texts("soup")[i]
    if soup is not None:
        parts.append(f"{'models' if '+' in soup else 'model'} {soup}")
    return ", ".join(parts)


def _merge_summary(run: RunView) -> List[Tuple[str, float, int, str]]:
    """(label, objective, candidate_id, parameters) for the bars: base, each model, the uniform soup,
    the final greedy soup (the greedy_soup row with the largest candidate_id) and each other method's best row."""
    methods, values, ids = _merge_rows(run)
    soups = run.texts("soup")
    entries: List[Tuple[str, float, int, str]] = []

    def add(text: str, i: int) -> None:
        entries.append((text, float(values[i]), int(ids[i]), _merge_params(run, i)))

    def best_of(method: str) -> Optional[int]:
        on = np.flatnonzero((methods == method) & np.isfinite(values))
        if not len(on):
            return None
        return int(on[best_index(values[on], run.mode)])

    if (i := best_of("base")) is not None:
        add("base", i)
    model_rows = np.flatnonzero((methods == "model") & np.isfinite(values))
    names = _model_names(run)
    for n, i in enumerate(model_rows[np.argsort(ids[model_rows], kind="stable")]):
        index = soups[i] if soups[i] is not None else str(n)
        named = index.isdigit() and int(index) < len(names)
        add(f"model {index}" + (f" ({names[int(index)]})" if named else ""), int(i))
    if (i := best_of("uniform_soup")) is not None:
        add("uniform soup", i)
    greedy = np.flatnonzero(methods == "greedy_soup")
    if len(greedy):
        last = int(greedy[np.argmax(ids[greedy])])
        if np.isfinite(values[last]):
            add("greedy soup (final)" if soups[last] is None else f"greedy soup (final: {soups[last]})", last)
    named = {"base", "model", "uniform_soup", "greedy_soup", "greedy_step"}  # greedy_step: the soup's trial rounds
    for method in sorted({m for m in methods if m is not None and m not in named}):
        if (i := best_of(method)) is not None:
            add(f"best {method}", i)
    return entries


@dataclass
class _Panel:
    """One panel of merge.png: how to draw it, whether it is a heat map (a row of its own), and its caption."""

    draw: Callable[[Any, Any], None]
    heat_map: bool
    caption: str


def _merge_figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    from matplotlib.figure import Figure as Canvas

    methods, values, ids = _merge_rows(run)
    for method in dict.fromkeys(m for m in methods if m is not None):
        on = np.flatnonzero((methods == method) & np.isfinite(values))
        if len(on):
            i = int(on[best_index(values[on], run.mode)])
            params = _merge_params(run, i)
            notes.append(f"best {method}: {run.objective} = {fmt(values[i])} (candidate {int(ids[i])}"
                         f"{'; ' + params if params else ''})")
    greedy = np.flatnonzero(methods == "greedy_soup")
    if len(greedy):
        last = int(greedy[np.argmax(ids[greedy])])
        notes.append(f"final greedy soup: models {run.texts('soup')[last] or '?'}, "
                     f"{run.objective} = {fmt(values[last])} (candidate {int(ids[last])})")
    drawn = []
    panels = _merge_panels(run)
    if panels:
        maps = [p for p in panels if p.heat_map]
        others = [p for p in panels if not p.heat_map]
        rows = len(maps) + math.ceil(len(others) / MAX_COLUMNS)
        fig = Canvas(figsize=(MAX_FIGURE_WIDTH, HEAT_MAP_HEIGHT * len(maps) + PANEL_HEIGHT * (rows - len(maps))),
                     layout="constrained")
        grid = fig.add_gridspec(rows, MAX_COLUMNS)
        axes = [fig.add_subplot(grid[r, :]) for r in range(len(maps))]
        for k in range(len(others)):
            alone = k == len(others) - 1 and k % MAX_COLUMNS == 0  # the last row's only panel spans it
            row = len(maps) + k // MAX_COLUMNS
            axes.append(fig.add_subplot(grid[row, :] if alone else grid[row, k % MAX_COLUMNS]))
        for ax, panel in zip(axes, maps + others):
            panel.draw(fig, ax)
        fig.suptitle(f"{label(run.name)}: {label(run.objective)} over the merge coefficients "
                     f"({better(run.mode)})", fontsize=11)
        path = folder / "merge.png"
        save(fig, path)
        drawn.append(Figure(path, f"{run.objective} over each merge method's coefficients: "
                                  + "; ".join(p.caption for p in maps + others) + "."))
    entries = _merge_summary(run)
    if entries:
        drawn.append(_merge_dots(run, folder, entries))
    return drawn


def _merge_panels(run: RunView) -> List[_Panel]:
    methods, values, _ = _merge_rows(run)
    per_model = _per_model_rows(run.ok)
    lambdas = run.floats("lambda")
    panels: List[_Panel] = []
    for method in GRID_METHODS:
        on = (methods == method) & ~per_model
        if (on & np.isfinite(lambdas) & np.isfinite(run.floats("density")) & np.isfinite(values)).any():
            rows = _grid_rows(run.ok, method)
            most = int(pivot_counts(column_floats(rows, "lambda"), column_floats(rows, "density"),
                                    column_floats(rows, run.objective)).max(initial=1))
            what = "one row per cell" if most == 1 else f"the mean over up to {most} seeds per cell"
            panels.append(_Panel(lambda fig, ax, method=method, most=most: _heat_map(run, fig, ax, method, most),
                                 True, f"{method} as a heat map over λ × density ({what}, best cell outlined, "
                                       f"brighter where better)"))
    on = (methods == "task_arithmetic") & ~per_model & np.isfinite(lambdas) & np.isfinite(values)
    if on.any():
        panels.append(_Panel(lambda fig, ax, on=on: _lambda_line(run, ax, on), False,
                             "task_arithmetic as a line over λ (the star is its best)"))
    columns = _per_model_columns(run.ok)
    if len(columns) >= 2:
        both = per_model & np.isfinite(run.floats(columns[1])) & np.isfinite(values)
        search = getattr(run.study, "search", None)
        how = {"random": "drawn at random", "grid": "on a grid"}.get(str(search), "")
        for method in dict.fromkeys(m for m in methods[both] if m is not None):
            panels.append(_Panel(lambda fig, ax, on=both & (methods == method), method=method:
                                 _per_model_scatter(run, fig, ax, on, method, columns), False,
                                 f"{method} with one λ per model ({how + ', ' if how else ''}λ0 against λ1, "
                                 f"coloured by {run.objective})"))
    return panels


def _heat_map(run: RunView, fig: Any, ax: Any, method: str, most: int) -> None:
    from matplotlib.patches import Rectangle

    lambdas, densities, grid = merge_grid(run.ok, method, run.objective)
    masked = np.ma.masked_invalid(grid)
    scale = value_scale(grid, run.mode)
    image = ax.imshow(masked, origin="lower", aspect="auto", cmap=cmap(run.mode), norm=scale.norm())
    scale.colorbar(fig, image, ax, run.metric_label(run.objective, scale), pad=0.01)
    ax.set_xticks(range(len(lambdas)), [fmt(v) for v in lambdas], rotation=45 if len(lambdas) > 12 else 0)
    ax.set_yticks(range(len(densities)), [fmt(v) for v in densities])
    thin_ticks(ax)
    if len(lambdas) <= MAX_ANNOTATED_GRID and len(densities) <= MAX_ANNOTATED_GRID:
        _annotate_cells(fig, ax, grid, scale, image.get_cmap())
    best = best_index(grid.ravel(), run.mode)
    title = f"{method}: {'mean ' if most > 1 else ''}{label(run.objective)}{' over seeds' if most > 1 else ''}"
    if best is not None:
        j, i = divmod(best, len(lambdas))
        ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5, zorder=5))
        title += f"; best {fmt(grid[j, i])} at λ = {fmt(lambdas[i])}, density = {fmt(densities[j])}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("λ (scale of the merged task vectors)")
    ax.set_ylabel("density (fraction kept)")


def _annotate_cells(fig: Any, ax: Any, grid: np.ndarray, scale: Scale, colours: Any) -> None:
    """Each cell's value, in black or white against its colour, when the cells are big enough for the text."""
    box = ax.get_position()  # before the layout, which only widens the axes: a cautious estimate
    rows, columns = grid.shape
    cell_w = box.width * fig.get_figwidth() * 72 / max(columns, 1)  # points
    cell_h = box.height * fig.get_figheight() * 72 / max(rows, 1)
    texts = {(j, i): f"{grid[j, i]:.3g}" if np.isfinite(grid[j, i]) else "no rows"
             for j in range(rows) for i in range(columns)}
    widest = max((len(t) for t in texts.values()), default=0)
    if cell_w < widest * CHAR_WIDTH * MIN_FONT_SIZE + 4 or cell_h < 1.4 * MIN_FONT_SIZE:
        return
    norm = scale.norm()
    for (j, i), text in texts.items():
        if not np.isfinite(grid[j, i]):
            ax.text(i, j, text, ha="center", va="center", fontsize=MIN_FONT_SIZE, color="0.5")
            continue
        r, g, b, _ = colours(float(np.clip(norm(grid[j, i]), 0.0, 1.0)))
        light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
        ax.text(i, j, text, ha="center", va="center", fontsize=MIN_FONT_SIZE, color="black" if light else "white")



def _lambda_line(run: RunView, ax: Any, on: np.ndarray) -> None:
    lambdas = run.floats("lambda")[on]
    values = run.floats(run.objective)[on]
    xs, _, grid = pivot(lambdas, np.zeros_like(lambdas), values)
    most = int(pivot_counts(lambdas, np.zeros_like(lambdas), values).max(initial=1))
    ax.plot(xs, grid[0], "-o", ms=4, color="C0")
    scale = value_scale(grid[0], run.mode)
    scale.axis(ax, "y", grid[0])
    best = best_index(grid[0], run.mode)
    title = f"task_arithmetic: {'mean ' if most > 1 else ''}{label(run.objective)} vs λ"
    if best is not None:
        ax.plot(xs[best], grid[0][best], "*", ms=14, color="C3", mec="black", zorder=4)
        title += f"\nbest {fmt(grid[0][best])} at λ = {fmt(xs[best])}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("λ (scale of the summed task vectors)")
    ax.set_ylabel(run.metric_label(run.objective, scale))
    ax.grid(alpha=0.3)


def _per_model_scatter(run: RunView, fig: Any, ax: Any, on: np.ndarray, method: str, columns: List[str]) -> None:
    l0, l1 = run.floats(columns[0])[on], run.floats(columns[1])[on]
    values = run.floats(run.objective)[on]
    scale = value_scale(values, run.mode)
    dots = ax.scatter(l0, l1, c=values, s=22, cmap=cmap(run.mode), norm=scale.norm(), edgecolors="none")
    scale.colorbar(fig, dots, ax, run.metric_label(run.objective, scale))
    best = best_index(values, run.mode)
    title = f"{method}: one λ per model"
    if best is not None:
        ax.plot(l0[best], l1[best], "*", ms=15, color="C3", mec="black", zorder=4)
        title += f"\nbest {fmt(values[best])} (the star)"
    hidden = [f"λ{name[len('lambda_'):]}" for name in columns[2:]]
    if hidden:
        title += f"; {hidden[0] if len(hidden) == 1 else hidden[0] + ' … ' + hidden[-1]} not shown"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("λ0 (coefficient of model 0)")
    ax.set_ylabel("λ1 (coefficient of model 1)")
    ax.grid(alpha=0.3)


def _merge_dots(run: RunView, folder: Path, entries: List[Tuple[str, float, int, str]]) -> Figure:
    """merge-summary.png: one dot per entry on a value axis zoomed to the entries, with the base and the best
    single model as reference lines: the merges that beat every model stand left (or right) of the second."""
    fig, (ax,) = figure(1, width=7.8, height=max(2.6, 0.36 * len(entries) + 1.5))
    labels = [label(e[0]) for e in entries]
    values = np.array([e[1] for e in entries])
    best = best_index(values, run.mode)
    rows = np.arange(len(entries))
    kinds = ["base" if e[0] == "base" else "model" if e[0].startswith("model") else "merge" for e in entries]
    colours = ["C3" if k == best else {"base": "0.45", "model": "0.6", "merge": "C0"}[kind]
               for k, kind in enumerate(kinds)]
    for k in rows:
        ax.plot([values[k]], [k], "o", ms=8, color=colours[k], mec="black" if k == best else "none", zorder=4)
        ax.annotate(fmt(values[k]), (values[k], k), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=MIN_FONT_SIZE + 1, zorder=5,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))
    base = [v for v, kind in zip(values, kinds) if kind == "base"]
    models = np.array([v for v, kind in zip(values, kinds) if kind == "model"])
    if base:
        ax.axvline(base[0], color="0.45", ls="--", lw=1.2, zorder=1, label=f"base ({fmt(base[0])})")
    if len(models):
        top = models[best_index(models, run.mode)]
        ax.axvline(top, color="0.3", ls=":", lw=1.4, zorder=1, label=f"best single model ({fmt(top)})")
    ax.set_yticks(rows, labels)
    ax.invert_yaxis()
    scale = value_scale(values, run.mode)
    scale.axis(ax, "x", values)
    ax.margins(x=0.12)
    ax.set_xlabel(run.metric_label(run.objective, scale))
    ax.set_title(f"{label(run.name)}: base, models, soups and each method's best\n({better(run.mode)}; "
                 f"the best in red)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if base or len(models):
        fig.legend(loc="outside lower center", ncol=2, fontsize=MIN_FONT_SIZE + 1, frameon=False)
    path = folder / "merge-summary.png"
    save(fig, path)
    return Figure(path, f"{run.objective} of the base, each model, the uniform soup, the final greedy soup and the "
                        f"best row of each merge method, one dot each; the overall best is red, the dashed line "
                        f"is the base and the dotted line the best single model.")


# --------------------------------------------------------------------------- the trade-off between metrics

#: How merge-tradeoff.png draws each method's rows: (colour, marker). The base and the models are drawn apart.
METHOD_STYLE = {"task_arithmetic": ("C0", "o"), "ties": ("C1", "s"), "dare": ("C2", "^"), "dare_ties": ("C4", "v"),
                "uniform_soup": ("C5", "D"), "greedy_step": ("C7", "P"), "greedy_soup": ("C6", "X")}
#: Pareto-optimal rows listed on the page, at most (the best by the objective first).
MAX_PARETO_LISTED = 40
#: The trade-off panels' axes run from the best value to the worst of the base, the models and the pair's front,
#: with this fraction of that range as a margin either side.
TRADEOFF_MARGIN = 0.06


def pareto_mask(values: np.ndarray, maximise: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Which rows of `values` [n, k] are Pareto-optimal: no other row is at least as good on every column
    and better on one. Lower is better, or higher for the columns `maximise` marks. A row with a non-finite
    value is never optimal; equal rows are optimal together or not at all.

    The rows are visited in lexicographic order, in which whatever dominates a row comes before it, and
    each is compared with the optimal rows found so far: O(n · front · k)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be [rows, metrics], got shape {values.shape}")
    if maximise is not None:
        values = np.where(np.asarray(maximise, dtype=bool)[None, :], -values, values)
    rows = np.flatnonzero(np.isfinite(values).all(axis=1))
    order = rows[np.lexsort(values[rows].T[::-1])] if len(rows) else rows
    front: List[int] = []
    for i in order.tolist():
        v = values[i]
        if front:
            seen = values[front]
            if ((seen <= v).all(axis=1) & (seen < v).any(axis=1)).any():
                continue
        front.append(i)
    keep = np.zeros(len(values), dtype=bool)
    keep[front] = True
    return keep


@dataclass
class _Tradeoff:
    """The rows merge-tradeoff.png and the page's Pareto table draw on: the ok rows with a finite value of
    every trade-off metric."""

    metrics: List[str]
    rows: np.ndarray  # indices into the ok rows
    values: np.ndarray  # [rows, metrics]
    maximise: List[bool]
    front: np.ndarray  # [rows] Pareto-optimal over every metric


def _tradeoff(run: RunView) -> Optional[_Tradeoff]:
    """The trade-off of `study.tradeoff`, or None (no such setting, or fewer than 2 of its metrics in the
    results: a warning then says which are missing)."""
    def make(run: RunView) -> Optional[_Tradeoff]:
        named = list(getattr(run.study, "tradeoff", None) or [])
        if not named:
            return None
        missing = [m for m in named if m not in run.metrics]
        if missing:
            run.warnings.append(f"study.tradeoff names {', '.join(missing)}, which the results have no column of "
                                f"(metrics: {', '.join(run.metrics)}): left out of the trade-off")
        metrics = [m for m in named if m in run.metrics]
        if len(metrics) < 2:
            return None
        values = np.stack([run.floats(m) for m in metrics], axis=1)
        rows = np.flatnonzero(np.isfinite(values).all(axis=1))
        maximise = [run.mode_of(m) == "max" for m in metrics]
        return _Tradeoff(metrics, rows, values[rows], maximise, pareto_mask(values[rows], maximise))

    return run.once("merge-tradeoff", make)


def _model_names(run: RunView) -> List[str]:
    """Each model's name on the figure: its weights file's stem (the folder's name for a checkpoint folder)."""
    names = []
    for path in getattr(run.study, "models", None) or []:
        p = Path(str(path))
        names.append(p.parent.name if p.stem in ("model", "pytorch_model") else p.stem)
    return names


def _model_name(soup: Optional[str], models: List[str]) -> str:
    """The name of the model a `model` row evaluates (its `soup` column holds the model's index)."""
    return models[int(soup)] if soup is not None and soup.isdigit() and int(soup) < len(models) else f"model {soup}"


def _row_name(run: RunView, i: int, models: List[str]) -> str:
    """What row `i` is on the page's table: a model's name for a model's own row, else its method."""
    method = run.texts("method")[i]
    return _model_name(run.texts("soup")[i], models) if method == "model" else str(method)


def _tradeoff_figure(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """merge-tradeoff.png: each pair of the trade-off metrics, every candidate a point coloured and shaped
    by its method, the pair's Pareto front as a staircase, the base and each model marked and named."""
    from matplotlib.lines import Line2D

    t = _tradeoff(run)
    if t is None or not len(t.rows):
        return []
    methods = run.texts("method")[t.rows]
    soups = run.texts("soup")[t.rows]
    models = _model_names(run)
    base = np.flatnonzero(methods == "base")
    model_rows = np.flatnonzero(methods == "model")
    best = best_index(run.floats(run.objective)[t.rows], run.mode) if run.objective else None
    pairs = list(itertools.combinations(range(len(t.metrics)), 2))
    legend_slot = len(pairs) > 1 and len(pairs) % MAX_COLUMNS == 1  # an empty cell: the legend goes there
    fig, axes = figure(len(pairs) + (1 if legend_slot else 0), width=4.55, height=4.1)
    labels = []
    for ax, (a, b) in zip(axes, pairs):
        x, y = t.values[:, a], t.values[:, b]
        pair = pareto_mask(t.values[:, [a, b]], [t.maximise[a], t.maximise[b]])
        for method in [m for m in METHOD_STYLE if (methods == m).any()] + sorted(
                {m for m in methods if m is not None and m not in METHOD_STYLE and m not in ("base", "model")}):
            on = methods == method
            colour, marker = METHOD_STYLE.get(method, ("C8", "o"))
            ax.scatter(x[on], y[on], s=20, color=colour, marker=marker, alpha=0.85, edgecolors="none", zorder=3,
                       label=label(method.replace("_", " ")))
        order = np.flatnonzero(pair)[np.argsort(x[pair], kind="stable")]
        ax.step(x[order], y[order], where="pre" if t.maximise[a] else "post", color="0.15", ls="--", lw=1.2,
                zorder=2, label="Pareto front of the pair")
        ax.scatter(x[order], y[order], s=58, facecolors="none", edgecolors="0.15", linewidths=0.9, zorder=4)
        for i in base:
            ax.plot(x[i], y[i], "s", ms=9, color="black", zorder=6, label="base")
            labels.append((ax, point_label(ax, "base", (x[i], y[i]), fontsize=MIN_FONT_SIZE + 1, zorder=7)))
        for k, i in enumerate(model_rows):
            ax.plot(x[i], y[i], "*", ms=15, color="black", mec="white", mew=0.6, zorder=6,
                    label="a fine-tuned model" if k == 0 else None)
            labels.append((ax, point_label(ax, label(_model_name(soups[i], models)), (x[i], y[i]),
                                           fontsize=MIN_FONT_SIZE + 1, zorder=7)))
        if best is not None:
            ax.plot(x[best], y[best], "o", ms=14, mfc="none", mec="C3", mew=2.0, zorder=5,
                    label=f"best {label(run.objective)}")
        anchors = np.concatenate([base, model_rows, np.flatnonzero(pair)]).astype(np.int64)
        beyond = np.zeros(len(x), dtype=bool)
        for which, col in (("x", a), ("y", b)):
            beyond |= _tradeoff_axis(ax, which, t.values[:, col], anchors, t.maximise[col])
        count = int(beyond.sum())
        ax.set_xlabel(run.metric_label(t.metrics[a]))
        ax.set_ylabel(run.metric_label(t.metrics[b]))
        ax.set_title(f"{label(t.metrics[b])} against {label(t.metrics[a])}\n{int(pair.sum())} on the pair's front"
                     + (f", {count} beyond the axes" if count else ""), fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="0.15", mew=0.9))
    names.append("on the pair's front")
    if legend_slot:
        axes[-1].axis("off")
        axes[-1].legend(handles, names, loc="center", fontsize=MIN_FONT_SIZE + 1, frameon=False)
    else:
        fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=MIN_FONT_SIZE + 1, frameon=False)
    modes = {run.mode_of(m) for m in t.metrics}
    fig.suptitle(f"{label(run.name)}: the trade-off between {', '.join(label(m) for m in t.metrics)}"
                 + (f" ({better(modes.pop())} on each)" if len(modes) == 1 else ""), fontsize=11)
    renderer = renderer_of(fig)
    for ax in axes[: len(pairs)]:
        place_labels(ax, [text for where, text in labels if where is ax], renderer=renderer)
    path = folder / "merge-tradeoff.png"
    save(fig, path)
    notes.append(f"Pareto set over {', '.join(t.metrics)}: {int(t.front.sum())} of {len(t.rows)} candidates "
                 f"(no other candidate is as good on all of them and better on one; listed below)")
    caption = (f"Each candidate as a point in each pair of {', '.join(t.metrics)}, coloured and shaped by its merge "
               f"method; the dashed staircase is the pair's Pareto front (its points ringed: no candidate is better "
               f"on both), the black square the base, each star a fine-tuned model"
               + (f", the red ring the best {run.objective}" if best is not None else "")
               + "; each axis runs from the best value to the worst of the base, the models and the pair's front "
                 "(the candidates worse than all of those on an axis lie beyond it, counted in the panel's title).")
    return [Figure(path, caption)]


def _tradeoff_axis(ax: Any, which: str, values: np.ndarray, anchors: np.ndarray, maximise: bool) -> np.ndarray:
    """Limit one axis of a trade-off panel to the best value and the worst of `anchors` (the base, the
    models and the pair's front), with a margin; a log scale by `value_scale`'s rule over what is shown.
    Returns which rows lie beyond the limits."""
    finite = values[np.isfinite(values)]
    if not len(finite) or not len(anchors):
        return np.zeros(len(values), dtype=bool)
    if maximise:
        low, high = float(values[anchors].min()), float(finite.max())
    else:
        low, high = float(finite.min()), float(values[anchors].max())
    outside = (values < low) | (values > high)
    shown = values[~outside & np.isfinite(values)]
    scale = value_scale(shown, "max" if maximise else "min")
    if scale.log:
        log_axis(ax, which, shown)
        pad = (high / low) ** TRADEOFF_MARGIN if high > low else 1.5
        limits = (low / pad, high * pad)
    else:
        pad = (high - low) * TRADEOFF_MARGIN if high > low else abs(high) * 0.05 or 0.5
        limits = (low - pad, high + pad)
    (ax.set_xlim if which == "x" else ax.set_ylim)(*limits)
    return outside


def _pareto_section(run: RunView) -> List[str]:
    """The page's table of the Pareto set over `study.tradeoff` (best objective first; none without one)."""
    t = _tradeoff(run)
    if t is None:
        return []
    head = "<h2>Trade-off: the Pareto set</h2>\n"
    chosen = t.rows[t.front]
    if not len(chosen):
        return [head + f"<p>No candidate has a finite value of every one of {escape(', '.join(t.metrics))}.</p>\n"]
    objective = run.floats(run.objective)[chosen] if run.objective else np.full(len(chosen), np.nan)
    key = np.where(np.isfinite(objective), -objective if run.mode == "max" else objective, np.inf)
    chosen = chosen[np.argsort(key, kind="stable")]
    shown = chosen[:MAX_PARETO_LISTED]
    models = _model_names(run)
    metrics = t.metrics + ([run.objective] if run.objective and run.objective not in t.metrics else [])
    described = [c for c in ("lambda", *_per_model_columns(run.ok), "density", "seed", "soup")
                 if c in run.ok.column_names]
    rows = []
    for i in shown.tolist():
        row: List[Any] = [int(run.floats("candidate_id")[i]), _row_name(run, i, models)]
        for c in described:
            value = run.texts(c)[i] if c == "soup" else run.floats(c)[i]
            finite = value is not None and (isinstance(value, str) or np.isfinite(value))
            row.append((int(value) if c == "seed" else value) if finite else None)
        row += [float(run.floats(m)[i]) for m in metrics]
        rows.append(row)
    names = ", ".join(t.metrics[:-1]) + f" and {t.metrics[-1]}"
    modes = {run.mode_of(m) for m in t.metrics}
    how = f"{better(modes.pop())} on each" if len(modes) == 1 else "; ".join(
        f"{m}: {better(run.mode_of(m))}" for m in t.metrics)
    more = len(chosen) - len(shown)
    text = (f"<p>The {len(chosen)} of {len(t.rows)} candidates on the Pareto front of {escape(names)} "
            f"({escape(how)}): no other candidate is at least as good on all of them and better on one. Best "
            f"{escape(run.objective or '')} first{f'; the first {len(shown)} shown' if more else ''}. The models "
            f"are named by their files; <i>soup</i> lists the models a soup averages.</p>\n")
    return [head + text + html_table(["candidate_id", "candidate", *described, *metrics], rows, "pareto") + "\n"]
