"""`sweep report`: figures and one self-contained HTML page for a finished run.

`write_report(run_dir)` reads a run folder written by `sweep run`
(`config.yaml`, `run.json` and the Parquet results it names), draws the
figures its study kind calls for into `<run_dir>/report/`, writes
`report.html` there with every figure embedded (the page can be mailed or
attached on its own), and logs the folder to the sweep's MLflow run.

Only rows with status `ok` and finite values are drawn; the others are
counted, and their errors listed, on the page.

Training studies (`pbt`, `search`) write one row per member per generation;
their report follows the population over training (`training.png`), draws
pbt's lineage tree with the best member's hyperparameter schedule
(`lineage.png`), the final objective against each searched hyperparameter
(`hyperparameters.png`), and puts the best member of the last generation,
with its schedule from `sweep.analysis.lineage`, on the page.

Matplotlib is imported when a report is written, never when this module is.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .analysis import lineage
from .analysis import metric_mode as _metric_mode
from .errors import ConfigError, SweepError
from .types import FAILED, INVALID, OK

#: Columns every results table has that are neither recipe nor metric.
FIXED_COLUMNS = frozenset({"candidate_id", "status", "error", "worker", "node", "eval_seconds"})
#: Columns of a training study's rows (kinds pbt and search) besides the searched hyperparameters.
TRAINING_COLUMNS = ("member", "generation", "parent", "step")
#: Study kinds that train a population, one row per member per generation.
TRAINING_KINDS = ("pbt", "search")
#: Recipe columns by study kind (training kinds add their searched hyperparameters); kinds not named
#: here get the generic parts only.
RECIPE_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "pbt": TRAINING_COLUMNS,
    "search": TRAINING_COLUMNS,
    "checkpoints": ("path",),
    "perturb": ("seed",),
    "interpolate": ("alpha",),
    "align": ("path", "alpha"),
    "landscape": ("x", "y"),
    "merge": ("method", "lambda", "density", "seed", "soup"),
}
#: Per-model coefficients of a merge study's random search: lambda_0 … lambda_{N-1}.
PER_MODEL_LAMBDA = re.compile(r"lambda_([0-9]+)")
#: Merge methods drawn as heat maps over lambda × density.
GRID_METHODS = ("ties", "dare", "dare_ties")
#: Every file name a report may write (removed first, so a re-run leaves no stale figure behind).
FIGURE_NAMES = ("interpolate.png", "align.png", "landscape.png", "merge.png", "merge-summary.png", "objective.png",
                "training.png", "lineage.png", "hyperparameters.png")
#: Resolution of the PNGs.
DPI = 120
#: Invalid and failed rows listed with their errors on the page.
MAX_ERRORS_LISTED = 20
#: Characters of one error shown on the page.
MAX_ERROR_CHARS = 2000
#: Heat map cells are annotated with their values up to this many rows and columns.
MAX_ANNOTATED_GRID = 12
#: A loss contour uses logarithmic levels when its range spans more than this many decades.
LOG_LEVELS_DECADES = 2.0
#: Panels per row in a figure.
MAX_COLUMNS = 3
#: Contour levels of a landscape.
CONTOUR_LEVELS = 16
#: Members drawn in training.png (an evenly spaced subset of a larger population, plus the best lineage).
MAX_MEMBERS_DRAWN = 400
#: The lineage tree is drawn for populations up to this size (the schedule panels always).
MAX_TREE_MEMBERS = 256
#: Switches of the best lineage named in training.png.
MAX_SWITCHES_NAMED = 12
#: Largest (generations × members) grid a training report lays its rows on (about 1 GB of arrays).
MAX_GRID_CELLS = 25_000_000

#: The rule for metrics other than the objective, which has its own mode in the config.
MODE_RULE = ("metrics other than the objective count as lower-is-better when their name holds 'loss', 'error' "
             "or 'perplexity', else higher-is-better")


@dataclass
class Report:
    """What `write_report` wrote, and whether it reached MLflow."""

    folder: Path  # <run_dir>/report
    html: Path  # <run_dir>/report/report.html
    figures: List[Path]  # the PNGs written
    mlflow_logged: bool  # True when the folder went to the sweep's MLflow run
    warnings: List[str] = field(default_factory=list)  # what could not be done (all but MLflow's also on the page)


# --------------------------------------------------------------------------- reading a run


def write_report(run_dir: Path, *, mlflow: bool = True, top: int = 10) -> Report:
    """Draw the run's figures and write `<run_dir>/report/report.html`; log the folder to MLflow.

    `top` best ok rows (by the objective, in the config's mode) are listed on
    the page. With `mlflow` (and MLflow enabled in the run's config, and an
    MLflow run recorded in run.json) the report folder is logged as the run's
    `report/` artifacts; a failure there is a warning in the returned Report,
    never an exception.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SweepError(f"top must be a whole number of at least 1, got {top!r}")
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    cfg = _load(run_dir)
    location = str(record.get("results") or run_dir / "results")
    table = _read_table(location, run_dir)
    warnings: List[str] = []
    run = _describe(cfg, table, location, warnings, record=record, run_dir=run_dir)

    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    for name in FIGURE_NAMES:
        (folder / name).unlink(missing_ok=True)
    figures, summary = _draw(run, folder, warnings)
    page = folder / "report.html"
    page.write_text(_page(run, figures, summary, top, warnings), encoding="utf-8")

    logged = False
    if mlflow:
        logged = _log_to_mlflow(cfg, record, folder, warnings)
    return Report(folder=folder, html=page, figures=[f.path for f in figures], mlflow_logged=logged,
                  warnings=warnings)


_GIVE = "give the runs/<name> folder of an earlier `sweep run`"


def _read_record(run_dir: Path) -> Dict[str, Any]:
    """run.json, after checking the folder holds config.yaml and run.json."""
    if not run_dir.is_dir():
        raise SweepError(f"{run_dir}: no such folder; {_GIVE}")
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise SweepError(f"{run_dir}: not a run folder: {name} is missing; {_GIVE} "
                             f"(it holds config.yaml, run.json and the results)")
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SweepError(f"{path}: cannot read it ({e}); {_GIVE}") from None
    if not isinstance(record, dict):
        raise SweepError(f"{path}: should hold a JSON object, got {type(record).__name__}; {_GIVE}")
    return record


def _load(run_dir: Path) -> Any:
    """The run's resolved config (imports not checked: the report runs no model).

    A run folder looked at elsewhere may have lost the files its config names
    (checkpoints, endpoints): those are then not checked either, since the
    report needs only the config's settings.
    """
    from .config import SweepConfig, load_config, read_yaml

    path = run_dir / "config.yaml"
    try:
        return load_config(path, check_imports=False)
    except ConfigError as first:
        try:
            raw = read_yaml(path.read_text(encoding="utf-8"), source=str(path))
            return SweepConfig.model_validate(raw, context={"base_dir": path.resolve().parent, "check_files": False})
        except Exception:
            raise SweepError(f"cannot read the run's config: {first}") from None


def _read_table(location: str, run_dir: Path) -> pa.Table:
    from .sinks.parquet import read_results

    try:
        return read_results(location)
    except FileNotFoundError:
        raise SweepError(f"{run_dir}: no results at {location} (named by run.json); {_GIVE} that wrote rows") from None
    except (OSError, pa.ArrowException) as e:
        raise SweepError(f"{run_dir}: cannot read the results at {location}: {e}") from None


@dataclass
class _Run:
    """A run's rows and what the config says about them."""

    name: str
    kind: str
    study: Any
    location: str
    table: pa.Table  # every row
    ok: pa.Table  # the rows with status ok
    recipe: List[str]  # recipe columns present, in table order
    metrics: List[str]  # metric columns, the objective first
    objective: Optional[str]
    mode: str  # the objective's
    hyper: List[str] = field(default_factory=list)  # training kinds: the searched hyperparameters in the table
    log_hyper: List[str] = field(default_factory=list)  # those searched log-uniformly (drawn on log axes)
    record: Dict[str, Any] = field(default_factory=dict)  # run.json
    run_dir: Optional[Path] = None
    population: Optional["_Population"] = None  # training kinds: the rows by member and generation
    _cache: Dict[str, np.ndarray] = field(default_factory=dict)

    def floats(self, name: str) -> np.ndarray:
        """Column `name` of the ok rows as float64 (null and missing → NaN)."""
        if name not in self._cache:
            self._cache[name] = _floats(self.ok, name)
        return self._cache[name]

    def texts(self, name: str) -> List[Optional[str]]:
        """Column `name` of the ok rows as strings (missing → None)."""
        key = "\0" + name
        if key not in self._cache:
            values = self.ok.column(name).to_pylist() if name in self.ok.column_names else [None] * self.ok.num_rows
            self._cache[key] = np.array([None if v is None else str(v) for v in values], dtype=object)
        return self._cache[key]

    def mode_of(self, metric: str) -> str:
        return self.mode if metric == self.objective else metric_mode(metric)


def metric_mode(name: str) -> str:
    """'min' or 'max' for a metric that is not the objective (the rule of `sweep.analysis.metric_mode`)."""
    return _metric_mode(name, None, "min")


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return np.full(table.num_rows, np.nan)
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _status_mask(table: pa.Table, status: str) -> np.ndarray:
    if "status" not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    mask = pc.fill_null(pc.equal(table.column("status"), status), False)
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pa.array(_status_mask(table, OK)))


