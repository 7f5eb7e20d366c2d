"""One MLflow child run per population member, against a SQLite tracking store.

Tables have the shape population-based training writes: one row per member per
generation, with the member it continued from (`parent`), its training steps,
its hyperparameters and its metrics.
"""

from __future__ import annotations

import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient

from sweep import SweepError
from sweep.config import flatten, parse_config
from sweep.results import LINEAGE, RECIPE, column, results_schema
from sweep.sinks import SinkContext, check_columns, open_sinks
from sweep.sinks.mlflow import NONFINITE_SUFFIX, Children, MlflowSink, children_of, columns_logged, resolve_tracking_uri
from tests.conftest import REPO, edited_quickstart

METRICS = ["loss", "accuracy"]
#: The results schema of a training study with two searched hyperparameters.
SCHEMA = results_schema({"member": pa.int64(), "generation": pa.int64(), "parent": pa.int64(), "step": pa.int64(),
                         "lr": pa.float64(), "momentum": pa.float64()}, METRICS)
#: The same columns with the roles a training study declares: member, generation, parent and step are lineage.
FIELDS = [column("member", pa.int64(), LINEAGE), column("generation", pa.int64(), LINEAGE),
          column("parent", pa.int64(), LINEAGE), column("step", pa.int64(), LINEAGE),
          column("lr", pa.float64(), RECIPE), column("momentum", pa.float64(), RECIPE)]
#: (member, generation) of the row that failed, and of the one whose loss is NaN.
FAILED = (2, 1)
NAN_LOSS = (3, 2)


def accuracy(m: int, g: int) -> float:
    return 0.5 + 0.1 * g + 0.01 * m


def loss(m: int, g: int) -> float:
    return math.nan if (m, g) == NAN_LOSS else 2.0 / (1 + g) + 0.001 * m


def lr(m: int, g: int) -> float:
    return 0.1 / (1 + m) * 0.8 ** g


def parent(m: int, g: int) -> int:
    return m if g == 0 or m % 2 == 0 else m - 1  # odd members continue from the even one before them


