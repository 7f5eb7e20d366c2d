"""Choose how many candidates share one vmapped call, by measuring on the user's machine.

The best chunk size depends on the model, the eval batch and the cache, so a
short trial at start-up times the per-candidate loop and vmap at growing chunk
sizes (bounded by device memory) and keeps the fastest. When the loop wins
(convolutions on a CPU, say) the evaluator uses the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
from torch.func import functional_call

if TYPE_CHECKING:
    from .evaluator import Evaluator

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


def activation_bytes(ev: "Evaluator", params: Dict[str, torch.Tensor], shared: Dict[str, torch.Tensor]) -> int:
    """Bytes of every submodule output in one forward of one candidate on the first batch."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in ev.module.modules()]
    try:
        with torch.no_grad():
            functional_call(ev.module, (params, shared), (ev.batches[0][0],), strict=True)
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


def _signature(ev: "Evaluator") -> tuple:
    """What the measurement depends on: the module's class and tensors, the data's shapes, device, dtype."""
    def shapes(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype))
        if isinstance(value, (tuple, list)):
            return tuple(shapes(v) for v in value)
        return type(value).__name__

    tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in ev.module.state_dict(keep_vars=True).items())
    data = tuple((shapes(x), shapes(y)) for x, y, _ in ev.batches[:2])
    return (type(ev.module).__qualname__, tensors, data, len(ev.batches), str(ev.device), str(ev.dtype),
            ev.compile, getattr(ev.metrics, "__qualname__", repr(ev.metrics)), torch.get_num_threads())


def choose_chunk_size(ev: "Evaluator", limit: Optional[int] = None) -> Tuple[int, Optional[str], str]:
    """(chunk size, mode 'vmap' | 'loop' | None when undecided, reason), measured once per process.

    `limit` is how many candidates are at hand: sizes beyond the first trial
    size that covers them are not tried (a sweep of 7 files needs no 8192 trial).
    """
    sizes = TRIAL_SIZES
    if limit is not None:
        sizes = tuple(k for k in TRIAL_SIZES if k < limit) + tuple(k for k in TRIAL_SIZES if k >= limit)[:1]
    key = (_signature(ev), sizes)
    if key not in _CHOSEN:
        _CHOSEN[key] = _measure(ev, sizes)
    return _CHOSEN[key]


def _measure(ev: "Evaluator", sizes: Tuple[int, ...] = TRIAL_SIZES, *,
             clock: Callable[[], float] = time.perf_counter,
             budget: Callable[[torch.device], int] = memory_budget) -> Tuple[int, Optional[str], str]:
    """The choice `choose_chunk_size` caches, timed with `clock` within `budget(device)` bytes a chunk."""
    from .evaluator import CandidateError

    own = {n: p.detach() for n, p in ev.module.named_parameters()}
    if not own or any(t.device.type == "meta" for t in own.values()):
        return FALLBACK_CHUNK, None, ""
    one = {n: ev._cast(t.to(ev.device, copy=True)) for n, t in own.items()}
    shared = ev._shared()
    param_bytes = sum(t.numel() * 4 for t in one.values())
    try:
        per_candidate = 3 * param_bytes + 2 * activation_bytes(ev, one, shared)
    except Exception:  # noqa: BLE001 - the module's own forward fails: let the chunks tell
        return FALLBACK_CHUNK, None, ""
    bound = max(1, budget(ev.device) // max(per_candidate, 1))

    first = ev.batches[:1]
    stacked1 = {n: t.unsqueeze(0) for n, t in one.items()}
    sync = torch.cuda.synchronize if ev.device.type == "cuda" else (lambda: None)
    try:
        loop_seconds = _timed(lambda: (ev._loop_row(stacked1, shared, 0, batches=first), sync()), clock=clock)
    except CandidateError:
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
                ev._vmap_values(batched, shared, k, batches=first, compiled=False)  # warm-up
            seconds = _timed(lambda: (ev._vmap_values(batched, shared, k, batches=first, compiled=False), sync()),
                             clock=clock)
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
