"""Report figures and page sections of a search (study kind `search`): the population figures, and where the
search learns as it goes, how.

A search's rows are one per member still training per evaluation (see
`_population_figures`). With successive halving (columns `rung` and
`stopped`) the report draws `halving.png`: every trial's objective over
its training steps, one panel per HyperBand bracket, the rungs with how many
went on, and the budget the stops saved. With trials numbered in waves
(columns `trial` and `wave`: more trials than the population, or an Optuna
sampler) it draws `trials.png`: each trial's final objective in the order
the trials were proposed, with the running best, and the values proposed
for each searched hyperparameter. The page gets a section on each.

Not a study: the search module exposes `SearchFigures()`'s names, figures
and page as its FIGURES, figures and page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..plotting import (CHAR_WIDTH, MAX_FIGURE_WIDTH, MIN_FONT_SIZE, Figure, RunView, Scale, better, cmap,
                        column_floats, draw_each, escape, fmt, html_table, label, place_labels, point_label,
                        renderer_of, save, status_mask, value_scale)
from ..types import OK
from ._population_figures import (BEST_COLOUR, BRACKET, CONTINUE_COLOUR, RUNG, TRIAL, WAVE, Trials,
                                  _best_member, _crowding, _hyperparameters, _range_text, _training, searched,
                                  stopped_rows, trials)

#: Trials drawn as lines per bracket in halving.png (an evenly spaced subset of more, plus the best).
MAX_TRIALS_DRAWN = 2000
#: Trials listed in the page's table of the best trials.
MAX_TRIALS_LISTED = 10
#: A searched hyperparameter whose positive values span more than this many decades is drawn on a log axis in
#: trials.png (a log-uniform one always is).
LOG_SPAN_DECADES = 2.0
#: halving.png's step axis is logarithmic when the full budget is at least this many times the first evaluation
#: (rungs at min_steps·η^k are evenly spaced there).
LOG_STEPS_RATIO = 10.0
#: Colour of the marker that ends a stopped trial's line.
STOPPED_COLOUR = "#08519c"
#: Colours of the budget panel: the full budget (outline) and what the trials spent.
FULL_COLOUR = "0.45"


@dataclass(frozen=True)
class SearchFigures:
    """The report's part for a search: the figures it may write (`names`), `figures` and the page's `page`
    sections, as the search module exposes them (FIGURES, figures, page)."""

    @property
    def names(self) -> Tuple[str, ...]:
        return ("training.png", "halving.png", "trials.png", "hyperparameters.png")

    def figures(self, run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
        """training.png; halving.png (rows with rungs); trials.png (rows with trials and waves);
        hyperparameters.png."""
        drawers = {"training": lambda r, f, n: _training(r, f, n, False), "halving": halving_figure,
                   "trials": trials_figure, "hyperparameters": lambda r, f, n: _hyperparameters(r, f, n, False)}
        return draw_each(run, folder, notes, drawers)

    def page(self, run: RunView) -> List[str]:
        """The best trial (or member); the rungs of successive halving; the best trials of a search in waves."""
        if run.objective is None:
            return []
        sections = [_best_member(run, False)]
        if halved(run):
            sections.append(halving_section(run))
        if numbered(run):
            sections.append(trials_section(run))
        return sections


def halved(run: RunView) -> bool:
    """The rows are a search with successive halving: some row decided a rung or stopped a trial."""
    table = run.table
    return ((RUNG in table.column_names and table.column(RUNG).null_count < table.num_rows)
            or bool(stopped_rows(table).any()))


def numbered(run: RunView) -> bool:
    """The rows name each trial and its wave (a search in waves, or Optuna's)."""
    return TRIAL in run.table.column_names and WAVE in run.table.column_names


# --------------------------------------------------------------------------- rungs and budget


@dataclass(frozen=True)
class Rung:
    """What a rung decided in one bracket, over every wave: `entered` trials reached it, `went_on` of them
    trained on (the others stopped there)."""

    bracket: int
    index: int  # k: the rung at min_steps·η^k
    step: float
    entered: int
    went_on: int

    def text(self, short: bool = False) -> str:
        if short:
            return f"r{self.index}\n{self.entered}→{self.went_on}"
        return f"rung {self.index} · {fmt(self.step)} steps\n{self.entered} → {self.went_on}"


def rungs(run: RunView, tr: Trials) -> List[Rung]:
    """The rungs decided in the rows, by bracket and rung index (a row with a `rung` decided it for its
    trial; a row with `stopped` stopped its trial there)."""
    return run.once("rungs", lambda r: _rungs(r, tr))


def _rungs(run: RunView, tr: Trials) -> List[Rung]:
    table = run.table
    rung = column_floats(table, RUNG)
    at = np.flatnonzero(np.isfinite(rung))
    if not len(at):
        return []
    bracket = np.nan_to_num(column_floats(table, BRACKET), nan=0.0)
    step = column_floats(table, "step")
    trial = tr.of_row(table.num_rows)
    stops = stopped_rows(table)
    out = []
    for b, k in sorted({(int(bracket[i]), int(rung[i])) for i in at}):
        rows = at[(bracket[at] == b) & (rung[at] == k)]
        rows = rows[trial[rows] >= 0]
        if not len(rows):
            continue
        steps = step[rows][np.isfinite(step[rows])]
        entered = np.unique(trial[rows])
        stopped = np.unique(trial[rows[stops[rows]]])
        out.append(Rung(bracket=b, index=k, step=float(np.median(steps)) if len(steps) else math.nan,
                        entered=len(entered), went_on=len(entered) - len(stopped)))
    return out


@dataclass(frozen=True)
class Budget:
    """Member-steps (one member trained one step) by segment between rungs: `edges` the segments' bounds
    (0, each rung's step, the full budget), `spent[b, s]` what bracket b's trials trained in segment s, and
    `full[s]` what all the trials would have trained there at the full budget."""

    edges: np.ndarray
    brackets: List[int]
    spent: np.ndarray
    full: np.ndarray

    @property
    def total(self) -> float:
        return float(self.spent.sum())

    @property
    def total_full(self) -> float:
        return float(self.full.sum())

    def headline(self) -> str:
        """'8,200 of 64,000 member-steps (12.8 %)'."""
        share = 100.0 * self.total / self.total_full if self.total_full > 0 else math.nan
        return f"{_count(self.total)} of {_count(self.total_full)} member-steps ({share:.3g} %)"


def budget(run: RunView, tr: Trials) -> Budget:
    """The member-steps the trials trained in each segment between rungs, by bracket, and at the full budget."""
    bounds = {float(r.step) for r in rungs(run, tr) if math.isfinite(r.step) and 0 < r.step < tr.full}
    edges = np.array([0.0] + sorted(bounds) + [tr.full])
    bracket = np.nan_to_num(tr.bracket, nan=0.0).astype(np.int64)
    brackets = sorted(set(bracket.tolist()))
    trained = np.nan_to_num(tr.step, nan=0.0)  # a trial trained until its last evaluation
    low, high = edges[:-1], edges[1:]
    within = np.clip(trained[:, None], low[None, :], high[None, :]) - low[None, :]
    spent = np.array([within[bracket == b].sum(axis=0) for b in brackets])
    return Budget(edges=edges, brackets=brackets, spent=spent, full=len(tr) * (high - low))


def _count(value: float) -> str:
    return f"{value:,.0f}"


# --------------------------------------------------------------------------- halving.png


def halving_figure(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """The objective of every trial over its training steps with the rungs, one panel per bracket; below,
    the member-steps spent between rungs against the full budget."""
    from matplotlib.figure import Figure as Canvas

    if not halved(run):
        return []
    tr = trials(run)
    if tr is None or tr.best is None:
        return []
    decided = rungs(run, tr)
    spent = budget(run, tr)
    bracket_of = np.nan_to_num(tr.bracket, nan=0.0).astype(np.int64)
    brackets = spent.brackets
    columns = min(2, len(brackets))
    panel_rows = math.ceil(len(brackets) / columns)
    panel_height = 4.6 if columns == 1 else 3.9
    fig = Canvas(figsize=(MAX_FIGURE_WIDTH, panel_height * panel_rows + 0.9 + 3.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[panel_height * panel_rows + 0.9, 3.6])
    grid = top.add_gridspec(panel_rows, columns)
    axes: List[Any] = []
    for j in range(len(brackets)):
        axes.append(top.add_subplot(grid[j // columns, j % columns], sharey=axes[0] if axes else None))

    value = _row_values(run)
    step = column_floats(run.table, "step")
    shown = np.concatenate([value[r] for r in tr.rows]) if len(tr) else np.zeros(0)
    scale = value_scale(shown, run.mode)
    first = np.nanmin(step[np.isfinite(step) & (step > 0)]) if np.isfinite(step).any() else 1.0
    log_steps = tr.full / max(first, 1e-12) >= LOG_STEPS_RATIO
    handles: Dict[str, Any] = {}
    tops, named = [], []
    for ax, b in zip(axes, brackets):
        members = np.flatnonzero(bracket_of == b)
        if log_steps:  # before the rungs' top axis, which takes the scale it finds
            ax.set_xscale("log")
            _plain_ticks(ax.xaxis, log=True, low=first, high=tr.full)
            ax.set_xlim(first / 1.12, tr.full * 1.12)
        else:
            ax.set_xlim(0.0, tr.full * 1.03)
        top_axis, texts = _halving_panel(run, ax, tr, members, [r for r in decided if r.bracket == b], value, step,
                                         handles)
        tops.append(top_axis)
        named.append(texts)
        scale.axis(ax, "y", np.concatenate([value[tr.rows[i]] for i in members]))
        ax.set_xlabel("training step" + (" (log scale)" if log_steps else ""))
        ax.grid(alpha=0.3)
        count = f"{len(members)} trial{'s' if len(members) != 1 else ''}"
        if len(brackets) > 1:  # in the colour of its bracket's bars in the budget below
            ax.set_title(f"bracket {b}: {count}", fontsize=10, color=_bracket_colour(brackets.index(b), brackets))
        else:
            ax.set_title(f"{count}, the best 1/{_eta(run)} of each rung going on", fontsize=10)
    axes[0].set_ylabel(run.metric_label(run.objective, scale))
    for ax in axes[1:]:
        ax.tick_params(labelleft=ax.get_subplotspec().colspan.start == 0)
        if ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel(run.metric_label(run.objective, scale))
    top.legend(handles=list(handles.values()), loc="outside lower center", ncol=min(2, len(handles)),
               fontsize=MIN_FONT_SIZE + 1, frameon=False)
    top.suptitle(f"{label(run.name)}: successive halving, {label(run.objective)} of every trial over training "
                 f"({better(run.mode)})", fontsize=11)
    _budget_panel(run, bottom, spent)
    renderer = renderer_of(fig)
    for ax, b, (top_axis, placed) in zip(axes, brackets, tops):
        _fit_rung_labels(top_axis, placed, renderer)
    for ax, texts in zip(axes, named):
        place_labels(ax, texts, renderer=renderer)
    path = folder / "halving.png"
    save(fig, path)

    best = tr.best
    notes.append(f"successive halving: {int(tr.completed.sum())} of {len(tr)} trials ran the full {fmt(tr.full)} "
                 f"steps, {int(tr.stopped.sum())} stopped at a rung; the trials trained {spent.headline()} of "
                 f"what they would have at the full budget")
    waves = f" over {tr.waves} waves" if tr.waves > 1 else ""
    per_bracket = (" One panel per HyperBand bracket (bracket b's first rung is the b-th); the y axis is shared."
                   if len(brackets) > 1 else "")
    zoom = (f" The {run.objective} axis is {scale.note}: the points beyond it are counted at its edge."
            if scale.clipped else "")
    crowded = [int((bracket_of == b).sum()) for b in brackets if (bracket_of == b).sum() > MAX_TRIALS_DRAWN]
    if crowded:
        zoom += (f" Where a bracket has more than {MAX_TRIALS_DRAWN} trials, an evenly spaced {MAX_TRIALS_DRAWN} of "
                 f"them are drawn (and the best).")
    caption = (f"Top: {run.objective} of every trial at each evaluation against its training steps"
               + (" (log scale)" if log_steps else "") + ", one light line per trial; a line ending in a dark "
               f"circle is a trial stopped at a rung. Dashed rules mark the rungs, named above the panel with the "
               f"trials that reached each and how many went on{waves}. The bold red line is the best trial "
               f"({tr.name(best)}, {tr.best_among}).{per_bracket}{zoom} Bottom: the member-steps the "
               f"trials trained between rungs (filled) against what the same {len(tr)} trials would have trained "
               f"at the full {fmt(tr.full)} steps (outlined): {spent.headline()}.")
    return [Figure(path, caption)]


def _eta(run: RunView) -> str:
    eta = getattr(getattr(run.study, "halving", None), "reduction_factor", None)
    return fmt(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else "η"


def _row_values(run: RunView) -> np.ndarray:
    """The objective of every row of the table (NaN unless ok and finite)."""
    value = np.where(status_mask(run.table, OK), column_floats(run.table, run.objective), np.nan)
    value[~np.isfinite(value)] = np.nan
    return value


def _halving_panel(run: RunView, ax: Any, tr: Trials, members: np.ndarray, decided: List[Rung], value: np.ndarray,
                   step: np.ndarray, handles: Dict[str, Any]) -> Tuple[Tuple[Any, List[Rung]], List[Any]]:
    """One bracket's trials on `ax`: a light line each, stopped trials ending in a circle, the best in red, the
    rungs as dashed rules named on a top axis. Returns (the top axis and the rungs it names, the labels for
    `place_labels`)."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    drawn = members
    if len(drawn) > MAX_TRIALS_DRAWN:
        drawn = members[np.unique(np.linspace(0, len(members) - 1, MAX_TRIALS_DRAWN).round().astype(np.int64))]
    alpha, thin = _crowding(len(drawn))
    segments, points, ends = [], [], []
    for i in drawn:
        xy = np.column_stack([step[tr.rows[i]], value[tr.rows[i]]])
        fine = np.isfinite(xy).all(axis=1)
        both = fine[:-1] & fine[1:]
        segments += [xy[j:j + 2] for j in np.flatnonzero(both)]
        points.append(xy[fine])
        if tr.stopped[i] and fine.any():
            ends.append(xy[np.flatnonzero(fine)[-1]])
    if segments:
        ax.add_collection(LineCollection(segments, colors=CONTINUE_COLOUR, linewidths=0.9 * thin, alpha=alpha,
                                         zorder=1))
    handles.setdefault("trial", Line2D([], [], color=CONTINUE_COLOUR, lw=1.5, label="a trial (one line each)"))
    dots = np.concatenate(points) if points else np.zeros((0, 2))
    ax.plot(dots[:, 0], dots[:, 1], ".", ms=2.5, color=CONTINUE_COLOUR, alpha=min(1.0, alpha + 0.2), zorder=1)
    if ends:
        end = np.array(ends)
        line = ax.plot(end[:, 0], end[:, 1], "o", ms=4.5, mfc="white", mec=STOPPED_COLOUR, mew=1.1, zorder=3,
                       label="stopped at a rung (its last evaluation)")
        handles.setdefault("stopped", line[0])
    for r in decided:
        if math.isfinite(r.step):
            ax.axvline(r.step, color="0.35", ls="--", lw=1.0, zorder=2)
    if decided:
        handles.setdefault("rung", Line2D([], [], color="0.35", ls="--", lw=1.0,
                                          label="a rung: reached → went on"))
    best = tr.best
    texts = []
    if best is not None and best in set(members.tolist()):
        rows = tr.rows[best]
        line = ax.plot(step[rows], value[rows], "-o", color=BEST_COLOUR, lw=2.2, ms=3.2, zorder=5,
                       label=f"best {tr.name(best)} (final {fmt(tr.value[best])})")
        handles["best"] = line[0]
        if np.isfinite(tr.value[best]) and np.isfinite(tr.step[best]):
            texts.append(point_label(ax, f"best: {tr.name(best)}\n{label(run.objective)} {fmt(tr.value[best])}",
                                     (tr.step[best], tr.value[best]), fontsize=MIN_FONT_SIZE, color=BEST_COLOUR,
                                     zorder=6, bbox=dict(boxstyle="round,pad=0.2", facecolor="white",
                                                         edgecolor="none", alpha=0.85)))
    named = [r for r in decided if math.isfinite(r.step)]
    top = ax.secondary_xaxis("top")
    top.set_xticks([r.step for r in named], [r.text() for r in named])
    top.xaxis.set_minor_locator(NullLocator())
    top.tick_params(axis="x", labelsize=MIN_FONT_SIZE, length=3, pad=2)
    return (top, named), texts


def _fit_rung_labels(top: Any, decided: List[Rung], renderer: Any) -> None:
    """Rung names that would touch side by side get their short form ('r1\\n16→4'); every other one is left
    out where even those would."""
    if not decided:
        return
    axis = top.xaxis

    def touching() -> bool:
        boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
        boxes.sort(key=lambda b: b.x0)
        return any(a.x1 + 4 > b.x0 for a, b in zip(boxes, boxes[1:]))

    if not touching():
        return
    axis.set_ticks([r.step for r in decided], [r.text(short=True) for r in decided])
    if touching():
        for k, text in enumerate(axis.get_ticklabels()):
            text.set_visible(k % 2 == 0)


def _budget_panel(run: RunView, fig: Any, spent: Budget) -> None:
    """Member-steps by segment between rungs: the full budget outlined, what each bracket's trials spent
    filled, each bar's count written on it."""
    ax = fig.subplots()
    segments = len(spent.edges) - 1
    bars = 1 + len(spent.brackets)
    width = 0.8 / bars
    x = np.arange(segments)
    values = np.concatenate([spent.full, spent.spent.ravel()])
    scale = value_scale(values[values > 0], "min")  # a cost: its small end spread out on a log scale
    if scale.log:
        ax.set_yscale("log")
    drawn = [ax.bar(x - 0.4 + width / 2, spent.full, width, facecolor="none", edgecolor=FULL_COLOUR, lw=1.2,
                    hatch="//", label=f"at the full budget: {_count(spent.total_full)}", zorder=2)]
    for j, b in enumerate(spent.brackets):
        colour = _bracket_colour(j, spent.brackets)
        who = f"bracket {b}'s trials" if len(spent.brackets) > 1 else "spent"
        drawn.append(ax.bar(x - 0.4 + width * (j + 1.5), spent.spent[j], width, color=colour, zorder=2,
                            label=f"{who}: {_count(spent.spent[j].sum())}"))
    fig_width = fig.get_figure(root=True).get_figwidth() * 72.0 * 0.85
    room = fig_width / max(1, segments) * width  # a bar's width in points, about
    for bar_set in drawn:
        for patch in bar_set.patches:
            height = patch.get_height()
            text = _count(height)
            turn = len(text) * CHAR_WIDTH * MIN_FONT_SIZE > room
            ax.annotate(text, (patch.get_x() + patch.get_width() / 2, max(height, 0.0)), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=MIN_FONT_SIZE,
                        rotation=90 if turn else 0, color="0.2", zorder=3)
    positive = values[values > 0]
    if len(positive):  # room above the tallest bar for its count
        if scale.log:
            ax.set_ylim(positive.min() / 1.6, positive.max() * 2.2)
        else:
            ax.set_ylim(0.0, positive.max() * 1.18)
    _plain_ticks(ax.yaxis, log=scale.log, low=ax.get_ylim()[0], high=ax.get_ylim()[1])
    ax.set_xticks(x, [f"{fmt(lo)}–{fmt(hi)}" for lo, hi in zip(spent.edges[:-1], spent.edges[1:])])
    ax.set_xlabel("training steps between rungs (a segment: from one rung to the next)")
    ax.set_ylabel("member-steps" + (" (log scale)" if scale.log else ""))
    saved = spent.total_full - spent.total
    ax.set_title(f"budget: {spent.headline()}; halving saved {_count(saved)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=drawn, loc="outside lower center", ncol=min(3, len(drawn)), fontsize=MIN_FONT_SIZE + 1,
               frameon=False)


def _bracket_colour(j: int, brackets: List[int]) -> str:
    """The colour of the j-th bracket (one colour for a single bracket)."""
    return f"C{j % 10}" if len(brackets) > 1 else "C0"


def _plain_ticks(axis: Any, *, log: bool, low: float, high: float) -> None:
    """Tick labels as plain numbers with thousands separators (1,000 rather than 1e+03 or 10³); a log axis
    under two decades gets ticks at 1, 2, 3 and 5 of each decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if log:
        narrow = low > 0 and high / low < 100.0
        axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 3.0, 5.0) if narrow else (1.0,), numticks=10))
        axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1 else fmt(v)))


# --------------------------------------------------------------------------- trials.png


def trials_figure(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    """Each trial's final objective against its number, coloured by wave, with the running best; below, each
    searched hyperparameter's value against the trial number, coloured by the trial's final objective."""
    from matplotlib.figure import Figure as Canvas

    if not numbered(run):
        return []
    tr = trials(run)
    if tr is None or tr.best is None:
        return []
    hyper, log_hyper = searched(run)
    rows = math.ceil(len(hyper) / 2)
    fig = Canvas(figsize=(MAX_FIGURE_WIDTH, 4.3 + 3.3 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(1 + rows, 2, height_ratios=[4.3] + [3.3] * rows)
    ax = fig.add_subplot(grid[0, :])
    key = tr.key.astype(np.float64)
    ok = np.isfinite(tr.value)
    early, done, failed = ok & tr.stopped, ok & ~tr.stopped, ~ok
    starts = _wave_starts(tr)

    waves, colours, mappable = _wave_colours(tr)
    scale = value_scale(tr.value[ok], run.mode)
    size = float(np.clip(2400.0 / max(len(tr), 1), 9.0, 42.0))
    handles: List[Any] = []
    if done.any():
        ax.scatter(key[done], tr.value[done], s=size, c=colours[done], edgecolors="none", zorder=3)
        handles.append(_marker("o", "0.45", filled=True, text=f"a trial that ran the full {fmt(tr.full)} steps"
                               if tr.stopped.any() else "a trial (its final value)"))
    if early.any():
        ax.scatter(key[early], tr.value[early], s=size, facecolors="none", edgecolors=colours[early],
                   linewidths=1.1, zorder=3)
        handles.append(_marker("o", "0.45", filled=False, text="stopped at a rung (hollow: its value there)"))
    if failed.any():
        handles.append(_failed(ax, key[failed], None))
    pool = tr.completed & ok
    pool = pool if pool.any() else ok
    running = (np.fmax if run.mode == "max" else np.fmin).accumulate(np.where(pool, tr.value, np.nan))
    if len(key) > 1:
        handles += ax.step(np.r_[key, key[-1] + 0.5], np.r_[running, running[-1]], where="post", color="0.2",
                           lw=1.4, zorder=4, label="running best" + (" (of the trials that ran the full budget)"
                                                                     if tr.stopped.any() else ""))
    best = tr.best
    handles += ax.plot(key[best], tr.value[best], "*", ms=15, color=BEST_COLOUR, mec="black", zorder=5,
                       label=f"best {tr.name(best)} ({label(run.objective)} {fmt(tr.value[best])})")
    named = [(ax, point_label(ax, f"{tr.name(best)}: {fmt(tr.value[best])}", (key[best], tr.value[best]),
                              fontsize=MIN_FONT_SIZE, color=BEST_COLOUR,
                              bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                                        alpha=0.85)))]
    for s in starts:
        ax.axvline(s - 0.5, color="0.75", lw=0.8, ls=":", zorder=0)
    ax.margins(y=0.08)
    scale.axis(ax, "y", tr.value[ok])
    _trial_axis(ax, key)
    ax.set_ylabel(f"final {run.metric_label(run.objective, scale)}")
    ax.set_title(f"each trial's {label(run.objective)} at its last evaluation, in the order proposed "
                 f"({better(run.mode)})", fontsize=10)
    ax.grid(alpha=0.3)
    bar = fig.colorbar(mappable, ax=ax, pad=0.01, aspect=25)
    bar.set_label("wave (trials trained side by side)")
    bar.set_ticks(np.arange(len(waves)) if len(waves) <= 20 else
                  np.unique(np.linspace(0, len(waves) - 1, 11).round()))
    bar.set_ticklabels([fmt(int(waves[int(t)])) for t in bar.get_ticks()])
    bar.ax.minorticks_off()

    hyper_axes = [fig.add_subplot(grid[1 + j // 2, j % 2]) for j in range(len(hyper))]
    norm = scale.norm()
    colour_map = cmap(run.mode)
    dots = None
    for hax, name in zip(hyper_axes, hyper):
        y = column_floats(run.table, name)[tr.last]
        have = np.isfinite(y)
        for mask, filled in ((done & have, True), (early & have, False)):
            if not mask.any():
                continue
            if filled:
                dots = hax.scatter(key[mask], y[mask], s=size, c=tr.value[mask], cmap=colour_map, norm=norm,
                                   edgecolors="none", zorder=3)
            else:
                from matplotlib import colormaps

                hax.scatter(key[mask], y[mask], s=size, facecolors="none", linewidths=1.1, zorder=3,
                            edgecolors=colormaps[colour_map](norm(np.clip(tr.value[mask], scale.vmin, scale.vmax))))
        if (failed & have).any():
            _failed(hax, key[failed & have], y[failed & have])
        if have[best]:
            hax.plot(key[best], y[best], "*", ms=14, color=BEST_COLOUR, mec="black", zorder=5)
            named.append((hax, point_label(hax, f"{label(name)} = {fmt(y[best])}", (key[best], y[best]),
                                           fontsize=MIN_FONT_SIZE, color=BEST_COLOUR,
                                           bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                                                     alpha=0.85))))
        for s in starts:
            hax.axvline(s - 0.5, color="0.75", lw=0.8, ls=":", zorder=0)
        positive = y[have & (y > 0)]
        log = bool(len(positive) and len(positive) == have.sum()
                   and (name in log_hyper or positive.max() / positive.min() > 10 ** LOG_SPAN_DECADES))
        if log:
            Scale(True, float(positive.min()), float(positive.max())).axis(hax, "y", positive)
        hax.margins(y=0.08)
        _trial_axis(hax, key)
        hax.set_ylabel(label(name) + (" (log scale)" if log else ""))
        hax.set_title(f"{label(name)}: the value each trial was given{_range_text(run, name)}", fontsize=10)
        hax.grid(alpha=0.3)
    if hyper_axes:
        if dots is None:
            from matplotlib.cm import ScalarMappable

            dots = ScalarMappable(norm=norm, cmap=colour_map)
        scale.colorbar(fig, dots, hyper_axes, f"final {run.metric_label(run.objective, scale)}", pad=0.01, aspect=30)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(2, len(handles)), fontsize=MIN_FONT_SIZE + 1,
               frameon=False)
    fig.suptitle(f"{label(run.name)}: {len(tr)} trial{'s' if len(tr) != 1 else ''} ({_source(run)})", fontsize=11)
    renderer = renderer_of(fig)
    for target, text in named:
        place_labels(target, [text], renderer=renderer)
    path = folder / "trials.png"
    save(fig, path)

    notes.append(f"trials: {len(tr)} in {tr.waves} wave{'s' if tr.waves != 1 else ''}; the best is "
                 f"{tr.name(best)} ({run.objective} = {fmt(tr.value[best])}), {tr.best_among}")
    stops = "; hollow markers are trials stopped at a rung, at their value there" if tr.stopped.any() else ""
    lost = f"; an × marks a trial whose last row has no value ({int(failed.sum())})" if failed.any() else ""
    logs = [n for n in hyper if _was_log(hyper_axes, hyper, n)]
    zoom = (f" The {run.objective} axis and colours are {scale.note}." if scale.note else "")
    caption = (f"Top: each trial's {run.objective} at its last evaluation against its trial number, coloured by "
               f"its wave (dotted rules between waves){stops}{lost}; the dark step line is the running best and the "
               f"star the best trial ({tr.name(best)}, {tr.best_among})."
               + (f" Below: the value of each searched hyperparameter each trial was given, against its number, "
                  f"coloured by the trial's final {run.objective} (brighter is better): the sampler's proposals "
                  f"over the waves" + (f"; log scale for {', '.join(logs)}" if logs else "") + "."
                  if hyper else "")
               + zoom)
    return [Figure(path, caption)]


def _source(run: RunView) -> str:
    method = str(getattr(run.study, "method", ""))
    sampler = getattr(getattr(run.study, "sampler", None), "name", None) or "TPESampler"
    return {"random": "drawn at random", "grid": "the grid's combinations",
            "optuna": f"proposed by Optuna's {sampler}"}.get(method, "searched")


def _wave_starts(tr: Trials) -> List[float]:
    """The first trial number of every wave after the first."""
    if tr.waves < 2:
        return []
    wave = tr.wave
    change = np.flatnonzero(np.isfinite(wave[1:]) & np.isfinite(wave[:-1]) & (wave[1:] != wave[:-1])) + 1
    return [float(tr.key[i]) for i in change]


def _wave_colours(tr: Trials) -> Tuple[np.ndarray, np.ndarray, Any]:
    """(the waves, each trial's RGBA colour by its wave, a mappable for the wave's colour bar): one of ten
    distinct colours for up to ten waves, else steps of cividis; grey for a trial of no wave."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    finite = np.isfinite(tr.wave)
    waves = np.unique(tr.wave[finite]) if finite.any() else np.array([0.0])
    count = len(waves)
    if count <= 10:
        palette = ListedColormap([colormaps["tab10"](k) for k in range(count)])
    else:
        palette = colormaps["cividis"].resampled(count)
    norm = BoundaryNorm(np.arange(count + 1) - 0.5, count)
    index = np.searchsorted(waves, np.where(finite, tr.wave, waves[0]))
    colours = palette(norm(index))
    colours[~finite] = (0.6, 0.6, 0.6, 1.0)
    return waves, colours, ScalarMappable(norm=norm, cmap=palette)


def _marker(marker: str, colour: str, *, filled: bool, text: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="none", marker=marker, ms=7, mfc=colour if filled else "white", mec=colour, mew=1.1,
                  label=text)


def _failed(ax: Any, x: np.ndarray, y: Optional[np.ndarray]) -> Any:
    """× at `x` (at `y`, or along the bottom of the axes where the trial has no value to stand at)."""
    if y is None:
        from matplotlib.transforms import blended_transform_factory

        transform = blended_transform_factory(ax.transData, ax.transAxes)
        return ax.scatter(x, np.full(len(x), 0.04), marker="x", s=30, color="0.35", transform=transform, zorder=4,
                          label="failed: its last row has no value (at the bottom)")
    return ax.scatter(x, y, marker="x", s=30, color="0.35", zorder=4)


def _trial_axis(ax: Any, key: np.ndarray) -> None:
    """The trial-number axis: whole numbers only, a little room either side."""
    from matplotlib.ticker import MaxNLocator

    low, high = (float(key.min()), float(key.max())) if len(key) else (0.0, 1.0)
    if high - low < 12:
        ax.set_xticks(np.arange(low, high + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    pad = max(0.6, 0.02 * (high - low))
    ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel("trial number (the order proposed)")


def _was_log(axes: List[Any], hyper: List[str], name: str) -> bool:
    return any(ax.get_yscale() == "log" for ax, n in zip(axes, hyper) if n == name)


# --------------------------------------------------------------------------- the page's sections


def halving_section(run: RunView) -> str:
    """The rungs: how many trials reached each and went on, the budget spent, and the best trial's path."""
    head = "<h2>Successive halving</h2>\n"
    tr = trials(run)
    if tr is None:
        return head + "<p>The rows could not be followed by trial (see the warnings).</p>\n"
    decided = rungs(run, tr)
    spent = budget(run, tr)
    eta = _eta(run)
    brackets = len(spent.brackets)
    parts = [head, f'<p id="halving">{len(tr)} trials'
                   + (f" in {brackets} brackets" if brackets > 1 else "")
                   + f"; at each rung the best 1/{escape(eta)} of a bracket went on. "
                     f"<b>{int(tr.completed.sum())}</b> ran the full {escape(fmt(tr.full))} steps and "
                     f"<b>{int(tr.stopped.sum())}</b> stopped at a rung. The trials trained "
                     f"{escape(spent.headline())} of what they would have at the full budget.</p>\n"]
    rows = []
    for r in decided:
        rows.append(([r.bracket] if brackets > 1 else []) + [r.index, None if not math.isfinite(r.step) else
                                                             int(r.step) if float(r.step).is_integer() else r.step,
                                                             r.entered, r.went_on, r.entered - r.went_on])
    finished = np.nan_to_num(tr.bracket, nan=0.0).astype(np.int64)
    for b in spent.brackets:  # the end of the budget: how many of each bracket got there
        rows.append(([b] if brackets > 1 else []) + ["full budget",
                                                    int(tr.full) if float(tr.full).is_integer() else tr.full,
                                                    int((tr.completed & (finished == b)).sum()), None, None])
    columns = (["bracket"] if brackets > 1 else []) + ["rung", "step", "trials reached it", "went on", "stopped"]
    parts.append(html_table(columns, rows, "rungs") + "\n")
    if tr.best is not None:
        i = tr.best
        mine = tr.rows[i]
        passed = sorted({int(k) for k in column_floats(run.table, RUNG)[mine] if np.isfinite(k)})
        parts.append(f"<p>The best trial, {escape(tr.name(i))}, went on at "
                     + (f"rung{'s' if len(passed) > 1 else ''} {escape(', '.join(map(str, passed)))}"
                        if passed else "no rung (its bracket had none)")
                     + f" and ended with {escape(run.objective)} = {escape(fmt(tr.value[i]))} after "
                       f"{escape(fmt(tr.step[i]))} steps.</p>\n")
    return "".join(parts)


def trials_section(run: RunView) -> str:
    """The best trials by their value at their last evaluation, those that ran the full budget first."""
    head = "<h2>Trials</h2>\n"
    tr = trials(run)
    if tr is None:
        return head + "<p>The rows could not be followed by trial (see the warnings).</p>\n"
    hyper, _ = searched(run)
    sign = -1.0 if run.mode == "max" else 1.0
    finite = np.isfinite(tr.value)
    order = np.lexsort((tr.key, np.where(finite, sign * tr.value, np.inf), ~tr.completed))
    order = [i for i in order if finite[i]][:MAX_TRIALS_LISTED]
    table_rows = []
    values = {n: column_floats(run.table, n) for n in hyper}
    stops = tr.stopped.any()
    rung = column_floats(run.table, RUNG)
    for i in order:
        row = [int(tr.key[i]), None if not np.isfinite(tr.wave[i]) else int(tr.wave[i]), int(tr.member[i]),
               int(tr.step[i]) if np.isfinite(tr.step[i]) else None]
        if stops:
            at = rung[tr.last[i]]
            row.append(("full budget" if not tr.stopped[i] else
                        f"stopped at rung {int(at)}" if np.isfinite(at) else "stopped at a rung"))
        row += [float(values[n][tr.last[i]]) if np.isfinite(values[n][tr.last[i]]) else None for n in hyper]
        row.append(float(tr.value[i]))
        table_rows.append(row)
    columns = ["trial", "wave", "member", "steps"] + (["ended"] if stops else []) + hyper + [run.objective]
    failed = int((~finite).sum())
    source = _source(run)
    parts = [head, f'<p id="trials-summary">{len(tr)} trials ({escape(source)}) in {tr.waves} '
                   f"wave{'s' if tr.waves != 1 else ''} of up to {int(tr.member.max()) + 1 if len(tr) else 0} "
                   f"members"
                   + (f"; {failed} ended without a value" if failed else "")
                   + f". The best {len(table_rows)} by {escape(run.objective)} at their last evaluation "
                     f"({escape(better(run.mode))})"
                   + (", those that ran the full budget first (a stopped trial's value is from fewer steps)"
                      if stops else "")
                   + ":</p>\n",
             html_table(columns, table_rows, "trials") + "\n"]
    return "".join(parts)
