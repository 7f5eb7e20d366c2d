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
#: Widest an image is shown on the report's page, in CSS pixels (the page's content width; report.py's style
#: sheet uses it). A figure no wider than this is shown at its own size, so its text keeps its point size.
PAGE_WIDTH_PX = 1100
#: Widest figure, in inches: the page's width at DPI. `figure` narrows wider panels to fit.
MAX_FIGURE_WIDTH = PAGE_WIDTH_PX / DPI
#: Smallest font size (points) of any text in a figure: at MAX_FIGURE_WIDTH it reads as about 10 pt on the page.
MIN_FONT_SIZE = 8
#: An axis label longer than this many characters is split over two lines (see `RunView.metric_label`).
MAX_LABEL_CHARS = 40
#: Panels per row in a figure (two panels of a readable size fit the page's width).
MAX_COLUMNS = 2
#: Width of a digit of the figures' font, as a fraction of its size (to tell whether numbers fit side by side).
CHAR_WIDTH = 0.62
#: Tick labels shown per axis by `thin_ticks` (about).
MAX_TICK_LABELS = 12
#: An axis of integers gets one tick per value up to this many values (every other one labelled above 20).
MAX_INTEGER_TICKS = 40
#: `value_scale`: a lower-is-better metric whose values are all positive and span at least this many decades
#: (largest / smallest ≥ 10) is drawn on a log scale, which spreads out its low (good) end.
LOG_DECADES = 1.0
#: `value_scale`: the percentiles a colour range or axis may be clipped to, at the end away from the good values.
CLIP_PERCENTILES = (2.0, 98.0)
#: `value_scale`: the range is clipped when the values beyond CLIP_PERCENTILES on the bad side stretch it more
#: than this many times (measured on the log scale when that is used).
OUTLIER_STRETCH = 2.0
#: Margin around a clipped axis's limits, as a fraction of the range shown.
AXIS_MARGIN = 0.06
#: Bins of a histogram: about 2·√n, within these bounds.
MIN_BINS, MAX_BINS = 12, 50
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
    describe: Dict[str, str] = field(default_factory=dict)  # metric -> what it is ("cross-entropy, nats")
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

    def metric_label(self, metric: str, scale: Optional["Scale"] = None) -> str:
        """An axis or colour-bar label of `metric`: its name with what it is (`describe`) and the scale's note,
        e.g. 'loss (cross-entropy, nats; log scale)'."""
        parts = [part for part in (self.describe.get(metric, ""), scale.note if scale is not None else "") if part]
        text = label(metric) + (f" ({label('; '.join(parts))})" if parts else "")
        if len(parts) == 2 and len(text) > MAX_LABEL_CHARS:  # the scale's note on a line of its own
            text = f"{label(metric)} ({label(parts[0])})\n({label(parts[1])})"
        return text

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


