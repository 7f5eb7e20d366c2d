"""What a study's figures are drawn with: the run as figures see it, and the helpers every figure uses.

A study module draws its report figures with `figures(run, folder, notes)`:
`run` is a `RunView` (the run's rows and what its columns are, read from
their roles), `folder` where the PNGs go, `notes` the lines of the page's
Summary it may add to; it returns the `Figure`s it wrote. A study without
`figures` gets `histogram`, the objective over the ok rows. A study's
`page(run)` sections are HTML, made with `escape` and `html_table`.

No study knowledge lives here. Matplotlib is imported inside the functions
that draw, never when this module is.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .analysis import Barrier, barrier, metric_mode
from .types import OK

#: Resolution of the PNGs.
DPI = 120
#: Panels per row in a figure.
MAX_COLUMNS = 3
#: Tick labels shown per axis by `thin_ticks` (about).
MAX_TICK_LABELS = 12
#: An axis of integers gets one tick per value up to this many values (every other one labelled above 20).
MAX_INTEGER_TICKS = 40
#: A loss is drawn on a log scale when its range spans more than this many decades.
LOG_LEVELS_DECADES = 2.0
#: Bins of the objective's histogram: about √n, within these bounds.
MIN_BINS, MAX_BINS = 10, 50
#: How far from an integer α still counts as an endpoint of a path.
ENDPOINT_TOLERANCE = 1e-9


@dataclass
class Figure:
    """A PNG a study drew into the report folder, and its caption on the page."""

    path: Path
    caption: str


@dataclass
class RunView:
    """A finished run as its figures see it: its rows, and what each column is (from the columns' roles).

    `recipe`, `lineage` and `metrics` are the columns with those roles, in
    table order, except that the objective is the first metric. `study` is
    the config's study section, `record` run.json. A figure or page section
    that cannot do something adds a line to `warnings` (shown on the page).
    """

    name: str
    kind: str
    study: Any
    location: str
    table: pa.Table  # every row
    ok: pa.Table  # the rows with status ok
    recipe: List[str]
    lineage: List[str]
    metrics: List[str]
    objective: Optional[str]
    mode: str  # the objective's: 'min' or 'max'
    record: Dict[str, Any] = field(default_factory=dict)
    run_dir: Optional[Path] = None
    warnings: List[str] = field(default_factory=list)
    _columns: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _shared: Dict[str, Any] = field(default_factory=dict, repr=False)

    def floats(self, name: str) -> np.ndarray:
        """Column `name` of the ok rows as float64 (null, missing and non-numeric → NaN)."""
        if name not in self._columns:
            self._columns[name] = column_floats(self.ok, name)
        return self._columns[name]

    def texts(self, name: str) -> np.ndarray:
        """Column `name` of the ok rows as an object array of strings (null and missing → None)."""
        key = "\0" + name
        if key not in self._columns:
            values = self.ok.column(name).to_pylist() if name in self.ok.column_names else [None] * self.ok.num_rows
            self._columns[key] = np.array([None if v is None else str(v) for v in values], dtype=object)
        return self._columns[key]

    def mode_of(self, metric: str) -> str:
        """'min' or 'max': the objective's configured mode, the naming rule of `sweep.analysis.metric_mode`
        for the other metrics."""
        return metric_mode(metric, self.objective, self.mode)

    def once(self, key: str, make: Callable[["RunView"], Any]) -> Any:
        """`make(self)`, computed the first time `key` is asked for: what a study's figures and page
        section share (a population laid out by member and generation)."""
        if key not in self._shared:
            self._shared[key] = make(self)
        return self._shared[key]


#: A study's figure: draws into the folder, may add Summary lines, returns what it wrote.
Drawer = Callable[[RunView, Path, List[str]], List[Figure]]


def draw_each(run: RunView, folder: Path, notes: List[str], drawers: Mapping[str, Drawer]) -> List[Figure]:
    """The figures of every drawer in turn; one that fails is a page warning naming it, and the rest still draw."""
    figures: List[Figure] = []
    for name, draw in drawers.items():
        try:
            figures += draw(run, folder, notes)
        except Exception as e:  # the page still shows the counts, the table and the errors
            run.warnings.append(f"could not draw the {name} figure: {type(e).__name__}: {e}")
    return figures


# --------------------------------------------------------------------------- columns as arrays


def column_floats(table: pa.Table, name: str) -> np.ndarray:
    """Column `name` of `table` as float64 (null → NaN; a missing or non-numeric column is all NaN)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return np.full(table.num_rows, np.nan)
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def status_mask(table: pa.Table, status: str = OK) -> np.ndarray:
    """Which rows have `status` (every row when the table has no status column)."""
    if "status" not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    mask = pc.fill_null(pc.equal(table.column("status"), status), False)
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pa.array(status_mask(table, OK)))


