"""`sweep report`: figures and the self-contained page from hand-made run folders with known answers.

Each run folder holds a real config.yaml (absolute paths to the example checkpoints), a run.json
and synthetic results whose columns carry their roles, as a sweep writes them. No Ray, no MLflow
server: MLflow is a local SQLite store.
"""

from __future__ import annotations

import base64
import json
import math
import re
import types
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import sweep.config as config
import sweep.report as report
import sweep.studies as studies
from sweep.errors import SweepError
from sweep.plotting import DPI, PAGE_WIDTH_PX, Figure, RunView, figure, save
from sweep.report import best_rows, metric_mode, write_report
from sweep.results import LINEAGE, RECIPE, column, results_schema
from sweep.settings import Section
from sweep.studies.merge import merge_grid

CHECKPOINTS = Path(report.__file__).resolve().parent / "examples" / "checkpoints"
ENDPOINTS = [str(CHECKPOINTS / f"seed{i}-epoch30.safetensors") for i in range(3)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


# --------------------------------------------------------------------------- run folders by hand


def config_dict(name: str, study: Dict[str, Any], *, objective: Optional[str] = "loss", mode: str = "min",
                mlflow: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The shape of configs/interpolate.yaml, with absolute paths."""
    return {
        "name": name,
        "model": {"factory": "sweep.examples.digits:make_model"},
        "data": {"loader": "sweep.examples.digits:eval_batches"},
        "metrics": {"function": "sweep.examples.digits:metrics", "objective": objective, "mode": mode},
        "study": study,
        "workers": {"count": 1},
        "sinks": {"mlflow": mlflow or {"enabled": False}},
    }


#: The metric columns of the hand-made tables; the other columns given are the study's.
METRICS = ("loss", "acc", "accuracy")
#: The study columns with role lineage (a population's); the others are recipe columns.
LINEAGE_COLUMNS = ("member", "generation", "parent", "step")


def results_table(columns: Dict[str, Any], types: Dict[str, pa.DataType], *, metrics: Sequence[str] = METRICS,
                  roles: bool = True) -> pa.Table:
    """A results table as a sweep writes it: candidate_id, status, error, the study's columns (float64 unless
    `types` says otherwise), the metrics among `metrics` (in the order given), then the trailing columns,
    each with its role in the field metadata (none with `roles=False`, as results written before roles)."""
    n = len(next(iter(columns.values())))
    data = {"candidate_id": pa.array(columns.pop("candidate_id", range(n)), pa.int64()),
            "status": pa.array(columns.pop("status", ["ok"] * n), pa.string()),
            "error": pa.array(columns.pop("error", [None] * n), pa.string())}
    study = [column(name, types.get(name, pa.float64()), LINEAGE if name in LINEAGE_COLUMNS else RECIPE)
             for name in columns if name not in metrics]
    schema = results_schema(study, [name for name in columns if name in metrics])
    for name, values in columns.items():
        data[name] = pa.array(list(values), schema.field(name).type)
    data["worker"] = pa.array(["w0"] * n, pa.string())
    data["node"] = pa.array(["n0"] * n, pa.string())
    data["eval_seconds"] = pa.array([0.01] * n, pa.float64())
    if not roles:
        schema = pa.schema([f.remove_metadata() for f in schema])
    return pa.Table.from_pydict(data, schema=schema)


def make_run(tmp_path: Path, config: Dict[str, Any], table: pa.Table, *, run_id: Optional[str] = None,
             name: str = "run") -> Path:
    """A run folder as `sweep run` leaves it: config.yaml, run.json and results/part-*.parquet."""
    run_dir = tmp_path / "runs" / name
    (run_dir / "results").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "run.json").write_text(json.dumps({"name": config["name"], "results": str(run_dir / "results"),
                                                  "mlflow_run_id": run_id}))
    pq.write_table(table, run_dir / "results" / "part-000000-abcdef01.parquet")
    return run_dir


def check_png(path: Path, min_height: int = 300, min_width: int = 400) -> np.ndarray:
    """A real PNG of a sensible size that is not one flat colour."""
    from matplotlib.image import imread

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width, image.shape
    assert image[..., :3].std() > 0.01, "the figure is blank"
    return image


def embedded_images(page: str) -> List[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def table_ids(page: str, table_id: str) -> List[int]:
    """The first column (candidate_id) of the page's table `table_id`, in order."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return [int(m) for m in re.findall(r'<tr><td class="num">(-?\d+)</td>', body)]


def summary_items(page: str) -> List[str]:
    block = re.search(r"<h2>Summary</h2>\s*<ul>(.*?)</ul>", page, re.S).group(1)
    return re.findall(r"<li>(.*?)</li>", block)


# --------------------------------------------------------------------------- interpolate


def interpolate_table() -> pa.Table:
    """Three endpoints (α = 0, 1, 2): loss bumps 0.2 over the first segment and 0.5 over the second
    (1 + b·|sin πα|, so the barrier is 0.5 at α = 1.5); beyond the endpoints the loss climbs
    steeply (extrapolation, which must not count). Accuracy dips 0.3 over the second segment."""
    alpha = np.round(np.linspace(-0.25, 2.25, 101), 12)
    bump = np.where(alpha < 1, 0.2, 0.5) * np.abs(np.sin(np.pi * alpha))
    inside = (alpha >= 0) & (alpha <= 2)
    loss = np.where(inside, 1 + bump, 1 + 10 * np.minimum(np.abs(alpha), np.abs(alpha - 2)))
    acc = np.where(inside, 0.9 - np.where(alpha < 1, 0.1, 0.3) * np.abs(np.sin(np.pi * alpha)), 0.5)
    n = len(alpha)
    status = ["ok"] * n + ["failed", "invalid"]
    error = [None] * n + [EVIL, "weights file unreadable"]
    return results_table({"candidate_id": list(range(n + 2)), "status": status, "error": error,
                          "alpha": list(alpha) + [3.0, 4.0], "loss": list(loss) + [None, None],
                          "acc": list(acc) + [None, None]}, {})


def test_interpolate_report_marks_the_barrier_of_the_whole_path(tmp_path):
    study = {"kind": "interpolate", "endpoints": ENDPOINTS, "alphas": {"start": -0.25, "stop": 2.25, "num": 101}}
    run_dir = make_run(tmp_path, config_dict("interp", study), interpolate_table())

    result = write_report(run_dir)

    assert result.folder == run_dir / "report"
    assert result.html == run_dir / "report" / "report.html"
    assert result.figures == [run_dir / "report" / "interpolate.png"]
    assert not result.mlflow_logged and result.warnings == []
    check_png(result.figures[0], min_width=1000)  # two panels side by side
    page = result.html.read_text(encoding="utf-8")
    items = summary_items(page)
    # The barrier of the path through three endpoints: the second segment's 0.5 at α = 1.5,
    # not the first segment's 0.2, and not the extrapolated climb.
    assert "barrier of loss (objective): 0.5 at α = 1.5 (lower is better)" in items
    # acc is not the objective: higher is better (no 'loss'/'error' in its name), so its dip is the barrier.
    assert "barrier of acc: 0.3 at α = 1.5 (higher is better)" in items
    assert embedded_images(page) == [result.figures[0].read_bytes()]
    assert "E0 = seed0-epoch30.safetensors, E1 = seed1-epoch30.safetensors" in page
    # counts: 103 rows, 101 ok, 1 invalid, 1 failed
    assert re.search(r'<table id="counts">.*?<td class="num">103</td><td class="num">101</td>'
                     r'<td class="num">1</td><td class="num">1</td>', page, re.S)
    # the failed row's error is shown, escaped
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "weights file unreadable" in page
    # one file: nothing fetched from elsewhere
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    # the best rows: the endpoints and the path points nearest them (loss 1.0 first, lower ids on ties)
    assert table_ids(page, "best")[:3] == [10, 50, 90]
    assert table_ids(page, "problems") == [101, 102]


def test_a_second_report_replaces_the_first(tmp_path):
    study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": [0.0, 0.5, 1.0]}
    table = results_table({"alpha": [0.0, 0.5, 1.0], "loss": [1.0, 1.25, 1.0]}, {})
    run_dir = make_run(tmp_path, config_dict("interp2", study), table)
    stale = run_dir / "report" / "objective.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    result = write_report(run_dir)
    assert not stale.exists(), "a figure this kind does not draw is left from an earlier report"
    assert "barrier of loss (objective): 0.25 at α = 0.5 (lower is better)" in summary_items(
        result.html.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- ranking and the generic parts


CHECKPOINT_LOSSES = [0.5, 0.2, float("nan"), 0.9, 0.2, 0.7, float("inf")]


def checkpoints_table() -> pa.Table:
    n = len(CHECKPOINT_LOSSES)
    status = ["ok"] * n + ["failed"]
    paths = [f"/ck/{i}.safetensors" for i in range(n)] + [f"/ck/{EVIL}.safetensors"]
    # the failed row carries a value that would win in either mode if status were not checked
    losses = CHECKPOINT_LOSSES + [-5.0]
    accs = [1 - v if math.isfinite(v) else v for v in CHECKPOINT_LOSSES] + [99.0]
    return results_table({"status": status, "error": [None] * n + ["boom"], "path": paths,
                          "loss": losses, "acc": accs}, {"path": pa.string()})


@pytest.mark.parametrize("mode, expected", [("min", [1, 4, 0, 5, 3]), ("max", [3, 5, 0, 1, 4])])
def test_best_rows_are_ranked_by_the_objective_in_its_mode(mode, expected):
    table = checkpoints_table()
    assert best_rows(table, "loss", mode, 10).column("candidate_id").to_pylist() == expected
    assert best_rows(table, "loss", mode, 2).column("candidate_id").to_pylist() == expected[:2]


@pytest.mark.parametrize("mode, expected", [("min", [1, 4, 0]), ("max", [3, 5, 0])])
def test_the_page_lists_the_best_rows_and_a_histogram(tmp_path, mode, expected):
    study = {"kind": "checkpoints", "paths": ENDPOINTS}
    run_dir = make_run(tmp_path, config_dict("ck", study, mode=mode), checkpoints_table())
    result = write_report(run_dir, top=3)
    assert result.figures == [run_dir / "report" / "objective.png"]
    check_png(result.figures[0])
    page = result.html.read_text(encoding="utf-8")
    assert table_ids(page, "best") == expected
    header = re.search(r'<table id="best">\s*<thead><tr>(.*?)</tr>', page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["candidate_id", "path", "loss", "acc"]
    assert "2 ok rows have a non-finite loss" in page  # the NaN and the inf: neither ranked nor drawn
    assert EVIL not in page and "&lt;script&gt;" in page  # a path from the data, escaped


def test_objective_defaults_to_the_first_metric(tmp_path):
    table = results_table({"path": ["a", "b", "c"], "acc": [0.5, 0.9, 0.7], "loss": [0.1, 0.3, 0.2]},
                          {"path": pa.string()})
    run_dir = make_run(tmp_path, config_dict("ck", {"kind": "checkpoints", "paths": ENDPOINTS},
                                             objective=None, mode="max"), table)
    page = write_report(run_dir).html.read_text(encoding="utf-8")
    assert "Best 3 rows by acc (higher is better)" in page
    assert table_ids(page, "best") == [1, 2, 0]


def test_metric_mode_rule():
    assert metric_mode("val_loss") == "min" and metric_mode("Error rate") == "min"
    assert metric_mode("accuracy") == "max" and metric_mode("f1") == "max"


# --------------------------------------------------------------------------- column roles and the study registry


class GridConfig(Section):
    """The config section of a study kind that only a test registers."""

    kind: Literal["tiles"]
    points: int = 3


@pytest.fixture
def tiles_kind():
    """A study kind `tiles` registered at runtime: a module with a Config, figures (tiles.png) and a page
    section, and no line in sweep.studies. Yields the RunViews its figures were given."""
    seen: List[RunView] = []

    def figures(run: RunView, folder: Path, notes: List[str]) -> List[Figure]:
        seen.append(run)
        fig, (ax,) = figure(1)
        ax.plot(run.floats("scale"), run.floats(run.objective), "o-")
        path = folder / "tiles.png"
        save(fig, path)
        notes.append(f"tiles of {run.ok.num_rows} points")
        return [Figure(path, "the objective over the scale")]

    module = types.ModuleType("tiles")
    module.Config = GridConfig
    module.FIGURES = ("tiles.png",)
    module.figures = figures
    module.page = lambda run: [f'<h2>Grid</h2>\n<p id="tiles-section">{len(run.metrics)} metrics</p>\n']
    assert "tiles" not in studies.STUDIES, "the runtime kind must not replace a registered one"
    studies.STUDIES["tiles"] = module
    config.rebuild()
    try:
        yield seen
    finally:
        del studies.STUDIES["tiles"]
        config.rebuild()


def tiles_table() -> pa.Table:
    """A float recipe column (scale) before the metrics, accuracy the first metric."""
    return results_table({"scale": [0.5, 1.0, 2.0], "accuracy": [0.7, 0.9, 0.8], "loss": [0.6, 0.2, 0.4]}, {})


def test_a_float_recipe_column_is_not_a_metric_and_the_objective_is_the_first_metric(tmp_path, tiles_kind):
    run_dir = make_run(tmp_path, config_dict("tiles", {"kind": "tiles"}, objective=None, mode="max"), tiles_table())
    result = write_report(run_dir, mlflow=False)
    assert result.warnings == []
    (run,) = tiles_kind
    assert (run.kind, run.recipe, run.lineage) == ("tiles", ["scale"], [])
    assert (run.metrics, run.objective, run.mode) == (["accuracy", "loss"], "accuracy", "max")
    page = result.html.read_text()
    assert "Objective: <b>accuracy</b>" in page and "Best 3 rows by accuracy (higher is better)" in page
    assert table_ids(page, "best") == [1, 2, 0]
    header = re.search(r'<table id="best">\s*<thead><tr>(.*?)</tr>', page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["candidate_id", "scale", "accuracy", "loss"]


def test_a_study_registered_at_runtime_draws_its_figures_and_page_section(tmp_path, tiles_kind):
    run_dir = make_run(tmp_path, config_dict("tiles", {"kind": "tiles", "points": 3}), tiles_table())
    (run_dir / "report").mkdir()
    (run_dir / "report" / "objective.png").write_bytes(PNG_SIGNATURE)  # a figure this kind does not draw
    result = write_report(run_dir, mlflow=False)
    assert result.figures == [run_dir / "report" / "tiles.png"]
    check_png(result.figures[0])
    assert not (run_dir / "report" / "objective.png").exists()
    page = result.html.read_text()
    assert embedded_images(page) == [result.figures[0].read_bytes()]
    assert '<figure id="tiles">' in page and "tiles.png: the objective over the scale" in page
    assert '<p id="tiles-section">2 metrics</p>' in page
    assert summary_items(page) == ["tiles of 3 points"]
    assert page.index('id="tiles-section"') < page.index("<h2>Figures</h2>")

    # Its figure names are the report's too: another kind's report removes a stale tiles.png.
    other = make_run(tmp_path, config_dict("ck", {"kind": "checkpoints", "paths": ENDPOINTS}), checkpoints_table(),
                     name="other")
    (other / "report").mkdir()
    (other / "report" / "tiles.png").write_bytes(PNG_SIGNATURE)
    assert [p.name for p in write_report(other, mlflow=False).figures] == ["objective.png"]
    assert not (other / "report" / "tiles.png").exists()


def test_results_without_roles_take_their_float_columns_for_metrics(tmp_path):
    table = results_table({"path": ["a", "b", "c"], "scale": [3.0, 2.0, 1.0], "loss": [0.3, 0.1, 0.2]},
                          {"path": pa.string()}, roles=False)
    run_dir = make_run(tmp_path, config_dict("old", {"kind": "checkpoints", "paths": ENDPOINTS}), table)
    result = write_report(run_dir, mlflow=False)
    assert result.warnings == ["the results carry no column roles (written before sweep recorded them): float "
                               "columns are taken for metrics (scale, loss), the others for recipe columns"]
    page = result.html.read_text()
    assert "the results carry no column roles" in page
    assert table_ids(page, "best") == [1, 2, 0]  # by loss, the configured objective
    header = re.search(r'<table id="best">\s*<thead><tr>(.*?)</tr>', page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["candidate_id", "path", "loss", "scale"]


# --------------------------------------------------------------------------- align


def test_align_marks_both_barriers(tmp_path):
    alpha = np.round(np.linspace(0, 1, 21), 12)
    original = 1 + 0.4 * np.sin(np.pi * alpha)
    aligned = 1 + 0.05 * np.sin(np.pi * alpha)
    table = results_table({"path": ["original"] * 21 + ["aligned"] * 21, "alpha": list(alpha) * 2,
                           "loss": list(original) + list(aligned), "acc": list(1 - original / 2) + list(1 - aligned / 2)},
                          {"path": pa.string()})
    study = {"kind": "align", "reference": ENDPOINTS[0], "model": ENDPOINTS[1], "alphas": {"num": 21}}
    run_dir = make_run(tmp_path, config_dict("align", study), table)
    result = write_report(run_dir)
    assert result.figures == [run_dir / "report" / "align.png"]
    check_png(result.figures[0], min_width=1000)
    items = summary_items(result.html.read_text(encoding="utf-8"))
    assert "original path: barrier of loss (objective): 0.4 at α = 0.5 (lower is better)" in items
    assert "aligned path: barrier of loss (objective): 0.05 at α = 0.5 (lower is better)" in items
    assert "original path: barrier of acc: 0.2 at α = 0.5 (higher is better)" in items


# --------------------------------------------------------------------------- landscape


def landscape_table(two_d: bool = True) -> pa.Table:
    """A bowl whose lowest grid point is (0.25, 0.5); the loss spans more than two decades."""
    xs = np.round(np.linspace(-1, 2, 13), 12)
    ys = np.round(np.linspace(-1, 2, 13), 12) if two_d else np.array([0.0])
    x, y = (a.ravel() for a in np.meshgrid(xs, ys))
    loss = 0.01 + (x - 0.25) ** 2 + (y - (0.5 if two_d else 0.0)) ** 2
    columns: Dict[str, Any] = {"x": list(x), "loss": list(loss), "acc": list(1 / (1 + loss))}
    if two_d:
        columns = {"x": list(x), "y": list(y), "loss": list(loss), "acc": list(1 / (1 + loss))}
    return results_table(columns, {})


def test_landscape_2d_contours_with_the_models_marked(tmp_path):
    grid = {"start": -1.0, "stop": 2.0, "num": 13}
    study = {"kind": "landscape", "center": ENDPOINTS[0], "directions": ENDPOINTS[1:], "x": grid, "y": grid}
    run_dir = make_run(tmp_path, config_dict("plane", study), landscape_table())
    result = write_report(run_dir)
    assert result.figures == [run_dir / "report" / "landscape.png"]
    check_png(result.figures[0], min_width=1000)
    page = result.html.read_text(encoding="utf-8")
    items = summary_items(page)
    assert "best loss: 0.01 at x = 0.25, y = 0.5" in items
    assert "loss at model 0: 0.3225" in items  # 0.01 + 0.25² + 0.5²
    assert "model 0, model 1, model 2 and the best point marked; log scale for loss." in page
    assert "(one value per grid point)" in page


def test_landscape_1d_random_direction(tmp_path):
    study = {"kind": "landscape", "directions": "random", "x": {"start": -1.0, "stop": 2.0, "num": 13}}
    run_dir = make_run(tmp_path, config_dict("line", study), landscape_table(two_d=False))
    result = write_report(run_dir)
    assert result.figures == [run_dir / "report" / "landscape.png"]
    check_png(result.figures[0])
    items = summary_items(result.html.read_text(encoding="utf-8"))
    assert "best loss: 0.01 at x = 0.25" in items
    assert "loss at the centre: 0.0725" in items


# --------------------------------------------------------------------------- merge


def merge_table() -> pa.Table:
    rows: List[Dict[str, Any]] = []

    def row(method, loss, status="ok", **kw):
        rows.append({"candidate_id": len(rows), "status": status, "method": method, "loss": loss, **kw})

    row("base", 2.0)
    row("model", 1.0, soup="0")
    row("model", 1.2, soup="1")
    row("model", 1.1, soup="2")
    # ties over λ ∈ {0.5, 1.0} × density ∈ {0.2, 0.8}, two seeds per cell; (1.0, 0.8) is empty
    row("ties", 0.9, **{"lambda": 0.5, "density": 0.2, "seed": 0})
    row("ties", 0.7, **{"lambda": 0.5, "density": 0.2, "seed": 1})  # cell mean 0.8
    row("ties", 0.6, **{"lambda": 1.0, "density": 0.2, "seed": 0})
    row("ties", 0.4, **{"lambda": 1.0, "density": 0.2, "seed": 1})  # cell mean 0.5: the best
    row("ties", 1.5, **{"lambda": 0.5, "density": 0.8, "seed": 0})  # cell mean 1.5
    row("ties", -9.0, status="failed", **{"lambda": 0.5, "density": 0.8, "seed": 1})  # not counted
    row("ties", float("nan"), **{"lambda": 1.0, "density": 0.2, "seed": 2})  # not counted
    row("ties", -8.0, **{"lambda": 1.0, "density": 0.8, "seed": 0, "lambda_0": 0.3, "lambda_1": 0.6})  # per-model
    row("dare", 0.95, **{"lambda": 0.5, "density": 0.5, "seed": 0})
    row("task_arithmetic", 0.85, **{"lambda": 0.5})
    row("task_arithmetic", 0.75, **{"lambda": 1.0})
    row("uniform_soup", 0.99, soup="0+1+2")
    row("greedy_soup", 1.0, soup="0")
    row("greedy_soup", 0.97, soup="0+2")  # the final greedy soup: the greedy_soup row with the largest id
    row("greedy_step", 0.96, soup="0+1")  # a trial round of the greedy soup, not the soup
    names = ["method", "lambda", "density", "seed", "soup", "loss", "lambda_0", "lambda_1"]
    columns = {"candidate_id": [r["candidate_id"] for r in rows], "status": [r["status"] for r in rows]}
    columns.update({n: [r.get(n) for r in rows] for n in names})
    return results_table(columns, {"method": pa.string(), "soup": pa.string(), "seed": pa.int64()})


def test_merge_grid_averages_ok_rows_per_cell():
    lambdas, densities, values = merge_grid(merge_table(), "ties", "loss")
    assert lambdas.tolist() == [0.5, 1.0]
    assert densities.tolist() == [0.2, 0.8]
    np.testing.assert_allclose(values, [[0.8, 0.5], [1.5, np.nan]])
    lambdas, densities, values = merge_grid(merge_table(), "dare", "loss")
    assert (lambdas.tolist(), densities.tolist(), values.tolist()) == ([0.5], [0.5], [[0.95]])


def test_merge_report(tmp_path):
    study = {"kind": "merge", "base": ENDPOINTS[0], "models": ENDPOINTS,
             "methods": ["task_arithmetic", "ties", "dare", "uniform_soup", "greedy_soup"]}
    run_dir = make_run(tmp_path, config_dict("merge", study), merge_table())
    result = write_report(run_dir)
    folder = run_dir / "report"
    assert result.figures == [folder / "merge.png", folder / "merge-summary.png", folder / "objective.png"]
    for path in result.figures:
        check_png(path)
    # ties and dare as heat maps a row each, the page's width; task_arithmetic and per-model side by side below
    image = check_png(folder / "merge.png", min_height=2 * 3.4 * DPI + 3.6 * DPI - 1, min_width=PAGE_WIDTH_PX)
    assert image.shape[1] == PAGE_WIDTH_PX
    page = result.html.read_text(encoding="utf-8")
    caption = re.search(r'<figure id="merge">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
    # ties has two seeds in a cell: a mean; dare one row per cell; per-model rows of a grid search (the default)
    assert "ties as a heat map over λ × density (the mean over up to 2 seeds per cell" in caption
    assert "dare as a heat map over λ × density (one row per cell" in caption
    assert "ties with one λ per model (on a grid, λ0 against λ1" in caption and "random" not in caption
    items = summary_items(page)
    assert "best base: loss = 2 (candidate 0)" in items
    assert "best ties: loss = -8 (candidate 11; λ = 1, density = 0.8, seed = 0, λ0 = 0.3, λ1 = 0.6)" in items
    assert "best task_arithmetic: loss = 0.75 (candidate 14; λ = 1)" in items
    assert "final greedy soup: models 0+2, loss = 0.97 (candidate 17)" in items
    assert "best model: loss = 1 (candidate 1; model 0)" in items
    assert len(embedded_images(page)) == 3


# --------------------------------------------------------------------------- errors


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": [0.0, 1.0]}
    run_dir = make_run(tmp_path, config_dict("x", study), results_table({"alpha": [0.0, 1.0], "loss": [1, 1]}, {}))
    (run_dir / "run.json").unlink()
    with pytest.raises(SweepError, match=r"run\.json is missing; give the runs/<name> folder of an earlier `sweep run`"):
        write_report(run_dir)
    (run_dir / "config.yaml").unlink()
    with pytest.raises(SweepError, match=r"config\.yaml is missing"):
        write_report(run_dir)
    with pytest.raises(SweepError, match="no such folder"):
        write_report(tmp_path / "nowhere")


def test_a_run_without_results_is_refused(tmp_path):
    study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": [0.0, 1.0]}
    run_dir = make_run(tmp_path, config_dict("x", study), results_table({"alpha": [0.0], "loss": [1.0]}, {}))
    for part in (run_dir / "results").iterdir():
        part.unlink()
    with pytest.raises(SweepError, match="no results at .*results"):
        write_report(run_dir)


def test_a_run_folder_whose_checkpoints_are_gone_still_reports(tmp_path):
    study = {"kind": "interpolate", "endpoints": [str(tmp_path / "gone0.safetensors"), str(tmp_path / "gone1.st")],
             "alphas": [0.0, 0.5, 1.0]}
    table = results_table({"alpha": [0.0, 0.5, 1.0], "loss": [1.0, 1.5, 1.0]}, {})
    run_dir = make_run(tmp_path, config_dict("moved", study), table)
    items = summary_items(write_report(run_dir).html.read_text(encoding="utf-8"))
    assert "barrier of loss (objective): 0.5 at α = 0.5 (lower is better)" in items


# --------------------------------------------------------------------------- pbt and search


def training_study(kind: str, population: int, generations: int, interval: int = 50) -> Dict[str, Any]:
    """configs/pbt.yaml's (or search.yaml's) study section, sized."""
    study = {"kind": kind, "population": population, "steps": generations * interval, "interval": interval,
             "train": {"loader": "sweep.examples.digits:train_batches"}, "loss": "sweep.examples.digits:loss",
             "optimizer": "sgd",
             "hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.001, "high": 1.0},
                                 "momentum": {"distribution": "uniform", "low": 0.0, "high": 0.99},
                                 "label_smoothing": 0.0},
             "seed": 0}
    if kind == "pbt":
        study.update(quantile=0.25, perturbation_factors=[1.2, 0.8], resample_probability=0.25)
    else:
        study["method"] = "random"
    return study


def training_table(rows: List[tuple], population: int) -> pa.Table:
    """Rows (generation, member, parent, lr, momentum, accuracy) as a pbt/search study writes them."""
    columns = {"candidate_id": [g * population + m for g, m, *_ in rows],
               "member": [m for _, m, *_ in rows], "generation": [g for g, *_ in rows],
               "parent": [p for _, _, p, *_ in rows], "step": [(g + 1) * 50 for g, *_ in rows],
               "lr": [r[3] for r in rows], "momentum": [r[4] for r in rows], "accuracy": [r[5] for r in rows],
               "loss": [None if r[5] is None else 2.5 * (1 - r[5]) for r in rows]}
    ints = {name: pa.int64() for name in ("member", "generation", "parent", "step")}
    return results_table(columns, ints)


#: A pbt run of 4 members × 4 generations with the exploits written out: m3 copies m0 after generation 0,
#: m2 copies m3 after generation 1, m1 copies m2 after generation 2. Member 2 is the best of the last
#: generation (accuracy 0.8) and its lineage is m0 → m3 → m2 → m2 (two switches). Generation 2's m3
#: (0.85) beats it but is not of the last generation.
PBT_ROWS = [
    (0, 0, 0, 0.1, 0.9, 0.50), (0, 1, 1, 0.01, 0.5, 0.30), (0, 2, 2, 0.001, 0.1, 0.20), (0, 3, 3, 0.5, 0.3, 0.40),
    (1, 0, 0, 0.1, 0.9, 0.60), (1, 1, 1, 0.01, 0.5, 0.35), (1, 2, 2, 0.001, 0.1, 0.25), (1, 3, 0, 0.12, 0.72, 0.62),
    (2, 0, 0, 0.1, 0.9, 0.65), (2, 1, 1, 0.01, 0.5, 0.38), (2, 2, 3, 0.144, 0.864, 0.70), (2, 3, 3, 0.12, 0.72, 0.85),
    (3, 0, 0, 0.1, 0.9, 0.70), (3, 1, 2, 0.1728, 0.6912, 0.75), (3, 2, 2, 0.144, 0.864, 0.80),
    (3, 3, 3, 0.12, 0.72, 0.72),
]


def schedule_rows(page: str) -> List[List[str]]:
    body = re.search(r'<table id="schedule">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_pbt_report_draws_the_lineage_and_gives_the_best_members_schedule(tmp_path):
    config = config_dict("pbt", training_study("pbt", 4, 4), objective="accuracy", mode="max")
    run_dir = make_run(tmp_path, config, training_table(PBT_ROWS, 4))
    record = json.loads((run_dir / "run.json").read_text())
    record["findings"] = {"best_member": 2, "best_member_accuracy": 0.8}
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "best.safetensors").write_bytes(b"")

    result = write_report(run_dir, mlflow=False)
    assert result.warnings == []
    names = sorted(p.name for p in result.figures)
    assert names == ["hyperparameters.png", "lineage.png", "training.png"]
    check_png(result.folder / "training.png")
    check_png(result.folder / "lineage.png", min_height=500)
    check_png(result.folder / "hyperparameters.png")
    assert not (result.folder / "objective.png").exists()
    page = result.html.read_text()
    assert len(embedded_images(page)) == 3

    best = re.search(r'<p id="best-member">(.*?)</p>', page, re.S).group(1)
    assert "Member <b>2</b>" in best and "accuracy = <b>0.8</b>" in best and "generation 3" in best
    assert "best.safetensors" in best
    assert re.search(r'<p id="exploits">Exploits: <b>3</b> rows', page)
    assert "switched members 2 times" in page
    # the schedule, generation 0 first: generation, step, member, lr, momentum, accuracy
    assert schedule_rows(page) == [["0", "50", "0", "0.1", "0.9", "0.5"],
                                   ["1", "100", "3", "0.12", "0.72", "0.62"],
                                   ["2", "150", "2", "0.144", "0.864", "0.7"],
                                   ["3", "200", "2", "0.144", "0.864", "0.8"]]
    assert "<th>label_smoothing</th>" not in page  # a constant, not searched
    # the best rows are the last generation's only (generation 2's 0.85 is not among them)
    assert "Best 4 rows of the last generation (3) by accuracy" in page
    assert "Only the rows of the last generation (3) are ranked" in page
    assert table_ids(page, "best") == [14, 13, 15, 12]
    # lr and momentum are recipe columns, not metrics
    head = re.search(r'<table id="best">\s*<thead>(.*?)</thead>', page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["candidate_id", "member", "generation", "parent", "step", "lr",
                                                   "momentum", "accuracy", "loss"]
    assert any("member 2, accuracy = 0.8" in item for item in summary_items(page))


def test_pbt_report_warns_when_findings_disagree_and_a_lineage_is_broken(tmp_path):
    rows = [r for r in PBT_ROWS if (r[0], r[1]) != (1, 3)]  # member 3's row of generation 1 is gone
    config = config_dict("pbt-broken", training_study("pbt", 4, 4), objective="accuracy", mode="max")
    run_dir = make_run(tmp_path, config, training_table(rows, 4))
    record = json.loads((run_dir / "run.json").read_text())
    record["findings"] = {"best_member": 1}
    (run_dir / "run.json").write_text(json.dumps(record))

    result = write_report(run_dir, mlflow=False)
    assert len(result.warnings) == 2, result.warnings
    assert "lineage of the best member (2) cannot be followed" in result.warnings[0]
    assert "continued from member 3, which has no row at generation 1" in result.warnings[0]
    assert "findings name member 1 as the best, but the results rank member 2 first" in result.warnings[1]
    assert {p.name for p in result.figures} == {"training.png", "lineage.png", "hyperparameters.png"}
    page = result.html.read_text()
    assert "Its lineage cannot be followed" in page and '<table id="schedule">' not in page


def test_search_report_has_no_lineage_tree(tmp_path):
    lrs, momenta = [0.003, 0.03, 0.3], [0.2, 0.5, 0.8]
    final = [0.6, 0.9, 0.7]  # member 1 is the best
    rows = [(g, m, m, lrs[m], momenta[m], final[m] * (g + 1) / 3) for g in range(3) for m in range(3)]
    rows[0] = (0, 0, 0, lrs[0], momenta[0], None)  # a failed row is counted, not drawn
    table = training_table(rows, 3)
    table = table.set_column(1, "status", pa.array(["failed"] + ["ok"] * 8, pa.string()))
    config = config_dict("search", training_study("search", 3, 3), objective="accuracy", mode="max")
    run_dir = make_run(tmp_path, config, table)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "lineage.png").write_bytes(PNG_SIGNATURE)  # a stale figure goes

    result = write_report(run_dir, mlflow=False)
    assert result.warnings == []
    assert sorted(p.name for p in result.figures) == ["hyperparameters.png", "training.png"]
    assert not (result.folder / "lineage.png").exists()
    check_png(result.folder / "training.png")
    check_png(result.folder / "hyperparameters.png")
    page = result.html.read_text()
    assert "Member <b>1</b>" in page and 'id="exploits"' not in page
    assert schedule_rows(page) == [[str(g), str(50 * (g + 1)), "1", "0.03", "0.5", f"{0.9 * (g + 1) / 3:.6g}"]
                                   for g in range(3)]
    assert table_ids(page, "best") == [7, 8, 6]
    assert "Invalid and failed rows (1)" in page


def simulated_pbt(population: int = 16, generations: int = 20, seed: int = 0) -> pa.Table:
    """A pbt run as the driver would write it: accuracy grows faster the nearer lr is to 0.1 and
    momentum to 0.9; after each generation the bottom quarter copy a random top-quarter member and
    perturb its hyperparameters by 1.2 or 0.8."""
    rng = np.random.default_rng(seed)
    lr = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), population))
    momentum = rng.uniform(0.0, 0.99, population)
    skill = np.zeros(population)
    parent = np.arange(population)
    rows = []
    for g in range(generations):
        rate = 0.12 * np.exp(-np.log10(lr / 0.1) ** 2) * (0.4 + 0.6 * np.exp(-((momentum - 0.9) / 0.4) ** 2))
        rate = np.where(lr > 0.6, -0.2, rate)  # too large a step diverges
        skill = np.maximum(0.0, skill + rate + rng.normal(0, 0.01, population))
        accuracy = np.clip(0.1 + 0.88 * (1 - np.exp(-skill)) + rng.normal(0, 0.005, population), 0.0, 1.0)
        for m in range(population):
            rows.append((g, m, int(parent[m]), float(lr[m]), float(momentum[m]), float(accuracy[m])))
        order = np.argsort(-accuracy)
        k = max(1, population // 4)
        parent = np.arange(population)
        for receiver in order[-k:]:
            donor = int(rng.choice(order[:k]))
            parent[receiver] = donor
            skill[receiver] = skill[donor]
            lr[receiver] = lr[donor] * rng.choice([1.2, 0.8])
            momentum[receiver] = min(0.99, momentum[donor] * rng.choice([1.2, 0.8]))
    return training_table(rows, population)


def test_a_realistic_pbt_run_reports(tmp_path):
    table = simulated_pbt()
    config = config_dict("pbt-digits", training_study("pbt", 16, 20), objective="accuracy", mode="max")
    result = write_report(make_run(tmp_path, config, table), mlflow=False)
    assert result.warnings == []
    for path in result.figures:
        check_png(path)
    page = result.html.read_text()
    assert len(schedule_rows(page)) == 20
    exploits = int(re.search(r'<p id="exploits">Exploits: <b>(\d+)</b>', page).group(1))
    assert exploits == 19 * 4


# --------------------------------------------------------------------------- MLflow


def test_the_report_goes_to_the_sweeps_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the file store needs MLFLOW_ALLOW_FILE_STORE since MLflow 3.7
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)  # a finished sweep
    study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": [0.0, 0.5, 1.0]}
    config = config_dict("logged", study, mlflow={"enabled": True, "tracking_uri": uri})
    run_dir = make_run(tmp_path, config, results_table({"alpha": [0.0, 0.5, 1.0], "loss": [1.0, 1.4, 1.2]}, {}),
                       run_id=run_id)

    result = write_report(run_dir, mlflow=False)
    assert not result.mlflow_logged and client.list_artifacts(run_id, "report") == []

    result = write_report(run_dir)
    assert result.mlflow_logged and result.warnings == []
    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, "report")}
    assert logged == {"report/report.html", "report/interpolate.png"}


def test_mlflow_down_is_a_warning(tmp_path, monkeypatch):
    import mlflow.tracking

    class Down:
        def __init__(self, tracking_uri=None):
            self.uri = tracking_uri

        def log_artifacts(self, run_id, local_dir, artifact_path=None):
            raise ConnectionError("connection refused\nsecond line")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Down)
    study = {"kind": "interpolate", "endpoints": ENDPOINTS[:2], "alphas": [0.0, 1.0]}
    config = config_dict("down", study, mlflow={"enabled": True, "tracking_uri": "http://127.0.0.1:9"})
    run_dir = make_run(tmp_path, config, results_table({"alpha": [0.0, 1.0], "loss": [1.0, 1.0]}, {}), run_id="abc")
    result = write_report(run_dir)
    assert not result.mlflow_logged
    assert result.warnings == ["the report was not logged to MLflow run abc (http://127.0.0.1:9): "
                               "ConnectionError: connection refused"]
    assert result.html.is_file()
