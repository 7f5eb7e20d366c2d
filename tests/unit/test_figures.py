"""The report's figures as a reader sees them: one scale rule for every metric drawn as colour or along a
value axis, references where a reader needs one, labels that cover neither curves nor each other, figures
no wider than the page, captions that follow the config, and metric names that say what they are.

Run folders are made by hand (a real config.yaml, run.json and Parquet results whose columns carry their
roles, as a sweep writes them); `write_report` draws them with matplotlib as a user's report does, and the
`drawn` fixture keeps each saved matplotlib figure so its axes can be inspected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import sweep.report as report
from sweep.config import MAX_DESCRIPTION_CHARS, parse_config
from sweep.errors import ConfigError
from sweep.plotting import (AXIS_MARGIN, CLIP_PERCENTILES, MIN_FONT_SIZE, PAGE_WIDTH_PX, Scale, figure,
                            renderer_of, value_scale)
from sweep.report import write_report
from sweep.results import LINEAGE, METRIC, RECIPE, column, results_schema

CHECKPOINTS = Path(report.__file__).resolve().parent / "examples" / "checkpoints"
ENDPOINTS = [str(CHECKPOINTS / f"seed{i}-epoch30.safetensors") for i in range(3)]
LINEAGE_COLUMNS = ("member", "generation", "parent", "step")


# --------------------------------------------------------------------------- run folders by hand


def config_dict(name: str, study: Dict[str, Any], *, objective: str = "loss", mode: str = "min",
                describe: Optional[Dict[str, str]] = None,
                function: str = "sweep.examples.digits:metrics") -> Dict[str, Any]:
    metrics: Dict[str, Any] = {"function": function, "objective": objective, "mode": mode}
    if describe is not None:
        metrics["describe"] = describe
    return {"name": name, "model": {"factory": "sweep.examples.digits:make_model"},
            "data": {"loader": "sweep.examples.digits:eval_batches"}, "metrics": metrics, "study": study,
            "workers": {"count": 1}, "sinks": {"mlflow": {"enabled": False}}}


def results_table(columns: Dict[str, Sequence[Any]], metrics: Sequence[str] = ("loss", "accuracy"),
                  types: Optional[Dict[str, pa.DataType]] = None) -> pa.Table:
    """A results table as a sweep writes it, every column with its role."""
    types = types or {}
    n = len(next(iter(columns.values())))
    study = [column(k, types.get(k, pa.float64()), LINEAGE if k in LINEAGE_COLUMNS else RECIPE)
             for k in columns if k not in metrics]
    schema = results_schema(study, [m for m in metrics if m in columns])
    data: Dict[str, Any] = {"candidate_id": list(range(n)), "status": ["ok"] * n, "error": [None] * n}
    data.update({k: list(v) for k, v in columns.items()})
    data.update(worker=["w0"] * n, node=["n0"] * n, eval_seconds=[0.01] * n)
    return pa.Table.from_pydict({f.name: pa.array(data[f.name], f.type) for f in schema}, schema=schema)


def make_run(tmp_path: Path, config: Dict[str, Any], table: pa.Table,
             findings: Optional[Dict[str, Any]] = None) -> Path:
    run_dir = tmp_path / "runs" / config["name"]
    (run_dir / "results").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    record: Dict[str, Any] = {"name": config["name"], "results": str(run_dir / "results")}
    if findings:
        record["findings"] = findings
    (run_dir / "run.json").write_text(json.dumps(record))
    pq.write_table(table, run_dir / "results" / "part-000000-abcdef01.parquet")
    return run_dir


def summary_items(page: str) -> List[str]:
    block = re.search(r"<h2>Summary</h2>\s*<ul>(.*?)</ul>", page, re.S)
    return re.findall(r"<li>(.*?)</li>", block.group(1)) if block else []


def caption(page: str, stem: str) -> str:
    return re.search(rf'<figure id="{stem}">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)


def shown_texts(fig: Any) -> List[Any]:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def line_points(ax: Any, step: float = 1.0) -> np.ndarray:
    """Display coordinates along every drawn line of `ax`, `step` pixels apart (sampled here, independently
    of the plotting code)."""
    out = [np.zeros((0, 2))]
    for line in ax.lines:
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        for a, b in zip(xy[:-1], xy[1:]):
            k = max(1, int(np.hypot(*(b - a)) / step))
            out.append(a + np.outer(np.linspace(0, 1, k + 1), b - a))
        out.append(xy)
    return np.concatenate(out)


# --------------------------------------------------------------------------- the one scale rule


def test_a_lower_is_better_metric_spanning_decades_gets_a_log_scale():
    values = np.geomspace(0.3, 24.0, 70)  # the DARE heat map's range: 1.9 decades
    scale = value_scale(values, "min")
    assert (scale.log, scale.clipped, scale.note) == (True, "", "log scale")
    assert (scale.vmin, scale.vmax) == (0.3, 24.0)
    assert scale.label("loss") == "loss (log scale)"
    assert np.allclose(np.diff(np.log10(scale.levels(5))), np.log10(80.0) / 4)  # evenly spaced in log
    # the same values where higher is better: a log scale would squeeze the good end, so it is linear
    assert not value_scale(values, "max").log
    # under a decade (0.27 … 2.5): linear
    assert not value_scale(np.linspace(0.27, 2.5, 50), "min").log


def test_heavy_outliers_clip_the_range_at_the_bad_end():
    rng = np.random.default_rng(0)
    bulk = rng.normal(-1.0, 0.05, 400)  # a score that may be negative: never log
    values = np.concatenate([bulk, [40.0, 55.0, 70.0]])
    scale = value_scale(values, "min")
    high = float(np.percentile(values, CLIP_PERCENTILES[1]))
    assert (scale.log, scale.clipped, scale.extend) == (False, "above", "max")
    assert scale.vmin == values.min() and scale.vmax == pytest.approx(high)
    assert scale.note == "clipped above the 98th percentile"
    assert scale.beyond(values) == (0, int((values > high).sum()))
    # higher is better: the stragglers are low, and the range stops at the 2nd percentile
    accuracy = np.concatenate([rng.uniform(0.90, 0.95, 300), [0.08, 0.1, 0.12]])
    scale = value_scale(accuracy, "max")
    assert (scale.clipped, scale.extend, scale.vmax) == ("below", "min", accuracy.max())
    assert scale.vmin == pytest.approx(np.percentile(accuracy, CLIP_PERCENTILES[0]))
    assert scale.note == "clipped below the 2nd percentile"
    # a loss spanning decades whose outliers dwarf the bulk even on a log scale: both
    loss = np.concatenate([rng.uniform(0.3, 0.4, 300), [1e4, 1e5, 1e6, 5e6]])
    scale = value_scale(loss, "min")
    assert (scale.log, scale.clipped) == (True, "above")
    assert scale.vmax == pytest.approx(10 ** np.percentile(np.log10(loss), CLIP_PERCENTILES[1]))
    assert scale.note == "log scale, clipped above the 98th percentile"


def test_a_narrow_range_stays_linear():
    values = np.linspace(0.29, 0.31, 40)
    scale = value_scale(values, "min")
    assert (scale.log, scale.clipped, scale.note) == (False, "", "")
    assert (scale.vmin, scale.vmax) == (0.29, 0.31)
    assert scale.label("loss") == "loss"
    # nothing to draw, one value, NaN and inf ignored
    assert value_scale(np.array([np.nan, np.inf])) == Scale(False, 0.0, 1.0)
    one = value_scale(np.array([0.5, np.nan, 0.5]), "min")
    assert one.vmin < 0.5 < one.vmax and not one.log


def test_colour_bars_and_axes_say_which_scale(tmp_path):
    values = np.geomspace(0.3, 24.0, 12).reshape(3, 4)
    scale = value_scale(values, "min")
    fig, (ax, other) = figure(2)
    image = ax.imshow(values, norm=scale.norm())
    bar = scale.colorbar(fig, image, ax, scale.label("loss"))
    assert bar.ax.get_ylabel() == "loss (log scale)" and bar.extend == "neither"
    assert image.norm.vmin == 0.3 and image.norm.vmax == 24.0 and type(image.norm).__name__ == "LogNorm"

    accuracy = np.concatenate([np.linspace(0.9, 0.95, 200), [0.05, 0.07, 0.09]])
    clipped = value_scale(accuracy, "max")
    other.plot(np.arange(len(accuracy)), accuracy, ".")
    clipped.axis(other, "y", accuracy)
    low, high = other.get_ylim()
    pad = (clipped.vmax - clipped.vmin) * AXIS_MARGIN
    assert (low, high) == (pytest.approx(clipped.vmin - pad), pytest.approx(clipped.vmax + pad))
    assert low > 0.5  # zoomed to where the values are, not 0 … 1
    notes = [t.get_text() for t in other.texts]
    assert notes == ["3 points below the axis (clipped below the 2nd percentile)"]
    fig.savefig(tmp_path / "scales.png")


# --------------------------------------------------------------------------- figures use the rule


def grid_table() -> pa.Table:
    """A basin: loss 0.25 at (0, 0) rising to ~25 at the corners (two decades); accuracy falls with it."""
    steps = np.round(np.linspace(-1.0, 1.0, 9), 12)
    a, b = (v.ravel() for v in np.meshgrid(steps, steps))
    loss = 0.25 * 10 ** (a ** 2 + b ** 2)
    return results_table({"toward_a": a, "toward_b": b, "loss": loss, "accuracy": 1 / (1 + loss)})


def grid_study() -> Dict[str, Any]:
    return {"kind": "grid", "centre": ENDPOINTS[0], "steps": {"start": -1.0, "stop": 1.0, "num": 9},
            "directions": {"toward_a": ENDPOINTS[1], "toward_b": ENDPOINTS[2]}}


def colour_bars(fig: Any) -> List[Any]:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_the_grid_heat_map_uses_the_rule_and_says_what_each_metric_is(tmp_path, drawn):
    describe = {"loss": "cross-entropy, nats", "accuracy": "fraction correct"}
    run_dir = make_run(tmp_path, config_dict("grid", grid_study(), describe=describe), grid_table())
    write_report(run_dir, mlflow=False)
    fig = drawn["grid.png"]
    loss_ax, accuracy_ax = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    loss_mesh, accuracy_mesh = loss_ax.collections[0], accuracy_ax.collections[0]
    assert type(loss_mesh.norm).__name__ == "LogNorm"  # 0.25 … 25: two decades, lower is better
    assert (loss_mesh.norm.vmin, loss_mesh.norm.vmax) == (pytest.approx(0.25), pytest.approx(25.0))
    assert type(accuracy_mesh.norm).__name__ == "Normalize"
    labels = [ax.get_ylabel() for ax in colour_bars(fig)]
    assert labels == ["loss (cross-entropy, nats; log scale)", "accuracy (fraction correct)"]
    # brighter is better: the best cell gets the colour map's brightest end for each metric
    assert loss_mesh.get_cmap().name == "viridis_r" and accuracy_mesh.get_cmap().name == "viridis"


def test_metric_descriptions_fall_back_to_the_metrics_function(tmp_path, drawn):
    import sweep.examples.digits as digits

    run_dir = make_run(tmp_path, config_dict("grid", grid_study()), grid_table())
    write_report(run_dir, mlflow=False)
    labels = [ax.get_ylabel() for ax in colour_bars(drawn["grid.png"])]
    assert labels == [f"loss ({digits.metrics.describe['loss']}; log scale)",
                      f"accuracy ({digits.metrics.describe['accuracy']})"]

    # the config's own words win, metric by metric
    other = make_run(tmp_path / "own", config_dict("grid", grid_study(), describe={"accuracy": "top-1, held out"}),
                     grid_table())
    write_report(other, mlflow=False)
    labels = [ax.get_ylabel() for ax in colour_bars(drawn["grid.png"])]
    assert labels == ["loss (cross-entropy, nats; log scale)", "accuracy (top-1, held out)"]

    # a metrics function that does not import where the report runs: the bare names, and no warning
    gone = make_run(tmp_path / "gone", config_dict("grid", grid_study(), function="not_a_module_here:metrics"),
                    grid_table())
    result = write_report(gone, mlflow=False)
    assert result.warnings == []
    assert [ax.get_ylabel() for ax in colour_bars(drawn["grid.png"])] == ["loss (log scale)", "accuracy"]


def test_metrics_describe_is_checked_when_the_config_is_read(tmp_path):
    def parse(describe: Any) -> Any:
        raw = config_dict("grid", grid_study(), describe=describe)
        return parse_config(raw, base_dir=tmp_path, check_imports=False)

    assert parse({"loss": "cross-entropy, nats"}).metrics.describe == {"loss": "cross-entropy, nats"}
    assert parse({}).metrics.describe == {}
    long = "x" * (MAX_DESCRIPTION_CHARS + 1)
    with pytest.raises(ConfigError, match=rf"metrics\.describe.*'loss': give one line of 1 to "
                                          rf"{MAX_DESCRIPTION_CHARS} characters.*got {MAX_DESCRIPTION_CHARS + 1}"):
        parse({"loss": long})
    with pytest.raises(ConfigError, match=r"metrics\.describe.*a metric name must not be empty"):
        parse({" ": "nats"})
    with pytest.raises(ConfigError, match=r"metrics\.describe"):
        parse({"loss": 3})
    # a config without describe keeps the digest it had: the empty default is not written out
    assert "describe" not in parse({}).to_dict()["metrics"]


def test_the_merge_histogram_spreads_the_bulk_on_log_bins(tmp_path, drawn):
    """131 of 158 rows fell in one linear bin: on log bins the good end takes several."""
    rng = np.random.default_rng(1)
    loss = np.concatenate([rng.uniform(0.296, 0.6, 131), rng.uniform(1.0, 24.2, 27)])
    table = results_table({"method": ["dare"] * len(loss), "lambda": np.ones(len(loss)),
                           "density": np.ones(len(loss)), "loss": loss}, metrics=("loss",),
                          types={"method": pa.string()})
    study = {"kind": "checkpoints", "paths": ENDPOINTS}
    write_report(make_run(tmp_path, config_dict("hist", study), table), mlflow=False)
    ax = drawn["objective.png"].axes[0]
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
    heights = np.array([p.get_height() for p in ax.patches])
    assert heights.sum() == len(loss)
    assert heights.max() < 131 / 2  # the bulk spreads over several bins


# --------------------------------------------------------------------------- references


def perturb_table(values: np.ndarray, base: Optional[float] = None) -> pa.Table:
    seeds: List[Optional[int]] = list(range(len(values)))
    loss = list(values)
    if base is not None:  # the unperturbed base as a row without a seed
        seeds.append(None)
        loss.append(base)
    return results_table({"seed": seeds, "loss": loss}, metrics=("loss",), types={"seed": pa.int64()})


PERTURB = {"kind": "perturb", "base": ENDPOINTS[0], "sigma": 0.05, "count": 200, "seed": 0}


def test_the_perturb_histogram_marks_the_unperturbed_base(tmp_path, drawn):
    values = np.random.default_rng(2).normal(0.31, 0.02, 200)
    base = 0.2917
    run_dir = make_run(tmp_path, config_dict("perturb", PERTURB), perturb_table(values),
                       findings={"base_loss": base})
    page = write_report(run_dir, mlflow=False).html.read_text()
    ax = drawn["objective.png"].axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [base, base]
    assert dashed[0].get_label() == "unperturbed base 0.2917"
    worse = int((values > base).sum())
    assert f"the base&#x27;s loss: 0.2917; {worse} of 200 perturbations (base + 0.05·N(0, I)) are worse" in \
        summary_items(page)
    assert "the dashed line is the unperturbed base (0.2917)" in caption(page, "objective")


def test_a_base_row_is_the_reference_and_not_one_of_the_perturbations(tmp_path, drawn):
    values = np.random.default_rng(3).normal(0.5, 0.05, 100)
    run_dir = make_run(tmp_path, config_dict("perturb", PERTURB), perturb_table(values, base=0.45))
    write_report(run_dir, mlflow=False)
    ax = drawn["objective.png"].axes[0]
    assert [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"] == [[0.45, 0.45]]
    assert sum(p.get_height() for p in ax.patches) == 100  # the base row is not in the histogram
    assert "100 ok perturbations" in ax.get_title()


def test_a_perturb_run_without_the_base_says_so(tmp_path, drawn):
    run_dir = make_run(tmp_path, config_dict("perturb", PERTURB), perturb_table(np.linspace(0.3, 0.4, 50)))
    page = write_report(run_dir, mlflow=False).html.read_text()
    assert not [line for line in drawn["objective.png"].axes[0].lines if line.get_linestyle() == "--"]
    assert ("the unperturbed base&#x27;s loss is not in this run&#x27;s results: the histogram has no reference "
            "line") in summary_items(page)


def training_study(kind: str, population: int, generations: int) -> Dict[str, Any]:
    study = {"kind": kind, "population": population, "steps": generations * 50, "interval": 50,
             "train": {"loader": "sweep.examples.digits:train_batches"}, "loss": "sweep.examples.digits:loss",
             "optimizer": "sgd", "seed": 0,
             "hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.001, "high": 1.0},
                                 "momentum": {"distribution": "uniform", "low": 0.0, "high": 0.99}}}
    if kind == "search":
        study["method"] = "random"
    return study


def population_table(population: int = 16, generations: int = 20, seed: int = 0) -> pa.Table:
    """A pbt run as configs/pbt.yaml's looks: the first evaluation finds most members near 0.8 and a few
    slow starters near 0.1; from the fourth generation on the population is above 0.9; each generation
    the bottom quarter copies a random top-quarter member (weights and learning rate)."""
    rng = np.random.default_rng(seed)
    start = np.where(np.arange(population) < 3, rng.uniform(0.05, 0.2, population), rng.uniform(0.7, 0.9, population))
    lr = 10 ** rng.uniform(-3, 0, population)
    rows = []
    parent = np.arange(population)
    accuracy = start
    for g in range(generations):
        accuracy = np.clip(accuracy + (0.95 - accuracy) * rng.uniform(0.3, 0.7, population)
                           + rng.normal(0, 0.002, population), 0, 1)
        for m in range(population):
            rows.append((g, m, int(parent[m]), lr[m], accuracy[m]))
        order = np.argsort(-accuracy)
        parent = np.arange(population)
        accuracy = accuracy.copy()
        for receiver in order[-(population // 4):]:
            donor = int(rng.choice(order[: population // 4]))
            parent[receiver], accuracy[receiver] = donor, accuracy[donor]
            lr[receiver] = lr[donor] * rng.choice([0.8, 1.2])
    columns = {"member": [r[1] for r in rows], "generation": [r[0] for r in rows], "parent": [r[2] for r in rows],
               "step": [(r[0] + 1) * 50 for r in rows], "lr": [r[3] for r in rows],
               "momentum": [0.9] * len(rows), "accuracy": [r[4] for r in rows]}
    ints = {name: pa.int64() for name in LINEAGE_COLUMNS}
    return results_table(columns, metrics=("accuracy",), types=ints)


def test_the_pbt_training_curve_zooms_to_the_population(tmp_path, drawn):
    table = population_table()
    run_dir = make_run(tmp_path, config_dict("pbt", training_study("pbt", 16, 20), objective="accuracy",
                                             mode="max"), table)
    page = write_report(run_dir, mlflow=False).html.read_text()
    ax = drawn["training.png"].axes[0]
    accuracy = np.asarray(table.column("accuracy").to_pylist())
    low_end, top = np.percentile(accuracy, CLIP_PERCENTILES[0]), accuracy.max()
    margin = (top - low_end) * AXIS_MARGIN
    low, high = ax.get_ylim()
    assert (low, high) == (pytest.approx(low_end - margin), pytest.approx(top + margin))
    assert low > 0.5 > accuracy.min()  # not 0 … 1: the first evaluations are counted, not drawn
    below = int((accuracy < low).sum())
    assert any(t.get_text().startswith(f"{below} points below the axis") for t in ax.texts)
    assert "clipped below the 2nd percentile" in caption(page, "training")


def test_exploit_labels_never_overlap(tmp_path, drawn):
    run_dir = make_run(tmp_path, config_dict("pbt", training_study("pbt", 16, 20), objective="accuracy",
                                             mode="max"), population_table(seed=5))
    write_report(run_dir, mlflow=False)
    fig = drawn["training.png"]
    renderer = renderer_of(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if "→" in t.get_text()]
    shown = [t for t in labels if t.get_visible()]
    assert shown, "no exploit is named"
    boxes = [t.get_window_extent(renderer) for t in shown]
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), [t.get_text() for t in shown]


# --------------------------------------------------------------------------- overlaps and sizes


def align_table() -> pa.Table:
    alpha = np.round(np.linspace(0, 1, 41), 12)
    original = 0.35 + 0.75 * np.exp(-((alpha - 0.5) / 0.1) ** 2)
    aligned = 0.35 - 0.04 * np.sin(np.pi * alpha)
    acc_original = 0.935 - 0.25 * np.exp(-((alpha - 0.5) / 0.1) ** 2)
    acc_aligned = 0.935 - 0.016 * np.sin(np.pi * alpha)
    return results_table({"path": ["original"] * 41 + ["aligned"] * 41, "alpha": list(alpha) * 2,
                          "loss": list(original) + list(aligned),
                          "accuracy": list(acc_original) + list(acc_aligned)}, types={"path": pa.string()})


def interpolate_table() -> pa.Table:
    alpha = np.round(np.linspace(-0.25, 1.25, 61), 12)
    loss = 0.29 + 0.15 * (alpha - 0.5) ** 2 - 0.04 * np.cos(4 * np.pi * alpha)
    accuracy = 0.934 - 0.008 * np.abs(np.sin(np.pi * alpha)) - 0.02 * np.maximum(0, np.abs(alpha - 0.5) - 0.5)
    return results_table({"alpha": alpha, "loss": loss, "accuracy": accuracy})


@pytest.mark.parametrize("kind", ["align", "interpolate"])
def test_path_legends_sit_below_the_panels_and_labels_cover_no_curve(tmp_path, drawn, kind):
    if kind == "align":
        study: Dict[str, Any] = {"kind": "align", "reference": ENDPOINTS[0], "model": ENDPOINTS[1]}
        table = align_table()
    else:
        study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": {"start": -0.25, "stop": 1.25,
                                                                              "num": 61}}
        table = interpolate_table()
    write_report(make_run(tmp_path, config_dict(kind, study), table), mlflow=False)
    fig = drawn[f"{kind}.png"]
    renderer = renderer_of(fig)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = fig.legends[0].get_window_extent(renderer)
    named = 0
    for ax in fig.axes:
        assert legend.y1 <= ax.get_window_extent(renderer).y0  # below every panel, over no curve
        points = line_points(ax)
        for text in ax.texts:
            if not (text.get_visible() and text.get_text().strip()):
                continue
            named += 1
            box = type(text).__mro__[1].get_window_extent(text, renderer)  # the text, not its leader line
            inside = ((points[:, 0] > box.x0) & (points[:, 0] < box.x1) & (points[:, 1] > box.y0)
                      & (points[:, 1] < box.y1))
            assert not inside.any(), f"{text.get_text()!r} covers a curve"
    assert named >= 3  # the endpoints and at least one barrier


def figures_of_every_kind(tmp_path: Path) -> List[Path]:
    merge_rows = {"method": ["base", "model", "model"] + ["ties"] * 20 + ["task_arithmetic"] * 5,
                  "lambda": [None] * 3 + list(np.repeat(np.linspace(0.2, 2.0, 10), 2)) + list(np.linspace(0.2, 1, 5)),
                  "density": [None] * 3 + [0.3, 0.7] * 10 + [None] * 5,
                  "loss": list(np.random.default_rng(4).uniform(0.3, 3.0, 28))}
    runs = [
        make_run(tmp_path / "g", config_dict("grid", grid_study()), grid_table()),
        make_run(tmp_path / "a", config_dict("align", {"kind": "align", "reference": ENDPOINTS[0],
                                                       "model": ENDPOINTS[1]}), align_table()),
        make_run(tmp_path / "m", config_dict("merge", {"kind": "merge", "base": ENDPOINTS[0],
                                                       "models": ENDPOINTS[1:]}),
                 results_table(merge_rows, metrics=("loss",), types={"method": pa.string()})),
        make_run(tmp_path / "p", config_dict("pbt", training_study("pbt", 16, 20), objective="accuracy",
                                             mode="max"), population_table()),
    ]
    return runs


def test_every_figure_fits_the_page_and_its_text_stays_legible(tmp_path, drawn):
    from matplotlib.image import imread

    for run_dir in figures_of_every_kind(tmp_path):
        result = write_report(run_dir, mlflow=False)
        assert result.figures and not [w for w in result.warnings if "could not" in w], result.warnings
        for path in result.figures:
            width = imread(path).shape[1]
            assert width <= PAGE_WIDTH_PX, f"{path.name} is {width} px wide: the page would shrink its text"
            small = [(t.get_text(), t.get_fontsize()) for t in shown_texts(drawn[path.name])
                     if t.get_fontsize() < MIN_FONT_SIZE]
            assert not small, f"{path.name}: text under {MIN_FONT_SIZE} pt: {small[:5]}"
    assert f"max-width: {PAGE_WIDTH_PX}px" in report._STYLE  # the page is as wide as the widest figure


def test_tick_labels_do_not_touch(tmp_path, drawn):
    run_dir = make_run(tmp_path, config_dict("pbt", training_study("pbt", 16, 20), objective="accuracy",
                                             mode="max"), population_table())
    write_report(run_dir, mlflow=False)
    fig = drawn["lineage.png"]
    renderer = renderer_of(fig)
    checked = 0
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels()
                     if t.get_visible() and t.get_text()]
            boxes = [b for b in boxes if b.width > 0]
            checked += len(boxes)
            for a, b in zip(boxes, boxes[1:]):
                assert not a.overlaps(b), (ax.get_title(), [t.get_text() for t in axis.get_ticklabels()])
    assert checked > 40


# --------------------------------------------------------------------------- captions follow the config


def merge_per_model_table(draws: int) -> pa.Table:
    rng = np.random.default_rng(6)
    l0, l1 = rng.uniform(0.2, 2, draws), rng.uniform(0.2, 2, draws)
    loss = 0.3 + (l0 - 0.8) ** 2 + (l1 - 0.6) ** 2
    columns = {"method": ["base", "model", "model"] + ["task_arithmetic"] * draws,
               "lambda_0": [None] * 3 + list(l0), "lambda_1": [None] * 3 + list(l1),
               "loss": [0.53, 0.3, 0.34] + list(loss)}
    return results_table(columns, metrics=("loss",), types={"method": pa.string()})


@pytest.mark.parametrize("search", ["random", "grid"])
def test_the_merge_caption_follows_the_search(tmp_path, search):
    study = {"kind": "merge", "base": ENDPOINTS[0], "models": ENDPOINTS[1:], "methods": ["task_arithmetic"],
             "per_model": True, "search": search}
    page = write_report(make_run(tmp_path, config_dict("merge", study), merge_per_model_table(30)),
                        mlflow=False).html.read_text()
    text = caption(page, "merge")
    if search == "random":
        assert "task_arithmetic with one λ per model (drawn at random, λ0 against λ1" in text
    else:
        assert "task_arithmetic with one λ per model (on a grid, λ0 against λ1" in text and "random" not in text


def test_heat_map_titles_say_mean_only_where_cells_are_averaged(tmp_path, drawn):
    lambdas, densities = [0.5, 1.0, 1.5], [0.2, 0.8]
    cells = [(lam, den) for lam in lambdas for den in densities]
    rows: Dict[str, List[Any]] = {"method": [], "lambda": [], "density": [], "seed": [], "loss": []}
    for method, seeds in (("ties", [0]), ("dare", [0, 1, 2])):
        for (lam, den) in cells:
            for seed in seeds:
                rows["method"].append(method)
                rows["lambda"].append(lam)
                rows["density"].append(den)
                rows["seed"].append(seed)
                rows["loss"].append(0.3 + abs(lam - 1) + den / 10 + seed / 100)
    table = results_table(rows, metrics=("loss",), types={"method": pa.string(), "seed": pa.int64()})
    study = {"kind": "merge", "base": ENDPOINTS[0], "models": ENDPOINTS[1:], "methods": ["ties", "dare"]}
    page = write_report(make_run(tmp_path, config_dict("merge", study), table), mlflow=False).html.read_text()
    titles = [ax.get_title() for ax in drawn["merge.png"].axes if ax.get_label() != "<colorbar>"]
    assert titles[0].startswith("ties: loss; best 0.32 at λ = 1, density = 0.2")
    assert titles[1].startswith("dare: mean loss over seeds; best 0.33 at λ = 1, density = 0.2")  # (0 + 1 + 2)/300
    text = caption(page, "merge")
    assert "ties as a heat map over λ × density (one row per cell" in text
    assert "dare as a heat map over λ × density (the mean over up to 3 seeds per cell" in text
    # every cell is big enough for its number: each is written on it
    numbers = {t.get_text() for t in drawn["merge.png"].axes[0].texts}
    assert numbers == {"0.82", "0.88", "0.32", "0.38"}  # 0.3 + |λ − 1| + density / 10


@pytest.mark.parametrize("method, words", [("random", "16 configurations drawn at random"),
                                           ("grid", "the 16 combinations of the grid")])
def test_the_search_caption_follows_the_method(tmp_path, method, words):
    study = training_study("search", 16, 20)
    study["method"] = method
    if method == "grid":
        del study["population"]  # the grid's size
        for spec in study["hyperparameters"].values():
            spec["num"] = 4
    run_dir = make_run(tmp_path, config_dict("search", study, objective="accuracy", mode="max"), population_table())
    page = write_report(run_dir, mlflow=False).html.read_text()
    text = caption(page, "training")
    assert f"accuracy of every member ({words}, trained side by side)" in text
    assert "lineage" not in text  # a search copies no weights: its best member has no lineage to follow
