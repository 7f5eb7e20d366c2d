"""Choose how many candidates share one vmapped call, by measuring on the user's machine, once.

The best chunk size depends on the model, the eval batch and the cache, so a
short trial times the per-candidate loop and vmap at growing chunk sizes
(bounded by device memory) and keeps the fastest. When the loop wins
(convolutions on a CPU, say) the evaluator uses the loop. Sizes that are
quick to try are always tried; a size that would take long per call is tried
only while the rate still rises steeply, so the search stops as soon as
growing the chunk stops paying (see `_measure`).

What is measured comes in a `Trial`: the module, one candidate, and the two
ways of evaluating it (the evaluator builds one with `Evaluator.trial()`).

The choice is kept on disk
--------------------------
A measured choice is written to the user's cache directory, one small JSON
file per key, and a later process (a notebook's next one-shot call, each Ray
worker of a sweep) reads it instead of measuring again. The key is what
decides the choice: the module's structure (its submodules' classes and
forward code, its parameter and buffer names, shapes and dtypes), the trial's
key (the data's shapes and dtypes, the precision, compile, the metrics
function), the device's name, the torch version, the number of threads and
the trial sizes. An entry is only a hint: one that cannot be read, holds the
wrong fields, or whose chunk no longer fits in the memory there is now is
measured again and overwritten; a chunk that runs out of memory in use is
forgotten (`forget`), so the next process measures again. Each entry is
written to a temporary file and renamed into place, so concurrent writers
(two Ray workers on one machine) each leave a whole entry and a reader never
sees half of one. Undecided measurements (nothing to measure, a module that
does not evaluate) are not kept. A choice is as good as the machine was quiet
when it was measured: delete the `chunks/` folder (or one entry in it) to
measure again.

Environment: `SWEEP_CACHE_DIR` moves the cache (default
`$XDG_CACHE_HOME/sweep`, else `~/.cache/sweep`; entries go in its `chunks/`
folder); `SWEEP_CACHE_DIR=off` keeps nothing on disk, and every process
measures again. A cache folder that cannot be written is passed over
silently, with the same effect.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch
from torch.func import functional_call

from .files import CACHE_ENV, cache_dir

Tensors = Dict[str, torch.Tensor]
Choice = Tuple[int, Optional[str], str]

#: Chunk sizes tried, smallest first.
TRIAL_SIZES = (8, 32, 128, 512, 2048, 8192)
#: Each trial size is timed over at least this long, and at least `TRIAL_CALLS` calls (the best counts):
#: the first call at a new size pays for its allocations.
TRIAL_SECONDS = 0.004
TRIAL_CALLS = 2
#: Calls timed at most per trial size.
MAX_REPEAT = 10
#: A call slower than this ends the search, and a size predicted to be slower is not tried.
MAX_TRIAL_SECONDS = 0.25
#: A size predicted (from the best rate so far) to take longer than this per call is tried only while the
#: rate still rises by `STRONG_GAIN` from one size to the next: by then the per-call overhead is paid for, and
#: only a steep rise is worth the trial. Quicker sizes are always tried: a noisy reading costs little there.
CHEAP_CALL_SECONDS = 0.02
STRONG_GAIN = 1.5
#: A size within this fraction of the best rate still counts as fast; the largest such size is chosen
#: (fewer calls, less overhead per candidate).
KEEP_FRACTION = 0.9
#: The whole measurement stops trying larger chunks after this long.
MAX_MEASURE_SECONDS = 0.5
#: Fraction of free device memory (or available RAM) a chunk may use.
MEMORY_FRACTION_CUDA = 0.5
MEMORY_FRACTION_CPU = 0.25
#: Chunk size when nothing can be measured.
FALLBACK_CHUNK = 256
#: Bytes of weights materialised at once when candidates are evaluated one at a time:
#: small enough that each candidate is still in cache when its forward reads it.
LOOP_CHUNK_BYTES = 8 * 1024**2

#: The folder (under the cache directory) that holds one JSON file per measured choice.
CHUNK_FOLDER = "chunks"
#: The format of an entry; an entry of another format is measured again and overwritten.
CACHE_FORMAT = 1
STRATEGIES = ("vmap", "loop")


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
    #: equal keys for the same module share one measurement. Its `repr` goes into the on-disk key, so it
    #: should hold plain values (strings, numbers, tuples) that read the same in every process.
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


def _timed(fn, min_seconds: float = TRIAL_SECONDS, max_repeat: int = MAX_REPEAT,
           clock: Callable[[], float] = time.perf_counter, min_calls: int = 1) -> float:
    """Best of several calls: at least `min_calls` (one when a call is slower than `MAX_TRIAL_SECONDS`),
    more while they add up to under `min_seconds`."""
    best, spent, count = float("inf"), 0.0, 0
    while (count < 1 or (count < min_calls and best <= MAX_TRIAL_SECONDS)
           or (spent < min_seconds and count < max_repeat)):
        start = clock()
        fn()
        elapsed = clock() - start
        best, spent, count = min(best, elapsed), spent + elapsed, count + 1
    return best


# -- the key, and the cache on disk ----------------------------------------------
#: Choices already made in this process, by key digest (see `chunk_key`).
_CHOSEN: Dict[str, Choice] = {}


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The device's model (the GPU's name, the CPU's model name): what its measurements depend on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's bytecode, names and constants (nested code objects by their own bytes: their repr
    holds a memory address)."""
    parts = [code.co_code, repr(code.co_names).encode()]
    parts += [_code_bytes(c) if isinstance(c, types.CodeType) else repr(c).encode() for c in code.co_consts]
    return b"\0".join(parts)


