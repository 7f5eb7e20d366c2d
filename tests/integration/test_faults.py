"""Faults on a real local Ray: workers killed mid-sweep, a batch that kills every worker it meets,
and the driver SIGKILLed then resumed. Every candidate id appears exactly once, with the metrics
of a fault-free run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow.dataset as ds
import pytest
import ray
import torch
import yaml
from safetensors.torch import save_file

from sweep.config import parse_config
from tests.conftest import BIN, sweep_cli
from workers.driver import run

pytestmark = pytest.mark.integration


def perturb_config(repo, name, count=3000, batch=200):
    raw = yaml.safe_load((repo / "configs/perturb.yaml").read_text())
    raw["name"] = name
    raw["study"]["count"] = count
    raw["workers"] = {"count": 2, "batch_size": batch}
    raw["evaluation"] = {"chunk_size": 64}
    raw["metrics"]["function"] = "tests.integration.helpers:slow_digits_metrics"
    raw["sinks"] = {"mlflow": {"enabled": False}, "parquet": {"rows_per_file": 500}}
    return parse_config(raw, base_dir=repo / "configs")


def table_of(result):
    return ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id")


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory, ray_cluster):
    return table_of(run(perturb_config(repo, "reference"), tmp_path_factory.mktemp("ref"), progress=False))


def assert_same_rows(table, reference):
    assert table.column("candidate_id").to_pylist() == list(range(reference.num_rows)), "each id exactly once"
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert np.allclose(table.column("loss").to_numpy(), reference.column("loss").to_numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("when", ["early", "middle", "last batch"])
@pytest.mark.parametrize("how", ["sigkill", "ray.kill"])
def test_a_killed_worker_loses_no_row(repo, tmp_path, ray_cluster, reference, when, how):
    name = f"kill-{how.replace('.', '')}-{when.replace(' ', '')}"
    config = perturb_config(repo, name)
    point = {"early": 200, "middle": 1400, "last batch": 2600}[when]  # 2600: the last two batches run
    killed = []

    pids = {}

    def on_batch(done, total):
        if not pids:
            # Asked once, early: an actor answers only between batches, so asking at the
            # kill point would wait for the very batch the kill should interrupt.
            pids.update({n: ray.get(ray.get_actor(n).describe.remote())["pid"]
                         for n in ray.util.list_named_actors() if n.startswith(f"sweep:{name}:")})
        if not killed and done >= point:
            # Near the end only the last batches are in flight: kill every worker so one holding them dies.
            victims = sorted(pids) if when == "last batch" else sorted(pids)[:1]
            for victim in victims:
                if how == "sigkill":
                    os.kill(pids[victim], signal.SIGKILL)
                else:
                    ray.kill(ray.get_actor(victim), no_restart=True)
            killed.append(done)

    result = run(config, tmp_path, progress=False, on_batch=on_batch)
    assert killed, "the fault was injected"
    assert result.summary["worker_replacements"] >= 1
    assert_same_rows(table_of(result), reference)


def test_a_candidate_that_kills_every_worker_fails_alone(repo, tmp_path, ray_cluster):
    a = {"w": torch.ones(4, 1), "scale": torch.zeros(1)}
    b = {"w": torch.ones(4, 1), "scale": torch.full((1,), 1000.0)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    alphas = [i / 1000 for i in range(40)]
    alphas[21] = 0.5  # scale 500: this candidate kills its worker, every time
    raw = {
        "name": "poison",
        "model": {"factory": "tests.integration.helpers:fragile"},
        "data": {"loader": "tests.integration.helpers:fragile_data"},
        "metrics": {"function": "tests.integration.helpers:mse"},
        "study": {"kind": "interpolate", "endpoints": ["a.safetensors", "b.safetensors"], "alphas": alphas,
                  "barrier": False},
        "workers": {"count": 2, "batch_size": 4},
        "sinks": {"mlflow": {"enabled": False}},
    }
    result = run(parse_config(raw, base_dir=tmp_path), tmp_path / "out", progress=False)
    table = ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id")
    assert table.column("candidate_id").to_pylist() == list(range(40))
    failed = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert [r["candidate_id"] for r in failed] == [21], "only the poisoned candidate: its batch was split"
    assert "the worker died" in failed[0]["error"] and failed[0]["alpha"] == 0.5
    assert failed[0]["error"].endswith("(3 attempts, each alone on a worker; split out of a batch of 4 candidates)")
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(ok) == 39 and all(r["mse"] is not None for r in ok)
    assert result.summary["completed"] and result.summary["failed"] == 1


def start_sweep(repo, out, env, *extra):
    return subprocess.Popen(
        [str(BIN / "sweep"), "run", str(repo / "configs/perturb-million.yaml"), "--out", str(out), "--no-progress",
         "--set", "study.count=120000", "--set", "sinks.parquet.rows_per_file=4096",
         "--set", "workers.batch_size=2048", "--set", "evaluation.chunk_size=512", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )


@pytest.fixture(scope="module")
def uninterrupted(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    clean = sweep_cli("run", str(repo / "configs/perturb-million.yaml"), "--out", str(out), "--no-progress",
                      "--set", "study.count=120000", "--set", "sinks.mlflow.enabled=false",
                      "--set", "evaluation.chunk_size=512", cwd=out)
    assert clean.returncode == 0, clean.stderr[-2000:]
    return ds.dataset(str(out / "runs/perturb-million/results"), format="parquet").to_table(
        columns=["candidate_id", "mse"]).sort_by("candidate_id")


@pytest.mark.parametrize("files_before_kill", [1, 20])  # of 30: early, late
def test_a_killed_driver_resumes_exactly_once(repo, tmp_path, files_before_kill, uninterrupted):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow's SQLite store is not crash-safe while it creates its tables: create them
    # first, and kill only once the run exists, so the resume has a run to reopen.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()
    out = tmp_path / "out"
    results = out / "runs" / "perturb-million" / "results"
    record = out / "runs" / "perturb-million" / "run.json"

    def mlflow_run_started() -> bool:
        try:
            return bool(json.loads(record.read_text()).get("mlflow_run_id"))
        except (OSError, ValueError):
            return False

    proc = start_sweep(repo, out, env)
    try:
        deadline = time.monotonic() + 180
        while len(list(results.glob("part-*.parquet"))) < files_before_kill or not mlflow_run_started():
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = ds.dataset(str(results), format="parquet").count_rows()
    assert 0 < before < 120000

    refused = sweep_cli("resume", str(out / "runs/perturb-million"), "--set", "study.sigma=0.5", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "study.sigma" in refused.stderr and "saved 0.01, now 0.5" in refused.stderr

    resumed = sweep_cli("resume", str(out / "runs/perturb-million"), "--no-progress", "--set", "workers.count=1",
                        cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "120000 candidates" in resumed.stdout
    table = ds.dataset(str(results), format="parquet").to_table(columns=["candidate_id", "seed", "mse"])
    table = table.sort_by("candidate_id")
    assert table.column("candidate_id").to_pylist() == list(range(120000)), "each id exactly once"

    # The same rows as a run that was never interrupted.
    assert np.allclose(table.column("mse").to_numpy(), uninterrupted.column("mse").to_numpy(), rtol=1e-6, atol=0)

    # One MLflow run, reopened by the resume and finished once.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("perturb-million").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["summary.candidates"] == 120000
