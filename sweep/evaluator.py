"""Evaluate many candidates against one shared module, a chunk at a time.

Candidates (explicit dicts, a `Stacked` population, or a recipe's rows) are
materialised as stacked tensors on the device, one `[k, *shape]` tensor per
parameter, and evaluated with `vmap(functional_call)` in one pass per data
batch. Explicit dicts are checked one by one on their metadata only; the value
checks (finite, tied weights) run once per chunk on the stacked tensors. A module that does not
vmap is detected on its first chunk and evaluated with the per-candidate loop
from then on, with a warning that says why; a metrics function that does not
vmap (one that calls `.item()`, say) keeps the forward under vmap and runs the
metrics one candidate at a time, with a warning that names it. The rows are the
same either way.
"""

from __future__ import annotations

import time
import warnings
from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import pyarrow as pa
import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .chunking import Trial, callable_id, choose_chunk_size, chunk_key
from .chunking import forget as forget_chunk_size
from .errors import SweepError
from .messages import first_line, user_frame
from .recipes import Prepared, Recipe, Rows, anchor_key
from .results import arrow_array
from .stacked import Population, Stacked
from .types import FAILED, INVALID, OK, Batch, Invalid, MetricsFn
from .validate import FastCheck, Plan, Schema, bad_rows

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: A row bounded below this fraction of the dtype's largest value cannot overflow when cast.
SAFE_FRACTION = 0.5


def evaluate(
    module: torch.nn.Module,
    candidates: Any,
    data: Iterable[Batch],
    metrics: MetricsFn,
    *,
    device: Optional[torch.device | str] = None,
    precision: str = "fp32",
    compile: bool = False,
    chunk_size: Optional[int] = None,
) -> pa.Table:
    """Evaluate each candidate against `module` on `data`.

    `candidates` is an iterable of parameter dicts, a `Stacked` population
    (`[K, *shape]` tensors, or a `[K, P]` matrix), or a recipe (`Affine`,
    `Noise`). Returns one row per candidate, in input order: `candidate_id`
    (0…N−1), `status` (`ok` | `invalid` | `failed`), `error` (null when ok),
    the recipe's columns, and one float64 column per metric (null when the row
    is not ok). The module is evaluated in eval mode, and its parameters,
    buffers and train/eval flags are as before when this returns; the caller's tensors are
    never mutated. When the `candidates` iterable itself raises midway,
    `CandidatesError` is raised from its error, with the rows of every
    candidate it yielded before in `.table`.

    `precision="bf16"` stores the materialised weights (and the inputs) in
    bfloat16; `compile=True` compiles the vmapped call with `torch.compile`;
    `chunk_size` fixes how many candidates share one vmapped call (default:
    measured at start-up).
    """
    evaluator = Evaluator(module, data, metrics, device=device, precision=precision, compile=compile,
                          chunk_size=chunk_size)
    try:
        return evaluator.run(candidates)
    finally:
        evaluator.restore()