def _recipe_and_metrics(table: pa.Table, kind: str, extra: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """(recipe columns, metric columns) of a results table, in table order.

    Metrics are the float columns that are neither fixed nor the kind's recipe
    columns (every metric is float64); other columns an unknown kind adds are
    shown as recipe columns. `extra`: more recipe columns (a training study's
    searched hyperparameters, float64 like the metrics).
    """
    known = set(RECIPE_COLUMNS.get(kind, ())) | set(extra)
    recipe, metrics = [], []
    for f in table.schema:
        if f.name in FIXED_COLUMNS:
            continue
        if f.name in known or (kind == "merge" and PER_MODEL_LAMBDA.fullmatch(f.name)):
            recipe.append(f.name)
        elif pa.types.is_floating(f.type):
            metrics.append(f.name)
        else:
            recipe.append(f.name)
    return recipe, metrics


def _searched(study: Any, table: pa.Table) -> Tuple[List[str], List[str]]:
    """(searched hyperparameters with a results column, the log-uniform ones among them), in config order.
    Constants have no column: every member used the config's value."""
    space = getattr(study, "hyperparameters", None)
    if not isinstance(space, dict):
        return [], []
    hyper = [n for n, v in space.items() if getattr(v, "distribution", None) is not None and n in table.column_names]
    return hyper, [n for n in hyper if getattr(space[n], "distribution", None) == "loguniform"]


def _describe(cfg: Any, table: pa.Table, location: str, warnings: List[str], *,
              record: Optional[Dict[str, Any]] = None, run_dir: Optional[Path] = None) -> _Run:
    study = getattr(cfg, "study", None)
    kind = str(getattr(study, "kind", "") or "unknown")
    hyper, log_hyper = _searched(study, table) if kind in TRAINING_KINDS else ([], [])
    recipe, metrics = _recipe_and_metrics(table, kind, hyper)
    config_metrics = getattr(cfg, "metrics", None)
    objective = getattr(config_metrics, "objective", None)
    mode = getattr(config_metrics, "mode", "min") or "min"
    if objective is not None and objective not in metrics:
        fallback = metrics[0] if metrics else None
        warnings.append(f"metrics.objective is {objective!r}, but the results have no such metric column "
                        f"(metrics: {', '.join(metrics) or 'none'}); ranking by {fallback!r} instead"
                        + (f" ({mode} is better)" if fallback else ""))
        objective = fallback
    elif objective is None:
        objective = metrics[0] if metrics else None
    if objective is not None:
        metrics = [objective] + [m for m in metrics if m != objective]
    run = _Run(name=str(getattr(cfg, "name", "sweep")), kind=kind, study=study, location=location, table=table,
               ok=_ok_rows(table), recipe=recipe, metrics=metrics, objective=objective, mode=mode, hyper=hyper,
               log_hyper=log_hyper, record=record or {}, run_dir=run_dir)
    if kind in TRAINING_KINDS and objective is not None:
        try:
            run.population = _population(run, warnings)
        except Exception as e:  # the page still shows the counts, the table and the errors
            warnings.append(f"could not follow the population by member and generation: {type(e).__name__}: {e}")
    return run


# --------------------------------------------------------------------------- analyses (pure numpy)


def best_rows(table: pa.Table, objective: str, mode: str, top: int) -> pa.Table:
    """The `top` best ok rows with a finite objective, best first (ties: lower candidate_id first)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    ok = _ok_rows(table)
    values = _floats(ok, objective)
    keep = np.flatnonzero(np.isfinite(values))
    ids = _floats(ok, "candidate_id")[keep]
    key = values[keep] if mode == "min" else -values[keep]
    order = keep[np.lexsort((ids, key))][:top]
    return ok.take(pa.array(order, pa.int64()))


def pivot(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xs, ys, grid): the sorted distinct xs and ys, and grid[j, i] the mean of `values` at (xs[i], ys[j]).

    Only points with finite x, y and value count; a cell without one is NaN.
    """
    x, y, values = (np.asarray(a, dtype=np.float64) for a in (x, y, values))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(values)
    x, y, values = x[keep], y[keep], values[keep]
    xs, xi = np.unique(x, return_inverse=True)
    ys, yi = np.unique(y, return_inverse=True)
    sums = np.zeros((len(ys), len(xs)))
    counts = np.zeros((len(ys), len(xs)))
    np.add.at(sums, (yi, xi), values)
    np.add.at(counts, (yi, xi), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)
    return xs, ys, grid


def _per_model_columns(table: pa.Table) -> List[str]:
    found = [(int(m.group(1)), name) for name in table.column_names if (m := PER_MODEL_LAMBDA.fullmatch(name))]
    return [name for _, name in sorted(found)]


def _per_model_rows(table: pa.Table) -> np.ndarray:
    """Rows whose per-model coefficients are set (a random search over lambda_0 … lambda_{N−1})."""
    columns = _per_model_columns(table)
    if not columns:
        return np.zeros(table.num_rows, dtype=bool)
    return np.isfinite(_floats(table, columns[0]))


def merge_grid(table: pa.Table, method: str, objective: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lambdas, densities, values) of one merge method: values[j, i] is the mean objective at
    (lambdas[i], densities[j]) over the ok rows with a finite objective (several seeds share a cell);
    NaN where no such row. Rows with per-model coefficients (lambda_0 …) are not on the grid."""
    methods = np.array(table.column("method").to_pylist() if "method" in table.column_names
                       else [None] * table.num_rows, dtype=object)
    keep = _status_mask(table, OK) & (methods == method) & ~_per_model_rows(table)
    rows = table.filter(pa.array(keep))
    return pivot(_floats(rows, "lambda"), _floats(rows, "density"), _floats(rows, objective))


def _best_index(values: np.ndarray, mode: str) -> Optional[int]:
    """Index of the best finite value (first of ties), None when none is finite."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    masked = np.where(finite, values if mode == "min" else -values, np.inf)
    return int(np.argmin(masked))


def _path_segments(study: Any) -> int:
    endpoints = getattr(study, "endpoints", None)
    try:
        return max(1, len(endpoints) - 1)
    except TypeError:
        return 1


def _path_barrier(alpha: np.ndarray, values: np.ndarray, segments: int, mode: str):
    from .analysis import barrier

    keep = np.isfinite(alpha)  # a value may be non-finite: barrier() counts it as leaving the region
    return barrier(alpha[keep], values[keep], segments, mode)


# --------------------------------------------------------------------------- figures


@dataclass
class _Figure:
    path: Path
    caption: str


def _fmt(value: Any) -> str:
    """A number as the page and the figures show it: 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.4g}"
    return str(value)


def _label(text: str) -> str:
    """Data text safe for a matplotlib label ('$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def _better(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def _metric_title(run: _Run, metric: str) -> str:
    role = "objective, " if metric == run.objective else ""
    return f"{_label(metric)} ({role}{_better(run.mode_of(metric))})"


def _figure(panels: int, width: float = 5.2, height: float = 4.0):
    from matplotlib.figure import Figure

    columns = max(1, min(panels, MAX_COLUMNS))
    rows = max(1, math.ceil(panels / columns))
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _draw(run: _Run, folder: Path, warnings: List[str]) -> Tuple[List[_Figure], List[str]]:
    """Every figure of the run's kind (a figure that fails is a warning, not the end of the report)."""
    figures: List[_Figure] = []
    summary: List[str] = []
    if run.objective is None:
        warnings.append("the results have no metric columns: no figures, no ranking")
        return figures, summary
    if not np.isfinite(run.floats(run.objective)).any():
        warnings.append(f"no ok row has a finite {run.objective}: nothing to draw")
        return figures, summary
    drawers: List[Callable[[_Run, Path, List[str]], List[_Figure]]] = []
    drawers += {"interpolate": [_interpolate], "align": [_align], "landscape": [_landscape],
                "merge": [_merge], "pbt": [_training, _lineage_figure, _hyperparameters],
                "search": [_training, _hyperparameters]}.get(run.kind, [])
    if run.kind not in ("interpolate", "align", "landscape") + TRAINING_KINDS:
        drawers.append(_histogram)
    for draw in drawers:
        try:
            figures += draw(run, folder, summary)
        except Exception as e:  # the page still shows the counts, the table and the errors
            warnings.append(f"could not draw the {draw.__name__.strip('_')} figure: {type(e).__name__}: {e}")
    return figures, summary


def _shade_extrapolation(ax: Any, alpha: np.ndarray, segments: int) -> None:
    finite = alpha[np.isfinite(alpha)]
    if not len(finite):
        return
    label = "extrapolation (beyond the endpoints)"
    if finite.min() < 0:
        ax.axvspan(finite.min(), 0.0, color="0.9", zorder=0, label=label)
        label = None
    if finite.max() > segments:
        ax.axvspan(float(segments), finite.max(), color="0.9", zorder=0, label=label)


def _draw_path(ax: Any, alpha: np.ndarray, values: np.ndarray, segments: int, bar: Any, *, color: str,
               label: str, ends: Sequence[str]) -> None:
    """One path on `ax`: solid between the endpoints, dashed beyond, dots at the endpoints, the chord
    between them dotted, and the barrier as an arrow from the chord to the curve."""
    keep = np.isfinite(alpha) & np.isfinite(values)
    order = np.argsort(alpha[keep], kind="stable")
    a, v = alpha[keep][order], values[keep][order]
    eps = 1e-9
    inside = (a >= -eps) & (a <= segments + eps)
    ax.plot(a[inside], v[inside], "-", color=color, lw=1.8, label=label, zorder=2)
    for part in (a <= eps, a >= segments - eps):
        if (part & ~inside).any():
            ax.plot(a[part], v[part], "--", color=color, lw=1.4, zorder=2)
    chord_x, chord_y = [], []
    for j in range(segments + 1):
        at = np.flatnonzero(np.isclose(a, j, rtol=0.0, atol=1e-9))
        if len(at):
            chord_x.append(j)
            chord_y.append(v[at[0]])
            ax.plot(j, v[at[0]], "o", ms=7, color=color, mec="black", zorder=4)
            ax.annotate(ends[j] if j < len(ends) else f"E{j}", (j, v[at[0]]), xytext=(4, 6),
                        textcoords="offset points", fontsize=8)
    if len(chord_x) == segments + 1:
        ax.plot(chord_x, chord_y, ":", color=color, lw=1.2, zorder=1)
    if bar is None:
        return
    if not math.isfinite(bar.height):
        ax.text(0.02, 0.97, "barrier ∞: non-finite values on the path", transform=ax.transAxes, va="top",
                fontsize=8, color=color)
        return
    if bar.height > 0:
        ax.annotate("", xy=(bar.alpha, bar.value), xytext=(bar.alpha, bar.chord), zorder=5,
                    arrowprops=dict(arrowstyle="->", color=color, lw=1.6, shrinkA=0, shrinkB=0))
        ax.annotate(f"barrier {_fmt(bar.height)}\nat α = {_fmt(bar.alpha)}", (bar.alpha, (bar.value + bar.chord) / 2),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color=color, zorder=6,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))


def _path_legend(ax: Any, alpha: np.ndarray, segments: int) -> None:
    """The legend of a path panel, with one entry each for the dashed and dotted parts."""
    finite = alpha[np.isfinite(alpha)]
    if len(finite) and (finite.min() < 0 or finite.max() > segments):
        ax.plot([], [], "--", color="0.3", label="extrapolated (dashed)")
    ax.plot([], [], ":", color="0.3", label="chord between endpoints")
    ax.legend(fontsize=7, loc="best")


def _interpolate(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    segments = _path_segments(run.study)
    alpha = run.floats("alpha")
    fig, axes = _figure(len(run.metrics))
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        mode = run.mode_of(metric)
        bar = _path_barrier(alpha, values, segments, mode)
        _shade_extrapolation(ax, alpha, segments)
        _draw_path(ax, alpha, values, segments, bar, color="C0", label=f"{_label(metric)} along the path",
                   ends=[f"E{j}" for j in range(segments + 1)])
        ax.set_title(_metric_title(run, metric), fontsize=10)
        ax.set_xlabel(_alpha_label(segments))
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        _path_legend(ax, alpha, segments)
        summary.append(_barrier_line(metric, mode, bar, run.objective))
    fig.suptitle(f"{_label(run.name)}: metrics along the interpolation path", fontsize=11)
    path = folder / "interpolate.png"
    _save(fig, path)
    ends = getattr(run.study, "endpoints", None) or []
    names = ", ".join(f"E{j} = {Path(str(e)).name}" for j, e in enumerate(ends))
    caption = (f"Each metric along the straight path through the endpoints ({names or 'endpoints at integer α'}): "
               f"dots mark the endpoints, dashed parts are extrapolated, the dotted line is the chord between "
               f"endpoints and the arrow marks the barrier (largest worsening over the chord).")
    return [_Figure(path, caption)]


def _alpha_label(segments: int) -> str:
    if segments <= 3:
        return "α (" + ", ".join(f"E{j} at {j}" for j in range(segments + 1)) + ")"
    return f"α (E0 at 0, E1 at 1, …, E{segments} at {segments})"


def _barrier_line(metric: str, mode: str, bar: Any, objective: Optional[str], prefix: str = "") -> str:
    role = " (objective)" if metric == objective else ""
    if bar is None:
        return f"{prefix}barrier of {metric}{role}: not available (an endpoint row is missing or not finite)"
    where = "" if not math.isfinite(bar.height) else f" at α = {_fmt(bar.alpha)}"
    return f"{prefix}barrier of {metric}{role}: {_fmt(bar.height)}{where} ({_better(mode)})"


def _align(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    alpha = run.floats("alpha")
    paths = run.texts("path")
    names = [p for p in ("original", "aligned") if (paths == p).any()]
    names += sorted({p for p in paths if p is not None and p not in names})
    fig, axes = _figure(len(run.metrics))
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        mode = run.mode_of(metric)
        _shade_extrapolation(ax, alpha, 1)
        for i, name in enumerate(names):
            on = paths == name
            bar = _path_barrier(alpha[on], values[on], 1, mode)
            height = "n/a" if bar is None else _fmt(bar.height)
            _draw_path(ax, alpha[on], values[on], 1, bar, color=f"C{i}", label=f"{_label(name)}: barrier {height}",
                       ends=["A", "B"])
            summary.append(_barrier_line(metric, mode, bar, run.objective, prefix=f"{name} path: "))
        ax.set_title(_metric_title(run, metric), fontsize=10)
        ax.set_xlabel("α (model A at 0, model B at 1)")
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        _path_legend(ax, alpha, 1)
    fig.suptitle(f"{_label(run.name)}: the path between two models before and after permutation alignment",
                 fontsize=11)
    path = folder / "align.png"
    _save(fig, path)
    caption = ("Each metric along the straight path from model A to model B, with B as trained ('original') and "
               "with B's units permuted to match A ('aligned'); the arrows mark each path's barrier over its chord, "
               "and the legend gives the heights.")
    return [_Figure(path, caption)]


def _landscape_marks(run: _Run, two_d: bool) -> List[Tuple[float, float, str]]:
    directions = getattr(run.study, "directions", None)
    if isinstance(directions, (list, tuple)):
        marks = [(0.0, 0.0, "model 0"), (1.0, 0.0, "model 1")]
        return marks + [(0.0, 1.0, "model 2")] if two_d else marks
    return [(0.0, 0.0, "centre")]


def _landscape_axes(run: _Run) -> Tuple[str, str]:
    if isinstance(getattr(run.study, "directions", None), (list, tuple)):
        return "x (model 0 → model 1)", "y (model 0 → model 2)"
    return "x (first direction)", "y (second direction)"


def _landscape(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    x = run.floats("x")
    y = run.floats("y")
    two_d = "y" in run.ok.column_names and bool(np.isfinite(y).any())
    xlabel, ylabel = _landscape_axes(run)
    marks = _landscape_marks(run, two_d)
    objective_values = run.floats(run.objective)
    best = _best_index(objective_values, run.mode)
    if best is not None:
        at = f"x = {_fmt(x[best])}" + (f", y = {_fmt(y[best])}" if two_d else "")
        summary.append(f"best {run.objective}: {_fmt(objective_values[best])} at {at}")
    for mx, my, name in marks:
        on = np.isclose(x, mx) & (np.isclose(y, my) if two_d else True)
        if on.any() and np.isfinite(objective_values[on]).any():
            summary.append(f"{run.objective} at {name}: {_fmt(np.nanmean(objective_values[on]))}")
    if two_d:
        return [_landscape_2d(run, folder, x, y, marks, xlabel, ylabel)]
    fig, axes = _figure(len(run.metrics))
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        xs, _, grid = pivot(x, np.zeros_like(x), values)
        ax.plot(xs, grid[0] if grid.size else [], "-o", ms=3, color="C0", label=_label(metric))
        lo, hi = (xs.min(), xs.max()) if len(xs) else (0.0, 0.0)
        shown = [(mx, name) for mx, _, name in marks if lo <= mx <= hi]
        for mx, _ in shown:
            ax.axvline(mx, color="0.4", ls=":", lw=1)
        if shown:  # named on a top axis, where no curve runs over them
            top = ax.secondary_xaxis("top")
            top.set_ticks([mx for mx, _ in shown], labels=[name for _, name in shown], fontsize=8)
        best_i = _best_index(grid[0], run.mode_of(metric)) if grid.size else None
        if best_i is not None:
            ax.plot(xs[best_i], grid[0][best_i], "*", ms=12, color="C3", mec="black", label="best", zorder=4)
        ax.set_title(_metric_title(run, metric), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{_label(run.name)}: the loss landscape along one direction", fontsize=11)
    path = folder / "landscape.png"
    _save(fig, path)
    return [_Figure(path, f"Each metric along the 1-D slice (x); dotted lines (named above the panel) mark "
                          f"{', '.join(m[2] for m in marks)}; the star is the best point.")]


def _landscape_2d(run: _Run, folder: Path, x: np.ndarray, y: np.ndarray, marks: List[Tuple[float, float, str]],
                  xlabel: str, ylabel: str) -> _Figure:
    from matplotlib import patheffects
    from matplotlib.colors import LogNorm

    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    fig, axes = _figure(len(run.metrics), width=5.6, height=4.6)
    log_metrics = []
    for ax, metric in zip(axes, run.metrics):
        values = run.floats(metric)
        xs, ys, grid = pivot(x, y, values)
        finite = grid[np.isfinite(grid)]
        mode = run.mode_of(metric)
        if len(xs) < 2 or len(ys) < 2 or finite.size < 4:
            keep = np.isfinite(values) & np.isfinite(x) & np.isfinite(y)
            drawn = ax.scatter(x[keep], y[keep], c=values[keep], cmap="viridis", s=25)
            fig.colorbar(drawn, ax=ax, label=_label(metric))
        else:
            lo, hi = float(finite.min()), float(finite.max())
            log = mode == "min" and lo > 0 and hi / lo > 10 ** LOG_LEVELS_DECADES
            if hi <= lo:
                hi = lo + (abs(lo) or 1.0) * 1e-6
            if log:
                levels, norm = np.geomspace(lo, hi, CONTOUR_LEVELS), LogNorm(lo, hi)
                log_metrics.append(metric)
            else:
                levels, norm = np.linspace(lo, hi, CONTOUR_LEVELS), None
            masked = np.ma.masked_invalid(grid)
            filled = ax.contourf(xs, ys, masked, levels=levels, norm=norm, cmap="viridis")
            lines = ax.contour(xs, ys, masked, levels=levels[::3], colors="white", linewidths=0.6, norm=norm)
            ax.clabel(lines, fmt=lambda v: f"{v:.3g}", fontsize=7, colors="white")
            fig.colorbar(filled, ax=ax, label=_label(metric) + (" (log scale)" if log else ""),
                         format="%.3g")
            best = _best_index(grid.ravel(), mode)
            if best is not None:
                j, i = divmod(best, len(xs))
                ax.plot(xs[i], ys[j], "*", ms=14, color="C3", mec="white", zorder=5)
                ax.annotate("best", (xs[i], ys[j]), xytext=(6, -12), textcoords="offset points", fontsize=8,
                            color="white", path_effects=outline, zorder=5)
        x_lo, x_hi, y_lo, y_hi = np.nanmin(x), np.nanmax(x), np.nanmin(y), np.nanmax(y)
        for mx, my, name in marks:
            if x_lo <= mx <= x_hi and y_lo <= my <= y_hi:
                ax.plot(mx, my, "o", ms=7, mfc="white", mec="black", zorder=5)
                ax.annotate(name, (mx, my), xytext=(6, 5), textcoords="offset points", fontsize=8, color="white",
                            path_effects=outline, zorder=5)
        ax.set_title(_metric_title(run, metric), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.suptitle(f"{_label(run.name)}: the landscape over the plane", fontsize=11)
    path = folder / "landscape.png"
    _save(fig, path)
    scale = f"; log-scale levels for {', '.join(log_metrics)}" if log_metrics else ""
    return _Figure(path, f"Contours of each metric over the (x, y) plane (mean per grid point), with "
                         f"{', '.join(m[2] for m in marks)} and the best point marked{scale}.")


# -- merge


def _merge_rows(run: _Run) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(methods, objective values, candidate ids) of the ok rows."""
    return run.texts("method"), run.floats(run.objective), run.floats("candidate_id")


def _merge_params(run: _Run, i: int) -> str:
    parts = []
    for name in ("lambda", "density", "seed"):
        value = run.floats(name)[i]
        if np.isfinite(value):
            parts.append(f"{'λ' if name == 'lambda' else name} = {_fmt(value if name != 'seed' else int(value))}")
    for name in _per_model_columns(run.ok):
        value = run.floats(name)[i]
        if np.isfinite(value):
            parts.append(f"λ{name[len('lambda_'):]} = {_fmt(value)}")
    soup = run.texts("soup")[i]
    if soup is not None:
        parts.append(f"{'models' if '+' in soup else 'model'} {soup}")
    return ", ".join(parts)


def _merge_summary(run: _Run) -> List[Tuple[str, float, int, str]]:
    """(label, objective, candidate_id, parameters) for the bars: base, each model, the uniform soup,
    the final greedy soup (the greedy_soup row with the largest candidate_id) and each other method's best row."""
    methods, values, ids = _merge_rows(run)
    soups = run.texts("soup")
    entries: List[Tuple[str, float, int, str]] = []

    def add(label: str, i: int) -> None:
        entries.append((label, float(values[i]), int(ids[i]), _merge_params(run, i)))

    def best_of(method: str) -> Optional[int]:
        on = np.flatnonzero((methods == method) & np.isfinite(values))
        if not len(on):
            return None
        return int(on[_best_index(values[on], run.mode)])

    if (i := best_of("base")) is not None:
        add("base", i)
    model_rows = np.flatnonzero((methods == "model") & np.isfinite(values))
    for n, i in enumerate(model_rows[np.argsort(ids[model_rows], kind="stable")]):
        add(f"model {soups[i] if soups[i] is not None else n}", int(i))
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


def _merge(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    methods, values, ids = _merge_rows(run)
    for method in dict.fromkeys(m for m in methods if m is not None):
        on = np.flatnonzero((methods == method) & np.isfinite(values))
        if len(on):
            i = int(on[_best_index(values[on], run.mode)])
            params = _merge_params(run, i)
            summary.append(f"best {method}: {run.objective} = {_fmt(values[i])} (candidate {int(ids[i])}"
                           f"{'; ' + params if params else ''})")
    greedy = np.flatnonzero(methods == "greedy_soup")
    if len(greedy):
        last = int(greedy[np.argmax(ids[greedy])])
        summary.append(f"final greedy soup: models {run.texts('soup')[last] or '?'}, "
                       f"{run.objective} = {_fmt(values[last])} (candidate {int(ids[last])})")
    figures = []
    panels = _merge_panels(run)
    if panels:
        fig, axes = _figure(len(panels), width=5.6, height=4.6)
        for ax, draw in zip(axes, panels):
            draw(fig, ax)
        fig.suptitle(f"{_label(run.name)}: {_label(run.objective)} over the merge coefficients "
                     f"({_better(run.mode)})", fontsize=11)
        path = folder / "merge.png"
        _save(fig, path)
        figures.append(_Figure(path, f"{run.objective} over each merge method's coefficients: heat maps over λ × "
                                     f"density (mean over seeds, best cell outlined), lines over λ, and per-model "
                                     f"coefficients of the random search coloured by {run.objective}."))
    entries = _merge_summary(run)
    if entries:
        figures.append(_merge_bars(run, folder, entries))
    return figures


def _merge_panels(run: _Run) -> List[Callable[[Any, Any], None]]:
    methods, values, _ = _merge_rows(run)
    per_model = _per_model_rows(run.ok)
    lambdas = run.floats("lambda")
    panels: List[Callable[[Any, Any], None]] = []
    for method in GRID_METHODS:
        on = (methods == method) & ~per_model
        if (on & np.isfinite(lambdas) & np.isfinite(run.floats("density")) & np.isfinite(values)).any():
            panels.append(lambda fig, ax, method=method: _heat_map(run, fig, ax, method))
    on = (methods == "task_arithmetic") & ~per_model & np.isfinite(lambdas) & np.isfinite(values)
    if on.any():
        panels.append(lambda fig, ax, on=on: _lambda_line(run, ax, on))
    columns = _per_model_columns(run.ok)
    if len(columns) >= 2:
        both = per_model & np.isfinite(run.floats(columns[1])) & np.isfinite(values)
        for method in dict.fromkeys(m for m in methods[both] if m is not None):
            panels.append(lambda fig, ax, on=both & (methods == method), method=method:
                          _per_model_scatter(run, fig, ax, on, method, columns))
    return panels


def _heat_map(run: _Run, fig: Any, ax: Any, method: str) -> None:
    from matplotlib.patches import Rectangle

    lambdas, densities, grid = merge_grid(run.ok, method, run.objective)
    masked = np.ma.masked_invalid(grid)
    image = ax.imshow(masked, origin="lower", aspect="auto", cmap="viridis" if run.mode == "max" else "viridis_r")
    fig.colorbar(image, ax=ax, label=f"{_label(run.objective)} ({_better(run.mode)}; brighter is better)")
    ax.set_xticks(range(len(lambdas)), [_fmt(v) for v in lambdas], fontsize=7,
                  rotation=45 if len(lambdas) > 6 else 0)
    ax.set_yticks(range(len(densities)), [_fmt(v) for v in densities], fontsize=7)
    _thin_ticks(ax)
    if len(lambdas) <= MAX_ANNOTATED_GRID and len(densities) <= MAX_ANNOTATED_GRID:
        lo, hi = (float(masked.min()), float(masked.max())) if masked.count() else (0.0, 1.0)
        for j in range(len(densities)):
            for i in range(len(lambdas)):
                if not np.isfinite(grid[j, i]):
                    ax.text(i, j, "no rows", ha="center", va="center", fontsize=7, color="0.5")
                    continue
                t = (grid[j, i] - lo) / (hi - lo) if hi > lo else 0.5
                bright = t > 0.5 if run.mode == "max" else t < 0.5
                ax.text(i, j, f"{grid[j, i]:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if bright else "white")
    best = _best_index(grid.ravel(), run.mode)
    title = f"{method}: mean {_label(run.objective)} over seeds"
    if best is not None:
        j, i = divmod(best, len(lambdas))
        ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5, zorder=5))
        title += f"\nbest {_fmt(grid[j, i])} at λ = {_fmt(lambdas[i])}, density = {_fmt(densities[j])}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("λ (scale of the merged task vectors)")
    ax.set_ylabel("density (fraction of each task vector kept)")


def _thin_ticks(ax: Any) -> None:
    """At most about 12 tick labels per axis."""
    for ticks in (ax.xaxis.get_major_ticks(), ax.yaxis.get_major_ticks()):
        step = max(1, math.ceil(len(ticks) / MAX_ANNOTATED_GRID))
        for k, tick in enumerate(ticks):
            tick.label1.set_visible(k % step == 0)


def _lambda_line(run: _Run, ax: Any, on: np.ndarray) -> None:
    lambdas = run.floats("lambda")[on]
    values = run.floats(run.objective)[on]
    xs, _, grid = pivot(lambdas, np.zeros_like(lambdas), values)
    ax.plot(xs, grid[0], "-o", ms=4, color="C0", label="task_arithmetic (mean per λ)")
    best = _best_index(grid[0], run.mode)
    if best is not None:
        ax.plot(xs[best], grid[0][best], "*", ms=14, color="C3", mec="black", zorder=4,
                label=f"best {_fmt(grid[0][best])} at λ = {_fmt(xs[best])}")
    ax.set_title(f"task_arithmetic: {_label(run.objective)} vs λ ({_better(run.mode)})", fontsize=10)
    ax.set_xlabel("λ (scale of the summed task vectors)")
    ax.set_ylabel(_label(run.objective))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _per_model_scatter(run: _Run, fig: Any, ax: Any, on: np.ndarray, method: str, columns: List[str]) -> None:
    l0, l1 = run.floats(columns[0])[on], run.floats(columns[1])[on]
    values = run.floats(run.objective)[on]
    dots = ax.scatter(l0, l1, c=values, s=22, cmap="viridis" if run.mode == "max" else "viridis_r",
                      edgecolors="none")
    fig.colorbar(dots, ax=ax, label=f"{_label(run.objective)} ({_better(run.mode)}; brighter is better)")
    best = _best_index(values, run.mode)
    if best is not None:
        ax.plot(l0[best], l1[best], "*", ms=15, color="C3", mec="black", zorder=4,
                label=f"best {_fmt(values[best])}")
        ax.legend(fontsize=7)
    hidden = [f"λ{name[len('lambda_'):]}" for name in columns[2:]]
    more = "" if not hidden else f" ({hidden[0] if len(hidden) == 1 else hidden[0] + ' … ' + hidden[-1]} not shown)"
    ax.set_title(f"{method}: per-model coefficients{more}", fontsize=10)
    ax.set_xlabel("λ0 (coefficient of model 0)")
    ax.set_ylabel("λ1 (coefficient of model 1)")
    ax.grid(alpha=0.3)


def _merge_bars(run: _Run, folder: Path, entries: List[Tuple[str, float, int, str]]) -> _Figure:
    fig, (ax,) = _figure(1, width=7.5, height=max(2.5, 0.42 * len(entries) + 1.3))
    labels = [_label(e[0]) for e in entries]
    values = np.array([e[1] for e in entries])
    best = _best_index(values, run.mode)
    colors = ["C3" if k == best else ("0.55" if e[0] in ("base",) or e[0].startswith("model") else "C0")
              for k, e in enumerate(entries)]
    rows = np.arange(len(entries))
    ax.barh(rows, values, color=colors)
    ax.set_yticks(rows, labels, fontsize=8)
    ax.invert_yaxis()
    span = float(np.nanmax(np.abs(values))) if len(values) else 1.0
    for k, v in enumerate(values):
        ax.text(v + 0.01 * span, k, _fmt(v), va="center", fontsize=8)
    ax.set_xlim(right=float(np.nanmax(values)) + 0.15 * span if np.nanmax(values) > 0 else None)
    ax.set_xlabel(f"{_label(run.objective)} ({_better(run.mode)})")
    ax.set_title(f"{_label(run.name)}: base, models, soups and each method's best (best in red)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    path = folder / "merge-summary.png"
    _save(fig, path)
    return _Figure(path, f"{run.objective} of the base, each model, the uniform soup, the final greedy soup and the "
                         f"best row of each merge method; the overall best bar is red.")


def _histogram(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    values = run.floats(run.objective)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return []
    fig, (ax,) = _figure(1, width=6.5, height=4.0)
    bins = int(min(50, max(10, math.sqrt(len(values)))))
    ax.hist(values, bins=bins, color="C0", edgecolor="white")
    best = float(values.min() if run.mode == "min" else values.max())
    ax.axvline(best, color="C3", lw=1.5, label=f"best {_fmt(best)}")
    ax.set_xlabel(f"{_label(run.objective)} ({_better(run.mode)})")
    ax.set_ylabel("candidates")
    ax.set_title(f"{_label(run.name)}: {_label(run.objective)} over {len(values)} ok candidates", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = folder / "objective.png"
    _save(fig, path)
    return [_Figure(path, f"Histogram of {run.objective} over the {len(values)} ok candidates with a finite value; "
                          f"the red line is the best.")]


# -- training studies (pbt, search)

#: Colours of training.png's and lineage.png's edges: a member continuing its own weights, and an exploit.
CONTINUE_COLOUR = "#9ecae1"
EXPLOIT_COLOUR = "#fd8d3c"
BEST_COLOUR = "#d62728"


@dataclass
class _Population:
    """A training study's rows on a (generation, member) grid.

    `row[g, m]` is the index in the run's table of member m's row at generation g (-1 where none; where a
    pair has several rows an ok one wins); `value` its objective (NaN unless ok and finite), `step` its
    training steps and `parent` its parent (-1 where none).
    """

    row: np.ndarray
    value: np.ndarray
    step: np.ndarray
    parent: np.ndarray
    last: Optional[int]  # the last generation with a finite objective
    best: Optional[int]  # the best member of that generation
    chain: List[Dict[str, Any]]  # lineage(best, last): generation 0 first; empty when broken
    exploits: int  # rows (distinct member and generation) with parent ≠ member

    @property
    def generations(self) -> int:
        return self.row.shape[0]

    @property
    def members(self) -> int:
        return self.row.shape[1]

    @property
    def present(self) -> np.ndarray:
        return self.row >= 0

    def best_value(self) -> float:
        return float(self.value[self.last, self.best]) if self.best is not None else math.nan

    def switches(self) -> List[int]:
        """Positions k ≥ 1 of the chain where the row continued from another member (an exploit)."""
        return [k for k in range(1, len(self.chain)) if self.chain[k]["member"] != self.chain[k - 1]["member"]]


def _population(run: _Run, warnings: List[str]) -> Optional[_Population]:
    """The rows of a pbt or search run by generation and member, the best member of the last generation
    and its lineage; None (and a warning) when the table lacks the training columns."""
    missing = [c for c in ("member", "generation", "parent") if c not in run.table.column_names]
    if missing:
        warnings.append(f"the results have no {', '.join(missing)} column: not the rows of a {run.kind} study; "
                        f"no training figures")
        return None
    table = run.table
    member, generation = _floats(table, "member"), _floats(table, "generation")
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
    ok = _status_mask(table, OK)[valid]
    row = np.full((int(g.max()) + 1, int(m.max()) + 1), -1, dtype=np.int64)
    order = np.argsort(ok, kind="stable")  # ok rows last: the ok row of a pair wins
    row[g[order], m[order]] = index[order]
    present = row >= 0
    at = np.where(present, row, 0)
    value = np.where(present & _status_mask(table, OK)[at], _floats(table, run.objective)[at], np.nan)
    value[~np.isfinite(value)] = np.nan
    step = np.where(present, _floats(table, "step")[at], np.nan)
    parents = _floats(table, "parent")[at]
    parent = np.where(present & np.isfinite(parents), np.nan_to_num(parents, nan=-1), -1).astype(np.int64)
    members = np.arange(row.shape[1])
    exploits = int((present & (parent >= 0) & (parent != members[None, :])).sum())
    finite_generations = np.flatnonzero(np.isfinite(value).any(axis=1))
    last = int(finite_generations[-1]) if len(finite_generations) else None
    best = _best_index(value[last], run.mode) if last is not None else None
    if last is not None and last < row.shape[0] - 1:
        warnings.append(f"the last generation ({row.shape[0] - 1}) has no ok row with a finite {run.objective}: "
                        f"the best member and the last-generation figures are from generation {last}")
    chain: List[Dict[str, Any]] = []
    if best is not None:
        try:
            chain = lineage(table, best, last)
        except ValueError as e:
            warnings.append(f"the lineage of the best member ({best}) cannot be followed: {e}")
        found = (run.record.get("findings") or {}).get("best_member") if isinstance(run.record, dict) else None
        if isinstance(found, int) and not isinstance(found, bool) and found != best:
            warnings.append(f"run.json's findings name member {found} as the best, but the results rank member "
                            f"{best} first in generation {last} by {run.objective} ({_better(run.mode)})")
    return _Population(row=row, value=value, step=step, parent=parent, last=last, best=best, chain=chain,
                       exploits=exploits)


def _chain_values(chain: List[Dict[str, Any]], name: str) -> np.ndarray:
    """Column `name` along a chain as float64 (a hyperparameter was used whatever the row's status)."""
    values = [row.get(name) for row in chain]
    return np.array([np.nan if v is None or isinstance(v, (str, bool)) else float(v) for v in values],
                    dtype=np.float64)


def _chain_objective(run: _Run, chain: List[Dict[str, Any]]) -> np.ndarray:
    """The objective along a chain (NaN at rows that are not ok or not finite)."""
    values = np.array([np.nan if row.get("status", OK) != OK or row.get(run.objective) is None
                       else float(row[run.objective]) for row in chain], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _drawn_members(pop: _Population) -> np.ndarray:
    if pop.members <= MAX_MEMBERS_DRAWN:
        return np.arange(pop.members)
    return np.unique(np.linspace(0, pop.members - 1, MAX_MEMBERS_DRAWN).round().astype(np.int64))


def _edges(pop: _Population, members: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(generation, member, parent, exploit) of every row at generation ≥ 1 of `members` whose parent has
    a row at the generation before."""
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
    return g, m, p, p != m


def _log_scale_wanted(values: np.ndarray, mode: str) -> bool:
    finite = values[np.isfinite(values)]
    return (mode == "min" and len(finite) > 1 and float(finite.min()) > 0
            and float(finite.max()) / float(finite.min()) > 10 ** LOG_LEVELS_DECADES)


def _training(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    pop = run.population
    if pop is None or pop.best is None:
        return []
    pbt = run.kind == "pbt"
    drawn = _drawn_members(pop)
    best_value = pop.best_value()
    summary.append(f"best member of the last generation (generation {pop.last}, step "
                   f"{_fmt(pop.step[pop.last, pop.best])}): member {pop.best}, {run.objective} = {_fmt(best_value)} "
                   f"({_better(run.mode)}), of {int(np.isfinite(pop.value[pop.last]).sum())} members with a finite "
                   f"value")
    if pbt:
        summary.append(f"exploits: {pop.exploits} rows continued from another member's weights (parent ≠ member); "
                       f"the best member's lineage switched members {len(pop.switches())} times")

    fig, (ax,) = _figure(1, width=9.5, height=5.2)
    g, m, p, exploit = _edges(pop, drawn)
    x0, y0 = pop.step[g - 1, p], pop.value[g - 1, p]
    x1, y1 = pop.step[g, m], pop.value[g, m]
    fine = np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
    segments = np.stack([np.column_stack([x0, y0]), np.column_stack([x1, y1])], axis=1)
    alpha, thin = _crowding(len(drawn))
    handles = []
    own_label = "a member continuing its own weights" if pbt else "a member (one line each)"
    for on, colour, width, label in ((fine & ~exploit, CONTINUE_COLOUR, 0.9, own_label),
                                     (fine & exploit, EXPLOIT_COLOUR, 1.0,
                                      "exploit: from the donor's point to the member's")):
        if on.any():
            ax.add_collection(LineCollection(segments[on], colors=colour, linewidths=width * thin, alpha=alpha,
                                             zorder=1))
            handles.append(Line2D([], [], color=colour, lw=1.5, label=label))
    if pbt:  # the jump itself: from the member's own point to the donor's, at the evaluation that decided it
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
    median_step, median = _nanmedian(pop.step), _nanmedian(pop.value)
    on = np.isfinite(median_step) & np.isfinite(median)
    handles += ax.plot(median_step[on], median[on], "--", color="0.3", lw=1.3, zorder=3,
                       label="population median")
    chain_steps = _chain_values(pop.chain, "step")
    chain_values = _chain_objective(run, pop.chain)
    if len(pop.chain):
        handles += ax.plot(chain_steps, chain_values, "-o", color=BEST_COLOUR, lw=2.4, ms=3.5, zorder=5,
                           label=f"best member {pop.best}" + ("'s lineage" if pbt else "")
                           + f" (final {_fmt(best_value)})")
        switches = pop.switches()
        if switches:
            handles += ax.plot(chain_steps[switches], chain_values[switches], "D", ms=6, mfc="white",
                               mec=BEST_COLOUR, mew=1.6, zorder=6, label="exploit along the lineage")
            for k in switches[:MAX_SWITCHES_NAMED]:
                if np.isfinite(chain_values[k]):
                    ax.annotate(f"m{pop.chain[k - 1]['member']}→m{pop.chain[k]['member']}",
                                (chain_steps[k], chain_values[k]), xytext=(4, -12 if run.mode == "max" else 6),
                                textcoords="offset points", fontsize=7, color=BEST_COLOUR, zorder=6,
                                bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8))
    else:
        ax.plot(pop.step[pop.last, pop.best], best_value, "*", ms=14, color=BEST_COLOUR, mec="black", zorder=6)
    if _log_scale_wanted(pop.value, run.mode):
        ax.set_yscale("log")
    ax.autoscale_view()
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{_label(run.objective)} ({_better(run.mode)})"
                  + (" (log scale)" if ax.get_yscale() == "log" else ""))
    shown = "" if len(drawn) == pop.members else f"; {len(drawn)} of {pop.members} members drawn"
    ax.set_title(f"{_label(run.name)}: {_label(run.objective)} of every member over training "
                 f"({pop.members} members, {pop.generations} generations{shown})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="lower right" if run.mode == "max" else "upper right")
    path = folder / "training.png"
    _save(fig, path)
    how = ("Each generation's segment runs from the parent's point at the previous evaluation to the member's "
           "point, so an exploit (orange) jumps from the donor's curve; " if pbt else
           "One light line per member; ")
    caption = (f"{run.objective} of every member at each evaluation against its training steps. {how}the dashed line "
               f"is the population's median and the bold red line the lineage of the best member of the last "
               f"generation (member {pop.best})" + (", diamonds where it continued from another member" if pbt else "")
               + (f". An evenly spaced {len(drawn)} of the {pop.members} members are drawn." if shown else "."))
    return [_Figure(path, caption)]


def _crowding(members: int) -> Tuple[float, float]:
    """(alpha, line width factor) of the population's lines: a crowd of lines is drawn fainter and thinner."""
    return float(np.clip(3.0 / math.sqrt(max(members, 1)), 0.08, 0.8)), (1.0 if members <= 50 else 0.6)


def _nanmedian(grid: np.ndarray) -> np.ndarray:
    """The median of each row of `grid` over its finite values (NaN for a row without one)."""
    out = np.full(grid.shape[0], np.nan)
    for i, line in enumerate(grid):
        finite = line[np.isfinite(line)]
        if len(finite):
            out[i] = float(np.median(finite))
    return out


def _objective_cmap(run: _Run) -> str:
    return "viridis" if run.mode == "max" else "viridis_r"


def _range_text(run: _Run, name: str) -> str:
    """' (searched in [low, high])' or ' (choices a, b, …)' of a hyperparameter, for a title."""
    space = getattr(run.study, "hyperparameters", None) or {}
    spec = space.get(name) if isinstance(space, dict) else None
    values = getattr(spec, "values", None)
    if getattr(spec, "distribution", None) == "choice" and values:
        shown = ", ".join(_fmt(v) for v in list(values)[:6]) + (", …" if len(values) > 6 else "")
        return f"\n(choices {shown})"
    low, high = getattr(spec, "low", None), getattr(spec, "high", None)
    if low is None or high is None:
        return ""
    return f"\n(searched {getattr(spec, 'distribution', '')} in [{_fmt(low)}, {_fmt(high)}])"


def _lineage_figure(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    from matplotlib.figure import Figure

    pop = run.population
    if pop is None or pop.best is None:
        return []
    tree = pop.members <= MAX_TREE_MEMBERS
    schedule = bool(run.hyper) and bool(pop.chain)
    if not tree:
        summary.append(f"lineage tree not drawn: {pop.members} members, more than {MAX_TREE_MEMBERS}")
    if not tree and not schedule:
        return []
    k = max(1, len(run.hyper)) if schedule else 1
    width = min(20.0, max(10.0, 0.42 * pop.generations + 4.0, 4.2 * k + 1.0 if schedule else 0.0))
    tree_height = min(12.0, max(4.0, 0.24 * pop.members + 1.8)) if tree else 0.0
    schedule_height = 3.3 if schedule else 0.0
    fig = Figure(figsize=(width, tree_height + schedule_height), layout="constrained")
    ratios = [h for h in (tree_height, schedule_height) if h]
    grid = fig.add_gridspec(len(ratios), k, height_ratios=ratios)
    if tree:
        _tree(run, pop, fig, fig.add_subplot(grid[0, :]))
    if schedule:
        _schedule(run, pop, [fig.add_subplot(grid[len(ratios) - 1, j]) for j in range(len(run.hyper))])
    size = f" ({pop.members} members × {pop.generations} generations, {pop.exploits} exploits)"
    fig.suptitle(f"{_label(run.name)}: lineage of the population{size} and the best member's schedule"
                 if tree and schedule else f"{_label(run.name)}: " +
                 (f"lineage of the population{size}" if tree else "the best member's schedule"), fontsize=11)
    path = folder / "lineage.png"
    _save(fig, path)
    parts = []
    if tree:
        parts.append(f"Top: one dot per member (y) and generation (x), coloured by {run.objective}; an edge joins "
                     f"each row to its parent's row at the generation before: grey where the member continued its "
                     f"own weights, orange where it copied another member's (exploit; {pop.exploits} in all). The "
                     f"best member's lineage is red.")
    if schedule:
        logs = [n for n in run.hyper if n in run.log_hyper]
        parts.append(f"{'Bottom' if tree else 'Panels'}: the best member's hyperparameters along its lineage, one "
                     f"value per generation; orange dotted lines mark where the lineage continued from another "
                     f"member" + (f"; log scale for {', '.join(logs)}" if logs else "") + ".")
    return [_Figure(path, " ".join(parts))]


def _tree(run: _Run, pop: _Population, fig: Any, ax: Any) -> None:
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
    dots = ax.scatter(gg[finite], mm[finite], c=values[finite], s=size, cmap=_objective_cmap(run), zorder=3,
                      edgecolors="none")
    fig.colorbar(dots, ax=ax, label=f"{_label(run.objective)} ({_better(run.mode)}; brighter is better)",
                 pad=0.01, aspect=30)
    if (~finite).any():
        handles += [ax.scatter(gg[~finite], mm[~finite], s=size, marker="x", color="0.45", zorder=3,
                               label="not ok or not finite")]
    if pop.chain:
        cg = np.array([row["generation"] for row in pop.chain], dtype=np.float64)
        cm = np.array([row["member"] for row in pop.chain], dtype=np.float64)
        handles += ax.plot(cg, cm, "-", color=BEST_COLOUR, lw=2.6, zorder=4,
                           label=f"best member {pop.best}'s lineage")
        ax.scatter(cg, cm, s=size * 1.6, facecolors="none", edgecolors=BEST_COLOUR, linewidths=1.4, zorder=5)
    ax.annotate(f"best: member {pop.best}\n{_label(run.objective)} {_fmt(pop.best_value())}",
                (pop.last, pop.best), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8,
                color=BEST_COLOUR, annotation_clip=False,
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))
    ax.set_xlim(-0.6, pop.generations - 0.4 + max(0.9, 0.13 * pop.generations))  # room for the label
    ax.set_ylim(-0.8, pop.members - 0.2)
    _integer_ticks(ax.xaxis, pop.generations)
    _integer_ticks(ax.yaxis, pop.members)
    ax.set_xlabel(f"generation (evaluated every {_fmt(getattr(run.study, 'interval', None)) or '?'} steps)")
    ax.set_ylabel("member")
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.005), ncol=len(handles),
              frameon=False, borderaxespad=0.0)


def _log_axis(ax: Any, which: str, values: np.ndarray) -> None:
    """A log-scale axis; one that spans less than a decade gets evenly spaced ticks labelled in plain numbers
    (the default has a tick or two there)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    finite = values[np.isfinite(values) & (values > 0)]
    if len(finite) and float(finite.max()) / float(finite.min()) < 10.0:
        axis = ax.yaxis if which == "y" else ax.xaxis
        axis.set_major_locator(MaxNLocator(nbins=6))
        axis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


def _integer_ticks(axis: Any, count: int) -> None:
    from matplotlib.ticker import MaxNLocator

    if count <= 40:
        axis.set_ticks(range(count))
        if count > 20:
            for k, label in enumerate(axis.get_ticklabels()):
                label.set_visible(k % 2 == 0)
    else:
        axis.set_major_locator(MaxNLocator(integer=True, nbins=20))


def _schedule(run: _Run, pop: _Population, axes: List[Any]) -> None:
    generations = np.array([row["generation"] for row in pop.chain], dtype=np.float64)
    switches = pop.switches()
    for ax, name in zip(axes, run.hyper):
        values = _chain_values(pop.chain, name)
        log = name in run.log_hyper and bool(np.all(values[np.isfinite(values)] > 0))
        ax.plot(generations, values, "-", drawstyle="steps-mid", color="C0", lw=1.6, zorder=3)
        ax.plot(generations, values, "o", ms=3.5, color="C0", zorder=4)
        for k, s in enumerate(switches):
            ax.axvline(generations[s] - 0.5, color=EXPLOIT_COLOUR, ls=":", lw=1.4, zorder=2,
                       label="continued from another member" if k == 0 else None)
        if log:
            _log_axis(ax, "y", values)
        ax.set_xlim(-0.6, max(generations.max() if len(generations) else 0.0, 0.0) + 0.6)
        _integer_ticks(ax.xaxis, int(generations.max()) + 1 if len(generations) else 1)
        ax.set_xlabel("generation")
        ax.set_ylabel(_label(name) + (" (log scale)" if log else ""))
        ax.set_title(f"best member {pop.best}: {_label(name)} along its lineage{_range_text(run, name)}", fontsize=10)
        ax.grid(alpha=0.3)
        if switches:
            ax.legend(fontsize=7, loc="best")


def _hyperparameters(run: _Run, folder: Path, summary: List[str]) -> List[_Figure]:
    pop = run.population
    if pop is None or pop.best is None:
        return []
    if not run.hyper:
        summary.append("no hyperparameter is searched (every one is a constant): no hyperparameters figure")
        return []
    last = pop.last
    rows = pop.row[last]
    present = rows >= 0
    at = np.where(present, rows, 0)
    values = pop.value[last]
    fig, axes = _figure(len(run.hyper), width=5.0, height=4.0)
    handles: List[Any] = []
    for ax, name in zip(axes, run.hyper):
        x = np.where(present, _floats(run.table, name)[at], np.nan)
        keep = np.isfinite(x) & np.isfinite(values)
        log = name in run.log_hyper and bool(np.all(x[keep] > 0))
        dots = ax.scatter(x[keep], values[keep], s=26, color="C0", alpha=0.8, edgecolors="none", zorder=3,
                          label=f"a member ({int(keep.sum())} with a finite {_label(run.objective)})")
        if keep[pop.best]:
            star = ax.plot(x[pop.best], values[pop.best], "*", ms=15, color=BEST_COLOUR, mec="black", zorder=4,
                           label=f"the best member ({pop.best}; {_label(run.objective)} {_fmt(values[pop.best])})")
            ax.annotate(f"{_label(name)} = {_fmt(x[pop.best])}", (x[pop.best], values[pop.best]), xytext=(9, -3),
                        textcoords="offset points", fontsize=8, color=BEST_COLOUR, va="top",
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8))
            handles = [dots] + star
        handles = handles or [dots]
        ax.margins(y=0.08)
        if log:
            _log_axis(ax, "x", x[keep])
        if _log_scale_wanted(values[keep], run.mode):
            ax.set_yscale("log")
        ax.set_xlabel(_label(name) + (" (log scale)" if log else "")
                      + (" in the last generation" if run.kind == "pbt" else ""))
        ax.set_ylabel(f"final {_label(run.objective)} ({_better(run.mode)})")
        ax.set_title(f"final {_label(run.objective)} vs {_label(name)}{_range_text(run, name)}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{_label(run.name)}: each member's {_label(run.objective)} at the last generation ({last}) "
                 f"against its hyperparameters", fontsize=11)
    path = folder / "hyperparameters.png"
    _save(fig, path)
    which = ("the value each member used in the last generation (pbt changes them along the way; lineage.png "
             "has the best member's schedule)" if run.kind == "pbt" else "each member's value")
    logs = [n for n in run.hyper if n in run.log_hyper]
    return [_Figure(path, f"{run.objective} of every member at the last generation ({last}) against {which}; the red "
                          f"star is the best member"
                          + (f"; log scale for {', '.join(logs)}" if logs else "") + ".")]



# --------------------------------------------------------------------------- the page


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .warn { color: #a40; } pre { white-space: pre-wrap; margin: 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        text = str(int(value)) if isinstance(value, (int, np.integer)) else f"{float(value):.6g}"
        return f'<td class="num">{_e(text)}</td>'
    return f"<td>{_e('' if value is None else value)}</td>"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f'<table id="{_e(table_id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def _counts(table: pa.Table) -> Dict[str, int]:
    counts = {"rows": table.num_rows, OK: 0, INVALID: 0, FAILED: 0}
    if "status" in table.column_names:
        for item in pc.value_counts(table.column("status")).to_pylist():
            key = item["values"] if item["values"] in (OK, INVALID, FAILED) else "other"
            counts[key] = counts.get(key, 0) + item["counts"]
    return counts


def _page(run: _Run, figures: List[_Figure], summary: List[str], top: int, warnings: List[str]) -> str:
    counts = _counts(run.table)
    parts = [f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>sweep report: {_e(run.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
             f"<h1>{_e(run.name)}</h1>\n",
             f"<p>Study kind: <b>{_e(run.kind)}</b>. Objective: <b>{_e(run.objective or 'none')}</b> "
             f"({_e(_better(run.mode))}). Results: <code>{_e(run.location)}</code>. "
             f"Written {_e(datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>\n",
             "<h2>Rows</h2>\n",
             _table(list(counts), [list(counts.values())], "counts")]
    if run.objective is not None:
        nonfinite = int((~np.isfinite(run.floats(run.objective))).sum())
        if nonfinite:
            parts.append(f"<p>{nonfinite} ok rows have a non-finite {_e(run.objective)}: "
                         f"they are neither drawn nor ranked.</p>\n")
    if warnings:
        parts.append("<h2>Warnings</h2>\n<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warnings)
                     + "</ul>\n")
    if summary:
        parts.append("<h2>Summary</h2>\n<ul>" + "".join(f"<li>{_e(s)}</li>" for s in summary) + "</ul>\n")
    if run.kind in TRAINING_KINDS and run.objective is not None:
        parts.append(_best_member(run))
    if figures:
        parts.append("<h2>Figures</h2>\n")
        for figure in figures:
            data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
            parts.append(f'<figure id="{_e(figure.path.stem)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{_e(figure.caption)}">\n<figcaption>{_e(figure.path.name)}: '
                         f"{_e(figure.caption)}</figcaption></figure>\n")
    if run.objective is not None:
        ranked, last = run.table, None
        if run.kind in TRAINING_KINDS and run.population is not None and run.population.last is not None:
            last = run.population.last
            ranked = run.table.filter(pa.array(_floats(run.table, "generation") == last))
        best = best_rows(ranked, run.objective, run.mode, top)
        columns = ["candidate_id"] + [c for c in run.recipe if c in best.column_names] + run.metrics
        rows = [[row.get(c) for c in columns] for row in best.select(columns).to_pylist()]
        of = "" if last is None else f" of the last generation ({last})"
        parts.append(f"<h2>Best {len(rows)} rows{of} by {_e(run.objective)} ({_e(_better(run.mode))})</h2>\n")
        if last is not None:
            parts.append(f"<p>Only the rows of the last generation ({last}) are ranked: the rows of earlier "
                         f"generations are the same members part-trained.</p>\n")
        parts.append(_table(columns, rows, "best") + "\n")
    parts.append(_problems(run))
    parts.append(f"<p><small>Figures draw the ok rows with finite values only. The objective's direction comes "
                 f"from the config; {_e(MODE_RULE)}.</small></p>\n</body>\n</html>\n")
    return "".join(parts)


def _best_member(run: _Run) -> str:
    """The page's section on a training study's best member: its value, its schedule, pbt's exploits."""
    pop = run.population
    head = "<h2>Best member</h2>\n"
    if pop is None:
        return head + "<p>The rows could not be laid out by member and generation (see the warnings).</p>\n"
    if pop.best is None:
        return head + f"<p>No member has an ok row with a finite {_e(run.objective)}.</p>\n"
    step = pop.step[pop.last, pop.best]
    parts = [head, f'<p id="best-member">Member <b>{pop.best}</b>: {_e(run.objective)} = '
                   f"<b>{_e(_fmt(pop.best_value()))}</b> ({_e(_better(run.mode))}) at generation {pop.last}"
                   + (f", step {_e(_fmt(step))}" if np.isfinite(step) else "")
                   + f", the best of the {int(np.isfinite(pop.value[pop.last]).sum())} members with a finite value "
                     f"in the last generation."]
    if run.run_dir is not None and (run.run_dir / "best.safetensors").is_file():
        parts.append(" Its weights: <code>best.safetensors</code> in the run folder.")
    parts.append("</p>\n")
    if run.kind == "pbt":
        parts.append(f'<p id="exploits">Exploits: <b>{pop.exploits}</b> rows continued from another member\'s '
                     f"weights (parent ≠ member) over the run; the best member's lineage switched members "
                     f"{len(pop.switches())} times.</p>\n")
    if not pop.chain:
        return "".join(parts) + "<p>Its lineage cannot be followed (see the warnings).</p>\n"
    columns = ["generation", "step", "member"] + run.hyper + [run.objective]
    rows = []
    objective = _chain_objective(run, pop.chain)
    for row, value in zip(pop.chain, objective):
        rows.append([row.get(c) for c in columns[:-1]] + [None if not np.isfinite(value) else float(value)])
    parts.append("<p>Its schedule: the rows of its lineage, generation 0 first. <i>member</i> is the member whose "
                 "row (and weights) the lineage passes through at that generation"
                 + (", so it changes where the lineage continued from another member" if run.kind == "pbt" else "")
                 + f"; the hyperparameters are the values used during that generation and {_e(run.objective)} the "
                   f"value at its end.</p>\n")
    parts.append(_table(columns, rows, "schedule") + "\n")
    return "".join(parts)


def _problems(run: _Run) -> str:
    table = run.table
    bad = table.filter(pa.array(~_status_mask(table, OK)))
    if not bad.num_rows:
        return "<h2>Invalid and failed rows</h2>\n<p>None.</p>\n"
    columns = [c for c in ("candidate_id", "status") if c in bad.column_names]
    columns += [c for c in run.recipe if c in bad.column_names]
    shown = bad.slice(0, MAX_ERRORS_LISTED)
    errors = shown.column("error").to_pylist() if "error" in shown.column_names else [None] * shown.num_rows
    rows = []
    for row, error in zip(shown.select(columns).to_pylist(), errors):
        text = "" if error is None else str(error)
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS] + " …"
        rows.append([row[c] for c in columns] + [text])
    more = bad.num_rows - shown.num_rows
    return (f"<h2>Invalid and failed rows ({bad.num_rows})</h2>\n" + _table(columns + ["error"], rows, "problems")
            + (f"\n<p>… and {more} more (see the results table).</p>" if more else "") + "\n")


# --------------------------------------------------------------------------- MLflow


def _log_to_mlflow(cfg: Any, record: Dict[str, Any], folder: Path, warnings: List[str]) -> bool:
    """Log the report folder as the run's `report/` artifacts; False (and a warning) when it could not be."""
    settings = getattr(getattr(cfg, "sinks", None), "mlflow", None)
    if settings is None or not getattr(settings, "enabled", False):
        return False
    run_id = record.get("mlflow_run_id")
    if not run_id:
        warnings.append("run.json names no MLflow run (the sweep never reached MLflow): the report was not logged")
        return False
    uri = getattr(settings, "tracking_uri", None)
    try:
        from mlflow.tracking import MlflowClient

        # One attempt with a bounded wait, as the sweep's own MLflow sink does: a server that is
        # away costs seconds here, not MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        MlflowClient(tracking_uri=uri).log_artifacts(str(run_id), str(folder), artifact_path="report")
    except Exception as e:  # a server that is down, a run that is gone: the report on disk stands
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        warnings.append(f"the report was not logged to MLflow run {run_id} ({uri or 'the default tracking URI'}): "
                        f"{type(e).__name__}: {lines[0] if lines else ''}")
        return False
    return True


__all__ = ("Report", "write_report", "best_rows", "lineage", "merge_grid", "metric_mode", "pivot")
