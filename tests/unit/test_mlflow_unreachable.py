"""An MLflow server that cannot be reached: said at once, given up after a short window, the rows kept in Parquet.

The tracking URI points at a port that was bound and closed again, so every request is refused.
"""

from __future__ import annotations


import pyarrow as pa

from sweep.sinks.mlflow import FIRST_CONTACT_SECONDS, MlflowSink
from tests.conftest import free_port


def rows(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({"candidate_id": pa.array(ids, pa.int64()), "status": ["ok"] * n, "error": [None] * n,
                     "loss": [float(i) for i in ids], "worker": ["w"] * n, "eval_seconds": [0.0] * n})


def test_a_refused_server_is_reported_at_once_and_given_up_after_a_short_window(tmp_path, sink_warnings):
    uri = f"http://127.0.0.1:{free_port()}"
    results = tmp_path / "results"
    # retry_seconds is far longer than the first-contact window: giving up at all before close() shows the short one.
    sink = MlflowSink("away", tracking_uri=uri, metric_names=["loss"], results_uri=str(results),
                      retry_seconds=3600, connect_seconds=1.0)
    sink.write(rows(0, 5))

    said = sink_warnings.wait_for("cannot be reached")  # close() has not been called
    assert uri in said and "Connection refused" in said
    assert f"Parquet results at {results}" in said
    assert "tried for up to 1 s" in said and "Ctrl-C" in said
    gave_up = sink_warnings.wait_for("was never reached")  # within connect_seconds, not retry_seconds
    assert uri in gave_up and "after 1 s" in gave_up

    sink.write(rows(5, 3))
    sink.close({"completed": True})
    assert not sink.reached and sink.run_id is None
    assert sink.errors == [gave_up.split("; the sweep goes on")[0]], "one warning for the run, not one per request"
    assert sink.missed_metrics == 8 and sink.logged_metrics == 0


def test_the_first_contact_window_is_short_and_never_longer_than_retry_seconds(sink_warnings):
    assert FIRST_CONTACT_SECONDS < MlflowSink.__init__.__kwdefaults__["retry_seconds"]
    sink = MlflowSink("away", tracking_uri=f"http://127.0.0.1:{free_port()}", metric_names=["loss"],
                      retry_seconds=0)
    said = sink_warnings.wait_for("cannot be reached")
    assert "it is tried no more" in said
    sink.close({"completed": True})
    assert not sink.reached and "after 0 s" in sink.errors[0]


def test_without_parquet_the_warning_says_so_and_shows_no_password(sink_warnings):
    port = free_port()
    sink = MlflowSink("away", tracking_uri=f"http://sweeper:s3cret@127.0.0.1:{port}", metric_names=["loss"],
                      connect_seconds=0)
    said = sink_warnings.wait_for("cannot be reached")
    assert f"http://127.0.0.1:{port}" in said
    assert "sinks.parquet is off, so what MLflow misses is kept nowhere" in said and "Ctrl-C" not in said
    sink.close({"completed": True})
    assert all("s3cret" not in m for m in sink_warnings.messages + sink.errors)
