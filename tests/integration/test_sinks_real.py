"""Sinks against real components: S3 (moto server) through pyarrow.fs, a real MLflow server
that goes away and comes back, a slow MLflow server, and a driver killed while writing."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from sweep.config import parse_config
from sweep.results import results_schema
from sweep.sinks.mlflow import NONFINITE_SUFFIX, MlflowSink
from sweep.sinks.parquet import ParquetSink, read_results
from tests.conftest import BIN, MlflowServer, free_port
from workers.driver import run

pytestmark = pytest.mark.integration
SCHEMA = results_schema({}, ["loss"])


def rows(start: int, n: int, value=None) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({"candidate_id": pa.array(ids, pa.int64()), "status": ["ok"] * n, "error": [None] * n,
                     "loss": [float(i) if value is None else value for i in ids], "worker": ["w"] * n,
                     "eval_seconds": [0.0] * n})


# -- S3 through pyarrow.fs -----------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir("sweeps")
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_parquet_sink_writes_to_s3(s3):
    uri = f"s3://sweeps/unit/results?{s3}"
    sink = ParquetSink(uri, SCHEMA, rows_per_file=10)
    for start in range(0, 35, 7):
        sink.write(rows(start, 7))
    sink.close({})
    table = read_results(uri)
    assert table.column("candidate_id").to_pylist() == list(range(35))
    assert sink.files_written == 3  # 14, 14 and the last 7 rows


def test_a_sweep_writes_its_results_to_s3(repo, tmp_path, ray_cluster, s3, capsys):
    raw = yaml.safe_load((repo / "configs/interpolate.yaml").read_text())
    raw["sinks"] = {"parquet": {"path": f"s3://sweeps/runs/interp?{s3}"}, "mlflow": {"enabled": False}}
    result = run(parse_config(raw, base_dir=repo / "configs"), tmp_path, progress=False)
    assert result.results_dir.startswith("s3://")
    table = read_results(result.results_dir)
    assert table.num_rows == 61 and table.column("candidate_id").to_pylist() == list(range(61))
    from sweep.cli import main

    assert main(["show", str(result.run_dir), "--by", "loss", "--top", "1", "--format", "json"]) == 0
    best = min((r for r in table.to_pylist()), key=lambda r: r["loss"])
    assert f'"candidate_id": {best["candidate_id"]}' in capsys.readouterr().out


# -- a driver killed while it writes --------------------------------------------
def test_results_stay_readable_after_the_driver_is_killed(repo, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(BIN / "sweep"), "run", str(repo / "configs/perturb-million.yaml"), "--out", str(out), "--no-progress",
         "--set", "study.count=2000000", "--set", "sinks.parquet.rows_per_file=8192",
         "--set", "workers.batch_size=4096", "--set", "sinks.mlflow.enabled=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    results = out / "runs" / "perturb-million" / "results"
    try:
        deadline = time.monotonic() + 120
        while len(list(results.glob("part-*.parquet"))) < 5:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no results were written"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray cluster it started
        except ProcessLookupError:
            pass
    parts = sorted(results.glob("part-*.parquet"))
    expected = sum(pq.read_metadata(p).num_rows for p in parts)  # every published file has its footer
    assert expected >= 5 * 8192
    assert ds.dataset(str(results), format="parquet").count_rows() == expected

    import duckdb
    import pandas

    assert len(pandas.read_parquet(results)) == expected
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{results}/*.parquet')").fetchall()[0][0] == expected
    import polars

    assert polars.scan_parquet(str(results / "*.parquet")).select(polars.len()).collect().item() == expected
    ids = ds.dataset(str(results), format="parquet").to_table(columns=["candidate_id"]).column("candidate_id")
    assert len(set(ids.to_pylist())) == expected, "no row twice"


# -- MLflow: outage, slow server, NaN, large sweeps, reopening ----------------------
def history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_an_mlflow_outage_mid_run_is_waited_out_and_loses_nothing(tmp_path, sink_warnings):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        sink = MlflowSink("outage", tracking_uri=server.uri, metric_names=["loss"], retry_seconds=120,
                          results_uri=str(tmp_path / "results"))
        sink.write(rows(0, 50))
        wait_for(lambda: sink.logged_metrics >= 50)
        server.stop()
        for first in range(50, 550, 50):
            sink.write(rows(first, 50))
        # Said when the first request failed, with the long window: the server has answered before.
        said = sink_warnings.wait_for("stopped answering")
        assert sink.reached and server.uri in said and "tried for up to 120 s" in said and "Parquet" in said
        assert "cannot be reached" not in " ".join(sink_warnings.messages)
        closing = threading.Thread(target=sink.close, args=({"ok": 550, "completed": True},), daemon=True)
        closing.start()
        assert "waiting up to" in sink_warnings.wait_for(f"more for MLflow at {server.uri}")
        server.start()  # the same port: the sink, still trying, sends everything it queued
        closing.join(180)
        assert not closing.is_alive(), "close() did not return once the server was back"
        assert "answers again" in sink_warnings.wait_for("answers again")
        assert sink.errors == [] and sink.missed_metrics == 0
        steps = sorted(m.step for m in history(server.uri, sink.run_id, "loss"))
        assert steps == list(range(550))
        from mlflow.tracking import MlflowClient

        assert MlflowClient(tracking_uri=server.uri).get_run(sink.run_id).info.status == "FINISHED"
    finally:
        server.stop()


class HoldingProxy:
    """Forwards HTTP to `target`, holding every request until `gate` is set: a server as slow as it gets."""

    def __init__(self, target: str):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                proxy.held.set()
                proxy.gate.wait()
                proxy.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                request = urllib.request.Request(target + self.path, data=body, method=self.command,
                                                 headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, payload, headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as e:
                    status, payload, headers = e.code, e.read(), e.headers
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self.held = threading.Event()  # a request has arrived and is being held
        self.gate = threading.Event()
        self.requests = 0  # requests forwarded
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.gate.set()
        self.server.shutdown()


def test_slow_mlflow_does_not_slow_writing(mlflow_server):
    proxy = HoldingProxy(mlflow_server.uri)
    try:
        sink = MlflowSink("slow", tracking_uri=proxy.uri, metric_names=["loss"])
        assert proxy.held.wait(60), "the sink sent no request"
        wrote = threading.Event()

        def write():
            for first in range(0, 2000, 100):
                sink.write(rows(first, 100))
            wrote.set()

        threading.Thread(target=write, daemon=True).start()
        # Every row is taken while the server has not answered one request of the sink.
        assert wrote.wait(60), "rows waited for the slow server"
        assert proxy.requests == 0
        proxy.gate.set()
        sink.close({"completed": True})
        # The 20 writes queued while the server was held went in a few requests, not one each.
        assert 0 < proxy.requests < 20
        assert sink.errors == [] and sink.missed_metrics == 0
        assert sorted(m.step for m in history(mlflow_server.uri, sink.run_id, "loss")) == list(range(2000))
    finally:
        proxy.close()


def test_nan_and_inf_stay_distinguishable_from_zero(mlflow_server):
    sink = MlflowSink("nonfinite", tracking_uri=mlflow_server.uri, metric_names=["loss"])
    table = rows(0, 4)
    table = table.set_column(3, "loss", pa.array([0.0, math.nan, math.inf, -math.inf]))
    sink.write(table)
    sink.close({"completed": True})
    values = {m.step: m.value for m in history(mlflow_server.uri, sink.run_id, "loss")}
    flags = {m.step: m.value for m in history(mlflow_server.uri, sink.run_id, "loss" + NONFINITE_SUFFIX)}
    assert values[0] == 0.0 and 0 not in flags
    assert math.isnan(values[1]) and flags[1] == 1.0
    assert values[2] > 1e300 and values[3] < -1e300 and flags[2] == flags[3] == 1.0


def test_large_sweeps_log_batch_summaries_and_the_table(mlflow_server, tmp_path):
    results = tmp_path / "results"
    parquet = ParquetSink(str(results), SCHEMA)
    sink = MlflowSink("large", tracking_uri=mlflow_server.uri, metric_names=["loss"], per_candidate=False,
                      results_uri=str(results))
    for first in range(0, 300, 100):
        parquet.write(rows(first, 100))
        sink.write(rows(first, 100))
    parquet.close({})
    sink.close({"completed": True})
    assert history(mlflow_server.uri, sink.run_id, "loss") == []
    mins = {m.step: m.value for m in history(mlflow_server.uri, sink.run_id, "batch.loss.min")}
    means = {m.step: m.value for m in history(mlflow_server.uri, sink.run_id, "batch.loss.mean")}
    assert mins == {0: 0.0, 1: 100.0, 2: 200.0} and means[2] == pytest.approx(249.5)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_run(sink.run_id).data.tags["sweep.results"] == str(results)
    artifacts = [a.path for a in client.list_artifacts(sink.run_id, "results")]
    assert artifacts and all(a.startswith("results/part-") for a in artifacts)


def test_a_reopened_run_keeps_its_params(mlflow_server):
    first = MlflowSink("reopen", tracking_uri=mlflow_server.uri, metric_names=["loss"], params={"a": 1, "b": 2})
    first.write(rows(0, 5))
    first.close({"completed": False})
    again = MlflowSink("reopen", tracking_uri=mlflow_server.uri, metric_names=["loss"], run_id=first.run_id,
                       params={"a": 1, "b": 3, "c": 4})
    again.write(rows(5, 5))
    again.close({"completed": True})
    from mlflow.tracking import MlflowClient

    data = MlflowClient(tracking_uri=mlflow_server.uri).get_run(first.run_id)
    assert data.data.params == {"a": "1", "b": "2", "c": "4"}
    assert any("'b'" in e for e in again.errors)
    assert data.info.status == "FINISHED"
    assert sorted(m.step for m in history(mlflow_server.uri, first.run_id, "loss")) == list(range(10))
