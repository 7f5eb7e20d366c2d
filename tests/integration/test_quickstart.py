"""`sweep run configs/quickstart.yaml` end to end: real local Ray, real Parquet, MLflow read back."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

import sweep
from sweep.examples import digits
from sweep.model import read_weights_file
from tests.conftest import digits_reference, sweep_cli

pytestmark = pytest.mark.integration


def reference_rows(repo: Path):
    """The quickstart's candidates evaluated independently: a plain functional_call loop."""
    module = digits.make_model()
    data = digits.eval_batches(batch_size=250)
    rows = {}
    for path in sorted(glob.glob(str(repo / "sweep/examples/checkpoints/*.safetensors"))):
        try:
            params = read_weights_file(path)
        except sweep.WeightsError:
            continue
        if any(params[k].shape != v.shape for k, v in module.state_dict().items()):
            continue
        rows[Path(path).name] = digits_reference(module, params, data)
    return rows


def test_quickstart_end_to_end(repo, tmp_path):
    work = tmp_path / "elsewhere"  # neither the repository nor the output folder
    work.mkdir()
    out = tmp_path / "out"
    caches = {"MLFLOW_TRACKING_URI": "", "SWEEP_CACHE_DIR": str(tmp_path / "cache")}
    checked = sweep_cli("validate", str(repo / "configs/quickstart.yaml"), cwd=work, env=caches)
    assert checked.returncode == 0, checked.stderr[-3000:]
    # The run, in a Python that lists what it imports: the checks validate kept spare the driver torch's import.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "from sweep.cli import console; console()",
                           "run", str(repo / "configs/quickstart.yaml"), "--out", str(out), "--no-progress"],
                          cwd=work, env={**os.environ, **caches}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"ray", "mlflow", "matplotlib"} <= imported and "torch" not in imported
    assert "5 ok, 2 invalid, 0 failed" in proc.stdout
    assert "bad-hidden32.safetensors" in proc.stdout and "expected shape (64×64) float32" in proc.stdout

    run_dir = out / "runs" / "quickstart"
    assert (run_dir / "config.yaml").is_file()
    results = run_dir / "results"
    assert not list(results.glob(".*")), "temporary files left behind"
    table = ds.dataset(str(results), format="parquet").to_table().sort_by("candidate_id")
    assert table.num_rows == 7
    assert table.column("candidate_id").to_pylist() == list(range(7))
    for column in ("candidate_id", "status", "error", "path", "loss", "accuracy", "worker", "eval_seconds"):
        assert column in table.column_names
    rows = table.to_pylist()
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["bad-hidden32.safetensors"]["status"] == "invalid"
    assert "'0.weight'" in by_name["bad-hidden32.safetensors"]["error"]
    assert by_name["bad-truncated.safetensors"]["status"] == "invalid"
    assert "truncated" in by_name["bad-truncated.safetensors"]["error"]
    assert by_name["bad-truncated.safetensors"]["loss"] is None

    expected = reference_rows(repo)
    assert len(expected) == 5
    for name, metrics in expected.items():
        row = by_name[name]
        assert row["status"] == "ok" and row["error"] is None
        assert row["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
        assert row["accuracy"] == pytest.approx(metrics["accuracy"], rel=1e-6)
        assert row["worker"] and row["eval_seconds"] > 0

    # MLflow's default store: a SQLite file in the working directory.
    from mlflow.tracking import MlflowClient

    assert (work / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id in proc.stdout
    assert run.info.status == "FINISHED"
    assert run.data.params["study.kind"] == "checkpoints"
    assert run.data.params["model.factory"] == "sweep.examples.digits:make_model"
    assert run.data.metrics["summary.ok"] == 5 and run.data.metrics["summary.invalid"] == 2
    history = client.get_metric_history(run.info.run_id, "accuracy")
    ok_ids = sorted(r["candidate_id"] for r in rows if r["status"] == "ok")
    assert sorted(m.step for m in history) == ok_ids
    by_id = {r["candidate_id"]: r for r in rows}
    for m in history:
        assert m.value == pytest.approx(by_id[m.step]["accuracy"])
    assert run.data.tags["sweep.git_commit"]

    # A second run of the same name refuses to mix results, and --overwrite replaces them.
    again = sweep_cli("run", str(repo / "configs/quickstart.yaml"), "--out", str(out), "--no-progress",
                      "--set", "sinks.mlflow.enabled=false", cwd=work)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    again = sweep_cli("run", str(repo / "configs/quickstart.yaml"), "--out", str(out), "--no-progress",
                      "--overwrite", "--set", "sinks.mlflow.enabled=false", "--set", "workers.count=1",
                      cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    table = ds.dataset(str(results), format="parquet").to_table()
    assert table.num_rows == 7 and len(set(table.column("worker").to_pylist())) == 1