def pivot_counts(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> np.ndarray:
    """counts[j, i]: how many finite values `pivot` averaged into grid[j, i]."""
    x, y, values = (np.asarray(a, dtype=np.float64) for a in (x, y, values))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(values)
    _, xi = np.unique(x[keep], return_inverse=True)
    _, yi = np.unique(y[keep], return_inverse=True)
    counts = np.zeros((int(yi.max()) + 1 if len(yi) else 0, int(xi.max()) + 1 if len(xi) else 0), dtype=np.int64)
    np.add.at(counts, (yi, xi), 1)
    return counts


# --------------------------------------------------------------------------- colour and axis scales


@dataclass(frozen=True)
class Scale:
    """How a metric's values map to colours or onto a value axis: linear or log, from `vmin` to `vmax`,
    and whether values beyond those limits exist (`clipped`: '', 'above', 'below' or 'both').

    Made by `value_scale`; `note` says which scale it is, in the words a colour bar or axis label carries.
    """

    log: bool
    vmin: float
    vmax: float
    clipped: str = ""

    @property
    def note(self) -> str:
        """'log scale', 'clipped above the 98th percentile', both, or '' for a plain linear scale."""
        low, high = (_ordinal(p) for p in CLIP_PERCENTILES)
        clip = {"above": f"clipped above the {high} percentile", "below": f"clipped below the {low} percentile",
                "both": f"clipped to the {low}–{high} percentile"}.get(self.clipped, "")
        return ", ".join(part for part in ("log scale" if self.log else "", clip) if part)

    def label(self, text: str) -> str:
        """`text` with the scale's note in parentheses (unchanged for a plain linear scale)."""
        return f"{text} ({self.note})" if self.note else text

    @property
    def extend(self) -> str:
        """The colour bar's `extend`: an arrow at each clipped end."""
        return {"above": "max", "below": "min", "both": "both"}.get(self.clipped, "neither")

    def norm(self) -> Any:
        """A matplotlib norm from vmin to vmax (LogNorm on a log scale)."""
        from matplotlib.colors import LogNorm, Normalize

        return LogNorm(self.vmin, self.vmax) if self.log else Normalize(self.vmin, self.vmax)

    def levels(self, count: int) -> np.ndarray:
        """`count` contour levels from vmin to vmax, evenly spaced on the scale."""
        return np.geomspace(self.vmin, self.vmax, count) if self.log else np.linspace(self.vmin, self.vmax, count)

    def bins(self, count: int) -> np.ndarray:
        """`count` histogram bins from vmin to vmax, evenly wide on the scale (`count` + 1 edges)."""
        return self.levels(count + 1)

    def beyond(self, values: np.ndarray) -> Tuple[int, int]:
        """(below vmin, above vmax): how many finite values lie outside the limits."""
        return _beyond(values, self.vmin, self.vmax)

    def colorbar(self, fig: Any, mappable: Any, ax: Any, text: str, **kwargs: Any) -> Any:
        """A colour bar for `mappable` labelled `text` (which should carry the scale's note: `label`, or
        `RunView.metric_label`), with arrows at clipped ends and plain numbers on a log scale."""
        bar = fig.colorbar(mappable, ax=ax, extend=self.extend, **kwargs)
        bar.set_label(text)
        if self.log:
            _plain_log_ticks(bar.ax.yaxis, self.vmin, self.vmax)
        return bar

    def axis(self, ax: Any, which: str, values: np.ndarray) -> None:
        """Put `values`' axis ('x' or 'y') of `ax` on this scale; a clipped axis gets its limits and a note
        inside the axes counting the points beyond them."""
        if self.log:
            (ax.set_yscale if which == "y" else ax.set_xscale)("log")
            _plain_log_ticks(ax.yaxis if which == "y" else ax.xaxis, self.vmin, self.vmax)
        if not self.clipped:
            return
        if self.log:
            pad = (self.vmax / self.vmin) ** AXIS_MARGIN
            low, high = self.vmin / pad, self.vmax * pad
        else:
            pad = (self.vmax - self.vmin) * AXIS_MARGIN
            low, high = self.vmin - pad, self.vmax + pad
        (ax.set_ylim if which == "y" else ax.set_xlim)(low, high)
        below, above = _beyond(values, low, high)
        for count, end in ((below, "below"), (above, "above")):
            if not count:
                continue
            text = f"{count} point{'s' if count > 1 else ''} {end} the axis ({self.note})"
            if which == "y":
                at = (0.01, 0.015, "left", "bottom") if end == "below" else (0.01, 0.985, "left", "top")
            else:
                at = (0.01, 0.015, "left", "bottom") if end == "below" else (0.99, 0.015, "right", "bottom")
            ax.text(at[0], at[1], text, transform=ax.transAxes, ha=at[2], va=at[3], fontsize=MIN_FONT_SIZE,
                    color="0.35", zorder=7, bbox=dict(boxstyle="round,pad=0.2", facecolor="white",
                                                       edgecolor="none", alpha=0.8))


def value_scale(values: np.ndarray, mode: Optional[str] = None) -> Scale:
    """The one rule for drawing a metric as colour or along a value axis, chosen so that its good values
    (low for `mode` 'min', high for 'max') are spread out rather than one flat colour:

    - log: lower is better, every value is positive and they span LOG_DECADES or more decades;
    - clipped: the values beyond the CLIP_PERCENTILES percentile at the bad end (above the 98th when lower
      is better, below the 2nd when higher is, both ends when `mode` is None) stretch the range more than
      OUTLIER_STRETCH times (on the log scale when that is used): the limits stop at that percentile, and a
      colour bar gets an arrow there;
    - else linear over the values' range.

    Only finite values count; a single value gets a linear range 5 % either side of it (±0.5 around 0), and
    no value the range [0, 1].
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not len(finite):
        return Scale(False, 0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        return Scale(False, lo - pad, hi + pad)
    log = mode == "min" and lo > 0 and math.log10(hi / lo) >= LOG_DECADES
    t = np.log10(finite) if log else finite
    t_lo, t_hi = float(t.min()), float(t.max())
    p_lo, p_hi = (float(v) for v in np.percentile(t, CLIP_PERCENTILES))
    span = t_hi - t_lo
    if mode == "min":  # the bad end is the top
        kept_low, kept_high = t_lo, p_hi
    elif mode == "max":  # the bottom
        kept_low, kept_high = p_lo, t_hi
    else:
        kept_low, kept_high = p_lo, p_hi
    clip = kept_high > kept_low and span > OUTLIER_STRETCH * (kept_high - kept_low)
    clip_low, clip_high = clip and kept_low > t_lo, clip and kept_high < t_hi
    unlog = (lambda v: 10.0 ** v) if log else (lambda v: v)
    low = unlog(p_lo) if clip_low else lo  # an end that is not clipped is the extreme value itself
    high = unlog(p_hi) if clip_high else hi
    clipped = "both" if clip_low and clip_high else "below" if clip_low else "above" if clip_high else ""
    return Scale(log, float(low), float(high), clipped)


def cmap(mode: str) -> str:
    """The colour map of a metric: brighter is better (viridis for higher-is-better, reversed for lower)."""
    return "viridis" if mode == "max" else "viridis_r"


def _beyond(values: np.ndarray, low: float, high: float) -> Tuple[int, int]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return int((finite < low).sum()), int((finite > high).sum())


def _ordinal(value: float) -> str:
    n = int(round(value))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _plain_log_ticks(axis: Any, low: float, high: float) -> None:
    """Ticks of a log axis (or colour bar) labelled as plain numbers; under two decades, evenly spread ones."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if low > 0 and high / low < 100.0:
        axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 3.0, 5.0), numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


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


