"""What a new user meets end to end: the MLflow store found from any directory, grid values a query finds,
their own model module imported by driver and workers alike."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from sweep.examples import digits
from sweep.model import read_weights_file
from sweep.sinks.parquet import MODE_KEY, OBJECTIVE_KEY
from tests.conftest import digits_reference, edited_quickstart, sweep_cli

pytestmark = pytest.mark.integration


def test_a_relative_sqlite_store_is_recorded_absolute_and_found_from_anywhere(repo, tmp_path):
    work, elsewhere, out = tmp_path / "work", tmp_path / "elsewhere", tmp_path / "out"
    work.mkdir()
    elsewhere.mkdir()
    config = tmp_path / "quickstart.yaml"
    config.write_text(yaml.safe_dump(edited_quickstart(repo, {"sinks.mlflow.tracking_uri": "sqlite:///store/mlflow.db"})))
    proc = sweep_cli("run", str(config), "--out", str(out), "--no-progress", "--no-report", cwd=work,
                     env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    database = work / "store" / "mlflow.db"
    uri = f"sqlite:///{database}"
    run_dir = out / "runs" / "quickstart"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["mlflow_tracking_uri"] == uri
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["store"]  # no ./mlruns beside the working directory

    # The report, made from another directory, logs to the same run and leaves nothing where it ran.
    report = sweep_cli("report", str(run_dir), cwd=elsewhere, env={"MLFLOW_TRACKING_URI": ""})
    assert report.returncode == 0, report.stderr[-3000:]
    assert "(and to the MLflow run, under report/)" in report.stdout and "warning" not in report.stderr
    assert list(elsewhere.iterdir()) == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = [a.path for a in client.list_artifacts(record["mlflow_run_id"], "report")]
    assert "report/report.html" in logged
    artifacts = work / "store" / "mlruns"
    assert list(artifacts.rglob("report.html")), "the artifacts of a SQLite store's experiment sit beside its database"
    assert sorted(p.name for p in work.iterdir()) == ["store"]

    # The results record which metric ranks them and which way is best.
    schema = ds.dataset(str(run_dir / "results"), format="parquet").schema
    assert schema.metadata[OBJECTIVE_KEY.encode()] == b"accuracy" and schema.metadata[MODE_KEY.encode()] == b"max"


def test_range_alphas_are_exact_so_a_query_finds_them(repo, tmp_path):
    raw = yaml.safe_load((repo / "configs/interpolate.yaml").read_text())
    raw["study"]["endpoints"] = [str(repo / "sweep/examples/checkpoints" / Path(p).name) for p in raw["study"]["endpoints"]]
    raw["study"]["alphas"] = {"start": -0.2, "stop": 1.2, "num": 15}  # np.linspace gives -2.78e-17 for 0
    raw["workers"] = {"count": 1, "batch_size": 8}
    raw["sinks"] = {"mlflow": {"enabled": False}}
    config = tmp_path / "interpolate.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = sweep_cli("run", str(config), "--out", str(out), "--no-progress", "--no-report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "runs" / "interpolate"
    table = ds.dataset(str(run_dir / "results"), format="parquet").to_table()
    assert sorted(table.column("alpha").to_pylist()) == [round(-0.2 + 0.1 * i, 1) for i in range(15)]
    for alpha in ("0", "0.5", "0.3", "1.1"):
        shown = sweep_cli("show", str(run_dir), "--where", f"alpha = {alpha}", "--format", "json", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert [row["alpha"] for row in json.loads(shown.stdout)] == [float(alpha)]
    # The value at alpha = 0.5 is that of the midpoint, by a plain functional_call loop.
    a, b = (read_weights_file(p) for p in raw["study"]["endpoints"])
    mid = {k: a[k] + 0.5 * (b[k] - a[k]) for k in a}
    expected = digits_reference(digits.make_model(), mid, digits.eval_batches())
    row = next(r for r in table.to_pylist() if r["alpha"] == 0.5)
    assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)


USER_MODULE = '''
"""A user's own model module, beside their config."""
from sweep.examples.digits import make_model as digits_model


def make_model(hidden=64):
    return digits_model(hidden=hidden)
'''


def test_a_module_beside_the_config_gets_a_hint_and_runs_with_it(repo, tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "mynet.py").write_text(USER_MODULE)
    raw = edited_quickstart(repo, {"model.factory": "mynet:make_model", "workers.count": 2,
                                   "sinks.mlflow.enabled": False})
    (project / "config.yaml").write_text(yaml.safe_dump(raw))
    proc = sweep_cli("validate", str(project / "config.yaml"), cwd=elsewhere, env={"PYTHONPATH": ""})
    assert proc.returncode == 2
    assert "model.factory: cannot import module 'mynet'" in proc.stderr
    assert f"the config's folder {project} holds 'mynet' but is not on the path: run with PYTHONPATH={project}" in proc.stderr
    assert "Python looked only in its own library and the installed packages" in proc.stderr

    # The advice works: with PYTHONPATH the driver and both workers import it.
    out = tmp_path / "out"
    proc = sweep_cli("run", str(project / "config.yaml"), "--out", str(out), "--no-progress", "--no-report",
                     cwd=elsewhere, env={"PYTHONPATH": str(project)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 ok, 2 invalid, 0 failed" in proc.stdout
    table = ds.dataset(str(out / "runs" / "quickstart" / "results"), format="parquet").to_table()
    assert len(set(table.column("worker").to_pylist())) == 2
