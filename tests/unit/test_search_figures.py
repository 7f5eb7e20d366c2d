"""The report of a search that learns as it goes: successive halving (halving.png), trials in waves and
Optuna's (trials.png), and the population figures on such rows (training.png, hyperparameters.png).

The rows are made here as the search study writes them: one per member still training per evaluation, with
the lineage columns member, generation (global over the waves), parent, step (the trial's own training),
trial and wave (a search in waves, or Optuna's), bracket, rung (set on the row where a rung was decided) and
stopped (set on the row where a trial stopped). The figures are drawn from a `RunView` of those rows and the
`drawn` fixture keeps each saved matplotlib figure, so the checks read what was drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pyarrow as pa
import pytest

from sweep.plotting import MIN_FONT_SIZE, PAGE_WIDTH_PX, RunView, ok_rows, renderer_of
from sweep.studies._population_figures import BEST_COLOUR
from sweep.studies._search_figures import STOPPED_COLOUR, SearchFigures
from sweep.studies._training import Distribution

STEPS, INTERVAL = 1000, 50
GENERATIONS = STEPS // INTERVAL


# --------------------------------------------------------------------------- rows as the search writes them


def search_rows(population: int, trials: int, *, eta: int = 4, min_steps: int = 50, brackets: int = 1,
                halving: bool = True, optuna: bool = False, failed: Sequence[Tuple[int, int]] = (),
                seed: int = 0) -> pa.Table:
    """A search of `trials` trials in waves of `population` (lr log-uniform, momentum uniform): accuracy
    rises with the steps toward a ceiling set by the values. With `halving`, at each rung of its bracket
    (rung k at min_steps·η^k steps, bracket b from rung b on; brackets are contiguous member slots) the best
    ⌊n/η⌋ of a bracket (at least one) go on. `failed` (trial, generation in its wave) rows have status
    'failed' and a null accuracy, and rank last at a rung."""
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-4, 0, trials)
    momentum = rng.uniform(0, 0.99, trials)
    ceiling = np.clip(0.97 - 0.12 * (np.log10(lr) + 1.3) ** 2 - 0.15 * (momentum - 0.9) ** 2, 0.12, 0.97)
    rung_steps = []
    at = min_steps
    while at < STEPS:
        rung_steps.append(at)
        at *= eta
    names = ("candidate_id", "status", "error", "member", "generation", "parent", "step", "trial", "wave",
             "bracket", "rung", "stopped", "lr", "momentum", "accuracy")
    columns: Dict[str, List[Any]] = {k: [] for k in names}
    for w, start in enumerate(range(0, trials, population)):
        n = min(population, trials - start)
        bracket = [m * brackets // n for m in range(n)]
        alive = list(range(n))
        for g in range(GENERATIONS):
            step = (g + 1) * INTERVAL
            accuracy = {m: math.nan if (start + m, g) in failed else
                        float(np.clip(0.1 + (ceiling[start + m] - 0.1) * (1 - math.exp(-step / 250))
                                      + rng.normal(0, 0.004), 0, 1)) for m in alive}
            rung: Dict[int, int] = {}
            stopped: Dict[int, str] = {}
            if halving and step in rung_steps:
                k = rung_steps.index(step)
                for b in range(min(brackets, k + 1)):
                    group = [m for m in alive if bracket[m] == b]
                    ranked = sorted(group, key=lambda m: (math.inf if math.isnan(accuracy[m]) else -accuracy[m], m))
                    keep = max(1, len(ranked) // eta)
                    for place, m in enumerate(ranked):
                        rung[m] = k
                        if place >= keep:
                            stopped[m] = (f"rung {k} ({step} steps): {place + 1}th of {len(ranked)} in bracket {b}; "
                                          f"the best {keep} go on")
            for m in alive:
                bad = (start + m, g) in failed
                row = {"candidate_id": (w * GENERATIONS + g) * population + m, "status": "failed" if bad else "ok",
                       "error": "RuntimeError: the loss is not finite" if bad else None, "member": m,
                       "generation": w * GENERATIONS + g, "parent": m, "step": step, "trial": start + m, "wave": w,
                       "bracket": bracket[m], "rung": rung.get(m), "stopped": stopped.get(m),
                       "lr": float(lr[start + m]), "momentum": float(momentum[start + m]),
                       "accuracy": None if bad else accuracy[m]}
                for k, v in row.items():
                    columns[k].append(v)
            alive = [m for m in alive if m not in stopped]
    drop = set()
    if not (trials > population or optuna):
        drop |= {"trial", "wave"}
    if not halving:
        drop |= {"bracket", "rung", "stopped"}
    types = {"status": pa.string(), "error": pa.string(), "stopped": pa.string(), "lr": pa.float64(),
             "momentum": pa.float64(), "accuracy": pa.float64()}
    return pa.table({k: pa.array(v, types.get(k, pa.int64())) for k, v in columns.items() if k not in drop})


def study(population: int, trials: int, *, eta: int = 4, brackets: int = 1, halving: bool = True,
          optuna: bool = False, **_: Any) -> SimpleNamespace:
    return SimpleNamespace(
        kind="search", method="optuna" if optuna else "random", population=population, trials=trials, steps=STEPS,
        interval=INTERVAL,
        halving=SimpleNamespace(reduction_factor=eta, min_steps=50, brackets=brackets) if halving else None,
        sampler=SimpleNamespace(name="TPESampler", kwargs={}) if optuna else None,
        hyperparameters={"lr": Distribution(distribution="loguniform", low=1e-4, high=1.0),
                         "momentum": Distribution(distribution="uniform", low=0.0, high=0.99)})


def run_view(table: pa.Table, config: SimpleNamespace, findings: Optional[Dict[str, Any]] = None) -> RunView:
    lineage = [c for c in ("member", "generation", "parent", "step", "trial", "wave", "bracket", "rung", "stopped")
               if c in table.column_names]
    return RunView(name="search", kind="search", study=config, location="memory", table=table, ok=ok_rows(table),
                   recipe=["lr", "momentum"], lineage=lineage, metrics=["accuracy"], objective="accuracy",
                   mode="max", record={"findings": findings or {}})


def report(tmp_path: Path, population: int, trials: int, findings: Optional[Dict[str, Any]] = None,
           **options: Any) -> Tuple[RunView, List[str], List[str], str]:
    """(the run, the figures' names, the Summary notes, the page's sections) of a synthetic search."""
    run = run_view(search_rows(population, trials, **options), study(population, trials, **options), findings)
    notes: List[str] = []
    figures = SearchFigures().figures(run, tmp_path, notes)
    page = "".join(SearchFigures().page(run))
    return run, [f.path.name for f in figures], notes, page


# --------------------------------------------------------------------------- what the rows say, read independently


def rows_of(table: pa.Table) -> List[Dict[str, Any]]:
    return table.to_pylist()


def trial_of(row: Dict[str, Any]) -> int:
    return row["trial"] if "trial" in row else row["member"]


def expected_segments(table: pa.Table) -> Set[Tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of every pair of consecutive evaluations of one trial, both with a value."""
    by_trial: Dict[int, List[Dict[str, Any]]] = {}
    for row in rows_of(table):
        by_trial.setdefault(trial_of(row), []).append(row)
    out = set()
    for rows in by_trial.values():
        rows.sort(key=lambda r: r["generation"])
        for a, b in zip(rows, rows[1:]):
            if a["accuracy"] is not None and b["accuracy"] is not None:
                out.add((a["step"], round(a["accuracy"], 9), b["step"], round(b["accuracy"], 9)))
    return out