def figure(panels: int, width: float = 4.55, height: float = 3.6) -> Tuple[Any, List[Any]]:
    """A matplotlib figure of `panels` axes, at most MAX_COLUMNS to a row, each `width` × `height` inches
    (narrowed, keeping the panels' shape, so that the figure is at most MAX_FIGURE_WIDTH wide)."""
    from matplotlib.figure import Figure as Canvas

    columns = max(1, min(panels, MAX_COLUMNS))
    rows = max(1, math.ceil(panels / columns))
    if width * columns > MAX_FIGURE_WIDTH:  # narrower panels, same shape: the page shows the figure at its size
        height *= MAX_FIGURE_WIDTH / (width * columns)
        width = MAX_FIGURE_WIDTH / columns
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
        if finite.max() == finite.min():  # one value: a range around it (matplotlib's would span decades)
            (ax.set_ylim if which == "y" else ax.set_xlim)(float(finite[0]) / 1.5, float(finite[0]) * 1.5)
        axis = ax.yaxis if which == "y" else ax.xaxis
        axis.set_major_locator(MaxNLocator(nbins=6))
        axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


def integer_ticks(axis: Any, count: int) -> None:
    """Ticks at the integers 0 … count − 1 (about 20 past MAX_INTEGER_TICKS), every k-th labelled so that the
    labels fit the axis's length side by side without touching."""
    from matplotlib.ticker import MaxNLocator

    if count > MAX_INTEGER_TICKS:
        axis.set_major_locator(MaxNLocator(integer=True, nbins=20))
        return
    axis.set_ticks(range(count))
    ax = axis.axes
    fig = ax.get_figure(root=True)
    box = ax.get_position()  # before the layout's adjustments: near enough to count labels
    vertical = axis is ax.yaxis
    room = 72.0 * (box.height * fig.get_figheight() if vertical else box.width * fig.get_figwidth())
    size = float(axis.get_ticklabels()[0].get_fontsize()) if count else 10.0
    each = 1.5 * size if vertical else (len(str(max(count - 1, 0))) * CHAR_WIDTH + 0.6) * size  # with a gap
    step = max(1, math.ceil(count / max(1.0, room / each)))
    for k, text in enumerate(axis.get_ticklabels()):
        text.set_visible(k % step == 0)


