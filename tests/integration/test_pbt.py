"""pbt and search through real Ray workers: the population sharded over two workers, exploits
within and across shards, checked against an independent replay with torch.optim."""

from __future__ import annotations

import copy
import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray
import torch

from sweep.errors import SweepError
from sweep.examples import digits
from sweep.model import build_module, read_weights_file
from sweep.population import PopulationPlan, Train
from sweep.studies.base import WAIT, CandidateBatch
from tests.conftest import digits_reference, repo_config, sweep_cli
from workers.driver import run
from workers.members import Members

pytestmark = pytest.mark.integration

SMALL = {"sinks.mlflow.enabled": False, "study.population": 6, "study.steps": 60, "study.interval": 10,
         "study.quantile": 0.34, "workers.count": 2}


def rows(result):
    return ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id").to_pylist()


def replay(config, table):
    """Train every member one at a time with torch.optim.SGD, following the table's lineage and schedule."""
    study = config.study
    data = digits.train_batches(**study.train.kwargs)
    eval_data = digits.eval_batches()
    models = {m: build_module(config.model.factory, config.model.kwargs, seed=study.seed * 2**32 + m)
              for m in range(study.population)}
    optimizers = {}
    out = {}
    generations = study.steps // study.interval
    by_key = {(r["generation"], r["member"]): r for r in table}
    for g in range(generations):
        previous = {m: (copy.deepcopy(models[m].state_dict()),
                        copy.deepcopy(optimizers[m].state_dict()) if m in optimizers else None)
                    for m in models}
        for m in range(study.population):
            r = by_key[(g, m)]
            module = build_module(config.model.factory, config.model.kwargs)
            weights, opt_state = previous[r["parent"]]
            module.load_state_dict(weights)
            opt = torch.optim.SGD(module.parameters(), lr=r["lr"], momentum=r["momentum"])
            if opt_state is not None:
                # A copy each: torch keeps the given buffers as they are, and a donor may have two receivers.
                opt.load_state_dict(copy.deepcopy(opt_state))
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = r["lr"], r["momentum"]
            module.train()
            for t in range(g * study.interval, (g + 1) * study.interval):
                x, y = data[t % len(data)]
                opt.zero_grad()
                digits.loss(module(x), y).backward()
                opt.step()
            models[m], optimizers[m] = module.eval(), opt
            out[(g, m)] = digits_reference(module, dict(module.named_parameters()), eval_data)
    return out


def test_pbt_on_two_workers_matches_an_independent_replay(repo, tmp_path, ray_cluster):
    config = repo_config(repo, "pbt.yaml", **SMALL)
    result = run(config, tmp_path, progress=False)
    table = rows(result)
    assert len(table) == 6 * 6 and all(r["status"] == "ok" for r in table)
    assert [r["candidate_id"] for r in table] == list(range(36))
    assert {r["worker"] for r in table} and len({r["worker"] for r in table}) == 2, "sharded over two workers"
    exploited = [r for r in table if r["parent"] != r["member"]]
    assert exploited and all(r["generation"] > 0 for r in exploited)
    # Members 0-2 live on one worker, 3-5 on the other: some exploits cross.
    assert any((r["parent"] < 3) != (r["member"] < 3) for r in exploited)
    assert all(r["step"] == 10 * (r["generation"] + 1) for r in table)
    want = replay(config, table)
    for r in table:
        expected = want[(r["generation"], r["member"])]
        assert r["loss"] == pytest.approx(expected["loss"], rel=2e-4, abs=1e-5), (r["generation"], r["member"])

    # The best member of the last generation, saved: its weights give its row's numbers.
    best = int(result.findings["best_member"])
    last = {r["member"]: r for r in table if r["generation"] == 5}
    assert last[best]["accuracy"] == max(r["accuracy"] for r in last.values())
    saved = read_weights_file(tmp_path / "runs" / "pbt" / "best.safetensors")
    got = digits_reference(digits.make_model(), saved, digits.eval_batches())
    assert got["loss"] == pytest.approx(last[best]["loss"], rel=1e-5)

    # Reproducible: the same config and seed, the same table.
    again = rows(run(repo_config(repo, "pbt.yaml", name="pbt-again", **SMALL), tmp_path, progress=False))
    key = ("candidate_id", "member", "generation", "parent", "step", "lr", "momentum", "loss", "accuracy")
    assert [tuple(r[k] for k in key) for r in again] == [tuple(r[k] for k in key) for r in table]


