"""One contract for every sink: rows written are the rows read back, none lost, none twice."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from sweep.results import results_schema
from sweep.sinks.parquet import ParquetSink, read_results

SCHEMA = results_schema({"path": pa.string()}, ["loss", "accuracy"])


def batch(start: int, n: int, *, invalid_every: int = 4) -> pa.Table:
    ids = list(range(start, start + n))
    status = ["invalid" if i % invalid_every == 3 else "ok" for i in ids]
    loss = [None if s != "ok" else (math.nan if i == 5 else 1.0 / (i + 1)) for i, s in zip(ids, status)]
    return pa.table({
        "candidate_id": pa.array(ids, pa.int64()),
        "status": status,
        "error": [None if s == "ok" else f"bad {i}" for i, s in zip(ids, status)],
        "path": [f"c{i}.safetensors" for i in ids],
        "loss": pa.array(loss, pa.float64()),
        "accuracy": pa.array([None if s != "ok" else i / 100 for i, s in zip(ids, status)], pa.float64()),
        "worker": ["w"] * n,
        "eval_seconds": [0.01] * n,
    })


class ParquetCase:
    name = "parquet"

    def make(self, tmp_path: Path):
        return ParquetSink(tmp_path / "results", SCHEMA, rows_per_file=7, flush_seconds=3600,
                           metadata={"sweep.name": "contract"})

    def read_back(self, sink, tmp_path: Path):
        table = read_results(tmp_path / "results")
        return {r["candidate_id"]: r["loss"] for r in table.to_pylist() if r["status"] == "ok"}


class MlflowCase:
    name = "mlflow"

    def make(self, tmp_path: Path):
        from sweep.sinks.mlflow import MlflowSink

        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        return MlflowSink("contract", tracking_uri=self.uri, params={"a.b": 1}, tags={"t": "x"},
                          metric_names=["loss", "accuracy"])

    def read_back(self, sink, tmp_path: Path):
        from mlflow.tracking import MlflowClient

        history = MlflowClient(tracking_uri=self.uri).get_metric_history(sink.run_id, "loss")
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), "a candidate was logged twice"
        return {m.step: m.value for m in history}


@pytest.fixture(params=[ParquetCase, MlflowCase], ids=lambda c: c.name)
def case(request):
    return request.param()


def test_sink_contract(case, tmp_path):
    sink = case.make(tmp_path)
    written = {}
    for start, n in ((0, 5), (5, 11), (16, 1), (17, 0), (17, 20)):
        table = batch(start, n)
        sink.write(table)
        written.update({r["candidate_id"]: r["loss"] for r in table.to_pylist() if r["status"] == "ok"})
    sink.flush()
    sink.close({"ok": len(written), "completed": True})
    got = case.read_back(sink, tmp_path)
    assert set(got) == set(written)
    for cid, value in written.items():
        if math.isnan(value):
            assert math.isnan(got[cid])
        else:
            assert got[cid] == pytest.approx(value)


def test_parquet_files_are_complete_and_one_schema(tmp_path):
    sink = ParquetCase().make(tmp_path)
    only_invalid = batch(3, 1).select(["candidate_id", "status", "error", "path", "worker", "eval_seconds"])
    sink.write(only_invalid)  # no metric columns: filled with nulls
    for start in range(4, 40, 6):
        sink.write(batch(start, 6))
    sink.close({})
    results = tmp_path / "results"
    files = sorted(results.iterdir())
    assert files and all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    assert len(files) >= 4, "rows_per_file=7 must roll files"
    # A partial file someone left with the temporary prefix is never read.
    (results / ".part-999999-deadbeef.parquet.tmp").write_bytes(b"PAR1 partial")
    dataset = ds.dataset(str(results), format="parquet")
    assert dataset.schema.names == SCHEMA.names
    table = dataset.to_table()
    assert sorted(table.column("candidate_id").to_pylist()) == list(range(3, 40))
    assert dataset.schema.metadata[b"sweep.name"] == b"contract"
    assert table.schema.field("loss").type == pa.float64()


def test_parquet_flushes_by_time(tmp_path):
    # Rows wait in the buffer until flush_seconds have passed since the last flush ...
    waiting = ParquetSink(tmp_path / "waiting", SCHEMA, rows_per_file=10**6, flush_seconds=3600)
    waiting.write(batch(0, 3))
    waiting.write(batch(3, 3))
    assert list((tmp_path / "waiting").glob("part-*.parquet")) == []
    waiting.close({})
    assert read_results(tmp_path / "waiting").num_rows == 6
    # ... and with flush_seconds passed (0: always) each write is published, however few rows it has.
    timely = ParquetSink(tmp_path / "timely", SCHEMA, rows_per_file=10**6, flush_seconds=0)
    timely.write(batch(0, 3))
    assert len(list((tmp_path / "timely").glob("part-*.parquet"))) == 1
    timely.write(batch(3, 3))
    assert len(list((tmp_path / "timely").glob("part-*.parquet"))) == 2
    timely.close({})
    assert read_results(tmp_path / "timely").num_rows == 6


def test_conform_refuses_unknown_columns(tmp_path):
    sink = ParquetCase().make(tmp_path)
    with pytest.raises(ValueError, match="extra_metric"):
        sink.write(batch(0, 2).append_column("extra_metric", pa.array([1.0, 2.0])))