def thin_ticks(ax: Any) -> None:
    """At most about MAX_TICK_LABELS tick labels per axis."""
    for ticks in (ax.xaxis.get_major_ticks(), ax.yaxis.get_major_ticks()):
        step = max(1, math.ceil(len(ticks) / MAX_TICK_LABELS))
        for k, tick in enumerate(ticks):
            tick.label1.set_visible(k % step == 0)


#: Where `place_labels` tries a label, as (dx, dy) offsets in points from its anchor, nearest first.
LABEL_OFFSETS = tuple((r * dx, r * dy) for r in (7, 16, 28, 44, 64)
                      for dx, dy in ((1, 0.6), (1, -1.2), (-1, 0.6), (-1, -1.2), (0, 1.3), (0, -1.8),
                                     (0.8, 1.3), (-0.8, 1.3), (0.8, -1.8), (-0.8, -1.8)))
#: A label of `point_label` placed farther than this (points) from its point gets a thin line to it.
LEADER_FROM = 12.0
#: Cost of a label position that covers another label, or leaves the axes, against one drawn point covered.
LABEL_CLASH = 1000
#: Drawn lines are sampled every this many pixels when a label checks what it covers.
LABEL_SAMPLE_PX = 2.0


def place_labels(ax: Any, labels: Sequence[Any], *, offsets: Sequence[Tuple[float, float]] = LABEL_OFFSETS,
                 hide: bool = False, avoid: Sequence[Any] = (), renderer: Any = None) -> List[Any]:
    """Move each annotation of `labels` (made with textcoords='offset points'), in turn, to the first of
    `offsets` where it covers the fewest drawn points of `ax` (its lines, markers, scatters and line
    collections, and the artists in `avoid`), no label placed before it and no other text, and stays inside
    the axes. With `hide`, a label that cannot avoid an earlier label is hidden instead. Returns the labels
    shown. Call it once the axes' limits are set; `renderer` (from `renderer_of`, after which nothing but
    labels left out of the layout was added) saves laying the figure out again for each axes."""
    if not labels or not offsets:
        return list(labels)
    for text in labels:
        text.set_in_layout(False)  # the layout must not move when they do
    if renderer is None:
        renderer = renderer_of(ax.get_figure(root=True))
    inside = ax.get_window_extent(renderer)
    points = _drawn_points(ax, list(avoid))
    mine = {id(t) for t in labels}
    leaders = {id(t) for t in labels if getattr(t, "arrow_patch", None) is not None and not t.arrow_patch.get_visible()}
    taken = [_text_box(t, renderer) for t in ax.texts if t.get_visible() and id(t) not in mine and t.get_text().strip()]
    shown = []
    for text in labels:
        best = (math.inf, tuple(offsets[0]), "left")
        anchor = text.xycoords == "data" and ax.transData.transform(text.xy)
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            text.set_position((dx, dy))
            text.set_horizontalalignment(ha)
            text.set_verticalalignment("center")
            box = _text_box(text, renderer)
            cost = float(_covered(points, box))
            if id(text) in leaders and math.hypot(dx, dy) > LEADER_FROM:  # the line to the point crosses too
                cost += _near_segment(points, anchor, (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
            cost += LABEL_CLASH * sum(box.overlaps(other) for other in taken)
            if not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)):
                cost += LABEL_CLASH
            if cost < best[0]:
                best = (cost, (dx, dy), ha)
            if cost == 0:
                break
        text.set_position(best[1])
        text.set_horizontalalignment(best[2])
        if id(text) in leaders:
            text.arrow_patch.set_visible(math.hypot(*best[1]) > LEADER_FROM)
        if hide and best[0] >= LABEL_CLASH and any(_text_box(text, renderer).overlaps(o) for o in taken):
            text.set_visible(False)
            continue
        taken.append(_text_box(text, renderer))
        shown.append(text)
    return shown