def _batch_size(x: Any, y: Any) -> int:
    for v in (y, x):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    try:
        return len(y)
    except TypeError:
        return 1


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def is_out_of_memory(error: BaseException) -> bool:
    """A device (or host) allocation that failed, as opposed to any other error."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class CandidateError(Exception):
    """A candidate whose forward or metrics failed; the row becomes `failed`."""


class CandidatesError(SweepError):
    """The candidates iterable raised midway; `.table` holds the rows of every candidate it yielded before.

    The iterable's own error is the `__cause__`.
    """

    def __init__(self, message: str, table: pa.Table):
        super().__init__(message)
        self.table = table

    def __reduce__(self):  # the table survives pickling (a Ray task, a process pool)
        return type(self), (str(self), self.table)


_STATUS_NAMES = np.array([OK, INVALID, FAILED], dtype=object)
_STATUS_CODES = {OK: 0, INVALID: 1, FAILED: 2}


class _Chunk:
    """Statuses, errors and metric values of k rows, filled in as a chunk is evaluated."""

    def __init__(self, k: int):
        self.k = k
        self.codes = np.zeros(k, dtype=np.int8)  # index into _STATUS_NAMES
        self.errors: Dict[int, str] = {}
        self.values: Dict[str, np.ndarray] = {}

    def mark(self, i: int, status: str, error: str) -> None:
        self.codes[i] = _STATUS_CODES[status]
        self.errors[i] = error


class Evaluator:
    """A module, its eval data and metrics, prepared once on one device.

    Workers hold one and feed it batch after batch; `evaluate()` uses one for
    a single call. Recipe anchors are validated and kept on the device, keyed
    by their content, so each is prepared once however many batches use it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        data: Iterable[Batch],
        metrics: MetricsFn,
        *,
        device: Optional[torch.device | str] = None,
        precision: str = "fp32",
        compile: bool = False,
        chunk_size: Optional[int] = None,
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(metrics):
            raise TypeError(f"metrics must be a callable metrics(output, y) -> mapping, got {type(metrics).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.module = module
        self.metrics = metrics
        self.device = torch.device(device) if device is not None else _module_device(module)
        self.dtype = PRECISIONS[precision]
        self.precision = precision
        self.compile = compile
        self.chunk_size = chunk_size
        self.schema = Schema(module)
        self._fast = FastCheck(self.schema, self.device)
        cast = self._cast
        move = lambda v: cast(v.to(self.device)) if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.batches: List[Tuple[Any, Any, int]] = []
        for i, item in enumerate(data):
            try:
                x, y = item
            except (TypeError, ValueError):
                raise TypeError(f"data batch {i} must be an (x, y) pair, got {type(item).__name__}") from None
            self.batches.append((tree_map(move, x), tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, y), _batch_size(x, y)))
        if not self.batches:
            raise ValueError("data yielded no batches: give at least one (x, y) batch to evaluate on")
        _check_batch_shapes(self.batches)
        self.total = sum(n for _, _, n in self.batches)
        named_buffers = dict(module.named_buffers())
        self.buffers = {n: named_buffers[n].detach().to(self.device, copy=True) for n in self.schema.buffer_names}
        self.metric_names: Optional[Tuple[str, ...]] = None
        #: how a chunk runs: "vmap" (one vmapped call) or "loop" (one candidate at a time), measured with the
        #: chunk size or decided on the first chunk
        self.strategy: Optional[str] = None
        #: why the strategy is what it is ("" when nothing needed saying)
        self.strategy_reason = ""
        #: Why the metrics run one candidate at a time after a vmapped forward ("" while they vmap).
        self.metrics_reason = ""
        self.compile_seconds = 0.0
        self._calls: Dict[Tuple[str, bool], Callable[..., Any]] = {}
        self._anchors: Dict[str, Any] = {}
        self._training = [(m, m.training) for m in module.modules()]
        module.eval()

    # -- public ------------------------------------------------------------
    def restore(self) -> None:
        """Give each submodule back its train/eval flag."""
        for m, training in self._training:
            m.train(training)

    def probe_metric_names(self) -> Tuple[str, ...]:
        """The metric names, learned if need be by evaluating the module's own weights.

        Raises `CandidateError` with the reason when the module's own weights
        cannot be evaluated (a broken model, loader or metrics function).
        """
        if self.metric_names is None:
            own = {n: p.detach() for n, p in self.module.named_parameters()}
            if any(t.device.type == "meta" for t in own.values()):
                raise CandidateError("the module's own parameters are on the meta device; nothing to probe")
            batched = {n: t.to(self.device, copy=True).unsqueeze(0) for n, t in own.items()}
            try:
                self._loop_row(self._cast_all(batched), self._shared(), 0)
            except CandidateError as e:
                where = user_frame(e.__cause__) if e.__cause__ is not None else None
                if where is None:
                    raise
                raise CandidateError(f"{e}, at {where}") from e.__cause__
        return self.metric_names  # type: ignore[return-value]

    def run(self, candidates: Any, ids: Optional[Sequence[int]] = None, *, timing: bool = False) -> pa.Table:
        """Evaluate candidates (dicts, a `Stacked` population or a recipe); returns the results table (see `evaluate`).

        `ids` replaces 0…N−1 as `candidate_id`; `timing` adds `eval_seconds`.
        """
        if isinstance(candidates, Recipe):
            # Prepared for this call only: no content hash needed to share it.
            key = f"call-{id(candidates)}"
            self._anchors[key] = self._prepare(candidates.anchors())
            try:
                return self.run_rows(candidates.rows(), key, ids, timing=timing)
            finally:
                del self._anchors[key]
        if isinstance(candidates, Stacked):
            return self._run_stacked(candidates, ids, timing)
        chunks = []
        limit = len(candidates) if hasattr(candidates, "__len__") else None
        iterator = iter(candidates)
        failure: Optional[Exception] = None
        while True:
            size = self._chunk_hint(limit)
            items: List[Any] = []
            try:
                items.extend(islice(iterator, size))  # keeps what came before an error midway
            except Exception as e:  # noqa: BLE001 - the candidates yielded before it are still evaluated
                failure = e
            if items:
                start = time.perf_counter()
                chunk = self._explicit_chunk(items)
                chunks.append((chunk, time.perf_counter() - start))
            if failure is not None or len(items) < size:
                break
        if failure is None:
            return self._table(chunks, ids, {}, timing)
        n = sum(c.k for c, _ in chunks)
        table = self._table(chunks, None if ids is None else ids[:n], {}, timing)
        raise CandidatesError(
            f"the candidates iterable raised {type(failure).__name__} after yielding {n} candidate(s): "
            f"{first_line(failure)}; the {n} row(s) evaluated before it are kept: catch sweep.CandidatesError "
            f"and read its .table (the usual results table), then fix the iterable and evaluate the rest",
            table) from failure

    def add_anchors(self, anchors: Mapping[str, Mapping[str, Any]], key: Optional[str] = None) -> str:
        """Validate a recipe's anchors once and keep them on the device; returns their key."""
        key = key or anchor_key(dict(anchors))  # type: ignore[arg-type]
        if key not in self._anchors:
            self._anchors[key] = self._prepare(anchors)
        return key

    def has_anchors(self, key: str) -> bool:
        return key in self._anchors

    def run_rows(self, rows: Rows, key: str, ids: Optional[Sequence[int]] = None, *, timing: bool = False) -> pa.Table:
        """Evaluate a recipe's rows against anchors added before under `key`."""
        prepared = self._anchors[key]
        chunks = []
        n = len(rows)
        if isinstance(prepared, str):
            chunk = _Chunk(n)
            for i in range(n):
                chunk.mark(i, INVALID, prepared)
            chunks.append((chunk, 0.0))
        else:
            start = 0
            while start < n:
                stop = min(n, start + self._chunk_hint(n))
                t0 = time.perf_counter()
                try:
                    chunk = self._recipe_chunk(rows.slice(start, stop), prepared)
                except Exception as e:  # noqa: BLE001 - only running out of memory is handled here
                    if not is_out_of_memory(e) or stop - start == 1:
                        raise
                    # Materialising the chunk did not fit: smaller chunks from here on.
                    prepared.release()
                    self._shrink_chunk((stop - start) // 2)
                    continue
                chunks.append((chunk, time.perf_counter() - t0))
                start = stop
        return self._table(chunks, ids, rows.columns(), timing)

    # -- preparing candidates ------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def _cast_all(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {n: self._cast(t) for n, t in tensors.items()}

    def _shared(self, given: Optional[Mapping[str, torch.Tensor]] = None, skip: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
        """The buffers every candidate of a chunk shares, in the evaluation dtype."""
        skip = set(skip)
        out = {}
        for n, b in self.buffers.items():
            if n in skip:
                continue
            out[n] = self._cast(given[n].to(self.device)) if given and n in given else self._cast(b)
        return out

    def _explicit_chunk(self, items: List[Any]) -> _Chunk:
        """A chunk of explicit candidates: each checked on its metadata (a candidate shaped like one found
        valid before costs one comparison), the values of all checked at once on the stacked tensors, and
        only a row that fails there checked again in full, for its error."""
        chunk = _Chunk(len(items))
        rows: List[int] = []
        candidates: List[Mapping[str, Any]] = []
        plans: List[Plan] = []
        metadata = self._fast.metadata
        for i, candidate in enumerate(items):
            if isinstance(candidate, Invalid):
                chunk.mark(i, INVALID, candidate.reason)
                continue
            plan, error = metadata(candidate)
            if error is not None:
                chunk.mark(i, INVALID, error)
                continue
            rows.append(i)
            candidates.append(candidate)
            plans.append(plan)  # type: ignore[arg-type]
        if not rows:
            return chunk
        with torch.no_grad():
            batched, finite, tied = self._stack(candidates, plans)
            bad = bad_rows(len(rows), finite, tied)
            errors = {j: error for j in bad if (error := self.schema.check(candidates[j], self.device)[1])}
            for j, error in errors.items():
                chunk.mark(rows[j], INVALID, error)
            keep = np.arange(len(rows))
            if errors:
                keep = np.delete(keep, sorted(errors))
                if not len(keep):
                    return chunk
                index = torch.as_tensor(keep, device=self.device)
                batched = {n: t.index_select(0, index) for n, t in batched.items()}
            batched = {n: self._cast(t) for n, t in batched.items()}
        shared = self._shared(skip=batched)
        self._evaluate_stacked(batched, shared, np.asarray(rows)[keep], chunk)
        return chunk

    def _stack(self, candidates: List[Mapping[str, Any]], plans: List[Plan]) -> Tuple[
            Dict[str, torch.Tensor], List[Tuple[torch.Tensor, Optional[torch.Tensor]]],
            List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]]:
        """The candidates' tensors stacked by canonical name on the device (a buffer a candidate does not give
        is the module's own), and the value checks to make on them (see `sweep.validate.bad_rows`)."""
        finite: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        tied: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        batched: Dict[str, torch.Tensor] = {}
        distinct = {id(p): p for p in plans}
        if len(distinct) == 1:  # one shape of candidate (the usual population): one list per key
            plan = plans[0]
            for name, key in plan.chosen:  # one device per key: the signature holds it
                batched[name] = torch.stack([c[key] for c in candidates]).to(self.device)
            finite = [(batched[name], None) for name in plan.finite]
            for name, key in plan.tied:
                tied.append((batched[name], torch.stack([c[key] for c in candidates]).to(self.device), None))
            return batched, finite, tied
        keys = {pid: dict(p.chosen) for pid, p in distinct.items()}
        order = {n: i for i, n in enumerate(self.schema.param_names + self.schema.buffer_names)}
        names = sorted({n for p in distinct.values() for n, _ in p.chosen}, key=order.__getitem__)
        checked = {n for p in distinct.values() for n in p.finite}
        for name in names:
            parts: List[torch.Tensor] = []
            given: List[int] = []
            for j, (c, p) in enumerate(zip(candidates, plans)):
                key = keys[id(p)].get(name)
                if key is None:
                    parts.append(self.buffers[name])
                else:
                    parts.append(c[key])
                    given.append(j)
            if len({t.device for t in parts}) > 1:
                parts = [t.to(self.device) for t in parts]
            batched[name] = torch.stack(parts).to(self.device)
            if name in checked:
                if len(given) == len(parts):
                    finite.append((batched[name], None))
                else:
                    index = torch.as_tensor(given, device=self.device)
                    finite.append((batched[name].index_select(0, index), index))
        pairs = sorted({pair for p in distinct.values() for pair in p.tied})
        for name, key in pairs:
            given = [j for j, p in enumerate(plans) if (name, key) in p.tied]
            index = torch.as_tensor(given, device=self.device)
            other = torch.stack([candidates[j][key].to(self.device) for j in given])
            tied.append((batched[name].index_select(0, index), other, index))
        return batched, finite, tied

    def _run_stacked(self, stacked: Stacked, ids: Optional[Sequence[int]], timing: bool) -> pa.Table:
        """A `Stacked` population, checked once per key, evaluated a chunk of views at a time."""
        population = stacked.resolve(self.schema, self.device)
        chunks = []
        start = 0
        while start < population.k:
            stop = min(population.k, start + (self._chunk_hint(population.k) if population.error is None
                                             else population.k))
            t0 = time.perf_counter()
            chunks.append((self._stacked_chunk(population, start, stop), time.perf_counter() - t0))
            start = stop
        return self._table(chunks, ids, {}, timing)

    def _stacked_chunk(self, population: Population, start: int, stop: int) -> _Chunk:
        """Rows `start:stop` of a population: their values checked once per key, a row that fails checked
        in full for its error (the one its candidate dict would get), the others evaluated."""
        k = stop - start
        chunk = _Chunk(k)
        plan = population.plan
        if plan is None:  # a flat matrix that does not fit the module: every row has its error
            for i in range(k):
                chunk.mark(i, INVALID, population.error)  # type: ignore[arg-type]
            return chunk
        key_of = dict(plan.chosen)
        with torch.no_grad():
            views, copies = population.chunk(start, stop)
            bad = bad_rows(k, [(views[key_of[name]], None) for name in plan.finite],
                           [(views[key_of[name]], views[key], None) for name, key in plan.tied])
            errors = {i: error for i in bad
                      if (error := self.schema.check(population.row(views, i), self.device)[1])}
            if population.error is not None:  # the metadata is wrong: every row is invalid
                for i in range(k):
                    chunk.mark(i, INVALID, errors.get(i, population.error))
                return chunk
            for i, error in errors.items():
                chunk.mark(i, INVALID, error)
            keep = np.arange(k)
            index = None
            if errors:
                keep = np.delete(keep, sorted(errors))
                if not len(keep):
                    return chunk
                index = torch.as_tensor(keep, device=self.device)
            batched = {}
            for name, key in plan.chosen:
                t = views[key] if index is None else views[key].index_select(0, index)
                cast = self._cast(t)
                # A view of the caller's tensor is copied: a forward that writes to its weights must not
                # write to the caller's (and the copy is contiguous, which the vmapped call prefers).
                batched[name] = cast.clone() if cast is t and index is None and key not in copies else cast
        self._evaluate_stacked(batched, self._shared(skip=batched), keep, chunk)
        return chunk

    def _prepare(self, anchors: Mapping[str, Mapping[str, Any]]) -> Any:
        """Prepared anchors, or the error that makes every row of the recipe invalid."""
        base = anchors.get("base")
        if base is None:  # the module's own parameters
            base = {n: p.detach() for n, p in self.module.named_parameters()}
        directions = [anchors[k] for k in sorted((k for k in anchors if k.startswith("direction_")),
                                                   key=lambda k: int(k.split("_")[1]))]
        base_params, error = self.schema.check(base, self.device, finite=False)
        if error is not None:
            return f"recipe base: {error}"
        dir_params = []
        for d, direction in enumerate(directions):
            params, error = self.schema.check(direction, self.device, finite=False)
            if error is not None:
                return f"recipe direction {d}: {error}"
            dir_params.append(params)
        slots = {s.name: s for s in self.schema.slots}
        varied_buffers = {n for p in dir_params for n in p if slots[n].is_buffer and p[n].is_floating_point()}
        names = [n for n in self.schema.param_names if slots[n].dtype.is_floating_point]
        names += [n for n in self.schema.buffer_names if n in varied_buffers]
        fixed = {n: base_params[n] for n in base_params if n not in names}

        def flat(params: Mapping[str, torch.Tensor], default: Callable[[str], torch.Tensor]) -> torch.Tensor:
            parts = [(params[n] if n in params else default(n)).detach().to(self.device, torch.float32).reshape(-1)
                     for n in names]
            return torch.cat(parts)

        flats = {"base": flat(base_params, lambda n: self.buffers[n])}
        if dir_params:
            zeros = lambda n: torch.zeros(slots[n].shape, device=self.device)  # noqa: E731
            flats["directions"] = torch.stack([flat(p, zeros) for p in dir_params])
        shared = self._shared(given=fixed, skip=names)
        for n, t in fixed.items():
            if n not in shared:  # a non-floating parameter
                shared[n] = t.detach().to(self.device)
        return Prepared(names, [slots[n].shape for n in names], flats, shared)

    def _recipe_chunk(self, rows: Rows, prepared: Prepared) -> _Chunk:
        chunk = _Chunk(len(rows))
        with torch.no_grad():
            # Cast first: a value finite in float32 can overflow bfloat16.
            flat = rows.materialise(prepared, self.device, out=prepared.scratch(len(rows))).to(self.dtype)
            bound = rows.bound(prepared, self.device)
            if bound is not None:
                # Rows whose values are bounded well inside the dtype's range are finite.
                suspect = (~(bound < SAFE_FRACTION * torch.finfo(self.dtype).max)).nonzero().flatten()
            else:
                # A row with NaN or inf has a non-finite sum; only those rows (and
                # rows whose finite values overflow the sum) get the exact check.
                suspect = (~torch.isfinite(flat.sum(dim=1, dtype=torch.float32))).nonzero().flatten()
            if len(suspect):
                exact = torch.isfinite(flat.index_select(0, suspect)).all(dim=1)
                bad = suspect[~exact].tolist()
            else:
                bad = []
        for i in bad:
            chunk.mark(i, INVALID, _nonfinite_error(flat[i], prepared))
        if self.compile and self.chunk_size and len(rows) < self.chunk_size and not bad:
            # One shape (and layout) for the compiled call: pad with copies of the last row.
            flat = torch.cat([flat, flat[-1:].expand(self.chunk_size - len(rows), flat.shape[1])])
        batched = prepared.unflatten(flat, self.dtype)
        rows_ok = np.delete(np.arange(len(rows)), bad) if bad else np.arange(len(rows))
        if len(rows_ok):
            if bad:
                index = torch.as_tensor(rows_ok, device=self.device)
                batched = {n: t.index_select(0, index) for n, t in batched.items()}
            self._evaluate_stacked(batched, prepared.shared, rows_ok, chunk)
        return chunk

    # -- evaluating a stacked chunk -------------------------------------------
    #: The key and the size of a chunk size chosen by `sweep.chunking`, while the evaluator keeps to it.
    _auto_chunk: Optional[Tuple[str, int]] = None

    def _chunk_hint(self, limit: Optional[int] = None) -> int:
        """The chunk size, measured on first use or read from what an earlier process measured (see
        `sweep.chunking`); `limit` (the candidates at hand) caps the trials."""
        if self.chunk_size is None:
            trial = self.trial()
            self.chunk_size, self.strategy, self.strategy_reason = choose_chunk_size(trial, limit)
            self._auto_chunk = (chunk_key(trial, limit), self.chunk_size)
        return self.chunk_size

    def _shrink_chunk(self, size: int) -> None:
        """Chunks of `size` from here on (one ran out of memory); a choice kept for later processes is
        dropped at once, so the next process measures again."""
        self.chunk_size = max(1, size)
        if self._auto_chunk is not None and self.chunk_size < self._auto_chunk[1]:
            forget_chunk_size(self._auto_chunk[0])
            self._auto_chunk = None

    def trial(self) -> Trial:
        """What `sweep.chunking` measures to choose the chunk size and the strategy: the module's own weights
        as one candidate, evaluated alone and vmapped on the first data batch."""
        first = self.batches[:1]

        def candidate() -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
            own = {n: p.detach() for n, p in self.module.named_parameters()}
            if not own or any(t.device.type == "meta" for t in own.values()):
                return None
            return {n: self._cast(t.to(self.device, copy=True)) for n, t in own.items()}, self._shared()

        def shapes(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return (tuple(value.shape), str(value.dtype))
            if isinstance(value, (tuple, list)):
                return tuple(shapes(v) for v in value)
            return type(value).__name__

        data = tuple((shapes(x), shapes(y)) for x, y, _ in self.batches[:2])
        key = (data, len(self.batches), str(self.dtype), self.compile, callable_id(self.metrics))
        return Trial(
            module=self.module, device=self.device, example=first[0][0], key=key, candidate=candidate,
            loop=lambda stacked, shared: self._loop_row(stacked, shared, 0, batches=first),
            vmap=lambda stacked, shared, k: self._vmap_values(stacked, shared, k, batches=first, compiled=False))

    def _evaluate_stacked(self, batched: Dict[str, torch.Tensor], shared: Dict[str, torch.Tensor],
                          rows: np.ndarray, chunk: _Chunk) -> None:
        """Evaluate k stacked candidates; rows[i] is where candidate i's result goes in `chunk`."""
        if self.strategy != "loop":
            k = next(iter(batched.values())).shape[0] if batched else len(rows)
            try:
                if self.metrics_reason:
                    self._fill(rows, self._forward_rows(batched, self._fresh(shared), len(rows))[0], chunk)
                    return
                values = self._vmap_values(batched, self._fresh(shared), k)
            except Exception as e:  # noqa: BLE001 - any failure: the loop decides what it was
                if is_out_of_memory(e) and len(rows) > 1:
                    # Too big for the device: halve the chunk (and every later one) and try again.
                    half = len(rows) // 2
                    self._shrink_chunk(min(self.chunk_size or half, half))
                    warnings.warn(f"sweep: a chunk of {len(rows)} candidates ran out of memory; "
                                  f"chunks are now {self.chunk_size}", RuntimeWarning, stacklevel=3)
                    for part in (slice(0, half), slice(half, len(rows))):
                        self._evaluate_stacked({n: t[part] for n, t in batched.items()}, shared, rows[part], chunk)
                    return
                if not self.metrics_reason and self._metrics_do_not_vmap(batched, shared, rows, chunk, e):
                    return
                self._loop_chunk(batched, shared, rows, chunk, vmap_error=e)
                return
            if self.strategy is None:
                self.strategy = "vmap"
            for name, array in values.items():
                column = chunk.values.setdefault(name, np.full(chunk.k, np.nan))
                column[rows] = array[: len(rows)]  # a padded chunk has extra rows at the end
            return
        self._loop_chunk(batched, shared, rows, chunk)

    def _fresh(self, shared: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`shared` with its buffers copied: a forward that writes to them leaks no state from one
        chunk (or candidate) to the next, and the module's stay as they are."""
        return {n: b.clone() if n in self.buffers else b for n, b in shared.items()}

    def _metrics_do_not_vmap(self, batched, shared, rows, chunk, vmap_error: BaseException) -> bool:
        """After a vmapped chunk failed: when the forward alone runs under vmap, the metrics function is
        what does not. Then the chunk is evaluated with the metrics one candidate at a time, as every later
        chunk will be, with a warning that names the metrics function; returns whether it was."""
        try:
            results, numbers = self._forward_rows(batched, self._fresh(shared), len(rows))
        except Exception:  # noqa: BLE001 - the forward does not vmap either: the loop decides
            return False
        if not any(isinstance(r, dict) for r in results):
            return False  # every row failed: nothing tells the metrics apart from the module
        if self.strategy is None:
            self.strategy = "vmap"
        self.metrics_reason = f"{type(vmap_error).__name__}: {first_line(vmap_error)}"
        self._fill(rows, results, chunk)
        ok = [r for r in results if isinstance(r, dict)]
        # A number that differs between candidates was computed from the output; a constant vmaps.
        varying = sorted(n for n in numbers if len({r[n] for r in ok}) > 1) or sorted(numbers)
        which = ""
        if varying:
            which = (f"; metric {', '.join(map(repr, varying))} came back as a Python number computed from the "
                     f"output (.item(), float()), which vmap cannot batch")
        warnings.warn(
            f"sweep: the metrics function {_callable_name(self.metrics)} does not run under torch.vmap "
            f"({self.metrics_reason}){which}; return tensors from it (e.g. `(out.argmax(1) == y).float().mean()`, "
            f"not `.item()`) to evaluate at full speed. The module still runs under vmap; only the metrics "
            f"are computed one candidate at a time (same results, slower)",
            RuntimeWarning,
            stacklevel=5,
        )
        return True

    def _forward_rows(self, batched: Dict[str, torch.Tensor], shared: Dict[str, torch.Tensor],
                      count: int) -> Tuple[List[Any], Set[str]]:
        """The forward under vmap, the metrics one candidate at a time (for a metrics function that does
        not vmap): each of the first `count` rows' metric values, or the error that fails the row, and the
        names of metrics that came back as plain numbers. Raises when the forward itself fails."""
        call = self._call("forward", False)
        sums: List[Dict[str, torch.Tensor]] = [{} for _ in range(count)]
        errors: Dict[int, str] = {}
        numbers: Set[str] = set()
        with torch.no_grad():
            for x, y, n in self.batches:
                out = self._to_float(call(batched, shared, x))
                for i in range(count):
                    if i in errors:
                        continue
                    try:
                        got = self.metrics(tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, out), y)
                        checked = self._check_metrics(got)
                    except CandidateError as e:
                        errors[i] = str(e)
                        continue
                    except Exception as e:  # noqa: BLE001 - any error in user code fails this row only
                        errors[i] = f"{type(e).__name__}: {e}"
                        continue
                    numbers.update(name for name, value in got.items() if not isinstance(value, torch.Tensor))
                    for name, value in checked.items():
                        term = value * n
                        sums[i][name] = sums[i][name] + term if name in sums[i] else term
                    if self.metric_names is None:
                        self.metric_names = tuple(checked)
        results: List[Any] = [errors[i] if i in errors else
                              {name: float(total.item()) / self.total for name, total in sums[i].items()}
                              for i in range(count)]
        return results, numbers

    def _fill(self, rows: np.ndarray, results: List[Any], chunk: _Chunk) -> None:
        """Put each row's metric values (or the error that failed it) where the row goes in `chunk`."""
        for row, result in zip(rows, results):
            if isinstance(result, str):
                chunk.mark(row, FAILED, result)
                continue
            for name, value in result.items():
                chunk.values.setdefault(name, np.full(chunk.k, np.nan))[row] = value

    def _loop_chunk(self, batched, shared, rows, chunk, vmap_error: Optional[BaseException] = None) -> None:
        any_ok = False
        compiled = self.compile and self.strategy == "loop"
        for i, row in enumerate(rows):
            try:
                values = self._loop_row(batched, shared, i, compiled=compiled)
            except CandidateError as e:
                chunk.mark(row, FAILED, str(e))
                continue
            any_ok = True
            for name, value in values.items():
                chunk.values.setdefault(name, np.full(chunk.k, np.nan))[row] = value
        if vmap_error is not None and any_ok and self.strategy != "loop":
            # The loop ran what vmap could not: the module (or metrics) does not vmap.
            self.strategy = "loop"
            self.strategy_reason = f"{type(vmap_error).__name__}: {first_line(vmap_error)}"
            warnings.warn(
                f"sweep: this module does not evaluate under torch.vmap ({self.strategy_reason}); "
                f"evaluating one candidate at a time instead (same results, slower)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _loop_row(self, batched: Dict[str, torch.Tensor], shared: Dict[str, torch.Tensor], i: int,
                  batches: Optional[List[Tuple[Any, Any, int]]] = None, compiled: bool = False) -> Dict[str, float]:
        call = self._call("single", True) if compiled else None
        tensors = {n: t[i] for n, t in batched.items()}
        for n, b in shared.items():
            # Buffers are cloned per candidate so a forward that writes to them
            # cannot leak state into the next candidate.
            tensors[n] = b.clone() if n in self.buffers else b
        sums: Dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for x, y, n in batches or self.batches:
                    if call is not None:
                        got = call(tensors, {}, x, y)
                    else:
                        got = self.metrics(self._to_float(functional_call(self.module, tensors, (x,), strict=True)), y)
                    for name, value in self._check_metrics(got).items():
                        term = value * n
                        sums[name] = sums[name] + term if name in sums else term
        except CandidateError:
            raise
        except Exception as e:  # noqa: BLE001 - any error in user code fails this row only
            if is_out_of_memory(e):
                size = sum(t[i].numel() * t[i].element_size() for t in batched.values())
                raise CandidateError(
                    f"out of memory evaluating this candidate alone on {self.device} "
                    f"(its weights take {size:,} bytes; {first_line(e)})") from e
            raise CandidateError(f"{type(e).__name__}: {e}") from e
        result = {name: float(total.item()) / self.total for name, total in sums.items()}
        if self.metric_names is None:
            self.metric_names = tuple(result)
        return result

    def _to_float(self, out: Any) -> Any:
        if self.dtype == torch.float32:
            return out
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    def _call(self, kind: str, compiled: bool) -> Callable[..., Any]:
        """The forward-and-metrics call for one candidate ('single') or a stacked chunk ('vmap'), or the
        forward alone for a stacked chunk ('forward')."""
        key = (kind, compiled)
        if key not in self._calls:
            module, metrics, to_float, device = self.module, self.metrics, self._to_float, self.device

            def forward(params, shared, x):
                return functional_call(module, (params, shared), (x,), strict=True)

            def one(params, shared, x, y):
                return _numbers_as_tensors(metrics(to_float(forward(params, shared, x)), y), device)

            if kind == "forward":
                call = torch.vmap(forward, in_dims=(0, None, None), randomness="different")
            elif kind == "single":
                call = one
            else:
                call = torch.vmap(one, in_dims=(0, None, None, None), randomness="different")
            self._calls[key] = torch.compile(call, dynamic=False) if compiled else call
        return self._calls[key]

    def _vmap_values(self, batched, shared, k: int, batches: Optional[List[Tuple[Any, Any, int]]] = None,
                     compiled: Optional[bool] = None) -> Dict[str, np.ndarray]:
        compiled = self.compile if compiled is None else compiled
        call = self._call("vmap", compiled)
        if compiled and self.chunk_size and k < self.chunk_size:
            # One shape for the compiled call: pad the short chunk with copies of its last row.
            pad = self.chunk_size - k
            batched = {n: torch.cat([t, t[-1:].expand((pad,) + tuple(t.shape[1:]))]) for n, t in batched.items()}
            values = self._vmap_values(batched, shared, self.chunk_size, batches, compiled)
            return {name: v[:k] for name, v in values.items()}
        sums: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for x, y, n in batches or self.batches:
                first = compiled and self.compile_seconds == 0.0
                t0 = time.perf_counter()
                got = call(batched, shared, x, y)
                if first:
                    self.compile_seconds = time.perf_counter() - t0
                if not isinstance(got, Mapping):
                    raise TypeError(f"metrics must return a mapping, got {type(got).__name__}")
                if self.metric_names is not None and set(got) != set(self.metric_names):
                    raise ValueError("metric names differ from earlier candidates")
                for name, value in got.items():
                    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (k,):
                        raise ValueError(f"metric {name!r} is not one scalar per candidate")
                    term = value.to(torch.float64) * n
                    sums[name] = sums[name] + term if name in sums else term
        result = {name: (total / self.total).cpu().numpy() for name, total in sums.items()}
        if self.metric_names is None:
            self.metric_names = tuple(result)
        return result

    def _check_metrics(self, got: Any) -> Dict[str, torch.Tensor]:
        if not isinstance(got, Mapping):
            raise CandidateError(
                f"metrics must return a mapping of name → scalar tensor, got {type(got).__name__}"
            )
        if self.metric_names is not None and set(got) != set(self.metric_names):
            raise CandidateError(
                f"metrics returned names {sorted(map(str, got))}, expected {sorted(self.metric_names)} "
                f"as for earlier candidates; return the same names for every candidate"
            )
        checked: Dict[str, torch.Tensor] = {}
        for name, value in got.items():
            if not isinstance(name, str) or not name:
                raise CandidateError(f"metric names must be non-empty strings, got {name!r}")
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise CandidateError(
                        f"metric '{name}' must be a scalar, got a tensor of shape {tuple(value.shape)}"
                    )
                checked[name] = value.detach().reshape(()).to(torch.float64)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                checked[name] = torch.tensor(float(value), dtype=torch.float64, device=self.device)
            elif hasattr(value, "item") and getattr(value, "size", None) == 1:
                checked[name] = torch.tensor(float(value.item()), dtype=torch.float64, device=self.device)
            else:
                raise CandidateError(f"metric '{name}' must be a scalar tensor or number, got {type(value).__name__}")
        return checked

    # -- the table -------------------------------------------------------------
    def _table(self, chunks: List[Tuple[_Chunk, float]], ids: Optional[Sequence[int]],
               recipe_columns: Dict[str, pa.Array], timing: bool) -> pa.Table:
        n = sum(c.k for c, _ in chunks)
        if self.metric_names is None and n:
            try:  # no candidate was ok: still give the table its metric columns
                self.probe_metric_names()
            except CandidateError:
                pass
        if ids is None:
            ids = range(n)
        elif len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} candidates")
        codes = np.concatenate([c.codes for c, _ in chunks]) if chunks else np.zeros(0, np.int8)
        errors: List[Optional[str]] = [None] * n
        offset = 0
        for c, _ in chunks:
            for i, text in c.errors.items():  # few: errors are the exception
                errors[offset + i] = text
            offset += c.k
        columns: Dict[str, Any] = {
            "candidate_id": arrow_array(np.asarray(ids, dtype=np.int64)),
            "status": arrow_array(_STATUS_NAMES[codes], pa.string()),
            "error": arrow_array(errors, pa.string()),
        }
        columns.update(recipe_columns)
        ok = codes == 0
        for name in self.metric_names or ():
            values = np.concatenate([c.values.get(name, np.full(c.k, np.nan)) for c, _ in chunks]) if chunks else np.array([])
            columns[name] = arrow_array(values, pa.float64(), mask=~ok)
        if timing:
            columns["eval_seconds"] = arrow_array(
                np.concatenate([np.full(c.k, t / max(c.k, 1)) for c, t in chunks]) if chunks else np.array([]),
                pa.float64())
        return pa.table(columns)


def _is_number(value: Any) -> bool:
    """A plain number a metrics function may return for a metric: int, float, or a numpy scalar."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (hasattr(value, "item") and getattr(value, "size", None) == 1)


def _numbers_as_tensors(got: Any, device: torch.device) -> Any:
    """`got` with its plain numbers as 0-d tensors: a vmapped call returns only tensors, and vmap
    repeats a constant (one that does not depend on the candidate) for every candidate."""
    if not isinstance(got, Mapping) or not any(_is_number(v) for v in got.values()):
        return got
    return {name: torch.tensor(float(v.item() if hasattr(v, "item") else v), dtype=torch.float64, device=device)
            if _is_number(v) else v for name, v in got.items()}


def _callable_name(fn: Any) -> str:
    """`module.qualname` of a function (what a config's `metrics.function` names), else its repr."""
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:
        return repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def _check_batch_shapes(batches: List[Tuple[Any, Any, int]]) -> None:
    """Every batch's tensors must match the first batch's in all but the batch dimension."""
    def shapes(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape[1:]), value.dtype)
        if isinstance(value, (tuple, list)):
            return tuple(shapes(v) for v in value)
        if isinstance(value, Mapping):
            return tuple((k, shapes(v)) for k, v in value.items())
        return None

    first = (shapes(batches[0][0]), shapes(batches[0][1]))
    for i, (x, y, _) in enumerate(batches[1:], 1):
        got = (shapes(x), shapes(y))
        if got != first:
            raise ValueError(
                f"data batch {i} does not match batch 0: (x, y) per-example shapes and dtypes {got} "
                f"against {first}; every batch must hold the same kind of examples")


def _nonfinite_error(row: torch.Tensor, prepared: Prepared) -> str:
    problems = []
    for name, part in zip(prepared.names, torch.split(row, prepared.sizes)):
        n_nan = int(torch.isnan(part).sum())
        n_inf = int(torch.isinf(part).sum())
        if n_nan or n_inf:
            problems.append(f"key '{name}': expected finite values, got {n_nan} NaN and {n_inf} inf")
    return "materialised candidate is not finite: " + "; ".join(problems)