def drawn_segments(ax: Any) -> Set[Tuple[float, float, float, float]]:
    from matplotlib.collections import LineCollection

    out = set()
    for collection in ax.collections:
        if isinstance(collection, LineCollection):
            for seg in collection.get_segments():
                out.add((float(seg[0][0]), round(float(seg[0][1]), 9), float(seg[1][0]), round(float(seg[1][1]), 9)))
    return out


def last_rows(table: pa.Table) -> Dict[int, Dict[str, Any]]:
    last: Dict[int, Dict[str, Any]] = {}
    for row in rows_of(table):
        t = trial_of(row)
        if t not in last or row["generation"] > last[t]["generation"]:
            last[t] = row
    return dict(sorted(last.items()))


def best_completed(table: pa.Table) -> Tuple[int, float]:
    done = {t: r["accuracy"] for t, r in last_rows(table).items()
            if r["step"] == STEPS and r["accuracy"] is not None and r["status"] == "ok"}
    best = max(sorted(done), key=lambda t: done[t])
    return best, done[best]


def rung_labels(ax: Any) -> List[str]:
    (top,) = ax.child_axes
    return [t.get_text() for t in top.xaxis.get_ticklabels()]


def halving_axes(fig: Any) -> Tuple[List[Any], Any]:
    panels, budget = fig.subfigs
    return list(panels.axes), budget.axes[0]


