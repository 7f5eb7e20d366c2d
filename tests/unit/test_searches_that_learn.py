"""Searches that learn, without Ray: members leaving and restarting in the stacked population, the rungs of
successive halving, Optuna's ask/tell over waves, and PB2's bandit.

The search study is driven here as the driver drives it (batches, a round's rows settled, `WAIT`), with
the rows made up from each trial's values so that what the study decides can be checked by hand.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch

from sweep.errors import ConfigError
from sweep.examples import digits
from sweep.model import build_module
from sweep.population import MODEL_START, Dimension, PopulationPlan, Train, start_population, train_round
from sweep.studies import plan
from sweep.studies._halving import HalvingConfig, Rungs
from sweep.studies._pb2 import PB2Explore
from sweep.studies.base import StudyContext, Wait
from tests.conftest import repo_config

REPO = Path(__file__).resolve().parents[2]


def factory(seed: int) -> torch.nn.Module:
    return build_module("sweep.examples.digits:make_model", seed=seed)


def train_alone(seed: int, lr: float, momentum: float, steps: int, data) -> Dict[str, torch.Tensor]:
    """One member trained by itself with torch.optim.SGD from the factory's start under `seed`."""
    module = factory(seed)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    for t in range(steps):
        x, y = data[t % len(data)]
        opt.zero_grad()
        digits.loss(module(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------- the population: stop and restart

def small_plan(size: int = 4) -> PopulationPlan:
    return PopulationPlan(size=size, optimizer="sgd", loss="sweep.examples.digits:loss",
                          loader="sweep.examples.digits:train_batches", loader_kwargs={"epochs": 1},
                          hyper={"lr": [0.1, 0.2, 0.05, 0.3][:size], "momentum": [0.5, 0.0, 0.9, 0.3][:size]},
                          seeds=[10, 11, 12, 13][:size])


def test_stopped_members_leave_the_stacked_rows_and_the_others_train_as_they_would_alone():
    data = digits.train_batches(epochs=1)
    population = start_population(small_plan(), [0, 1, 2, 3], digits.make_model(), torch.device("cpu"), factory)
    population.train(3)
    population.retain([1, 3])
    assert population.ids == [1, 3] and population.flat.shape[0] == 2
    assert all(s.shape[0] == 2 for s in population.state.values()) and population.hyper["lr"].shape == (2, 1)
    population.train(4)
    for member, seed, lr, momentum in ((1, 11, 0.2, 0.0), (3, 13, 0.3, 0.3)):
        want = train_alone(seed, lr, momentum, 7, data)
        for name, p in population.params.items():
            torch.testing.assert_close(p[population.index[member]], want[name], rtol=1e-5, atol=1e-6)
    # One member left: its steps go without vmap, to the same weights.
    population.retain([3])
    population.train(3)
    want = train_alone(13, 0.3, 0.3, 10, data)
    for name, p in population.params.items():
        torch.testing.assert_close(p[0], want[name], rtol=1e-5, atol=1e-6)


def test_a_restarted_member_is_a_new_trial_from_its_seed_and_a_new_slot_grows_the_rows():
    data = digits.train_batches(epochs=1)
    population = start_population(small_plan(2), [0, 1], digits.make_model(), torch.device("cpu"), factory)
    population.train(5)
    population.retain([0])
    # Member 0 starts afresh from seed 21, member 1 (gone) comes back from seed 22: every member restarts,
    # so the batches start from the first again.
    population.restart({0: 21, 1: 22})
    population.set_hyper(0, {"lr": 0.07, "momentum": 0.8})
    population.set_hyper(1, {"lr": 0.02, "momentum": 0.1})
    assert population.ids == [0, 1] and population.steps_done == 0
    assert all(float(s.abs().sum()) == 0.0 for s in population.state.values())
    population.train(6)
    for member, seed, lr, momentum in ((0, 21, 0.07, 0.8), (1, 22, 0.02, 0.1)):
        want = train_alone(seed, lr, momentum, 6, data)
        for name, p in population.params.items():
            torch.testing.assert_close(p[population.index[member]], want[name], rtol=1e-5, atol=1e-6)


def test_a_round_with_retire_and_starts_drops_and_restarts_before_training():
    from sweep.evaluator import Evaluator

    module = digits.make_model()
    evaluator = Evaluator(module, digits.eval_batches(), digits.metrics, chunk_size=4)
    population = start_population(small_plan(), [0, 1, 2, 3], evaluator.module, torch.device("cpu"), factory)
    source = Train(members=[2, 0], donors=[None, None], hyper=[{"lr": 0.01}, None], steps=[2, 2],
                   starts=[31, None], retire=True)
    table = train_round(population, evaluator, [5, 6], source)
    assert sorted(population.ids) == [0, 2] and table.column("candidate_id").to_pylist() == [5, 6]
    # Without retire a batch that leaves members out is refused, as before.
    with pytest.raises(ValueError, match="the batch names members"):
        train_round(population, evaluator, [7], Train([2], [None], [None], [1]))
    # The module's own weights as a start.
    population.restart({0: MODEL_START})
    own = dict(evaluator.module.named_parameters())
    for name, p in population.params.items():
        assert torch.equal(p[population.index[0]], own[name].detach())


# --------------------------------------------------------------------------- rungs and brackets

def test_rungs_lie_at_min_steps_times_eta_to_the_k_and_keep_the_best_fraction():
    rungs = Rungs(HalvingConfig(reduction_factor=3, min_steps=20), steps=500, interval=10, size=27)
    assert rungs.steps == [20, 60, 180] and rungs.bracket == [0] * 27
    scores = {m: float(m) for m in range(9)} | {9: math.nan}
    decided = {d.member: d for d in rungs.decide(0, 1, scores, "max")}
    assert sorted(m for m, d in decided.items() if d.goes_on) == [6, 7, 8]
    assert decided[9].reason == "rung 1 (60 steps): 10th of 10 in bracket 0; the best 3 go on"
    low = {d.member for d in rungs.decide(0, 1, scores, "min") if d.goes_on}
    assert low == {0, 1, 2}, "NaN ranks last whatever the mode"
    pair = rungs.decide(0, 0, {4: 1.0, 5: 0.5}, "max")
    assert [d.goes_on for d in pair] == [True, False], "at least one"
    assert pair[1].reason == "rung 0 (20 steps): 2nd of 2 in bracket 0; only the best goes on"
    # 27 → 9 → 3 → 1 over 50 evaluations: the rows one wave gives, counted by hand.
    assert rungs.rows(10, 500) == 27 * 2 + 9 * 4 + 3 * 12 + 1 * 32


def test_hyperband_brackets_start_later_and_take_members_as_hyperband_sizes_them():
    rungs = Rungs(HalvingConfig(reduction_factor=2, min_steps=10, brackets=3), steps=80, interval=10, size=20)
    assert rungs.steps == [10, 20, 40]
    counts = [rungs.bracket.count(b) for b in range(3)]
    # n_b ∝ η^s / (s + 1) for s = 3, 2, 1 rungs: 2, 1.33, 1 → 8.6, 5.7, 4.3 of 20 by largest remainder.
    assert counts == [9, 6, 5] and rungs.bracket == sorted(rungs.bracket)
    assert rungs.rung_at(0, 10) == 0 and rungs.rung_at(1, 10) is None and rungs.rung_at(1, 20) == 1
    assert rungs.rung_at(2, 40) == 2 and rungs.rung_at(2, 80) is None


@pytest.mark.parametrize("halving, message", [
    ({"min_steps": 25}, "must be a multiple of interval"),
    ({"min_steps": 1000}, "must be below steps"),
    ({"brackets": 9}, "9 brackets need 8 rungs"),
])
def test_a_halving_that_cannot_work_fails_before_any_work_naming_the_field(halving, message):
    config = repo_config(REPO, "search.yaml", **{"study.halving": halving})
    with pytest.raises(ConfigError, match=f"study.halving.*{message}"):
        plan(config.study, StudyContext.from_config(config))


# --------------------------------------------------------------------------- the study driven as the driver does

def drive(study, value: Callable[[Dict[str, float], int, int], float], fail: Callable[[int, int], bool] = None
          ) -> List[Dict]:
    """Run `study`'s rounds as the driver does: each batch's rows (objective `value(values, step, trial)`;
    'failed' where `fail(trial, step)`), settled, observed; every row returned."""
    study.bind("accuracy", "max", ["loss", "accuracy"])
    rows = []
    for batch in study.batches(study.default_batch_size):
        if isinstance(batch, Wait):
            continue
        n = len(batch)
        trials = batch.columns.get("trial", batch.columns["member"])
        names = study.hyper_names
        values = [value({k: batch.columns[k][i] for k in names}, batch.columns["step"][i], trials[i]) for i in range(n)]
        failed = [bool(fail and fail(trials[i], batch.columns["step"][i])) for i in range(n)]
        table = pa.table({"candidate_id": pa.array(batch.ids, pa.int64()),
                          "status": ["failed" if f else "ok" for f in failed],
                          "accuracy": [None if f else v for f, v in zip(failed, values)],
                          **{k: v for k, v in batch.columns.items()}})
        table = study.settle(table)
        study.observe(table)
        rows.extend(table.to_pylist())
    return rows


def search(**changes):
    config = repo_config(REPO, "search.yaml", **changes)
    return plan(config.study, StudyContext.from_config(config))


def peak(values, step, trial):
    """Accuracy rising with steps, best where lr is near 0.1 (whatever the momentum)."""
    return (1 - math.exp(-step / 200)) * math.exp(-abs(math.log10(values["lr"]) + 1))


def test_random_search_with_halving_stops_the_worst_at_each_rung_and_their_rows_stop_there():
    study = search(**{"study.population": 32, "study.steps": 400, "study.interval": 50,
                      "study.halving": {"reduction_factor": 4, "min_steps": 50}})
    rows = drive(study, peak)
    assert len(rows) == len(study) == 32 + 8 * 3 + 2 * 4
    last_step = {}
    for r in rows:
        last_step[r["member"]] = max(last_step.get(r["member"], 0), r["step"])
    stopped = [r for r in rows if r["stopped"]]
    assert len(stopped) == 30 and sum(s == 400 for s in last_step.values()) == 2
    for r in stopped:  # a member's last row is the one that says why it stopped
        assert r["step"] == last_step[r["member"]] and r["rung"] is not None
    # At rung 0 the 8 best go on, by the objective at 50 steps.
    first = sorted((r for r in rows if r["step"] == 50), key=lambda r: -r["accuracy"])
    assert {r["member"] for r in first[:8]} == {r["member"] for r in rows if r["step"] == 100}
    assert all(r["stopped"].startswith("rung 0 (50 steps): ") for r in first[8:])
    summary = study.summarise()
    assert summary["trials_stopped"] == 30 and summary["trials_finished"] == 2
    assert summary["member_steps"] == 32 * 50 + 8 * 150 + 2 * 200
    finals = {r["member"]: r["accuracy"] for r in rows if r["step"] == 400}
    assert summary["best_trial"] == max(finals, key=finals.get)
    assert study.saved_members() == {"best.safetensors": int(summary["best_trial"])}


def test_waves_of_random_trials_restart_every_slot_from_its_trial_s_seed():
    study = search(**{"study.population": 4, "study.trials": 10, "study.steps": 100, "study.interval": 50})
    assert study.sizes == [4, 4, 2]
    seen = []
    study.bind("accuracy", "max", ["accuracy"])
    for batch in study.batches(4):
        if isinstance(batch, Wait):
            continue
        seen.append(batch)
        n = len(batch)
        table = pa.table({"candidate_id": pa.array(batch.ids, pa.int64()), "status": ["ok"] * n,
                          "accuracy": [0.5] * n, **batch.columns})
        study.observe(study.settle(table))
    assert [b.columns["trial"] for b in seen[::2]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert seen[0].source.starts is None and seen[1].source.starts is None
    assert seen[2].source.starts == [4, 5, 6, 7] and seen[4].source.starts == [8, 9]
    assert seen[3].source.starts is None, "only a wave's first round restarts"
    # The later waves' values are the random draws in trial order, set in the first round of the wave.
    assert [h["lr"] for h in seen[2].source.hyper] == [study.draws[t]["lr"] for t in range(4, 8)]
    assert seen[3].source.hyper == [None] * 4
    ids = [i for b in seen for i in b.ids.tolist()]
    assert len(set(ids)) == len(ids) == len(study) == 20


@pytest.mark.parametrize("name", ["RandomSampler", "GPSampler", "QMCSampler", "NSGAIISampler"])
def test_any_optuna_sampler_by_name_proposes_the_waves(name):
    optuna = pytest.importorskip("optuna")
    study = search(**{"study.method": "optuna", "study.population": 3, "study.trials": 6, "study.steps": 100,
                      "study.interval": 50, "study.sampler": {"name": name}})
    rows = drive(study, peak)
    assert type(study.proposals.study.sampler) is getattr(optuna.samplers, name)
    assert sorted({r["trial"] for r in rows}) == list(range(6)) and len(rows) == 12
    assert [t.state.name for t in study.proposals.study.trials] == ["COMPLETE"] * 6


def test_optuna_tpe_is_asked_by_waves_told_each_end_and_reported_every_value(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = search(**{"study.method": "optuna", "study.population": 8, "study.trials": 24, "study.steps": 200,
                      "study.interval": 50, "study.storage": storage, "study.study_name": "digits",
                      "study.halving": {"reduction_factor": 2, "min_steps": 50}})
    rows = drive(study, peak, fail=lambda trial, step: trial == 9 and step == 100)
    kept = optuna.load_study(study_name="digits", storage=storage)
    trials = {t.number: t for t in kept.trials}
    assert sorted(trials) == list(range(24))
    ends = {}
    for r in rows:
        ends[r["trial"]] = r
    for number, t in trials.items():
        end = ends[number]
        if number == 9:
            assert t.state.name == "FAIL"
        elif end["stopped"]:
            assert t.state.name == "PRUNED" and t.intermediate_values[end["step"]] == pytest.approx(end["accuracy"])
        else:
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(end["accuracy"]) and end["step"] == 200
        reported = {r["step"]: r["accuracy"] for r in rows if r["trial"] == number and r["status"] == "ok"}
        assert t.intermediate_values == pytest.approx(reported)
        assert t.params["lr"] == pytest.approx(end["lr"])
    # The sampler learnt: the last wave's proposals lie nearer the best lr (0.1) than the first wave's.
    def spread(wave):
        return np.median([abs(math.log10(r["lr"]) + 1) for r in rows if r["wave"] == wave and r["step"] == 50])
    assert spread(2) < spread(0)


def test_optuna_s_absence_and_an_unknown_sampler_are_config_errors_naming_the_fix(monkeypatch):
    pytest.importorskip("optuna")
    with pytest.raises(ConfigError, match="study.sampler.name: no Optuna sampler 'TPE'; .* TPESampler"):
        search(**{"study.method": "optuna", "study.sampler": {"name": "TPE"}})
    with pytest.raises(ConfigError, match="study.sampler: BruteForceSampler cannot propose this search's space"):
        search(**{"study.method": "optuna", "study.sampler": {"name": "BruteForceSampler"}})
    with pytest.raises(ConfigError, match=r"study.sampler: GridSampler\(seed=0\) failed: .*search_space"):
        search(**{"study.method": "optuna", "study.sampler": {"name": "GridSampler"}})
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"optuna needs the optuna extra.*pip install 'sweep\[optuna\]'"):
        search(**{"study.method": "optuna"})
    with pytest.raises(ConfigError, match="sampler is for method optuna"):
        search(**{"study.sampler": {"name": "TPESampler"}})


# --------------------------------------------------------------------------- PB2

def test_pb2_proposes_where_the_improvement_was_largest_and_spreads_a_round_s_receivers():
    dims = {"lr": Dimension("lr", "loguniform", 1e-3, 1.0), "momentum": Dimension("momentum", "uniform", 0.0, 0.99)}
    rng = np.random.default_rng(0)
    pb2 = PB2Explore(dims, "max", rng)
    # Improvement is largest at lr = 0.03, momentum = 0.5 (unit point ≈ (0.49, 0.51)).
    for t in range(1, 9):
        hyper = {m: {"lr": float(np.exp(rng.uniform(np.log(1e-3), 0))), "momentum": float(rng.uniform(0, 0.99))}
                 for m in range(16)}
        start = {m: 0.5 for m in range(16)}
        end = {m: 0.5 + 0.1 * math.exp(-8 * float(np.sum((pb2.unit(h) - [0.49, 0.51]) ** 2))) for m, h in hyper.items()}
        pb2.observe(t, start, end, hyper)
    proposed = pb2.propose(9, [0.55, 0.55, 0.55], [])
    first = pb2.unit(proposed[0])
    assert np.linalg.norm(first - [0.49, 0.51]) < 0.2
    # Each chosen point joins the running ones: the next receivers do not take the same values.
    points = [pb2.unit(p) for p in proposed]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(points) for b in points[i + 1:]) > 1e-3


def test_pb2_in_a_pbt_config_refuses_a_choice_and_explores_from_its_bandit():
    config = repo_config(REPO, "pbt.yaml", **{"study.explore": "pb2",
                                              "study.hyperparameters.momentum": {"distribution": "choice",
                                                                                 "values": [0.0, 0.9]}})
    with pytest.raises(ConfigError, match="study.hyperparameters.momentum: PB2 searches continuous"):
        plan(config.study, StudyContext.from_config(config))
    config = repo_config(REPO, "pbt.yaml", **{"study.explore": "pb2"})
    study = plan(config.study, StudyContext.from_config(config))
    study.bind("accuracy", "max", ["accuracy"])
    hyper = {m: {"lr": 0.01 * (m + 1), "momentum": 0.5} for m in range(16)}
    for g in range(3):
        scores = {m: 0.5 + 0.01 * m * (g + 1) for m in range(16)}
        moves = study.next_generation(scores, hyper)
        assert len(moves) == 4 and all(donor >= 12 for _, donor, _ in moves)
        for receiver, donor, values in moves:
            assert 1e-3 <= values["lr"] <= 1.0 and 0.0 <= values["momentum"] <= 0.99
            hyper[receiver] = values
    assert len(study.pb2.rows) == 2 * 16, "two intervals observed after three generations"