def best_index(values: np.ndarray, mode: str) -> Optional[int]:
    """Index of the best finite value (first of ties), None when none is finite."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    masked = np.where(finite, values if mode == "min" else -values, np.inf)
    return int(np.argmin(masked))


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


def log_scale_wanted(values: np.ndarray, mode: str) -> bool:
    """Whether a lower-is-better quantity spans more than LOG_LEVELS_DECADES decades (and is positive)."""
    finite = values[np.isfinite(values)]
    return (mode == "min" and len(finite) > 1 and float(finite.min()) > 0
            and float(finite.max()) / float(finite.min()) > 10 ** LOG_LEVELS_DECADES)


# --------------------------------------------------------------------------- text


def fmt(value: Any) -> str:
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


def label(text: str) -> str:
    """Data text safe for a matplotlib label ('$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def better(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def metric_title(run: RunView, metric: str) -> str:
    """A panel's title: the metric, whether it is the objective, and which way is better."""
    role = "objective, " if metric == run.objective else ""
    return f"{label(metric)} ({role}{better(run.mode_of(metric))})"


def escape(value: Any) -> str:
    """Text for the HTML page."""
    return html.escape(str(value), quote=True)


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    """An HTML table with id `table_id`: numbers right-aligned (integers as they are, floats to 6 digits)."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f'<table id="{escape(table_id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def _cell(value: Any) -> str:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        text = str(int(value)) if isinstance(value, (int, np.integer)) else f"{float(value):.6g}"
        return f'<td class="num">{escape(text)}</td>'
    return f"<td>{escape('' if value is None else value)}</td>"


# --------------------------------------------------------------------------- figures and axes


def figure(panels: int, width: float = 5.2, height: float = 4.0) -> Tuple[Any, List[Any]]:
    """A matplotlib figure of `panels` axes, at most MAX_COLUMNS to a row, each `width` × `height` inches."""
    from matplotlib.figure import Figure as Canvas

    columns = max(1, min(panels, MAX_COLUMNS))
    rows = max(1, math.ceil(panels / columns))
    fig = Canvas(figsize=(width * columns, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def log_axis(ax: Any, which: str, values: np.ndarray) -> None:
    """A log-scale axis ('x' or 'y'); one that spans less than a decade gets evenly spaced ticks labelled in
    plain numbers (the default has a tick or two there)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    finite = values[np.isfinite(values) & (values > 0)]
    if len(finite) and float(finite.max()) / float(finite.min()) < 10.0:
        axis = ax.yaxis if which == "y" else ax.xaxis
        axis.set_major_locator(MaxNLocator(nbins=6))
        axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


def integer_ticks(axis: Any, count: int) -> None:
    """Ticks at the integers 0 … count − 1 (every other one labelled past 20; about 20 past MAX_INTEGER_TICKS)."""
    from matplotlib.ticker import MaxNLocator

    if count <= MAX_INTEGER_TICKS:
        axis.set_ticks(range(count))
        if count > MAX_INTEGER_TICKS // 2:
            for k, text in enumerate(axis.get_ticklabels()):
                text.set_visible(k % 2 == 0)
    else:
        axis.set_major_locator(MaxNLocator(integer=True, nbins=20))


def thin_ticks(ax: Any) -> None:
    """At most about MAX_TICK_LABELS tick labels per axis."""
    for ticks in (ax.xaxis.get_major_ticks(), ax.yaxis.get_major_ticks()):
        step = max(1, math.ceil(len(ticks) / MAX_TICK_LABELS))
        for k, tick in enumerate(ticks):
            tick.label1.set_visible(k % step == 0)


# --------------------------------------------------------------------------- paths through endpoints


def path_barrier(alpha: np.ndarray, values: np.ndarray, segments: int, mode: str) -> Optional[Barrier]:
    """The barrier of the path through `segments` + 1 endpoints at α = 0 … segments (see `sweep.analysis.barrier`)."""
    keep = np.isfinite(alpha)  # a value may be non-finite: barrier() counts it as leaving the region
    return barrier(alpha[keep], values[keep], segments, mode)


def shade_extrapolation(ax: Any, alpha: np.ndarray, segments: int) -> None:
    """Grey where α lies beyond the endpoints (below 0, above `segments`)."""
    finite = alpha[np.isfinite(alpha)]
    if not len(finite):
        return
    text: Optional[str] = "extrapolation (beyond the endpoints)"
    if finite.min() < 0:
        ax.axvspan(finite.min(), 0.0, color="0.9", zorder=0, label=text)
        text = None
    if finite.max() > segments:
        ax.axvspan(float(segments), finite.max(), color="0.9", zorder=0, label=text)


def draw_path(ax: Any, alpha: np.ndarray, values: np.ndarray, segments: int, bar: Optional[Barrier], *, color: str,
              label: str, ends: Sequence[str]) -> None:
    """One path on `ax`: solid between the endpoints, dashed beyond, dots at the endpoints, the chord
    between them dotted, and the barrier as an arrow from the chord to the curve."""
    keep = np.isfinite(alpha) & np.isfinite(values)
    order = np.argsort(alpha[keep], kind="stable")
    a, v = alpha[keep][order], values[keep][order]
    eps = ENDPOINT_TOLERANCE
    inside = (a >= -eps) & (a <= segments + eps)
    ax.plot(a[inside], v[inside], "-", color=color, lw=1.8, label=label, zorder=2)
    for part in (a <= eps, a >= segments - eps):
        if (part & ~inside).any():
            ax.plot(a[part], v[part], "--", color=color, lw=1.4, zorder=2)
    chord_x, chord_y = [], []
    for j in range(segments + 1):
        at = np.flatnonzero(np.isclose(a, j, rtol=0.0, atol=ENDPOINT_TOLERANCE))
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
        ax.annotate(f"barrier {fmt(bar.height)}\nat α = {fmt(bar.alpha)}", (bar.alpha, (bar.value + bar.chord) / 2),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color=color, zorder=6,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))


