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
    # 512 is fastest; 2048 is within 10% of it (fewer calls) and levels off, so 8192 is not tried.
    rates = {8: 10_000, 32: 40_000, 128: 100_000, 512: 200_000, 2048: 190_000, 8192: 400_000}
    (chunk, strategy, reason), module = measure(0.01, at_rates(rates))
    assert (chunk, strategy) == (2048, "vmap")
    assert reason == "vmap chunks of 2048 measured fastest (190,000/s; loop 100/s)"
    assert set(module.chunks) == {8, 32, 128, 512, 2048}


@pytest.mark.parametrize("rates, chosen, tried", [
    # sizes quick to try are tried whatever the rate did: 2048 falls back, 8192 (4 ms a call) is still tried
    ({8: 100_000, 32: 400_000, 128: 1_000_000, 512: 2_000_000, 2048: 1_000_000, 8192: 4_000_000}, 8192,
     [8, 32, 128, 512, 2048, 8192]),
    # past the peak: 2048 would take 2048/10,000 s a call (more than CHEAP_CALL_SECONDS) after a fall (0.5×)
    ({8: 1_000, 32: 4_000, 128: 10_000, 512: 5_000, 2048: 50_000}, 128, [8, 32, 128, 512]),
    # levelled off: the next size would take 2048/12,000 s a call while the rate rose only 1.2×
    ({8: 1_000, 32: 4_000, 128: 10_000, 512: 12_000, 2048: 50_000}, 512, [8, 32, 128, 512]),
    # a steep rise (2.5×, then 4×) is followed into calls longer than CHEAP_CALL_SECONDS ...
    ({8: 1_000, 32: 4_000, 128: 10_000, 512: 40_000, 2048: 40_000, 8192: 160_000}, 2048, [8, 32, 128, 512, 2048]),
    # ... but never into a call predicted longer than MAX_TRIAL_SECONDS (128/400 s)
    ({8: 150, 32: 400, 128: 1_600}, 32, [8, 32]),
])
def test_the_search_stops_once_larger_chunks_stop_paying(rates, chosen, tried):
    (chunk, strategy, _), module = measure(10.0, at_rates(rates))
    assert (chunk, strategy) == (chosen, "vmap")
    assert sorted(set(module.chunks)) == tried


def test_the_stopping_rules_are_what_the_cases_above_assume():
    assert (chunking.KEEP_FRACTION, chunking.STRONG_GAIN) == (0.9, 1.5)
    assert 8192 / 2_000_000 < chunking.CHEAP_CALL_SECONDS < min(2048 / 12_000, 2048 / 10_000, 512 / 10_000)
    assert 2048 / 200_000 < chunking.CHEAP_CALL_SECONDS < 8192 / 200_000
    assert 128 / 400 > MAX_TRIAL_SECONDS > max(512 / 10_000, 2048 / 40_000, 32 / 150)
    assert 8192 / 40_000 <= MAX_TRIAL_SECONDS


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


@pytest.mark.parametrize("seconds, tried, calls", [
    # the first trial's call is slower than a call may be: timed once, and the search ends
    (MAX_TRIAL_SECONDS * 1.2, [8], 1),
    # two calls a size (0.12 s of the 0.5 s), the rate rising 4× a size: five sizes use up the measurement's time
    (MAX_MEASURE_SECONDS * 0.12, [8, 32, 128, 512, 2048], 2 * 5),
])
def test_slow_trials_end_the_search(seconds, tried, calls):
    (chunk, strategy, _), module = measure(10.0, lambda k: seconds)
    assert (chunk, strategy) == (tried[-1], "vmap")  # same time per chunk: the largest tried is fastest
    assert sorted(set(module.chunks)) == tried
    assert len(module.chunks) == calls, "each size is called at least twice, unless one call is already too slow"


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


def test_timed_makes_a_second_call_at_a_new_size_unless_the_first_is_too_slow():
    clock = Clock()
    costs = iter([0.05, 0.01, 0.3, 0.2])

    def call():
        clock.now += next(costs)

    # the first call (allocations at a new size) took the whole minimum time: a second still counts
    assert chunking._timed(call, min_seconds=0.004, clock=clock, min_calls=2) == pytest.approx(0.01)
    # a call slower than MAX_TRIAL_SECONDS is not repeated
    assert chunking._timed(call, min_seconds=0.004, clock=clock, min_calls=2) == pytest.approx(0.3)
    assert next(costs) == 0.2


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


def test_the_choice_is_measured_once_and_trials_stop_at_the_candidates_at_hand(monkeypatch, tmp_path):
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    monkeypatch.setenv(chunking.CACHE_ENV, str(tmp_path))
    module = CountsCalls()
    ev = Evaluator(module, data(), metrics)
    first = choose_chunk_size(ev.trial(), limit=7)
    assert set(module.chunks) == {8}, "7 candidates: the first trial size that covers them, and no larger"
    calls = module.calls
    again = Evaluator(module, data(), metrics)
    assert choose_chunk_size(again.trial(), limit=7) == first
    assert module.calls == calls, "the same module, data and metrics are not measured again"