def _text_box(text: Any, renderer: Any) -> Any:
    """The box of a text (an annotation's text only, not its arrow), with a little room around it."""
    from matplotlib.text import Text

    return Text.get_window_extent(text, renderer).padded(3.0)


def point_label(ax: Any, text: str, xy: Tuple[float, float], **kwargs: Any) -> Any:
    """A label of the point `xy` for `place_labels` to place: an annotation offset in points, with a thin
    line to the point that is shown when the label ends up farther than LEADER_FROM from it."""
    colour = kwargs.get("color", "0.3")
    text = ax.annotate(text, xy, xytext=(6, 6), textcoords="offset points",
                       arrowprops=dict(arrowstyle="-", lw=0.7, color=colour, shrinkA=1, shrinkB=2), **kwargs)
    text.arrow_patch.set_visible(False)  # place_labels shows it when it moves the label away
    text.set_in_layout(False)  # placed inside the axes: the layout does not wait for it
    return text


def renderer_of(fig: Any) -> Any:
    """The figure laid out as it will be saved, and the renderer that measures its texts."""
    if not hasattr(fig.canvas, "get_renderer"):  # a Figure made without pyplot has no drawing canvas yet
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def _drawn_points(ax: Any, extra: List[Any]) -> np.ndarray:
    """Display coordinates of what `ax` draws: its lines (sampled along each segment), its markers and
    scatter points, and the segments of its line collections."""
    from matplotlib.collections import LineCollection, PathCollection

    chunks: List[np.ndarray] = []
    arrows = [t.arrow_patch for t in ax.texts if getattr(t, "arrow_patch", None) is not None and t.get_visible()
              and t.arrow_patch.get_visible()]
    for arrow in arrows:  # an annotation's arrow: its path, sampled like a line's
        vertices = arrow.get_transform().transform(arrow.get_path().vertices)
        chunks.append(_sampled(vertices))
    for artist in list(ax.lines) + list(ax.collections) + extra:
        if not artist.get_visible():
            continue
        transform = artist.get_transform()
        if isinstance(artist, PathCollection):
            offsets = np.asarray(artist.get_offsets(), dtype=np.float64)
            if len(offsets):
                chunks.append(artist.get_offset_transform().transform(offsets))
            continue
        if isinstance(artist, LineCollection):
            paths = [transform.transform(np.asarray(seg, dtype=np.float64)) for seg in artist.get_segments()]
        elif hasattr(artist, "get_xydata"):
            data = np.asarray(artist.get_xydata(), dtype=np.float64)
            paths = [transform.transform(data)] if len(data) else []
        else:
            continue
        chunks += [_sampled(path) for path in paths]
    return np.concatenate(chunks) if chunks else np.zeros((0, 2))


