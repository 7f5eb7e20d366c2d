"""sweep/chunking.py: the loop or vmap, and the chunk size, chosen from measured rates within the memory bound.

The rates are made up: the module's forward moves a fake clock on by what a chunk of k candidates
"takes" (k = 1 for the per-candidate loop), and the measurement reads that clock.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor

from sweep import chunking
from sweep.chunking import FALLBACK_CHUNK, MAX_MEASURE_SECONDS, MAX_TRIAL_SECONDS, TRIAL_SIZES, choose_chunk_size
from sweep.evaluator import Evaluator

#: What the measurement counts per candidate for the modules below: three copies of the weights
#: (4×1 float32) and two of every submodule output (the module's own, 8×1 float32 on the first batch).
PER_CANDIDATE = 3 * (4 * 1 * 4) + 2 * (8 * 1 * 4)
PLENTY = lambda device: 2**40  # noqa: E731 - memory enough for every trial size


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(torch.nn.Module):
    """x @ w, whose forward moves `clock` on by `loop_seconds` for one candidate, `vmap_seconds(k)` for k."""

    def __init__(self, clock: Clock, loop_seconds: float, vmap_seconds: Callable[[int], float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))
        self.clock, self.loop_seconds, self.vmap_seconds = clock, loop_seconds, vmap_seconds
        self.chunks: List[int] = []  # the k of every vmapped forward

    def forward(self, x):
        if is_batchedtensor(self.w):
            k = get_unwrapped(self.w).shape[0]
            self.chunks.append(k)
            self.clock.now += self.vmap_seconds(k)
        else:
            self.clock.now += self.loop_seconds
        return x @ self.w


def metrics(output, y):
    return {"mse": ((output - y) ** 2).mean()}


def data():
    return [(torch.ones(8, 4), torch.zeros(8, 1)), (torch.ones(8, 4), torch.zeros(8, 1))]


def at_rates(rates: Dict[int, float]) -> Callable[[int], float]:
    """vmap chunks of k that run at rates[k] candidates per second."""
    return lambda k: k / rates[k]


def measure(loop_seconds: float, vmap_seconds: Callable[[int], float], budget=PLENTY):
    clock = Clock()
    module = Timed(clock, loop_seconds, vmap_seconds)
    ev = Evaluator(module, data(), metrics)
    return chunking._measure(ev.trial(), TRIAL_SIZES, clock=clock, budget=budget), module


def test_vmap_wins_and_the_largest_chunk_within_10_percent_of_the_best_is_kept():
    # 512 is fastest; 2048 is within 10% of it (fewer calls); 8192 is not, and its trial ends the search.
    rates = {8: 1_000, 32: 4_000, 128: 10_000, 512: 12_000, 2048: 11_000, 8192: 5_000}
    assert 8192 / rates[8192] > MAX_TRIAL_SECONDS
    (chunk, strategy, reason), module = measure(0.01, at_rates(rates))
    assert (chunk, strategy) == (2048, "vmap")
    assert reason == "vmap chunks of 2048 measured fastest (11,000/s; loop 100/s)"
    assert set(module.chunks) == set(TRIAL_SIZES)


def test_the_loop_wins_when_it_measures_faster():
    (chunk, strategy, reason), _ = measure(0.001, at_rates(dict.fromkeys(TRIAL_SIZES, 500)))
    assert (chunk, strategy) == (FALLBACK_CHUNK, "loop")  # tiny weights: the loop's chunk is capped by FALLBACK_CHUNK
    assert reason == "the per-candidate loop measured faster (1,000/s against 500/s with vmap)"


def test_the_memory_bound_caps_the_trials_and_the_chunk():
    rates = {8: 1_000, 32: 4_000, 128: 10_000, 512: 12_000, 2048: 11_000, 8192: 5_000}
    (chunk, strategy, _), module = measure(0.01, at_rates(rates), budget=lambda device: 40 * PER_CANDIDATE)
    assert (chunk, strategy) == (32, "vmap")
    assert max(module.chunks) == 32, "no chunk beyond the 40 candidates that fit was tried"


def test_the_memory_bound_caps_the_loop_chunk():
    (chunk, strategy, _), module = measure(0.001, at_rates(dict.fromkeys(TRIAL_SIZES, 500)),
                                       budget=lambda device: 100 * PER_CANDIDATE)
    assert (chunk, strategy) == (100, "loop")
    assert max(module.chunks) == 32


def test_a_bound_below_the_smallest_trial_is_the_chunk():
    (chunk, strategy, reason), module = measure(0.01, at_rates(dict.fromkeys(TRIAL_SIZES, 1_000)),
                                            budget=lambda device: 5 * PER_CANDIDATE)
    assert (chunk, strategy, reason) == (5, "vmap", "")
    assert module.chunks == [], "nothing was tried"


@pytest.mark.parametrize("seconds, tried", [
    (MAX_TRIAL_SECONDS * 1.2, [8]),                 # the first trial is slower than a trial may be
    (MAX_MEASURE_SECONDS * 0.24, [8, 32, 128, 512]),  # warm-up and four trials use up the measurement's time
])
def test_slow_trials_end_the_search(seconds, tried):
    (chunk, strategy, _), module = measure(10.0, lambda k: seconds)
    assert (chunk, strategy) == (tried[-1], "vmap")  # same time per chunk: the largest tried is fastest
    assert sorted(set(module.chunks)) == tried


def test_a_module_that_does_not_vmap_leaves_the_choice_to_the_first_chunk():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 1))

        def forward(self, x):
            out = x @ self.w
            return out if out.sum().item() > 0 else -out  # .item() does not vmap

    ev = Evaluator(Branchy(), data(), metrics)
    assert chunking._measure(ev.trial(), TRIAL_SIZES, clock=Clock(), budget=PLENTY) == (FALLBACK_CHUNK, None, "")


def test_timed_keeps_the_best_of_calls_that_add_up_to_the_trial_time():
    clock = Clock()
    costs = iter([0.006, 0.003, 0.004, 0.005, 0.001])  # the fourth call brings the total past 0.015

    def call():
        clock.now += next(costs)

    assert chunking._timed(call, min_seconds=0.015, clock=clock) == pytest.approx(0.003)
    assert next(costs) == 0.001, "no call after the total reached min_seconds"


class CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))
        self.chunks: List[int] = []
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if is_batchedtensor(self.w):
            self.chunks.append(get_unwrapped(self.w).shape[0])
        return x @ self.w


def test_the_choice_is_measured_once_and_trials_stop_at_the_candidates_at_hand(monkeypatch):
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    module = CountsCalls()
    ev = Evaluator(module, data(), metrics)
    first = choose_chunk_size(ev.trial(), limit=7)
    assert set(module.chunks) == {8}, "7 candidates: the first trial size that covers them, and no larger"
    calls = module.calls
    again = Evaluator(module, data(), metrics)
    assert choose_chunk_size(again.trial(), limit=7) == first
    assert module.calls == calls, "the same module, data and metrics are not measured again"
