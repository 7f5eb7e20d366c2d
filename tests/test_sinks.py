"""One contract for every registered sink: rows written are the rows read back, none lost, none twice.

Each sink in `sweep.sinks.SINKS` is opened as the driver opens it (`open(SinkContext(...))` from a parsed
config with only that sink on), given rows, flushed, closed, and read back with its reader in `READERS`
below: a sink registered without one fails here, saying to add it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from sweep.config import flatten, parse_config
from sweep.results import results_schema
from sweep.sinks import SINKS, SinkContext, open_sinks
from sweep.sinks.parquet import ParquetSink, read_results
from tests.conftest import REPO, edited_quickstart

METRICS = ["loss", "accuracy"]
SCHEMA = results_schema({"path": pa.string()}, METRICS)
#: (first candidate id, rows) of the tables the contract writes: an empty one included.
BATCHES = ((0, 5), (5, 11), (16, 1), (17, 0), (17, 20))


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


@dataclass
class Opened:
    """A sink under test and what it was opened with."""

    sink: Any
    context: SinkContext
    #: every `update_record(**fields)` the sink made, in order
    recorded: List[Dict[str, Any]]


@dataclass
class Reader:
    """How the contract reads a sink back: {candidate_id: loss} of the ok rows it holds."""

    read: Callable[[Opened], Dict[int, float]]
    #: the sink's settings for the contract (beyond `enabled`), given the test's folder
    settings: Callable[[Path], Dict[str, Any]] = lambda folder: {}
    #: whether the sink gives back NaN as NaN
    keeps_nan: bool = True


def read_parquet(opened: Opened) -> Dict[int, float]:
    table = read_results(opened.context.results)
    ids = table.column("candidate_id").to_pylist()
    assert len(ids) == len(set(ids)), "a candidate was written twice"
    assert sorted(ids) == list(range(opened.context.total)), "the results hold every row, invalid ones included"
    assert table.schema.metadata[b"sweep.name"] == b"contract", "the files carry the sweep's stamp"
    return {r["candidate_id"]: r["loss"] for r in table.to_pylist() if r["status"] == "ok"}


def read_mlflow(opened: Opened) -> Dict[int, float]:
    from mlflow.tracking import MlflowClient

    outcome = opened.sink.outcome()
    run_id = outcome["mlflow_run_id"]
    assert outcome["mlflow_missed_metrics"] == 0
    uri = opened.context.config.sinks.mlflow.tracking_uri
    assert run_id is not None and opened.recorded == [{"mlflow_tracking_uri": uri}, {"mlflow_run_id": run_id}], \
        "run.json gets where the run lives and the run's id"
    client = MlflowClient(tracking_uri=opened.context.config.sinks.mlflow.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["sweep.name"] == "contract" and run.data.params["name"] == "contract"
    history = client.get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a candidate was logged twice"
    return {m.step: m.value for m in history}


#: The contract's reader of each registered sink.
READERS: Dict[str, Reader] = {
    "parquet": Reader(read_parquet, lambda folder: {"rows_per_file": 7, "flush_seconds": 3600}),
    "mlflow": Reader(read_mlflow, lambda folder: {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"}),
}


def reader_of(name: str) -> Reader:
    if name not in READERS:
        pytest.fail(f"the sink {name!r} is registered in sweep.sinks.SINKS but the contract cannot read it back: "
                    f"add its reader to READERS in tests/test_sinks.py", pytrace=False)
    return READERS[name]


def contract_config(folder: Path, only: str, settings: Dict[str, Any]):
    """The quickstart config named 'contract' with only the sink `only` on (with `settings`)."""
    changes: Dict[str, Any] = {"name": "contract", "sinks": {name: {"enabled": name == only} for name in SINKS}}
    changes["sinks"][only].update(settings)
    return parse_config(edited_quickstart(REPO, changes), base_dir=folder)


def open_one(name: str, folder: Path, settings: Dict[str, Any]) -> Opened:
    config = contract_config(folder, name, settings)
    recorded: List[Dict[str, Any]] = []
    run_dir = folder / "runs" / "contract"
    context = SinkContext(
        config=config, schema=SCHEMA, metric_names=METRICS,
        results=str(run_dir / "results") if config.sinks.parquet.enabled else None,
        run_dir=run_dir, total=sum(n for _, n in BATCHES), workers=1,
        stamp={"sweep.name": "contract", "sweep.config_digest": config.digest()}, record={},
        update_record=lambda **fields: recorded.append(fields), params=flatten(config.to_dict()))
    sinks = open_sinks(context)
    assert len(sinks) == 1, f"only sinks.{name} is enabled, {len(sinks)} sinks opened"
    return Opened(sinks[0], context, recorded)


@pytest.fixture(params=list(SINKS))
def sink_name(request) -> str:
    return request.param


def test_sink_contract(sink_name, tmp_path):
    reader = reader_of(sink_name)
    opened = open_one(sink_name, tmp_path, reader.settings(tmp_path))
    written = {}
    for start, n in BATCHES:
        table = batch(start, n)
        opened.sink.write(table)
        written.update({r["candidate_id"]: r["loss"] for r in table.to_pylist() if r["status"] == "ok"})
    opened.sink.flush()
    opened.sink.close({"ok": len(written), "completed": True})
    assert opened.sink.warnings == [], "a sink that had no trouble has nothing to warn about"
    assert isinstance(opened.sink.outcome(), dict)
    got = reader.read(opened)
    assert set(got) == set(written), "every ok row is read back, and only those"
    for cid, value in written.items():
        if math.isnan(value) and reader.keeps_nan:
            assert math.isnan(got[cid])
        elif math.isnan(value):
            assert got[cid] is None, "a sink that cannot keep NaN gives back nothing, not a number"
        else:
            assert got[cid] == pytest.approx(value)


def test_a_sink_without_a_reader_fails_the_contract():
    with pytest.raises(pytest.fail.Exception, match="add its reader to READERS in tests/test_sinks.py"):
        reader_of("a sink nobody wrote a reader for")


def test_only_enabled_sinks_open(tmp_path):
    config = contract_config(tmp_path, "parquet", {"enabled": False})
    context = SinkContext(config=config, schema=SCHEMA, metric_names=METRICS, results=None, run_dir=tmp_path,
                          total=1, workers=1, stamp={}, record={}, update_record=lambda **fields: None, params={})
    assert open_sinks(context) == []


def test_parquet_opens_at_the_results_location(tmp_path):
    opened = open_one("parquet", tmp_path, {})
    assert isinstance(opened.sink, ParquetSink) and opened.sink.location == opened.context.results
    assert opened.sink.outcome() == {}


def parquet_sink(tmp_path: Path) -> ParquetSink:
    return ParquetSink(tmp_path / "results", SCHEMA, rows_per_file=7, flush_seconds=3600,
                       metadata={"sweep.name": "contract"})


def test_parquet_files_are_complete_and_one_schema(tmp_path):
    sink = parquet_sink(tmp_path)
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
    sink = parquet_sink(tmp_path)
    with pytest.raises(ValueError, match="extra_metric"):
        sink.write(batch(0, 2).append_column("extra_metric", pa.array([1.0, 2.0])))