def _sampled(path: np.ndarray) -> np.ndarray:
    """The points of a polyline (display coordinates), LABEL_SAMPLE_PX apart along each segment."""
    path = path[np.isfinite(path).all(axis=1)]
    if len(path) < 2:
        return path.reshape(-1, 2)
    steps = np.maximum(1, np.ceil(np.linalg.norm(np.diff(path, axis=0), axis=1) / LABEL_SAMPLE_PX))
    steps = np.minimum(steps, 2000).astype(np.int64)
    parts = [a + np.outer(np.arange(k) / k, b - a) for a, b, k in zip(path[:-1], path[1:], steps)]
    return np.concatenate(parts + [path[-1:]])


def _near_segment(points: np.ndarray, start: Any, x: float, y: float, within: float = 2.0) -> int:
    """How many of `points` lie within `within` pixels of the segment from `start` to (x, y)."""
    if start is False or not len(points):
        return 0
    a, b = np.asarray(start, dtype=np.float64), np.array([x, y])
    d = b - a
    t = np.clip(((points - a) @ d) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return int((np.linalg.norm(points - (a + t[:, None] * d), axis=1) <= within).sum())


def _covered(points: np.ndarray, box: Any) -> int:
    if not len(points):
        return 0
    x, y = points[:, 0], points[:, 1]
    return int(((x >= box.x0) & (x <= box.x1) & (y >= box.y0) & (y <= box.y1)).sum())


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
              label: str, ends: Sequence[str]) -> List[Any]:
    """One path on `ax`: solid between the endpoints, dashed beyond, dots at the endpoints, the chord
    between them dotted, and the barrier as an arrow from the chord to the curve. Returns its labels (the
    barrier's, then the endpoints' named in `ends`; '' names none) for `place_labels`, once the axes'
    limits are set."""
    keep = np.isfinite(alpha) & np.isfinite(values)
    order = np.argsort(alpha[keep], kind="stable")
    a, v = alpha[keep][order], values[keep][order]
    eps = ENDPOINT_TOLERANCE
    inside = (a >= -eps) & (a <= segments + eps)
    ax.plot(a[inside], v[inside], "-", color=color, lw=1.8, label=label, zorder=2)
    for part in (a <= eps, a >= segments - eps):
        if (part & ~inside).any():
            ax.plot(a[part], v[part], "--", color=color, lw=1.4, zorder=2)
    labels: List[Any] = []
    chord_x, chord_y = [], []
    for j in range(segments + 1):
        at = np.flatnonzero(np.isclose(a, j, rtol=0.0, atol=ENDPOINT_TOLERANCE))
        if len(at):
            chord_x.append(j)
            chord_y.append(v[at[0]])
            ax.plot(j, v[at[0]], "o", ms=7, color=color, mec="black", zorder=4)
            name = ends[j] if j < len(ends) else f"E{j}"
            if name:
                labels.append(point_label(ax, name, (j, v[at[0]]), fontsize=MIN_FONT_SIZE + 1, zorder=6))
    if len(chord_x) == segments + 1:
        ax.plot(chord_x, chord_y, ":", color=color, lw=1.2, zorder=1)
    if bar is None:
        return labels
    if not math.isfinite(bar.height):
        ax.text(0.02, 0.97, "barrier ∞: non-finite values on the path", transform=ax.transAxes, va="top",
                fontsize=MIN_FONT_SIZE, color=color)
        return labels
    if bar.height > 0:
        ax.annotate("", xy=(bar.alpha, bar.value), xytext=(bar.alpha, bar.chord), zorder=5,
                    arrowprops=dict(arrowstyle="->", color=color, lw=1.6, shrinkA=0, shrinkB=0))
        text = point_label(ax, f"barrier {fmt(bar.height)}\nat α = {fmt(bar.alpha)}",
                           (bar.alpha, (bar.value + bar.chord) / 2), va="center", fontsize=MIN_FONT_SIZE, color=color,
                           zorder=6, bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none",
                                               alpha=0.85))
        labels.insert(0, text)
    return labels


