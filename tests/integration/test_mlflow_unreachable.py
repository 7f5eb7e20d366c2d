"""The quickstart with an MLflow tracking URI nothing listens on: real Ray, real Parquet, connections refused."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from sweep.config import parse_config
from sweep.sinks.mlflow import FIRST_CONTACT_SECONDS
from tests.conftest import edited_quickstart, free_port
from workers.driver import run

pytestmark = pytest.mark.integration


def test_unreachable_mlflow_is_reported_while_the_sweep_runs_and_given_up_soon(repo, tmp_path, ray_cluster, sink_warnings):
    uri = f"http://127.0.0.1:{free_port()}"
    config = parse_config(edited_quickstart(repo, {"name": "mlflow-away", "workers.count": 1,
                                                   "sinks.mlflow.tracking_uri": uri}), base_dir=repo)
    assert config.sinks.mlflow.retry_seconds > FIRST_CONTACT_SECONDS  # the default: an outage gets the long wait
    said = []

    def on_batch(done: int, total: int) -> None:
        if done == total:  # every row is in; the sinks are not closed yet
            said.append(sink_warnings.wait_for("cannot be reached"))

    result = run(config, tmp_path, progress=False, on_batch=on_batch)
    assert said, "the sweep never landed its last batch"
    results = tmp_path / "runs" / "mlflow-away" / "results"
    assert uri in said[0] and "Connection refused" in said[0] and f"Parquet results at {results}" in said[0]
    assert f"tried for up to {FIRST_CONTACT_SECONDS:g} s" in said[0] and "Ctrl-C" in said[0]
    # Given up as a server that never answered: the short window, not sinks.mlflow.retry_seconds.
    assert len(result.warnings) == 1 and "was never reached" in result.warnings[0]
    assert f"after {FIRST_CONTACT_SECONDS:g} s" in result.warnings[0]
    assert result.mlflow_run_id is None and result.summary["mlflow_missed_metrics"] == 2 * 5
    assert result.summary["completed"] and ds.dataset(str(results), format="parquet").count_rows() == 7