def generation(g: int, members: int) -> pa.Table:
    """The rows of one generation, as the study writes them."""
    rows = []
    for m in range(members):
        failed = (m, g) == FAILED
        rows.append({
            "candidate_id": g * members + m, "status": "failed" if failed else "ok",
            "error": "RuntimeError: diverged" if failed else None,
            "member": m, "generation": g, "parent": parent(m, g), "step": 100 * (g + 1),
            "lr": lr(m, g), "momentum": 0.9,
            "loss": None if failed else loss(m, g), "accuracy": None if failed else accuracy(m, g),
            "worker": "w0", "node": "n0", "eval_seconds": 0.01,
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def spec(**changes) -> Children:
    return Children(**{"values": ["lr", "parent", "step"], **changes})


def sink(uri: str, **kwargs) -> MlflowSink:
    return MlflowSink("pbt", tracking_uri=uri, run_name="pbt", metric_names=METRICS, params={"population": 4},
                      tags={"sweep.name": "pbt"}, **{"children": spec(), **kwargs})


def histories(client: MlflowClient, run_id: str, key: str) -> dict:
    history = client.get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice"
    return {m.step: m.value for m in history}


def children_of_run(client: MlflowClient, run) -> list:
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_one_child_per_member_with_one_step_per_generation(uri):
    first = sink(uri, children=spec(params={m: {"seed": str(100 + m)} for m in range(4)}))
    for g in range(3):
        first.write(generation(g, 4))
    first.close({"ok": 11, "completed": True})
    assert first.errors == [] and first.missed_metrics == 0

    client = MlflowClient(tracking_uri=uri)
    parent_run = client.get_run(first.run_id)
    found = children_of_run(client, parent_run)
    assert sorted(r.info.run_name for r in found) == ["member-000", "member-001", "member-002", "member-003"]
    assert first.child_run_ids == {int(r.data.tags["sweep.member"]): r.info.run_id for r in found}
    for run in found:
        m = int(run.data.tags["sweep.member"])
        assert run.info.run_name == f"member-{m:03d}"
        assert run.data.tags["mlflow.parentRunId"] == first.run_id
        assert run.data.tags["sweep.child_key"] == "member"
        assert run.data.tags["sweep.name"] == "pbt"  # the sweep's stamp
        assert run.data.params == {"seed": str(100 + m)}
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == parent_run.info.experiment_id
        ok = [g for g in range(3) if (m, g) != FAILED]
        assert histories(client, run.info.run_id, "accuracy") == {g: accuracy(m, g) for g in ok}
        assert histories(client, run.info.run_id, "lr") == {g: lr(m, g) for g in ok}
        assert histories(client, run.info.run_id, "parent") == {g: float(parent(m, g)) for g in ok}
        assert histories(client, run.info.run_id, "step") == {g: 100.0 * (g + 1) for g in ok}
        assert "momentum" not in run.data.metrics  # only the columns asked for
        losses = histories(client, run.info.run_id, "loss")
        flags = histories(client, run.info.run_id, "loss" + NONFINITE_SUFFIX)
        assert set(losses) == set(ok)
        if m == NAN_LOSS[0]:
            assert math.isnan(losses[NAN_LOSS[1]]) and flags == {NAN_LOSS[1]: 1.0}
            assert all(losses[g] == loss(m, g) for g in ok if g != NAN_LOSS[1])
        else:
            assert losses == {g: loss(m, g) for g in ok} and flags == {}
    assert FAILED[1] not in histories(client, first.child_run_ids[FAILED[0]], "accuracy")

    # The sweep's run keeps params, tags and summary; the children carry the per-member metrics.
    assert not first.per_candidate
    assert parent_run.data.params == {"population": "4"} and parent_run.data.tags["sweep.name"] == "pbt"
    assert client.get_metric_history(first.run_id, "accuracy") == []
    assert histories(client, first.run_id, "batch.accuracy.max") == {g: accuracy(3, g) for g in range(3)}
    assert parent_run.data.metrics["summary.ok"] == 11 and parent_run.info.status == "FINISHED"

    # Reopened: generation 3 goes to the same four children, none is created.
    again = sink(uri, run_id=first.run_id, children=spec(params={m: {"seed": str(100 + m)} for m in range(4)}))
    again.write(generation(3, 4))
    again.close({"ok": 15, "completed": True})
    assert again.errors == [] and again.missed_metrics == 0
    assert again.child_run_ids == first.child_run_ids
    found = children_of_run(client, client.get_run(first.run_id))
    assert len(found) == 4 and {r.info.run_id for r in found} == set(first.child_run_ids.values())
    for run in found:
        m = int(run.data.tags["sweep.member"])
        ok = [g for g in range(4) if (m, g) != FAILED]
        assert histories(client, run.info.run_id, "accuracy") == {g: accuracy(m, g) for g in ok}
        assert run.info.status == "FINISHED" and run.data.params == {"seed": str(100 + m)}
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_children_end_as_the_sweep_does_and_run_again_when_reopened(uri):
    first = sink(uri)
    first.write(generation(0, 3))
    first.close({"completed": False})
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert [client.get_run(r).info.status for r in first.child_run_ids.values()] == ["KILLED"] * 3

    again = sink(uri, run_id=first.run_id)
    again.write(generation(1, 2))  # member 2 gets no rows this time: it ends with the sweep all the same
    deadline = time.monotonic() + 30
    while client.get_run(again.child_run_ids.get(0, first.child_run_ids[0])).info.status != "RUNNING":
        assert time.monotonic() < deadline, "the reopened child was not set running"
        time.sleep(0.05)
    again.close({"completed": True})
    assert again.child_run_ids == first.child_run_ids
    assert [client.get_run(r).info.status for r in first.child_run_ids.values()] == ["FINISHED"] * 3
    assert len(children_of_run(client, client.get_run(first.run_id))) == 3


def test_many_metrics_for_one_child_go_in_several_batches(uri):
    """One write with 1,200 generations of one member: 3,600 values, more than one log_batch takes."""
    rows = [{"candidate_id": g, "status": "ok", "member": 0, "generation": g, "step": g,
             "lr": 0.0, "momentum": 0.0, "loss": float(g), "accuracy": 1.0 / (1 + g)} for g in range(1200)]
    one = sink(uri, children=spec(values=["step"]))
    one.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    one.close({"completed": True})
    assert one.errors == [] and one.missed_metrics == 0 and one.logged_metrics >= 3600
    client = MlflowClient(tracking_uri=uri)
    assert histories(client, one.child_run_ids[0], "loss") == {g: float(g) for g in range(1200)}


def test_columns_that_are_not_there_or_not_numbers_are_reported_once(uri):
    one = sink(uri, children=spec(values=["lr", "optimizer", "nope", "rung"]))
    for g in range(2):
        table = generation(g, 2).append_column("optimizer", pa.array(["sgd", "adam"]))
        # A column with no value in these rows (a rung decided at another generation) is not a problem.
        one.write(table.append_column("rung", pa.nulls(2) if g == 0 else pa.array([1, None], pa.int64())))
    one.close({"completed": True})
    assert len(one.errors) == 2, one.errors
    assert any("'optimizer'" in e and "not a number" in e for e in one.errors)
    assert any("'nope'" in e for e in one.errors)
    client = MlflowClient(tracking_uri=uri)
    assert histories(client, one.child_run_ids[1], "lr") == {0: lr(1, 0), 1: lr(1, 1)}


class AwayServer:
    """An HTTP server that holds every request until `release` is set, then answers 503: a server that is away."""

    def __init__(self):
        self.held = threading.Event()  # a request is being held
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _away(self):
                server.held.set()
                server.release.wait()
                self.send_error(503)

            do_GET = do_POST = _away

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


def test_a_server_that_is_away_does_not_stop_the_sweep():
    server = AwayServer()
    try:
        away = MlflowSink("pbt", tracking_uri=server.uri, metric_names=METRICS, children=spec(), retry_seconds=1.0)
        assert server.held.wait(60), "the sink sent no request"
        wrote = threading.Event()

        def write():
            for g in range(3):
                away.write(generation(g, 4))
            wrote.set()

        threading.Thread(target=write, daemon=True).start()
        # The server holds the sink's first request and answers nothing until released: the rows go in regardless.
        assert wrote.wait(60), "writing rows waited for MLflow"
        server.release.set()
        away.close({"completed": True})
    finally:
        server.close()
    assert away.errors and away.child_run_ids == {} and not away.reached
    assert away.missed_metrics == 11 * 5 + 1  # 11 ok rows × (2 metrics + 3 values), and one NaN flag


# --------------------------------------------------------------------------- children from the schema's roles


def test_lineage_columns_member_and_generation_make_the_children():
    schema = results_schema([*FIELDS, column("optimizer", pa.string(), RECIPE)], METRICS)
    assert columns_logged(schema) == ["parent", "step", "lr", "momentum"]  # numbers only: not the optimizer
    made = children_of(schema)
    assert (made.key, made.step, list(made.values)) == ("member", "generation", ["parent", "step", "lr", "momentum"])


@pytest.mark.parametrize("fields", [
    {"member": pa.int64(), "generation": pa.int64(), "lr": pa.float64()},  # no roles given: recipe columns
    [column("member", pa.int64(), LINEAGE), column("lr", pa.float64())],  # no generation
], ids=["recipe", "member-only"])
def test_without_member_and_generation_lineage_there_are_no_children(fields):
    schema = results_schema(fields, METRICS)
    assert columns_logged(schema) == [] and children_of(schema) is None


def contract_config(tmp_path, **sinks):
    changes = {"name": "pbt", "sinks": {"parquet": {"enabled": False}, "mlflow": sinks}}
    return parse_config(edited_quickstart(REPO, changes), base_dir=tmp_path)


def test_check_columns_checks_the_logged_columns_while_mlflow_is_on(tmp_path):
    schema = results_schema([*FIELDS, column("lr!", pa.float64(), RECIPE)], METRICS)
    with pytest.raises(SweepError, match=r"'lr!', which MLflow refuses as a metric name: it holds '!'"):
        check_columns(contract_config(tmp_path), schema, METRICS)
    check_columns(contract_config(tmp_path, enabled=False), schema, METRICS)
    check_columns(contract_config(tmp_path), results_schema({"lr!": pa.float64()}, METRICS), METRICS)  # not logged


def test_a_sink_opened_for_a_training_schema_logs_children(tmp_path, uri):
    config = contract_config(tmp_path, tracking_uri=uri, max_candidate_metrics=100)
    schema = results_schema(FIELDS, METRICS)
    recorded = []
    context = SinkContext(config=config, schema=schema, metric_names=METRICS, results=None, run_dir=tmp_path,
                          total=8, workers=2, stamp={"sweep.name": "pbt"}, record={},
                          update_record=lambda **fields: recorded.append(fields), params=flatten(config.to_dict()))
    [opened] = open_sinks(context)
    for g in range(2):
        opened.write(generation(g, 4).cast(schema))
    opened.close({"completed": True})
    assert opened.warnings == [] and opened.outcome() == {
        "mlflow_run_id": opened.run_id, "mlflow_tracking_uri": resolve_tracking_uri(uri), "mlflow_missed_metrics": 0}
    assert recorded == [{"mlflow_tracking_uri": resolve_tracking_uri(uri)}, {"mlflow_run_id": opened.run_id}]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(opened.run_id)
    assert run.data.tags["sweep.workers"] == "2" and "sweep.git_commit" in run.data.tags
    found = children_of_run(client, run)
    assert len(found) == 4
    child = opened.child_run_ids[1]
    assert histories(client, child, "lr") == {g: lr(1, g) for g in range(2)}
    assert histories(client, child, "momentum") == {0: 0.9, 1: 0.9}
    assert histories(client, child, "parent") == {g: float(parent(1, g)) for g in range(2)}