def test_search_trains_without_exploit_and_logs_one_child_run_per_member(repo, tmp_path, ray_cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    changes = {**SMALL, "sinks.mlflow.enabled": True, "sinks.mlflow.tracking_uri": mlflow_server.uri,
               "study.method": "grid", "study.steps": 30,
               "study.hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.01, "high": 0.5, "num": 2},
                                         "momentum": {"distribution": "choice", "values": [0.0, 0.9]}}}
    del changes["study.quantile"], changes["study.population"]  # a grid's population is its size
    config = repo_config(repo, "search.yaml", drop=("population",), **changes)
    result = run(config, tmp_path, progress=False)
    table = rows(result)
    assert len(table) == 4 * 3 and all(r["parent"] == r["member"] for r in table)
    assert sorted({(r["lr"], r["momentum"]) for r in table}) == sorted(
        (lr, m) for lr in (0.01, 0.5) for m in (0.0, 0.9))
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    children = client.search_runs([client.get_run(result.mlflow_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"member-{m:03d}" for m in range(4)]
    for child in children:
        member = int(child.data.tags["sweep.member"])
        history = client.get_metric_history(child.info.run_id, "accuracy")
        want = [r["accuracy"] for r in table if r["member"] == member]
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == [0, 1, 2]
        assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(want)
        assert child.info.status == "FINISHED"


def test_cli_refuses_an_unknown_hyperparameter_before_ray_starts(repo, tmp_path):
    proc = sweep_cli("run", str(repo / "configs/pbt.yaml"), "--set", "study.hyperparameters.dropout=0.1",
                     cwd=tmp_path)
    assert proc.returncode == 2
    assert "study.hyperparameters.dropout" in proc.stderr
    assert not (tmp_path / "runs").exists()
    record = tmp_path / "runs" / "pbt" / "run.json"
    assert not record.exists() or "findings" not in json.loads(record.read_text())


@ray.remote(num_cpus=0)
class Counter:
    """Stands for a worker of a population: each member's state is a number, a round adds 1 to it
    (after the exploits); a round of −1 steps kills the worker."""

    def __init__(self, members):
        self.state = {m: 10 * m for m in members}

    def export(self, members):
        return [self.state[m] for m in members]

    def evaluate(self, batch, imports=None):
        source = batch.source
        if source.steps[0] < 0:
            os._exit(1)
        given = {donor: ray.get(ref)[i] for donor, (ref, i) in (imports or {}).items()}
        for member, donor in zip(source.members, source.donors):
            if donor is not None:
                self.state[member] = self.state[donor] if donor in self.state else given[donor]
        for member in source.members:
            self.state[member] += 1
        return pa.table({"candidate_id": pa.array(batch.ids, pa.int64()),
                         "value": [self.state[m] for m in source.members]})


def round_of(generation, donors, steps=1):
    members = list(range(len(donors)))
    return CandidateBatch([generation * len(members) + m for m in members], {"member": members},
                          Train(members, list(donors), [None] * len(members), [steps] * len(members)))


def test_members_executor_exports_a_donor_before_its_round_and_stops_when_a_worker_dies(ray_cluster):
    plan = PopulationPlan(size=5, optimizer="sgd", loss="x:y", loader="x:y")
    members = Members(Counter.remote, plan, 2)
    try:
        assert members.shards == [[0, 1], [2, 3, 4]]
        # round 1: members 1 (same worker) and 4 (the other worker) take member 0; member 3 takes member 2
        rounds = [round_of(0, [None] * 5), WAIT, round_of(1, [None, 0, None, 2, 0])]
        out = {}
        for batch, table in members.map_unordered(rounds):
            # A whole round at a time, its workers' parts in member order.
            assert len(batch) == 5 and table.column("candidate_id").to_pylist() == list(batch.ids)
            out.update(zip(table.column("candidate_id").to_pylist(), table.column("value").to_pylist()))
        # each member's start + 1; then the donors' states after round 0 (not after round 1) + 1
        assert out == {0: 1, 1: 11, 2: 21, 3: 31, 4: 41, 5: 2, 6: 2, 7: 22, 8: 22, 9: 2}
        assert members.replacements == members.retries == 0
        with pytest.raises(SweepError, match="a training worker died in generation 1 .*its members' weights were "
                                             "only on it: run the study again"):
            list(members.map_unordered([round_of(0, [None] * 5), WAIT, round_of(1, [None] * 5, steps=-1)]))
    finally:
        for actor in members.actors:
            ray.kill(actor)