def _code_digest(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return ""
    return hashlib.sha256(_code_bytes(code)).hexdigest()[:16]


def callable_id(fn: Any) -> str:
    """`module.qualname` of a function (or of a callable object's class) and a digest of its code: the same in
    every process for the same code, different when the code changes."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', type(fn).__name__)}"
    code = fn if hasattr(fn, "__code__") else getattr(type(fn), "__call__", None)
    return f"{name}:{_code_digest(code)}"


def _module_structure(module: torch.nn.Module) -> str:
    """A digest of the submodules' classes (and their forward code) and every parameter and buffer's
    name, shape and dtype."""
    classes = sorted({f"{type(m).__module__}.{type(m).__qualname__}:{_code_digest(getattr(type(m), 'forward', None))}"
                      for m in module.modules()})
    tensors = [(kind, n, list(t.shape), str(t.dtype))
               for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers()))
               for n, t in named]
    return hashlib.sha256(json.dumps([classes, tensors]).encode()).hexdigest()


def _signature(trial: Trial, sizes: Tuple[int, ...]) -> Dict[str, Any]:
    """What the measurement depends on, as plain JSON values."""
    return {
        "module": _module_structure(trial.module),
        "module_class": type(trial.module).__qualname__,
        "trial": repr(trial.key),
        "device": trial.device.type,
        "device_name": device_name(trial.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": list(sizes),
    }


def _digest(signature: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:32]


def _sizes(limit: Optional[int]) -> Tuple[int, ...]:
    """The trial sizes for `limit` candidates at hand: those below it and the first that covers it."""
    if limit is None:
        return TRIAL_SIZES
    return tuple(k for k in TRIAL_SIZES if k < limit) + tuple(k for k in TRIAL_SIZES if k >= limit)[:1]


def chunk_key(trial: Trial, limit: Optional[int] = None) -> str:
    """The key of `trial`'s choice with `limit` candidates at hand, in this process and on disk."""
    return _digest(_signature(trial, _sizes(limit)))


def _entry_path(key: str) -> Optional[Path]:
    folder = cache_dir()
    return None if folder is None else folder / CHUNK_FOLDER / f"{key}.json"


def _read(key: str, signature: Dict[str, Any]) -> Optional[Choice]:
    """The choice kept on disk under `key`, or None when there is none or it is not a valid entry."""
    path = _entry_path(key)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
        return None
    chunk, strategy, reason = entry.get("chunk"), entry.get("strategy"), entry.get("reason")
    if (type(chunk) is not int or chunk < 1 or strategy not in STRATEGIES or not isinstance(reason, str)
            or entry.get("signature") != json.loads(json.dumps(signature))):
        return None
    return chunk, strategy, reason


def _write(key: str, signature: Dict[str, Any], choice: Choice) -> None:
    """Keep `choice` on disk under `key`: a temporary file renamed into place; nothing when it cannot be written."""
    path = _entry_path(key)
    if path is None:
        return
    chunk, strategy, reason = choice
    entry = {"format": CACHE_FORMAT, "chunk": chunk, "strategy": strategy, "reason": reason,
             "signature": signature, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, indent=1)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        pass  # a cache that cannot be written: the next process measures again


def forget(key: str) -> None:
    """Drop the choice kept under `key`, in this process and on disk (its chunk ran out of memory in use)."""
    _CHOSEN.pop(key, None)
    path = _entry_path(key)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


# -- choosing --------------------------------------------------------------------
def choose_chunk_size(trial: Trial, limit: Optional[int] = None, *,
                      budget: Callable[[torch.device], int] = memory_budget) -> Choice:
    """(chunk size, strategy 'vmap' | 'loop' | None when undecided, reason), measured once per key.

    `limit` is how many candidates are at hand: sizes beyond the first trial
    size that covers them are not tried (a sweep of 7 files needs no 8192
    trial). A choice made before in this process is used as it is; one kept
    on disk is used when its chunk still fits within `budget(device)`;
    otherwise the trial is measured and the choice kept (see the module's
    docstring).
    """
    sizes = _sizes(limit)
    signature = _signature(trial, sizes)
    key = _digest(signature)
    if key in _CHOSEN:
        return _CHOSEN[key]
    kept = _read(key, signature)
    if kept is not None:
        fit = _fit(trial, budget)
        if fit is not None and kept[0] <= fit[3]:
            _CHOSEN[key] = kept
            return kept
    choice = _measure(trial, sizes, budget=budget)
    _CHOSEN[key] = choice
    if choice[1] is not None and choice[2]:  # a measured decision, not a fallback
        _write(key, signature, choice)
    return choice


def _fit(trial: Trial, budget: Callable[[torch.device], int]) -> Optional[Tuple[Tensors, Tensors, int, int]]:
    """(one candidate, the shared tensors, its parameter bytes, how many candidates fit in a chunk), or None
    when there is nothing to measure with or the module's own forward fails."""
    candidate = trial.candidate()
    if candidate is None:
        return None
    one, shared = candidate
    param_bytes = sum(t.numel() * 4 for t in one.values())
    try:
        per_candidate = 3 * param_bytes + 2 * activation_bytes(trial, one, shared)
    except Exception:  # noqa: BLE001 - the module's own forward fails: let the chunks tell
        return None
    return one, shared, param_bytes, max(1, budget(trial.device) // max(per_candidate, 1))


def _measure(trial: Trial, sizes: Tuple[int, ...] = TRIAL_SIZES, *,
             clock: Callable[[], float] = time.perf_counter,
             budget: Callable[[torch.device], int] = memory_budget) -> Choice:
    """The choice `choose_chunk_size` keeps, timed with `clock` within `budget(device)` bytes a chunk.

    Sizes are tried smallest first; the search stops at the first of: a size
    beyond the memory bound, the measurement's time used up
    (`MAX_MEASURE_SECONDS`), a call slower than `MAX_TRIAL_SECONDS` (measured,
    or predicted from the best rate so far), or a next size predicted to take
    longer than `CHEAP_CALL_SECONDS` a call while the last size's rate was
    less than `STRONG_GAIN` times the one before (levelled off, or past the
    peak).
    """
    fit = _fit(trial, budget)
    if fit is None:
        return FALLBACK_CHUNK, None, ""
    one, shared, param_bytes, bound = fit

    stacked1 = {n: t.unsqueeze(0) for n, t in one.items()}
    sync = torch.cuda.synchronize if trial.device.type == "cuda" else (lambda: None)
    try:
        loop_seconds = _timed(lambda: (trial.loop(stacked1, shared), sync()), clock=clock)
    except Exception:  # noqa: BLE001 - the candidate fails alone too: the first real chunk decides
        return FALLBACK_CHUNK, None, ""
    loop_rate = 1.0 / max(loop_seconds, 1e-9)

    rates: Dict[int, float] = {}
    gain = float("inf")  # the last size's rate over the rate of the size before
    started = clock()
    for k in sizes:
        if k > bound or clock() - started > MAX_MEASURE_SECONDS:
            break
        if rates:
            predicted = k / max(rates.values())
            if predicted > MAX_TRIAL_SECONDS or (predicted > CHEAP_CALL_SECONDS and gain < STRONG_GAIN):
                break
        batched = {n: t.expand((k,) + tuple(t.shape)).contiguous() for n, t in one.items()}
        try:
            # Measured without torch.compile: compiling every trial size would take minutes.
            seconds = _timed(lambda: (trial.vmap(batched, shared, k), sync()), clock=clock, min_calls=TRIAL_CALLS)
        except Exception:  # noqa: BLE001 - the first real chunk decides and warns
            if not rates:
                return FALLBACK_CHUNK, None, ""
            break
        last = next(reversed(rates.values()), 0.0)
        rates[k] = k / max(seconds, 1e-9)
        gain = rates[k] / last if last else float("inf")
        if seconds > MAX_TRIAL_SECONDS:
            break
    top_rate = max(rates.values(), default=0.0)
    # Within KEEP_FRACTION of the best, the larger chunk wins: fewer calls, less overhead per candidate.
    best_k = max((k for k, r in rates.items() if r >= KEEP_FRACTION * top_rate), default=0)
    best_rate = rates.get(best_k, 0.0)
    if best_k == 0:
        return max(1, min(FALLBACK_CHUNK, bound)), "vmap", ""
    if loop_rate > top_rate:
        reason = f"the per-candidate loop measured faster ({loop_rate:,.0f}/s against {best_rate:,.0f}/s with vmap)"
        return loop_chunk(param_bytes, bound), "loop", reason
    return best_k, "vmap", f"vmap chunks of {best_k} measured fastest ({best_rate:,.0f}/s; loop {loop_rate:,.0f}/s)"