def path_legend(ax: Any, alpha: np.ndarray, segments: int) -> None:
    """The legend of a path panel, with one entry each for the dashed and dotted parts."""
    finite = alpha[np.isfinite(alpha)]
    if len(finite) and (finite.min() < 0 or finite.max() > segments):
        ax.plot([], [], "--", color="0.3", label="extrapolated (dashed)")
    ax.plot([], [], ":", color="0.3", label="chord between endpoints")
    ax.legend(fontsize=7, loc="best")


def alpha_label(segments: int) -> str:
    """The α axis of a path through `segments` + 1 endpoints E0 … E{segments}."""
    if segments <= 3:
        return "α (" + ", ".join(f"E{j} at {j}" for j in range(segments + 1)) + ")"
    return f"α (E0 at 0, E1 at 1, …, E{segments} at {segments})"


def barrier_line(metric: str, mode: str, bar: Optional[Barrier], objective: Optional[str], prefix: str = "") -> str:
    """The Summary line of a path's barrier."""
    role = " (objective)" if metric == objective else ""
    if bar is None:
        return f"{prefix}barrier of {metric}{role}: not available (an endpoint row is missing or not finite)"
    where = "" if not math.isfinite(bar.height) else f" at α = {fmt(bar.alpha)}"
    return f"{prefix}barrier of {metric}{role}: {fmt(bar.height)}{where} ({better(mode)})"


# --------------------------------------------------------------------------- the default figure


def histogram(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """`objective.png`: the objective over the ok rows with a finite value (none under two such rows)."""
    values = run.floats(run.objective)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return []
    fig, (ax,) = figure(1, width=6.5, height=4.0)
    bins = int(min(MAX_BINS, max(MIN_BINS, math.sqrt(len(values)))))
    ax.hist(values, bins=bins, color="C0", edgecolor="white")
    best = float(values.min() if run.mode == "min" else values.max())
    ax.axvline(best, color="C3", lw=1.5, label=f"best {fmt(best)}")
    ax.set_xlabel(f"{label(run.objective)} ({better(run.mode)})")
    ax.set_ylabel("candidates")
    ax.set_title(f"{label(run.name)}: {label(run.objective)} over {len(values)} ok candidates", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = folder / "objective.png"
    save(fig, path)
    return [Figure(path, f"Histogram of {run.objective} over the {len(values)} ok candidates with a finite value; "
                         f"the red line is the best.")]
