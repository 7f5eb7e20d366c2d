"""Choose how many candidates share one vmapped call, by measuring on the user's machine.

The best chunk size depends on the model, the eval batch and the cache, so a
short trial at start-up times the per-candidate loop and vmap at growing chunk
sizes (bounded by device memory) and keeps the fastest. When the loop wins
(convolutions on a CPU, say) the evaluator uses the loop.

What is measured comes in a `Trial`: the module, one candidate, and the two
ways of evaluating it (the evaluator builds one with `Evaluator.trial()`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch
from torch.func import functional_call

Tensors = Dict[str, torch.Tensor]

#: Chunk sizes tried, smallest first.
TRIAL_SIZES = (8, 32, 128, 512, 2048, 8192)
#: Each trial size is timed over at least this long (short calls are noisy).
TRIAL_SECONDS = 0.015
#: A trial slower than this ends the search (bigger chunks only take longer).
MAX_TRIAL_SECONDS = 0.25
#: The whole measurement stops trying larger chunks after this long.
MAX_MEASURE_SECONDS = 1.0
#: Fraction of free device memory (or available RAM) a chunk may use.
MEMORY_FRACTION_CUDA = 0.5
MEMORY_FRACTION_CPU = 0.25
#: Chunk size when nothing can be measured.
FALLBACK_CHUNK = 256
#: Bytes of weights materialised at once when candidates are evaluated one at a time:
#: small enough that each candidate is still in cache when its forward reads it.
LOOP_CHUNK_BYTES = 8 * 1024**2


def memory_budget(device: torch.device) -> int:
    """Bytes a chunk may use on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION_CUDA)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_FRACTION_CPU)
    except OSError:
        pass
    return 2 * 1024**3


@dataclass
class Trial:
    """What the measurement runs: a module, one candidate, and the two ways of evaluating candidates.

    `candidate()` gives one candidate's weights (on the device, in the
    evaluation dtype) and the tensors every candidate shares, or None when
    there is nothing to measure with (no parameters, or weights on the meta
    device). `loop(stacked, shared)` evaluates the one candidate of
    `stacked` ([1, *shape] tensors) alone; `vmap(stacked, shared, k)`
    evaluates k stacked candidates in one vmapped call, not compiled. Both run
    on the first data batch only and raise when the evaluation fails.
    """

    module: torch.nn.Module
    device: torch.device
    #: the first data batch's input (one forward on it counts the activation bytes)
    example: Any
    #: what else the choice depends on (the data's shapes, the dtype, compile, the metrics function):
    #: equal keys for the same module share one measurement
    key: Hashable
    candidate: Callable[[], Optional[Tuple[Tensors, Tensors]]]
    loop: Callable[[Tensors, Tensors], Any]
    vmap: Callable[[Tensors, Tensors, int], Any]