def path_legend(fig: Any, ax: Any, alpha: np.ndarray, segments: int) -> None:
    """The legend of a figure of path panels, below them (where no curve runs): the paths and shading of
    `ax`, and one entry each for the dashed and dotted parts."""
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles.sort(key=lambda h: not isinstance(h, Line2D))  # the paths first, then the shading
    finite = alpha[np.isfinite(alpha)]
    if len(finite) and (finite.min() < 0 or finite.max() > segments):
        handles.append(Line2D([], [], ls="--", color="0.3", label="extrapolated (dashed)"))
    handles.append(Line2D([], [], ls=":", color="0.3", label="chord between the endpoints (dotted)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=MIN_FONT_SIZE + 1,
               frameon=False)


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


def histogram(run: RunView, folder: Path, notes: List[str], *, reference: Optional[Tuple[float, str]] = None,
              what: str = "candidates", rows: Optional[np.ndarray] = None, detail: str = "") -> List[Figure]:
    """`objective.png`: the objective over the ok rows with a finite value (none under two such rows), on
    `value_scale`'s scale: log bins for a lower-is-better objective spanning decades; a range clipped at the
    bad end, the rows beyond counted on the figure, when a few outliers would squeeze the rest into a bin.
    `reference` (value, name) is drawn as a dashed line (e.g. the unperturbed base); `what` names the rows
    (`detail` says more of them in the caption) and `rows` (a mask over the ok rows) picks them (default: all)."""
    from matplotlib.ticker import MaxNLocator

    values = run.floats(run.objective)
    values = values[np.isfinite(values) & (True if rows is None else rows)]
    if len(values) < 2:
        return []
    scale = value_scale(values, run.mode)
    fig, (ax,) = figure(1, width=7.0, height=3.9)
    bins = int(min(MAX_BINS, max(MIN_BINS, 2 * math.sqrt(len(values)))))
    shown = values[(values >= scale.vmin) & (values <= scale.vmax)]
    ax.hist(shown, bins=scale.bins(bins), color="C0", edgecolor="white", linewidth=0.5)
    if scale.log:
        scale.axis(ax, "x", values)
    best = float(values.min() if run.mode == "min" else values.max())
    ax.axvline(best, color="C3", lw=1.6, label=f"best {fmt(best)}")
    if reference is not None and math.isfinite(reference[0]):
        ax.axvline(reference[0], color="black", ls="--", lw=1.6, label=f"{label(reference[1])} {fmt(reference[0])}")
    below, above = scale.beyond(values)
    beyond = []
    if above:
        beyond.append(f"{above} above {fmt(scale.vmax)}")
    if below:
        beyond.append(f"{below} below {fmt(scale.vmin)}")
    if beyond:
        ax.text(0.99 if above else 0.01, 0.97, f"not drawn: {' and '.join(beyond)}\n({scale.note})",
                transform=ax.transAxes, ha="right" if above else "left", va="top", fontsize=MIN_FONT_SIZE,
                color="0.3", bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8"))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(run.metric_label(run.objective, scale if scale.log else None))
    ax.set_ylabel(what)
    ax.set_title(f"{label(run.name)}: {label(run.objective)} over {len(values)} ok {what} "
                 f"({better(run.mode)})", fontsize=10)
    ax.legend(fontsize=MIN_FONT_SIZE + 1, loc="upper left" if (above and run.mode == "min") else "best")
    ax.grid(alpha=0.3)
    path = folder / "objective.png"
    save(fig, path)
    bins_text = " (bins evenly wide on a log scale)" if scale.log else ""
    cut = (f"; {' and '.join(beyond)} lie beyond the drawn range ({scale.note}) and are counted on the figure"
           if beyond else "")
    ref = f"; the dashed line is the {reference[1]} ({fmt(reference[0])})" if reference is not None else ""
    return [Figure(path, f"Histogram of {run.objective} over the {len(values)} ok {what}{detail} with a finite "
                         f"value{bins_text}{cut}; the red line is the best{ref}.")]
