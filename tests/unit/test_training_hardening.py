"""The training driver's pure parts: which member is best, and how a generation's rows are keyed."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from sweep.model import read_weights_file
from sweep.studies import plan
from sweep.studies.base import StudyContext
from tests.conftest import repo_config
from workers import training
from workers.training import _best, _rows, best_member

REPO = Path(__file__).resolve().parents[2]
INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("mode, want", [("min", 4), ("max", 1)])
def test_non_finite_scores_are_never_best(mode, want):
    scores = {0: -INF, 1: 0.5, 2: NAN, 3: INF, 4: 0.3, 5: None}
    assert best_member(scores, mode) == want
    assert best_member({0: -INF, 1: INF, 2: NAN}, mode) is None
    assert best_member({3: 0.5, 1: 0.5}, mode) == 1  # equal scores: the lowest id


class FakeWorker:
    """Answers `state_dict.remote(member)` as a training worker would (with `ray.get` the identity)."""

    class state_dict:  # noqa: N801 - stands for the actor method
        @staticmethod
        def remote(member):
            return {"w": torch.full((2,), float(member))}


def test_a_minus_inf_loss_is_not_saved_as_best(tmp_path, monkeypatch):
    monkeypatch.setattr(training.ray, "get", lambda value: value)
    study = type("Study", (), {"mode": "min", "objective": "loss"})()
    workers = [FakeWorker(), FakeWorker()]
    owner = {0: 0, 1: 0, 2: 1, 3: 1}
    findings = _best(study, workers, owner, {0: -INF, 1: 0.7, 2: NAN, 3: 0.4}, tmp_path)
    assert findings == {"best_member": 3.0, "best_member_loss": 0.4}
    assert torch.equal(read_weights_file(tmp_path / "best.safetensors")["w"], torch.full((2,), 3.0))
    # nothing finite: no best member, no file
    other = tmp_path / "none"
    other.mkdir()
    assert _best(study, workers, owner, {0: -INF, 1: INF, 2: NAN, 3: NAN}, other) == {}
    assert not (other / "best.safetensors").exists()


def test_rows_find_candidate_id_by_name_in_any_column_order():
    config = repo_config(REPO, "pbt.yaml", **{"study.population": 4, "study.steps": 100, "study.interval": 50})
    study = plan(config.study, StudyContext.from_config(config))
    # a worker's table with `candidate_id` (the member) in the middle, not first
    table = pa.table({
        "status": pa.array(["ok", "invalid"]),
        "loss": pa.array([0.25, None], pa.float64()),
        "candidate_id": pa.array([2, 0], pa.int64()),
        "error": pa.array([None, "bad"], pa.string()),
        "eval_seconds": pa.array([0.1, 0.2], pa.float64()),
    })
    current = {m: {"lr": 0.01 * (m + 1), "momentum": 0.5} for m in range(4)}
    out = _rows(table, 1, study, {0: 0, 1: 1, 2: 3, 3: 3}, current)
    assert out.column_names.count("candidate_id") == 1 and "status" in out.column_names
    rows = out.to_pylist()
    assert [(r["candidate_id"], r["member"], r["generation"], r["parent"], r["step"]) for r in rows] == [
        (4, 0, 1, 0, 100), (6, 2, 1, 3, 100)]
    # every other column stays with its row
    assert [(r["status"], r["loss"], r["error"], r["eval_seconds"], r["lr"]) for r in rows] == [
        ("invalid", None, "bad", 0.2, 0.01), ("ok", 0.25, None, 0.1, 0.03)]
