"""`sweep show`: top, order, filter and formats over a results dataset, without Ray."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa
import pytest
import yaml

from sweep.cli import main
from sweep.results import results_schema
from sweep.sinks.parquet import ParquetSink


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "runs" / "demo"
    results = run / "results"
    schema = results_schema({"alpha": pa.float64()}, ["loss", "accuracy"])
    sink = ParquetSink(str(results), schema, rows_per_file=40)
    n = 100
    ids = list(range(n))
    status = ["invalid" if i % 10 == 9 else "ok" for i in ids]
    sink.write(pa.table({
        "candidate_id": pa.array(ids, pa.int64()),
        "status": status,
        "error": [None if s == "ok" else "bad" for s in status],
        "alpha": [i / 100 for i in ids],
        "loss": [None if s != "ok" else (i - 50) ** 2 / 100 for i, s in zip(ids, status)],
        "accuracy": [None if s != "ok" else 1 - abs(i - 30) / 100 for i, s in zip(ids, status)],
        "worker": ["w"] * n,
        "eval_seconds": [0.1] * n,
    }))
    sink.close({})
    (run / "config.yaml").write_text(yaml.safe_dump({"metrics": {"objective": "accuracy", "mode": "max"}}))
    (run / "run.json").write_text(json.dumps({"results": str(results)}))
    return run


def show(capsys, *args):
    code = main(["show", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_top_by_objective_is_best_first(run_dir, capsys):
    code, out, _ = show(capsys, run_dir, "--by", "accuracy", "--top", "3", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and [r["candidate_id"] for r in rows] == [30, 31, 28]  # 29 is invalid; ties by id


def test_other_columns_sort_ascending_unless_told(run_dir, capsys):
    _, out, _ = show(capsys, run_dir, "--by", "loss", "--top", "1", "--format", "json")
    assert json.loads(out)[0]["candidate_id"] == 50
    _, out, _ = show(capsys, run_dir, "--by", "loss", "--desc", "--top", "1", "--format", "json")
    assert json.loads(out)[0]["candidate_id"] == 0


def test_where_and_csv(run_dir, capsys):
    code, out, _ = show(capsys, run_dir, "--where", "status = 'invalid'", "--format", "csv",
                        "--columns", "candidate_id,status,loss")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [int(r["candidate_id"]) for r in rows] == list(range(9, 100, 10))
    assert all(r["loss"] == "" for r in rows)


def test_table_default_shows_twenty_rows(run_dir, capsys):
    code, out, _ = show(capsys, run_dir)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:3] == ["candidate_id", "status", "error"]
    assert len(lines) == 2 + 20


def test_results_folder_works_without_run_record(run_dir, capsys):
    code, out, _ = show(capsys, run_dir / "results", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 100


def test_bad_input_is_one_clear_line(run_dir, capsys, tmp_path):
    code, _, err = show(capsys, run_dir, "--by", "acc")
    assert code == 1 and "no column 'acc'" in err and "accuracy" in err
    code, _, err = show(capsys, run_dir, "--where", "loss <<< 2")
    assert code == 1 and "--where" in err
    code, _, err = show(capsys, tmp_path / "nothing-here")
    assert code == 1 and "no results found" in err


def test_nan_survives_json(tmp_path, capsys):
    schema = results_schema({}, ["m"])
    sink = ParquetSink(str(tmp_path / "r"), schema)
    sink.write(pa.table({"candidate_id": pa.array([0], pa.int64()), "status": ["ok"], "error": [None],
                         "m": [math.nan], "worker": ["w"], "eval_seconds": [0.0]}))
    sink.close({})
    _, out, _ = show(capsys, tmp_path / "r", "--format", "json")
    assert math.isnan(json.loads(out)[0]["m"])


def test_a_run_folder_and_its_results_folder_order_alike(run_dir, capsys):
    orders = []
    for where in (run_dir, run_dir / "results"):
        _, out, _ = show(capsys, where, "--by", "accuracy", "--top", "5", "--format", "json")
        orders.append([r["candidate_id"] for r in json.loads(out)])
    assert orders[0] == orders[1] == [30, 31, 28, 32, 27]


def test_results_that_record_their_objective_order_best_first_anywhere(tmp_path, capsys):
    """A results folder moved away from its run (no config beside it) still knows its objective and mode."""
    from sweep.sinks.parquet import MODE_KEY, OBJECTIVE_KEY

    schema = results_schema({}, ["loss", "accuracy"])
    sink = ParquetSink(str(tmp_path / "moved"), schema, metadata={OBJECTIVE_KEY: "accuracy", MODE_KEY: "max"})
    sink.write(pa.table({"candidate_id": pa.array([0, 1, 2], pa.int64()), "status": ["ok"] * 3, "error": [None] * 3,
                         "loss": [0.5, 0.1, 0.9], "accuracy": [0.2, 0.9, 0.5], "worker": ["w"] * 3,
                         "eval_seconds": [0.1] * 3}))
    sink.close({})
    _, out, _ = show(capsys, tmp_path / "moved", "--by", "accuracy", "--format", "json")
    assert [r["candidate_id"] for r in json.loads(out)] == [1, 2, 0]
    _, out, _ = show(capsys, tmp_path / "moved", "--by", "loss", "--format", "json")
    assert [r["candidate_id"] for r in json.loads(out)] == [1, 0, 2]  # not the objective: smallest first


def test_a_misspelt_column_in_where_names_the_columns(run_dir, capsys):
    code, _, err = show(capsys, run_dir, "--where", "acuracy > 0.5")
    assert code == 1
    assert "no column 'acuracy' (did you mean 'accuracy'?); columns are candidate_id, status, error, alpha" in err
    assert "Binder" not in err
    code, _, err = show(capsys, run_dir, "--where", "results.lost > 0.5")
    assert code == 1 and "no column 'lost' (did you mean 'loss'?)" in err
    code, _, err = show(capsys, run_dir, "--where", "loss >")
    assert code == 1 and "cannot select with --where 'loss >'" in err


def test_the_help_states_the_order_rule(capsys):
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "best first when it is the run's objective" in help_text and "smallest first for any other column" in help_text
