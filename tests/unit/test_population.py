"""Population training: the vectorised step against a per-member torch.optim loop, exploit as an
exact row copy, explore following Ray Tune's rules, and the training study configs."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sweep.errors import ConfigError
from sweep.examples import digits
from sweep.population import Dimension, Population, exploit_pairs
from sweep.studies import plan
from sweep.studies.base import StudyContext
from tests.conftest import repo_config

REPO = Path(__file__).resolve().parents[2]


def starts(m: int):
    modules = [digits.make_model() for _ in range(m)]
    init = {n: torch.stack([dict(mod.named_parameters())[n].detach() for mod in modules])
            for n, _ in modules[0].named_parameters()}
    return modules, init


def batches(count: int = 7, size: int = 32):
    x, y = digits._arrays("train")
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(count)]


def torch_optimizer(name, module, h):
    if name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=h["lr"], momentum=h.get("momentum", 0.0),
                               weight_decay=h.get("weight_decay", 0.0))
    betas = (h.get("beta1", 0.9), h.get("beta2", 0.999))
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(module.parameters(), lr=h["lr"], betas=betas, eps=h.get("eps", 1e-8),
               weight_decay=h.get("weight_decay", 0.0 if name == "adam" else 0.01))


HYPER = {
    "sgd": {"lr": [0.1, 0.05, 0.3, 0.01], "momentum": [0.9, 0.0, 0.5, 0.99], "weight_decay": [0.0, 1e-3, 1e-2, 0.0]},
    "adam": {"lr": [1e-3, 1e-2, 3e-3, 1e-4], "beta1": [0.9, 0.8, 0.95, 0.5], "beta2": [0.999, 0.99, 0.9, 0.999],
             "weight_decay": [0.0, 1e-3, 0.0, 1e-2]},
    "adamw": {"lr": [1e-3, 1e-2, 3e-3, 1e-4], "weight_decay": [0.0, 0.1, 0.01, 0.5]},
}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_vectorised_step_equals_the_per_member_torch_optim_loop(name):
    torch.manual_seed(0)
    modules, init = starts(4)
    data = batches()
    hyper = {**HYPER[name], "label_smoothing": [0.0, 0.1, 0.0, 0.2]}
    population = Population(digits.make_model(), range(4), init, name, hyper, data, digits.loss)
    population.train(3)
    grads = {}
    population_grads = population.gradients(*data[3])
    population.train(9)  # 12 steps: the batches cycle (7 of them)
    for i, module in enumerate(modules):
        module = copy.deepcopy(module).train()
        h = {k: v[i] for k, v in hyper.items()}
        opt = torch_optimizer(name, module, h)
        for t in range(12):
            x, y = data[t % len(data)]
            opt.zero_grad()
            digits.loss(module(x), y, label_smoothing=h["label_smoothing"]).backward()
            if t == 3:
                grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            opt.step()
        for n, p in module.named_parameters():
            assert torch.allclose(p.detach(), population.params[n][i], rtol=1e-5, atol=1e-5), (name, n, i)
            # Same gradients at step 4, too (before the optimiser's arithmetic).
            assert torch.allclose(grads[n], population_grads[n][i], rtol=1e-4, atol=1e-6), (name, n, i)
        assert int(population.state["step"][i, 0]) == 12


def test_exploit_copies_weights_and_optimiser_state_exactly():
    _, init = starts(3)
    data = batches()
    hyper = {"lr": [0.1, 0.01, 0.2], "momentum": [0.9, 0.5, 0.0]}
    population = Population(digits.make_model(), [10, 11, 12], init, "sgd", hyper, data, F.cross_entropy)
    population.train(4)
    population.copy(donor=10, receiver=12)
    for table in (population.params, population.state, population.hyper):
        for name, t in table.items():
            assert torch.equal(t[2], t[0]), name
    assert not torch.equal(population.params["0.weight"][1], population.params["0.weight"][0])
    # The copy trains on exactly as the donor does.
    population.train(3)
    for name, t in population.params.items():
        assert torch.equal(t[2], t[0]), name

    # Across populations (another worker): export, then load.
    _, other_init = starts(2)
    other = Population(digits.make_model(), [0, 1], other_init, "sgd", {"lr": [0.5, 0.5], "momentum": [0.1, 0.1]},
                       data, F.cross_entropy)
    other.load(1, population.export([11])[0])
    for name in population.params:
        assert torch.equal(other.params[name][1], population.params[name][1])
    for name in population.state:
        assert torch.equal(other.state[name][1], population.state[name][1])
    assert other.hyper_of(1)["lr"] == pytest.approx(0.01) and other.hyper_of(0)["lr"] == pytest.approx(0.5)


def test_explore_follows_ray_tunes_rules_statistically():
    rng = np.random.default_rng(123)
    lr = Dimension("lr", "loguniform", 1e-3, 1.0)
    n = 20_000
    resampled = up = down = 0
    for _ in range(n):
        new = lr.explore(0.01, rng, [1.2, 0.8], 0.25)
        if math.isclose(new, 0.012):
            up += 1
        elif math.isclose(new, 0.008):
            down += 1
        else:
            resampled += 1
            assert 1e-3 <= new <= 1.0
    sd = math.sqrt(n * 0.25 * 0.75)
    assert abs(resampled - 0.25 * n) < 4 * sd
    assert abs(up - down) < 4 * math.sqrt(n * 0.75 * 0.25)

    # Integers are rounded after the factor, as Ray Tune does; choices move to a neighbour or resample.
    layers = Dimension("layers", "int", 1, 8)
    assert {layers.explore(5, rng, [1.2, 0.8], 0.0) for _ in range(200)} == {6.0, 4.0}
    width = Dimension("width", "choice", values=(16, 32, 64, 128))
    moves = [width.explore(32.0, rng, [1.2, 0.8], 0.0) for _ in range(4000)]
    assert set(moves) == {16.0, 64.0} and abs(moves.count(16.0) - 2000) < 4 * math.sqrt(1000)
    assert {width.explore(128.0, rng, [1.2, 0.8], 0.0) for _ in range(200)} == {64.0, 128.0}  # clamped at the end
    always = [width.explore(32.0, rng, [1.2, 0.8], 1.0) for _ in range(4000)]
    assert set(always) == {16.0, 32.0, 64.0, 128.0}
    # Ray Tune does not clip; clip keeps values in range.
    momentum = Dimension("momentum", "uniform", 0.0, 0.99)
    assert momentum.explore(0.95, np.random.default_rng(0), [1.2], 0.0) == pytest.approx(1.14)
    assert momentum.explore(0.95, np.random.default_rng(0), [1.2], 0.0, clip=True) == 0.99


class Scripted:
    """Hands `Dimension.explore` decisions drawn by the test: resample or not, the factor, the resampled value."""

    def __init__(self, resample: bool, value: int):
        self.resample, self.value = resample, value

    def random(self) -> float:
        return 0.0 if self.resample else 1.0

    def integers(self, low: int, high: Optional[int] = None) -> int:
        return self.value if high is not None else 0  # a resample's value, else the only factor


def test_integer_explore_walks_as_ray_tunes_explore():
    """200-step walks of an integer through our explore and Ray Tune 2.60's `_explore`, fed the
    same decisions at every step (resample or which factor, and the resampled value), stay equal."""
    from ray.tune.schedulers.pbt import _explore

    layers = Dimension("layers", "int", 1, 8)
    decisions = np.random.default_rng(11)
    saved = random.getstate()  # Ray's explore draws from the global `random`: leave it as it was
    try:
        for resample_probability in (0.0, 0.25):
            ends, rose_from_3 = set(), False
            for start in range(1, 9):
                for _ in range(20):
                    ours = theirs = start
                    for _ in range(200):
                        resample = bool(decisions.random() < resample_probability)
                        factor = (1.2, 0.8)[int(decisions.integers(2))]
                        value = int(decisions.integers(1, 9))
                        new = layers.explore(float(ours), Scripted(resample, value), [factor], 0.5)
                        theirs = _explore({"layers": theirs}, {"layers": lambda: value}, float(resample),
                                          (factor,), None)[0]["layers"]
                        assert new == theirs and isinstance(theirs, int), (ours, factor, resample, new, theirs)
                        rose_from_3 |= ours == 3 and new == 4
                        ours = theirs
                    ends.add(ours)
            assert rose_from_3  # truncation kept 3 × 1.2 at 3: small integers could never rise
            if resample_probability == 0.0:
                # Without resampling a walk drifts down (1.2 · 0.8 < 1) and stops at 2, or stays at 1:
                # never at 0, below `low`, where truncation took every start.
                assert min(ends) == 1 and 2 in ends and 0 not in ends
            assert min(ends) >= 1
    finally:
        random.setstate(saved)


def test_integer_explore_rounds_half_to_even_like_ray_tune():
    from ray import tune
    from ray.tune.schedulers.pbt import _explore

    layers = Dimension("layers", "int", 0, 100)
    saved = random.getstate()
    try:
        for value, factor, want in [(3, 1.2, 4), (2, 0.8, 2), (3, 0.8, 2), (4, 1.2, 5), (1, 0.8, 1),
                                    (5, 0.9, 4), (7, 0.5, 4), (5, 0.5, 2), (1, 0.5, 0)]:  # x.5 to the even side
            got = layers.explore(float(value), np.random.default_rng(0), [factor], 0.0)
            theirs = _explore({"n": value}, {"n": tune.randint(0, 101)}, 0.0, (factor,), None)[0]["n"]
            assert got == theirs == want, (value, factor, got, theirs)
    finally:
        random.setstate(saved)
    # clip keeps a rounded value within [low, high]
    assert Dimension("n", "int", 3, 8).explore(3.0, np.random.default_rng(0), [0.8], 0.0) == 2.0
    assert Dimension("n", "int", 3, 8).explore(3.0, np.random.default_rng(0), [0.8], 0.0, clip=True) == 3.0


def test_exploit_pairs_quantiles_nan_and_random_ties():
    rng = np.random.default_rng(0)
    scores = {m: float(m) for m in range(10)}
    pairs = exploit_pairs(scores, 0.25, "max", rng)
    assert sorted(r for r, _ in pairs) == [0, 1, 2]  # ceil(10 · 0.25) = 3 worst
    assert all(d in (7, 8, 9) for _, d in pairs)
    assert sorted(r for r, _ in exploit_pairs(scores, 0.25, "min", rng)) == [7, 8, 9]
    assert len(exploit_pairs({0: 1.0, 1: 2.0, 2: 3.0}, 0.5, "max", rng)) == 1  # at most half
    with_nan = {0: float("nan"), 1: 0.9, 2: 0.5, 3: 0.7}
    assert [r for r, _ in exploit_pairs(with_nan, 0.25, "max", rng)] == [0]
    # Equal scores: who lands in the bottom is random, not the first or last by position.
    counts = np.zeros(8)
    for _ in range(2000):
        for receiver, donor in exploit_pairs({m: 0.5 for m in range(8)}, 0.25, "max", rng):
            counts[receiver] += 1
            assert donor != receiver
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def load(file: str, drop=(), **changes):
    return repo_config(REPO, file, tuple(drop), **changes)


def context(config):
    return StudyContext.from_config(config)


def test_pbt_plan_is_reproducible_and_explores_from_the_donor():
    config = load("pbt.yaml")
    a, b = plan(config.study, context(config)), plan(config.study, context(config))
    assert a.population == b.population and len(a) == 16 * 20
    for study in (a, b):
        study.bind("accuracy", "max", ["loss", "accuracy"])
    scores = {m: 0.5 + 0.01 * m for m in range(16)}
    hyper = {m: {"lr": 0.01 * (m + 1), "momentum": 0.5} for m in range(16)}
    moves_a, moves_b = a.next_generation(scores, hyper), b.next_generation(scores, hyper)
    assert moves_a == moves_b and len(moves_a) == 4
    for receiver, donor, values in moves_a:
        assert receiver in range(4) and donor in range(12, 16)
        assert set(values) == {"lr", "momentum"}


def test_search_grid_trains_every_combination():
    asks_16 = load("search.yaml", **GRID)
    with pytest.raises(ConfigError, match="study.population: the grid has 6 combinations"):
        plan(asks_16.study, context(asks_16))
    config = load("search.yaml", drop=["population"], **GRID)
    study = plan(config.study, context(config))
    assert study.population.size == 6 and len(study) == 6 * 20
    values = study.population.hyper
    pairs = sorted(zip(values["lr"], values["momentum"]))
    assert pairs == sorted((lr, m) for lr in (0.01, 0.1, 1.0) for m in (0.0, 0.9))
    assert not study.exploit


GRID = {"study.method": "grid",
        "study.hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.01, "high": 1.0, "num": 3},
                                  "momentum": {"distribution": "choice", "values": [0.0, 0.9]}}}


@pytest.mark.parametrize("changes, field", [
    ({"study.hyperparameters": {"dropout_rate": 0.1}}, "study.hyperparameters.dropout_rate"),
    ({"study.steps": 1001}, "interval"),
    ({"study.hyperparameters": {"lr": {"distribution": "loguniform", "low": 0.0, "high": 1.0}}}, "loguniform"),
    ({"model.factory": "sweep.examples.models:cnn"}, "BatchNorm2d"),
])
def test_training_configs_fail_before_any_work_naming_the_field(changes, field):
    with pytest.raises((ConfigError, ValueError)) as e:
        config = load("pbt.yaml", **changes)
        plan(config.study, context(config))
    assert field in str(e.value)


def test_tied_weights_train_as_one_tensor():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(4, 4, bias=False)
            self.out = torch.nn.Linear(4, 4, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.relu(self.emb(x)))

    torch.manual_seed(0)
    module = Tied()
    init = {n: torch.stack([p.detach(), p.detach() * 0.5]) for n, p in module.named_parameters()}
    assert list(init) == ["emb.weight"]
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    population = Population(module, [0, 1], init, "sgd", {"lr": [0.1, 0.2]}, [(x, y)], F.cross_entropy)
    population.train(3)
    for i, lr in enumerate((0.1, 0.2)):
        ref = Tied()
        ref.emb.weight.data.copy_(init["emb.weight"][i])
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
        assert torch.allclose(ref.emb.weight.detach(), population.params["emb.weight"][i], atol=1e-6)