def activation_bytes(trial: Trial, params: Tensors, shared: Tensors) -> int:
    """Bytes of every submodule output in one forward of one candidate on the first batch."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in trial.module.modules()]
    try:
        with torch.no_grad():
            functional_call(trial.module, (params, shared), (trial.example,), strict=True)
    finally:
        for h in handles:
            h.remove()
    return total


def loop_chunk(param_bytes: int, bound: int) -> int:
    """Candidates materialised at once for the loop: enough to amortise the call, few enough to stay in memory."""
    return max(1, min(FALLBACK_CHUNK, bound, LOOP_CHUNK_BYTES // max(param_bytes, 1)))


def _timed(fn, min_seconds: float = TRIAL_SECONDS, max_repeat: int = 20,
           clock: Callable[[], float] = time.perf_counter) -> float:
    """Best of several calls: at least one, more while they add up to under `min_seconds`."""
    best, spent, count = float("inf"), 0.0, 0
    while count < 1 or (spent < min_seconds and count < max_repeat):
        start = clock()
        fn()
        elapsed = clock() - start
        best, spent, count = min(best, elapsed), spent + elapsed, count + 1
    return best


#: Choices already measured in this process, by what decides them (see `_signature`).
_CHOSEN: Dict[tuple, Tuple[int, Optional[str], str]] = {}


def _signature(trial: Trial) -> tuple:
    """What the measurement depends on: the module's class and tensors, the device, the threads, the trial's key."""
    tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in trial.module.state_dict(keep_vars=True).items())
    return (type(trial.module).__qualname__, tensors, str(trial.device), trial.key, torch.get_num_threads())


def choose_chunk_size(trial: Trial, limit: Optional[int] = None) -> Tuple[int, Optional[str], str]:
    """(chunk size, strategy 'vmap' | 'loop' | None when undecided, reason), measured once per process.

    `limit` is how many candidates are at hand: sizes beyond the first trial
    size that covers them are not tried (a sweep of 7 files needs no 8192 trial).
    """
    sizes = TRIAL_SIZES
    if limit is not None:
        sizes = tuple(k for k in TRIAL_SIZES if k < limit) + tuple(k for k in TRIAL_SIZES if k >= limit)[:1]
    key = (_signature(trial), sizes)
    if key not in _CHOSEN:
        _CHOSEN[key] = _measure(trial, sizes)
    return _CHOSEN[key]


def _measure(trial: Trial, sizes: Tuple[int, ...] = TRIAL_SIZES, *,
             clock: Callable[[], float] = time.perf_counter,
             budget: Callable[[torch.device], int] = memory_budget) -> Tuple[int, Optional[str], str]:
    """The choice `choose_chunk_size` caches, timed with `clock` within `budget(device)` bytes a chunk."""
    candidate = trial.candidate()
    if candidate is None:
        return FALLBACK_CHUNK, None, ""
    one, shared = candidate
    param_bytes = sum(t.numel() * 4 for t in one.values())
    try:
        per_candidate = 3 * param_bytes + 2 * activation_bytes(trial, one, shared)
    except Exception:  # noqa: BLE001 - the module's own forward fails: let the chunks tell
        return FALLBACK_CHUNK, None, ""
    bound = max(1, budget(trial.device) // max(per_candidate, 1))

    stacked1 = {n: t.unsqueeze(0) for n, t in one.items()}
    sync = torch.cuda.synchronize if trial.device.type == "cuda" else (lambda: None)
    try:
        loop_seconds = _timed(lambda: (trial.loop(stacked1, shared), sync()), clock=clock)
    except Exception:  # noqa: BLE001 - the candidate fails alone too: the first real chunk decides
        return FALLBACK_CHUNK, None, ""
    loop_rate = 1.0 / max(loop_seconds, 1e-9)

    rates: Dict[int, float] = {}
    started = clock()
    for k in sizes:
        if k > bound or clock() - started > MAX_MEASURE_SECONDS:
            break
        batched = {n: t.expand((k,) + tuple(t.shape)).contiguous() for n, t in one.items()}
        try:
            # Measured without torch.compile: compiling every trial size would take minutes.
            if not rates:
                trial.vmap(batched, shared, k)  # warm-up
            seconds = _timed(lambda: (trial.vmap(batched, shared, k), sync()), clock=clock)
        except Exception:  # noqa: BLE001 - the first real chunk decides and warns
            if not rates:
                return FALLBACK_CHUNK, None, ""
            break
        rates[k] = k / max(seconds, 1e-9)
        if seconds > MAX_TRIAL_SECONDS:
            break
    top_rate = max(rates.values(), default=0.0)
    # Within 10% of the best, the larger chunk wins: fewer calls, less overhead per candidate.
    best_k = max((k for k, r in rates.items() if r >= 0.9 * top_rate), default=0)
    best_rate = rates.get(best_k, 0.0)
    if best_k == 0:
        return max(1, min(FALLBACK_CHUNK, bound)), "vmap", ""
    if loop_rate > top_rate:
        reason = f"the per-candidate loop measured faster ({loop_rate:,.0f}/s against {best_rate:,.0f}/s with vmap)"
        return loop_chunk(param_bytes, bound), "loop", reason
    return best_k, "vmap", f"vmap chunks of {best_k} measured fastest ({best_rate:,.0f}/s; loop {loop_rate:,.0f}/s)"
