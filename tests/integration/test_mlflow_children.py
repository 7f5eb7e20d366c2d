"""One MLflow child run per population member, against a real `mlflow server` over HTTP."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient

from sweep.results import results_schema
from sweep.sinks.mlflow import NONFINITE_SUFFIX, Children, MlflowSink

pytestmark = pytest.mark.integration

MEMBERS, GENERATIONS = 16, 5
METRICS = ["loss", "accuracy"]
#: The results schema of a training study with two searched hyperparameters.
SCHEMA = results_schema({"member": pa.int64(), "generation": pa.int64(), "parent": pa.int64(), "step": pa.int64(),
                         "lr": pa.float64(), "momentum": pa.float64()}, METRICS)
FAILED = {(5, 2), (11, 0)}
NONFINITE = {(7, 3): math.nan, (9, 1): math.inf}


def accuracy(m: int, g: int) -> float:
    return 0.3 + 0.1 * g + 0.003 * m


def loss(m: int, g: int) -> float:
    return NONFINITE.get((m, g), 1.0 / (1 + g) + 0.01 * m)


def lr(m: int, g: int) -> float:
    return 10 ** -(1 + m % 4) * (1.2 if (m + g) % 2 else 0.8) ** g


def parent(m: int, g: int) -> int:
    return m if g == 0 or m < MEMBERS // 2 else m - MEMBERS // 2  # the bottom half continues from the top


def rows(generations) -> pa.Table:
    out = []
    for g in generations:
        for m in range(MEMBERS):
            failed = (m, g) in FAILED
            out.append({
                "candidate_id": g * MEMBERS + m, "status": "failed" if failed else "ok",
                "error": "RuntimeError: diverged" if failed else None,
                "member": m, "generation": g, "parent": parent(m, g), "step": 250 * (g + 1),
                "lr": lr(m, g), "momentum": 0.9, "loss": None if failed else loss(m, g),
                "accuracy": None if failed else accuracy(m, g), "worker": f"w{m % 3}", "node": "n0",
                "eval_seconds": 0.02,
            })
    return pa.Table.from_pylist(out, schema=SCHEMA)


def children() -> Children:
    return Children(values=["lr", "parent", "step"], params={m: {"seed": str(1000 + m)} for m in range(MEMBERS)})


def history(client: MlflowClient, run_id: str, key: str) -> dict:
    got = client.get_metric_history(run_id, key)
    assert len({m.step for m in got}) == len(got), f"{key}: a step was logged twice"
    return {m.step: m.value for m in got}


def check_children(client: MlflowClient, sink: MlflowSink, generations: int) -> None:
    parent_run = client.get_run(sink.run_id)
    found = client.search_runs([parent_run.info.experiment_id], f"tags.mlflow.parentRunId = '{sink.run_id}'",
                               max_results=1000)
    assert len(found) == MEMBERS
    assert {int(r.data.tags["sweep.member"]): r.info.run_id for r in found} == sink.child_run_ids
    for run in found:
        m = int(run.data.tags["sweep.member"])
        assert run.info.run_name == f"member-{m:03d}" and run.info.status == "FINISHED"
        assert run.data.tags["sweep.child_key"] == "member" and run.data.tags["sweep.name"] == "pbt-http"
        assert run.data.params == {"seed": str(1000 + m)}
        ok = [g for g in range(generations) if (m, g) not in FAILED]
        child = run.info.run_id
        assert history(client, child, "accuracy") == {g: accuracy(m, g) for g in ok}
        assert history(client, child, "lr") == {g: lr(m, g) for g in ok}
        assert history(client, child, "parent") == {g: float(parent(m, g)) for g in ok}
        assert history(client, child, "step") == {g: 250.0 * (g + 1) for g in ok}
        losses = history(client, child, "loss")
        flags = history(client, child, "loss" + NONFINITE_SUFFIX)
        assert set(losses) == set(ok)
        odd = {g for g in ok if (m, g) in NONFINITE}
        assert flags == {g: 1.0 for g in odd}
        for g in ok:
            if g not in odd:
                assert losses[g] == loss(m, g)
            elif math.isnan(loss(m, g)):
                assert math.isnan(losses[g])
            else:
                assert losses[g] > 1e300  # MLflow clamps inf; the flag tells it apart


def test_population_over_http(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    first = MlflowSink("pbt-http", tracking_uri=mlflow_server.uri, metric_names=METRICS, params={"population": 16},
                       tags={"sweep.name": "pbt-http"}, children=children())
    table = rows(range(GENERATIONS - 1))
    first.write(table)
    first.close({"ok": table.num_rows - 2, "completed": True})
    assert table.num_rows == 64
    assert first.errors == [] and first.missed_metrics == 0
    check_children(client, first, GENERATIONS - 1)
    assert client.get_metric_history(first.run_id, "accuracy") == []  # the children carry them

    # Resumed: the last generation goes to the same sixteen children.
    again = MlflowSink("pbt-http", tracking_uri=mlflow_server.uri, metric_names=METRICS, params={"population": 16},
                       tags={"sweep.name": "pbt-http"}, children=children(), run_id=first.run_id)
    last = rows([GENERATIONS - 1])
    again.write(last)
    again.close({"ok": table.num_rows + last.num_rows - 2, "completed": True})
    assert again.errors == [] and again.missed_metrics == 0
    assert again.child_run_ids == first.child_run_ids
    check_children(client, again, GENERATIONS)
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_eighty_rows_in_one_write(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    sink = MlflowSink("pbt-http", tracking_uri=mlflow_server.uri, metric_names=METRICS,
                      tags={"sweep.name": "pbt-http"}, children=children())
    table = rows(range(GENERATIONS))
    sink.write(table)
    sink.close({"completed": True})
    assert table.num_rows == 80
    assert sink.errors == [] and sink.missed_metrics == 0
    check_children(client, sink, GENERATIONS)
