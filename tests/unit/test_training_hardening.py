"""Population training without Ray: which member is best and what is saved, how a generation's rows are
keyed (the study's rounds), and one worker's round (exploit, explore, train, evaluate)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from sweep.evaluator import Evaluator
from sweep.examples import digits
from sweep.model import build_module, read_weights_file
from sweep.population import PopulationPlan, Train, shards, start_population, train_round
from sweep.studies import plan
from sweep.studies._training import best_member
from sweep.studies.base import CandidateBatch, StudyContext, Wait
from tests.conftest import repo_config
from workers.driver import save_members

REPO = Path(__file__).resolve().parents[2]
INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("mode, want", [("min", 4), ("max", 1)])
def test_non_finite_scores_are_never_best(mode, want):
    scores = {0: -INF, 1: 0.5, 2: NAN, 3: INF, 4: 0.3, 5: None}
    assert best_member(scores, mode) == want
    assert best_member({0: -INF, 1: INF, 2: NAN}, mode) is None
    assert best_member({3: 0.5, 1: 0.5}, mode) == 1  # equal scores: the lowest id


def study_of(file: str = "pbt.yaml", **changes):
    config = repo_config(REPO, file, **{"study.population": 4, "study.steps": 100, "study.interval": 50, **changes})
    return plan(config.study, StudyContext.from_config(config))


def rows(batch: CandidateBatch, objective: str, scores: Dict[int, float], status: Dict[int, str] = {}) -> pa.Table:
    """What the workers give back for `batch`: its columns with `scores` (by member) as the objective."""
    members = batch.columns["member"]
    return pa.table({
        "candidate_id": pa.array(batch.ids, pa.int64()),
        "status": pa.array([status.get(m, "ok") for m in members]),
        **{name: pa.array(values) for name, values in batch.columns.items()},
        objective: pa.array([scores[m] for m in members], pa.float64()),
    })


def drive(study, objective: str, scores_of: List[Dict[int, float]]) -> List[CandidateBatch]:
    """Run the study's rounds as an executor would: each batch's rows observed, in halves (two shards)."""
    batches = []
    for item in study.batches(1):
        if isinstance(item, Wait):
            continue
        batches.append(item)
        table = rows(item, objective, scores_of[len(batches) - 1])
        study.observe(table.slice(2))
        study.observe(table.slice(0, 2))
    return batches


def test_a_minus_inf_loss_is_not_saved_as_best(tmp_path):
    study = study_of()
    study.bind("loss", "min", ["loss", "accuracy"])
    drive(study, "loss", [{m: 1.0 for m in range(4)}, {0: -INF, 1: 0.7, 2: NAN, 3: 0.4}])
    assert study.summarise() == {"best_member": 3.0, "best_member_loss": 0.4}
    assert study.saved_members() == {"best.safetensors": 3}
    save_members(study.saved_members(),
                 lambda member, metadata: save({"w": torch.full((2,), float(member))}, metadata=metadata), tmp_path)
    saved = read_weights_file(tmp_path / "best.safetensors")
    assert torch.equal(saved["w"], torch.full((2,), 3.0))
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as f:
        assert f.metadata() == {"member": "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]  # no temporary file left
    # nothing finite: no best member, no file
    other = study_of()
    other.bind("loss", "min", ["loss"])
    drive(other, "loss", [{m: 1.0 for m in range(4)}, {0: -INF, 1: INF, 2: NAN, 3: NAN}])
    assert other.summarise() == {} and other.saved_members() == {}


def test_generations_are_keyed_and_exploits_decided_from_the_rows_of_the_last():
    study = study_of(**{"study.quantile": 0.25})
    study.bind("accuracy", "max", ["loss", "accuracy"])
    first = {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.6}
    batches = drive(study, "accuracy", [first, {m: 0.5 for m in range(4)}])
    assert len(batches) == study.generations == 2
    g0, g1 = batches
    assert list(g0.ids) == [0, 1, 2, 3] and list(g1.ids) == [4, 5, 6, 7]
    assert g0.columns["generation"] == [0] * 4 and g1.columns["generation"] == [1] * 4
    assert g0.columns["step"] == [50] * 4 and g1.columns["step"] == [100] * 4
    assert g0.columns["parent"] == [0, 1, 2, 3] and g0.source.donors == [None] * 4
    # ceil(4 · 0.25) = 1: the worst member (1) takes the best one's (0) weights and explores its values.
    assert g1.columns["parent"] == [0, 0, 2, 3] and g1.source.donors == [None, 0, None, None]
    explored = g1.source.hyper[1]
    assert set(explored) == {"lr", "momentum"} and g1.source.hyper[0] is None
    assert g1.columns["lr"][1] == explored["lr"] and g1.columns["momentum"][1] == explored["momentum"]
    assert [g1.columns["lr"][m] for m in (0, 2, 3)] == [g0.columns["lr"][m] for m in (0, 2, 3)]
    assert g0.source.steps == g1.source.steps == [50] * 4
    # A shard's part of a round keeps its members, their ids, columns and what happens to them.
    part = g1.slice(0, 2)
    assert list(part.ids) == [4, 5] and part.source.members == [0, 1] and part.source.donors == [None, 0]
    assert part.columns["parent"] == [0, 0]


def test_a_search_never_exploits_and_refuses_to_skip():
    study = study_of("search.yaml")
    study.bind("accuracy", "max", ["accuracy"])
    batches = drive(study, "accuracy", [{0: 0.9, 1: 0.1, 2: 0.5, 3: 0.6}, {m: 0.5 for m in range(4)}])
    assert all(b.columns["parent"] == b.columns["member"] for b in batches)
    assert all(d is None for b in batches for d in b.source.donors)
    assert not study.resumable and "workers" in study.not_resumable
    with pytest.raises(ValueError, match="cannot skip"):
        next(study.batches(1, skip=frozenset({0})))


def test_the_plan_carries_the_member_seeds_and_shards_are_contiguous():
    study = study_of()
    assert study.population.seeds == [m for m in range(4)]  # seed 0 · 2^32 + m
    assert study_of(**{"study.seed": 3}).population.seeds == [3 * 2**32 + m for m in range(4)]
    assert study_of(**{"study.init": "model"}).population.seeds is None
    assert shards(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert shards(2, 5) == [[0], [1]]
    with pytest.raises(ValueError, match="hyper\\['lr'\\] has 2 values for 3 members"):
        PopulationPlan(size=3, optimizer="sgd", loss="x:y", loader="x:y", hyper={"lr": [0.1, 0.2]})


PLAN = PopulationPlan(size=4, optimizer="sgd", loss="sweep.examples.digits:loss",
                      loader="sweep.examples.digits:train_batches", loader_kwargs={"epochs": 1},
                      hyper={"lr": [0.1, 0.2, 0.05, 0.3], "momentum": [0.5] * 4}, seeds=[10, 11, 12, 13])


def factory(seed: int) -> torch.nn.Module:
    return build_module("sweep.examples.digits:make_model", seed=seed)


def shard(members: List[int]):
    evaluator = Evaluator(digits.make_model(), digits.eval_batches(), digits.metrics, chunk_size=len(members))
    return start_population(PLAN, members, evaluator.module, torch.device("cpu"), factory), evaluator


def test_a_round_takes_donors_here_and_from_elsewhere_then_trains_and_evaluates_under_the_batch_ids():
    held, evaluator = shard([2, 3])
    elsewhere, _ = shard([0, 1])
    # member 3 takes member 0's state (another worker's) with a new lr; member 2 trains on as it is
    source = Train(members=[3, 2], donors=[0, None], hyper=[{"lr": 0.5}, None], steps=[5, 5])
    table = train_round(held, evaluator, np.array([7, 6]), source, imports={0: elsewhere.export([0])[0]})
    assert table.column("candidate_id").to_pylist() == [7, 6]
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert all(s > 0 for s in table.column("eval_seconds").to_pylist())

    # The same by hand: member 0's start with lr 0.5, and member 2's own, 5 steps each.
    want, _ = shard([0, 2])
    want.set_hyper(0, {"lr": 0.5})
    want.train(5)
    for name, p in held.params.items():
        assert torch.equal(p[held.index[3]], want.params[name][0]), name
        assert torch.equal(p[held.index[2]], want.params[name][1]), name
    assert held.hyper_of(3)["lr"] == pytest.approx(0.5) and held.hyper_of(3)["momentum"] == pytest.approx(0.5)
    check = evaluator.run([{n: p[0] for n, p in want.params.items()}], ids=[7])
    assert table.column("loss").to_pylist()[0] == pytest.approx(check.column("loss").to_pylist()[0], rel=1e-6)

    # Within a worker the donor's row is copied on the device.
    copied = Train(members=[2, 3], donors=[None, 2], hyper=[None, None], steps=[1, 1])
    train_round(held, evaluator, [8, 9], copied)
    for name, p in held.params.items():
        assert torch.equal(p[0], p[1]), name


@pytest.mark.parametrize("source, message", [
    (Train([2], [None], [None], [1]), "the batch names members \\[2\\], this worker holds \\[2, 3\\]"),
    (Train([2, 3], [None, None], [None, None], [1, 2]), "steps must be equal"),
    (Train([2, 3], [None, 0], [None, None], [1, 1]), "member 3 takes member 0's weights"),
    (Train([2, 3], [3, 2], [None, None], [1, 1]), "both gives and takes"),
])
def test_a_round_the_worker_cannot_run_says_why(source, message):
    held, evaluator = shard([2, 3])
    with pytest.raises(ValueError, match=message):
        train_round(held, evaluator, list(range(len(source.members))), source)
