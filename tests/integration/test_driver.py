"""The driver in-process on the session's real local Ray, logging to a real MLflow server."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from sweep.config import parse_config
from sweep.errors import SweepError
from tests.conftest import edited_quickstart
from workers.driver import run

pytestmark = pytest.mark.integration


def config_for(repo, **changes):
    return parse_config(edited_quickstart(repo, changes), base_dir=repo)


def test_run_logs_to_a_real_mlflow_server(repo, tmp_path, ray_cluster, mlflow_server):
    config = config_for(repo, **{"name": "server-run", "sinks.mlflow.tracking_uri": mlflow_server.uri,
                                 "workers.count": 2, "workers.batch_size": 1})
    result = run(config, tmp_path, progress=False)
    assert result.summary["ok"] == 5 and result.summary["invalid"] == 2
    assert result.summary["best_accuracy"] > 0.9
    table = ds.dataset(str(result.results_dir), format="parquet").to_table()
    assert sorted(table.column("candidate_id").to_pylist()) == list(range(7))
    assert len(set(table.column("worker").to_pylist())) == 2, "both workers take batches"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    mlrun = client.get_run(result.mlflow_run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.experiment_id == client.get_experiment_by_name("server-run").experiment_id
    assert mlrun.data.params["workers.batch_size"] == "1"
    assert mlrun.data.metrics["summary.candidates"] == 7
    assert mlrun.data.metrics["summary.best_accuracy"] == pytest.approx(result.summary["best_accuracy"])
    losses = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    rows = {r["candidate_id"]: r["loss"] for r in table.to_pylist() if r["status"] == "ok"}
    assert losses.keys() == rows.keys()
    assert all(losses[k] == pytest.approx(rows[k]) for k in rows)


def test_unreachable_mlflow_does_not_stop_the_sweep(repo, tmp_path, ray_cluster):
    from tests.conftest import free_port

    config = config_for(repo, **{"name": "no-server", "workers.count": 1, "sinks.mlflow.retry_seconds": 2,
                                 "sinks.mlflow.tracking_uri": f"http://127.0.0.1:{free_port()}"})
    result = run(config, tmp_path, progress=False)
    assert result.summary["completed"] and result.summary["candidates"] == 7
    assert ds.dataset(str(result.results_dir), format="parquet").count_rows() == 7
    assert result.warnings and "MLflow" in result.warnings[0]


def test_broken_metrics_is_reported_before_the_sweep(repo, tmp_path, ray_cluster):
    config = config_for(repo, **{"name": "broken", "metrics.function": "tests.integration.helpers:broken_metrics",
                                 "workers.count": 1, "sinks.mlflow.enabled": False})
    with pytest.raises(SweepError, match="ZeroDivisionError"):
        run(config, tmp_path, progress=False)
