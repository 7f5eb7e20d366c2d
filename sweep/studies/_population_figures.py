"""Report figures and the best-member section of a population trained side by side (studies pbt and search).

Such a study writes one row per member per generation (lineage columns
member, generation, parent, step; the searched hyperparameters as recipe
columns). Its report follows the population over training
(`training.png`), draws the final objective against each searched
hyperparameter (`hyperparameters.png`), and, where members copy each other's
weights (`exploits`: pbt's exploit), the lineage tree with the best member's
hyperparameter schedule (`lineage.png`); the page gets the best member of the
last generation with its schedule from `sweep.analysis.lineage`.

Not a study: shared by the study modules that train a population.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

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
        """The section on the best member of the last generation: its value, its schedule, and (with
        exploits) how often members copied."""
        if run.objective is None:
            return []
        return [_best_member(run, self.exploits)]


# --------------------------------------------------------------------------- the rows by member and generation


@dataclass
class Population:
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


def population(run: RunView) -> Optional[Population]:
    """The run's rows by generation and member (computed once per run); None, with a page warning, when
    they cannot be laid out so."""
    return run.once("population", _population_or_warning)


def _population_or_warning(run: RunView) -> Optional[Population]:
    if run.objective is None:
        return None
    try:
        return _population(run)
    except Exception as e:  # the page still shows the counts, the table and the errors
        run.warnings.append(f"could not follow the population by member and generation: {type(e).__name__}: {e}")
        return None


def _population(run: RunView) -> Optional[Population]:
    """The rows of a population study by generation and member, the best member of the last generation
    and its lineage; None (and a warning) when the table lacks the lineage columns."""
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
    parents = column_floats(table, "parent")[at]
    parent = np.where(present & np.isfinite(parents), np.nan_to_num(parents, nan=-1), -1).astype(np.int64)
    members = np.arange(row.shape[1])
    exploits = int((present & (parent >= 0) & (parent != members[None, :])).sum())
    finite_generations = np.flatnonzero(np.isfinite(value).any(axis=1))
    last = int(finite_generations[-1]) if len(finite_generations) else None
    best = best_index(value[last], run.mode) if last is not None else None
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
                            f"{best} first in generation {last} by {run.objective} ({better(run.mode)})")
    return Population(row=row, value=value, step=step, parent=parent, last=last, best=best, chain=chain,
                      exploits=exploits)


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

    pop = population(run)
    if pop is None or pop.best is None:
        return []
    drawn = _drawn_members(pop)
    best_value = pop.best_value()
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
    own_label = "a member continuing its own weights" if exploits else "a member (one line each)"
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
    median_step, median = _nanmedian(pop.step), _nanmedian(pop.value)
    on = np.isfinite(median_step) & np.isfinite(median)
    handles += ax.plot(median_step[on], median[on], "--", color="0.3", lw=1.3, zorder=3,
                       label="population median")
    chain_steps = _chain_values(pop.chain, "step")
    chain_values = _chain_objective(run, pop.chain)
    named: List[Any] = []  # the exploits' labels
    if len(pop.chain):
        handles += ax.plot(chain_steps, chain_values, "-o", color=BEST_COLOUR, lw=2.4, ms=3.5, zorder=5,
                           label=f"best member {pop.best}" + ("'s lineage" if exploits else "")
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
    ax.set_title(f"{label(run.name)}: {label(run.objective)} of every member over training, {better(run.mode)} "
                 f"({pop.members} members, {pop.generations} generations{shown})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize=MIN_FONT_SIZE + 1, loc="outside lower center", ncol=2, frameon=False)
    place_labels(ax, named, hide=True)  # an exploit label that would cover another is left out
    path = folder / "training.png"
    save(fig, path)
    how = ("Each generation's segment runs from the parent's point at the previous evaluation to the member's "
           "point, so an exploit (orange) jumps from the donor's curve; " if exploits else
           "One light line per member; ")
    zoom = (f" The {run.objective} axis is {scale.note}: the points beyond it are counted at its edge."
            if scale.clipped else "")
    method = getattr(run.study, "method", None)
    drawn_how = {"random": f"{pop.members} configurations drawn at random",
                 "grid": f"the {pop.members} combinations of the grid"}.get(str(method)) if not exploits else None
    source = f" ({drawn_how}, trained side by side)" if drawn_how else ""
    caption = (f"{run.objective} of every member{source} at each evaluation against its training steps. {how}the "
               f"dashed line is the population's median and the bold red line "
               + (f"the lineage of the best member of the last generation (member {pop.best})" if exploits else
                  f"the best member of the last generation (member {pop.best})")
               + (", diamonds where it continued from another member (named m<from>→m<to> where the names "
                  "do not overlap)" if exploits else "")
               + (f". An evenly spaced {len(drawn)} of the {pop.members} members are drawn." if shown else ".")
               + zoom)
    return [Figure(path, caption)]


# --------------------------------------------------------------------------- lineage.png


def _lineage_figure(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
    from matplotlib.figure import Figure as Canvas

    pop = population(run)
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
    pop = population(run)
    if pop is None or pop.best is None:
        return []
    hyper, log_hyper = searched(run)
    if not hyper:
        notes.append("no hyperparameter is searched (every one is a constant): no hyperparameters figure")
        return []
    last = pop.last
    rows = pop.row[last]
    present = rows >= 0
    at = np.where(present, rows, 0)
    values = pop.value[last]
    fig, axes = figure(len(hyper), width=5.0, height=4.0)
    handles: List[Any] = []
    named: List[Tuple[Any, Any]] = []
    for ax, name in zip(axes, hyper):
        x = np.where(present, column_floats(run.table, name)[at], np.nan)
        keep = np.isfinite(x) & np.isfinite(values)
        log = name in log_hyper and bool(np.all(x[keep] > 0))
        dots = ax.scatter(x[keep], values[keep], s=26, color="C0", alpha=0.8, edgecolors="none", zorder=3,
                          label=f"a member ({int(keep.sum())} with a finite {label(run.objective)})")
        if keep[pop.best]:
            star = ax.plot(x[pop.best], values[pop.best], "*", ms=15, color=BEST_COLOUR, mec="black", zorder=4,
                           label=f"the best member ({pop.best}; {label(run.objective)} {fmt(values[pop.best])})")
            named.append((ax, point_label(ax, f"{label(name)} = {fmt(x[pop.best])}", (x[pop.best], values[pop.best]),
                                          fontsize=MIN_FONT_SIZE, color=BEST_COLOUR,
                                          bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                                                    alpha=0.8))))
            handles = [dots] + star
        handles = handles or [dots]
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
    fig.suptitle(f"{label(run.name)}: each member's {label(run.objective)} at the last generation ({last}) "
                 f"against its hyperparameters ({better(run.mode)})", fontsize=11)
    renderer = renderer_of(fig) if named else None
    for ax, text in named:  # beside the star, off the other members' dots
        place_labels(ax, [text], renderer=renderer)
    path = folder / "hyperparameters.png"
    save(fig, path)
    which = ("the value each member used in the last generation (pbt changes them along the way; lineage.png "
             "has the best member's schedule)" if exploits else "each member's value")
    logs = [n for n in hyper if n in log_hyper]
    return [Figure(path, f"{run.objective} of every member at the last generation ({last}) against {which}; the red "
                         f"star is the best member"
                         + (f"; log scale for {', '.join(logs)}" if logs else "") + ".")]


# --------------------------------------------------------------------------- the page's section


def _best_member(run: RunView, exploits: bool) -> str:
    """The page's section on the best member: its value, its schedule, and how often members copied."""
    pop = population(run)
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
    rows = []
    objective = _chain_objective(run, pop.chain)
    for row, value in zip(pop.chain, objective):
        rows.append([row.get(c) for c in columns[:-1]] + [None if not np.isfinite(value) else float(value)])
    parts.append("<p>Its schedule: the rows of its lineage, generation 0 first. <i>member</i> is the member whose "
                 "row (and weights) the lineage passes through at that generation"
                 + (", so it changes where the lineage continued from another member" if exploits else "")
                 + f"; the hyperparameters are the values used during that generation and {escape(run.objective)} the "
                   f"value at its end.</p>\n")
    parts.append(html_table(columns, rows, "schedule") + "\n")
    return "".join(parts)
