"""Successive halving, Optuna's samplers and PB2 through the real driver on a real local Ray (two workers),
each row checked against the trial trained alone by a plain torch.optim loop."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import torch

from sweep.examples import digits
from sweep.model import build_module, read_weights_file
from tests.conftest import digits_reference, repo_config
from tests.integration.test_pbt import replay
from workers.driver import run

pytestmark = pytest.mark.integration


def rows(result):
    return ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id").to_pylist()


def trained_alone(config, trial_index: int, lr: float, momentum: float, steps: int):
    """The trial trained by itself: the factory's start under its seed, torch.optim.SGD, the batches in order
    from the first, evaluated every `interval` steps by a plain functional_call loop."""
    study = config.study
    data = digits.train_batches(**study.train.kwargs)
    module = build_module(config.model.factory, config.model.kwargs, seed=study.seed * 2**32 + trial_index)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    out = {}
    for t in range(steps):
        module.train()
        x, y = data[t % len(data)]
        opt.zero_grad()
        digits.loss(module(x), y).backward()
        opt.step()
        if (t + 1) % study.interval == 0:
            module.eval()
            out[t + 1] = digits_reference(module, dict(module.named_parameters()), digits.eval_batches())
    return out


def test_random_search_with_halving_in_waves_matches_each_trial_trained_alone_and_logs_a_child_per_trial(
        repo, tmp_path, ray_cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    config = repo_config(repo, "search.yaml", **{
        "sinks.mlflow.tracking_uri": mlflow_server.uri, "workers.count": 2, "study.population": 6,
        "study.trials": 9, "study.steps": 80, "study.interval": 10,
        "study.halving": {"reduction_factor": 3, "min_steps": 10}})
    result = run(config, tmp_path, progress=False)
    table = rows(result)
    assert all(r["status"] == "ok" for r in table) and len({r["worker"] for r in table}) == 2
    # Wave 0: 6 → 2 at 10 steps → 1 at 30 steps; wave 1 (3 trials): 3 → 1 → 1.
    assert len(table) == (6 + 2 * 2 + 5) + (3 + 1 * 2 + 5)
    by_trial = {}
    for r in table:
        by_trial.setdefault(r["trial"], []).append(r)
    assert sorted(by_trial) == list(range(9))
    finished = [t for t, rs in by_trial.items() if rs[-1]["step"] == 80]
    assert len(finished) == 2 and all(by_trial[t][-1]["stopped"] is None for t in finished)
    for trial, trial_rows in by_trial.items():
        want = trained_alone(config, trial, trial_rows[0]["lr"], trial_rows[0]["momentum"], trial_rows[-1]["step"])
        for r in trial_rows:
            assert r["loss"] == pytest.approx(want[r["step"]]["loss"], rel=2e-4, abs=1e-5), (trial, r["step"])
        if trial not in finished:
            assert trial_rows[-1]["stopped"].startswith(f"rung {trial_rows[-1]['rung']} ")
    # The best finished trial ran in the last wave: its weights are saved and give its last row's numbers.
    best = int(result.findings["best_trial"])
    assert best == max(finished, key=lambda t: by_trial[t][-1]["accuracy"])
    assert result.findings["member_steps"] == sum(rs[-1]["step"] for rs in by_trial.values())
    if by_trial[best][-1]["wave"] == 1:
        saved = read_weights_file(tmp_path / "runs" / "search" / "best.safetensors")
        got = digits_reference(digits.make_model(), saved, digits.eval_batches())
        assert got["loss"] == pytest.approx(by_trial[best][-1]["loss"], rel=1e-5)
    # The report: the rungs and the trials drawn, each trial ranked by its last row.
    from sweep.report import write_report

    report = write_report(tmp_path / "runs" / "search", mlflow=False)
    assert {f.name for f in report.figures} == {"training.png", "halving.png", "trials.png",
                                                     "hyperparameters.png"}
    page = report.html.read_text()
    assert "Best 9 trials by accuracy at their last evaluation" in page
    # One MLflow child run per trial, one step per training step.
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    children = client.search_runs([client.get_run(result.mlflow_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"trial-{t:03d}" for t in range(9)]
    for child in children:
        trial = int(child.data.tags["sweep.trial"])
        history = sorted(client.get_metric_history(child.info.run_id, "accuracy"), key=lambda h: h.step)
        assert [(h.step, h.value) for h in history] == [(r["step"], pytest.approx(r["accuracy"]))
                                                       for r in by_trial[trial]]


def test_optuna_search_on_two_workers_keeps_its_study_in_sqlite(repo, tmp_path, ray_cluster):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = repo_config(repo, "search.yaml", **{
        "sinks.mlflow.enabled": False, "workers.count": 2, "study.method": "optuna", "study.population": 4,
        "study.trials": 8, "study.steps": 40, "study.interval": 10, "study.storage": storage,
        "study.halving": {"reduction_factor": 2, "min_steps": 20}})
    table = rows(run(config, tmp_path, progress=False))
    kept = optuna.load_study(study_name="search", storage=storage)
    assert sorted(t.number for t in kept.trials) == list(range(8))
    for t in kept.trials:
        mine = [r for r in table if r["trial"] == t.number]
        assert {r["wave"] for r in mine} == {t.number // 4}
        assert t.intermediate_values == pytest.approx({r["step"]: r["accuracy"] for r in mine})
        assert t.state.name == ("PRUNED" if mine[-1]["stopped"] else "COMPLETE")
        want = trained_alone(config, t.number, t.params["lr"], t.params["momentum"], mine[-1]["step"])
        assert mine[-1]["loss"] == pytest.approx(want[mine[-1]["step"]]["loss"], rel=2e-4, abs=1e-5)


def test_pb2_on_two_workers_matches_an_independent_replay(repo, tmp_path, ray_cluster):
    config = repo_config(repo, "pbt.yaml", **{
        "sinks.mlflow.enabled": False, "study.population": 6, "study.steps": 50, "study.interval": 10,
        "study.quantile": 0.34, "workers.count": 2, "study.explore": "pb2"})
    table = rows(run(config, tmp_path, progress=False))
    assert len(table) == 30 and all(r["status"] == "ok" for r in table)
    exploited = [r for r in table if r["parent"] != r["member"]]
    assert exploited
    want = replay(config, table)
    for r in table:
        assert r["loss"] == pytest.approx(want[(r["generation"], r["member"])]["loss"], rel=2e-4, abs=1e-5)