def panels(fig: Any) -> List[Any]:
    """The figure's axes, colour bars left out."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def bar_heights(ax: Any) -> List[List[float]]:
    return [[float(p.get_height()) for p in container.patches] for container in ax.containers]


# --------------------------------------------------------------------------- halving.png


def test_halving_draws_each_trial_to_its_last_row_and_names_the_rungs(tmp_path, drawn):
    table = search_rows(16, 16)
    run, names, notes, page = report(tmp_path, 16, 16)
    assert names == ["training.png", "halving.png", "hyperparameters.png"]  # no trial column: no trials.png
    assert run.warnings == []
    (ax,), budget = halving_axes(drawn["halving.png"])
    # the rungs: 16 reach rung 0 and 4 go on, 4 → 1 at rung 1, the last one goes on at rung 2
    assert rung_labels(ax) == ["rung 0 · 50 steps\n16 → 4", "rung 1 · 200 steps\n4 → 1", "rung 2 · 800 steps\n1 → 1"]
    rules = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert rules == [50, 200, 800]
    # every trial's line runs through its own evaluations and ends at its last row; nothing else is joined
    assert drawn_segments(ax) == expected_segments(table)
    stopped = [r for r in last_rows(table).values() if r["stopped"]]
    assert len(stopped) == 15 and {r["step"] for r in stopped} == {50, 200}
    (ends,) = [line for line in ax.lines if line.get_markeredgecolor() == STOPPED_COLOUR]
    assert sorted(map(tuple, ends.get_xydata())) == sorted((r["step"], r["accuracy"]) for r in stopped)
    # the best trial in red, evaluated at every step to the full budget
    best, value = best_completed(table)
    (red,) = [line for line in ax.lines if line.get_color() == BEST_COLOUR]
    assert list(red.get_xdata()) == list(range(50, 1001, 50)) and red.get_ydata()[-1] == value
    assert f"best member {best} (final" in red.get_label()
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "training step (log scale)"
    # the budget: 16 trials × [50, 150, 600, 200] steps against what they trained
    full, spent = bar_heights(budget)
    assert full == [800, 2400, 9600, 3200] and spent == [800, 4 * 150, 600, 200]
    assert budget.get_title() == "budget: 2,200 of 16,000 member-steps (13.8 %); halving saved 13,800"
    assert [t.get_text() for t in budget.get_xticklabels()] == ["0–50", "50–200", "200–800", "800–1000"]
    assert "member-steps (log scale)" == budget.get_ylabel()  # 200 … 9,600: spans decades
    assert any("the trials trained 2,200 of 16,000 member-steps (13.8 %)" in n for n in notes)
    # the page: how many reached each rung and the best trial's way through them
    assert "<td class=\"num\">0</td><td class=\"num\">50</td><td class=\"num\">16</td><td class=\"num\">4</td>" in page
    assert "<td>full budget</td><td class=\"num\">1000</td><td class=\"num\">1</td>" in page
    assert f"The best trial, member {best}, went on at rungs 0, 1, 2" in page
    assert f'<p id="best-trial">Member <b>{best}</b>: accuracy = <b>{value:.4g}</b>' in page


def test_two_brackets_get_a_panel_each_on_one_axis_and_rungs_count_every_wave(tmp_path, drawn):
    table = search_rows(16, 48, brackets=2)
    run, names, notes, page = report(tmp_path, 16, 48, brackets=2)
    assert names == ["training.png", "halving.png", "trials.png", "hyperparameters.png"]
    assert run.warnings == []
    (first, second), budget = halving_axes(drawn["halving.png"])
    assert [first.get_title(), second.get_title()] == ["bracket 0: 24 trials", "bracket 1: 24 trials"]
    assert first.get_shared_y_axes().joined(first, second) and first.get_ylim() == second.get_ylim()
    # per wave, bracket 0 (8 slots) goes 8 → 2 → 1 → 1 and bracket 1 (from rung 1 on) 8 → 2 → 1: three waves
    assert rung_labels(first) == ["rung 0 · 50 steps\n24 → 6", "rung 1 · 200 steps\n6 → 3",
                                  "rung 2 · 800 steps\n3 → 3"]
    assert rung_labels(second) == ["rung 1 · 200 steps\n24 → 6", "rung 2 · 800 steps\n6 → 3"]
    assert drawn_segments(first) | drawn_segments(second) == expected_segments(table)
    best, value = best_completed(table)
    panel = first if best % 16 < 8 else second
    assert [line for line in panel.lines if line.get_color() == BEST_COLOUR]
    # the budget by bracket: 24 trials each, [50, 150, 600, 200]-step segments
    full, zero, one = bar_heights(budget)
    assert full == [2400, 7200, 28800, 9600]
    assert zero == [1200, 6 * 150, 3 * 600, 3 * 200] and one == [1200, 24 * 150, 6 * 600, 3 * 200]
    assert budget.get_title().startswith("budget: 13,500 of 48,000 member-steps (28.1 %)")
    assert '<th>bracket</th><th>rung</th>' in page

    # trials.png: each trial's last value by trial number, stopped ones hollow, coloured by wave
    from matplotlib import colormaps

    fig = drawn["trials.png"]
    top, lr_ax, momentum_ax = panels(fig)
    last = last_rows(table)
    filled, hollow = [c for c in top.collections if len(c.get_offsets()) and c.get_label().startswith("_")][:2]
    done = [t for t, r in last.items() if not r["stopped"] and r["accuracy"] is not None]
    early = [t for t, r in last.items() if r["stopped"] and r["accuracy"] is not None]
    assert sorted(filled.get_offsets()[:, 0]) == done and sorted(hollow.get_offsets()[:, 0]) == early
    assert len(hollow.get_facecolors()) == 0  # hollow
    tab10 = [colormaps["tab10"](k) for k in range(3)]
    for (x, _), colour in zip(filled.get_offsets(), filled.get_facecolors()):
        assert tuple(colour) == pytest.approx(tab10[int(x) // 16])
    # the running best over the trials that ran the full budget, as a step line
    (running,) = [line for line in top.lines if line.get_label().startswith("running best")]
    values = [last[t]["accuracy"] if t in done else math.nan for t in sorted(last)]
    expected = np.fmax.accumulate(np.array(values, dtype=float))
    assert np.allclose(running.get_ydata()[:-1], expected, equal_nan=True)
    assert np.nanmax(running.get_ydata()) == value
    # one panel per searched hyperparameter: its value against the trial number, coloured by the final value
    assert lr_ax.get_yscale() == "log" and momentum_ax.get_yscale() == "linear"
    dots = lr_ax.collections[0]
    assert sorted(dots.get_offsets()[:, 0]) == done
    assert list(dots.get_offsets()[:, 1]) == pytest.approx([last[int(t)]["lr"] for t in dots.get_offsets()[:, 0]])
    assert list(dots.get_array()) == pytest.approx([last[int(t)]["accuracy"] for t in dots.get_offsets()[:, 0]])

    # training.png: a slot's trials of different waves are never one line
    ax = drawn["training.png"].axes[0]
    assert drawn_segments(ax) == expected_segments(table)
    assert "48 trials in 3 waves of 16" in ax.get_title()
    # hyperparameters.png: every trial at its last row, the stopped hollow
    hyper = drawn["hyperparameters.png"].axes[0]
    assert sum(len(c.get_offsets()) for c in hyper.collections) == len(done) + len(early)


def test_rung_names_that_would_touch_are_shortened(tmp_path, drawn):
    report(tmp_path, 16, 16, eta=2, brackets=2)  # rungs at 50, 100, 200, 400, 800 in half-width panels
    fig = drawn["halving.png"]
    renderer = renderer_of(fig)
    (first, second), _ = halving_axes(fig)
    for ax in (first, second):
        (top,) = ax.child_axes
        shown = [t for t in top.xaxis.get_ticklabels() if t.get_visible() and t.get_text()]
        assert shown
        boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in shown]
    assert rung_labels(first)[0] == "r0\n8→4"


# --------------------------------------------------------------------------- failed rows, one trial, plain search


def test_a_failed_row_breaks_its_line_and_a_failed_last_row_is_marked(tmp_path, drawn):
    failed = [(3, 5), (10, GENERATIONS - 1)]  # trial 3 fails mid-way and trains on; trial 10's last row fails
    table = search_rows(8, 24, halving=False, failed=failed)
    assert table.column("status").to_pylist().count("failed") == 2
    run, names, notes, page = report(tmp_path, 8, 24, halving=False, failed=failed)
    assert names == ["training.png", "trials.png", "hyperparameters.png"]
    ax = drawn["training.png"].axes[0]
    segments = drawn_segments(ax)
    assert segments == expected_segments(table)
    # trial 3's line: 19 evaluations with a value, and no segment into or out of step 300 (its failed row)
    points = {(r["step"], round(r["accuracy"], 9)) for r in rows_of(table) if r["trial"] == 3 and r["accuracy"]}
    assert len(points) == GENERATIONS - 1
    assert len([s for s in segments if (s[0], s[1]) in points]) == GENERATIONS - 3
    fig = drawn["trials.png"]
    top, lr_ax, _ = panels(fig)
    crosses = [c for c in top.collections if c.get_label().startswith("failed")]
    assert len(crosses) == 1 and list(crosses[0].get_offsets()[:, 0]) == [10]
    (lr_cross,) = [c for c in lr_ax.collections if len(c.get_offsets()) == 1 and c.get_offsets()[0, 0] == 10]
    assert lr_cross.get_offsets()[0, 1] == pytest.approx(last_rows(table)[10]["lr"])
    assert "1 ended without a value" in page
    assert '<p id="trials-summary">24 trials (drawn at random) in 3 waves of up to 8 members' in page


def test_a_single_trial(tmp_path, drawn):
    table = search_rows(1, 1, halving=False, optuna=True, failed=[(0, 7)])
    run, names, notes, page = report(tmp_path, 1, 1, halving=False, optuna=True, failed=[(0, 7)])
    assert names == ["training.png", "trials.png", "hyperparameters.png"] and run.warnings == []
    top = drawn["trials.png"].axes[0]
    assert list(top.get_xticks()) == [0]
    (star,) = [line for line in top.lines if line.get_marker() == "*"]
    assert star.get_ydata()[0] == last_rows(table)[0]["accuracy"]
    assert drawn["trials.png"]._suptitle.get_text() == "search: 1 trial (proposed by Optuna's TPESampler)"
    assert drawn_segments(drawn["training.png"].axes[0]) == expected_segments(table)  # broken at generation 7
    assert "the only trial with a finite value" in page and 'id="best-trial">Trial <b>0</b>' in page


def test_a_plain_search_keeps_its_member_figures(tmp_path, drawn):
    run, names, notes, page = report(tmp_path, 8, 8, halving=False)
    assert names == ["training.png", "hyperparameters.png"] and run.warnings == []
    assert '<p id="best-member">Member <b>' in page and "Successive halving" not in page and "<h2>Trials" not in page
    assert any(n.startswith("best member of the last generation") for n in notes)


def test_findings_that_name_another_best_trial_are_a_warning(tmp_path):
    table = search_rows(16, 32)
    best, _ = best_completed(table)
    other = next(t for t in last_rows(table) if t != best)
    run, *_ = report(tmp_path, 16, 32, findings={"best_trial": float(other)})
    assert run.warnings == [f"run.json's findings name trial {other} as the best, but the results rank trial {best} "
                            f"first (the best of the 2 trials that ran the full 1000 steps with a finite value) by "
                            f"accuracy (higher is better)"]
    run, *_ = report(tmp_path, 16, 32, findings={"best_trial": float(best)})
    assert run.warnings == []


# --------------------------------------------------------------------------- a reader's page


@pytest.mark.parametrize("options", [dict(population=16, trials=64), dict(population=16, trials=48, brackets=2)])
def test_the_new_figures_fit_the_page_and_their_texts_do_not_overlap(tmp_path, drawn, options):
    from matplotlib.image import imread
    from matplotlib.text import Text

    report(tmp_path, **options)
    for name in ("halving.png", "trials.png", "training.png", "hyperparameters.png"):
        fig = drawn[name]
        assert imread(tmp_path / name).shape[1] <= PAGE_WIDTH_PX, name
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < MIN_FONT_SIZE]
        assert not small, (name, small[:5])
        renderer = renderer_of(fig)
        for ax in fig.axes:  # the labels inside a panel, and the rungs' names above it
            boxes = [Text.get_window_extent(t, renderer) for t in ax.texts if t.get_visible() and t.get_text()]
            for child in ax.child_axes:
                boxes += [t.get_window_extent(renderer) for t in child.xaxis.get_ticklabels()
                          if t.get_visible() and t.get_text()]
            for i, a in enumerate(boxes):
                assert not any(a.overlaps(b) for b in boxes[i + 1:]), (name, ax.get_title())
        legends = [legend.get_window_extent(renderer) for legend in fig.findobj(lambda a: type(a).__name__ ==
                                                                                 "Legend")]
        width = fig.get_figwidth() * fig.dpi
        for box in legends:  # whole on the figure
            assert box.x0 >= -1 and box.x1 <= width + 1, name
