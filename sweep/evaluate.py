"""Evaluate many candidate parameter dicts against one shared module."""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .types import FAILED, INVALID, OK, Batch, Invalid, MetricsFn
from .validate import Schema


def evaluate(
    module: torch.nn.Module,
    candidates: Iterable[Any],
    data: Iterable[Batch],
    metrics: MetricsFn,
    *,
    device: Optional[torch.device | str] = None,
) -> pa.Table:
    """Evaluate each candidate parameter dict against `module` on `data`.

    Returns one row per candidate, in input order: `candidate_id` (0…N−1),
    `status` (`ok` | `invalid` | `failed`), `error` (null when ok) and one
    float64 column per metric (null when the row is not ok). The module is
    evaluated in eval mode, and its parameters, buffers and mode are as before
    when this returns; the caller's tensors are never mutated.
    """
    evaluator = Evaluator(module, data, metrics, device=device)
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


def _to(device: torch.device):
    return lambda v: v.to(device) if isinstance(v, torch.Tensor) else v


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class CandidateError(Exception):
    """A candidate whose forward or metrics failed; the row becomes `failed`."""


class Evaluator:
    """A module, its eval data and metrics, prepared once on one device.

    Workers hold one and feed it batch after batch; `evaluate()` uses one for
    a single call.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        data: Iterable[Batch],
        metrics: MetricsFn,
        *,
        device: Optional[torch.device | str] = None,
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(metrics):
            raise TypeError(f"metrics must be a callable metrics(output, y) -> mapping, got {type(metrics).__name__}")
        self.module = module
        self.metrics = metrics
        self.device = torch.device(device) if device is not None else _module_device(module)
        self.schema = Schema(module)
        move = _to(self.device)
        self.batches: List[Tuple[Any, Any, int]] = []
        for i, item in enumerate(data):
            try:
                x, y = item
            except (TypeError, ValueError):
                raise TypeError(
                    f"data batch {i} must be an (x, y) pair, got {type(item).__name__}"
                ) from None
            self.batches.append((tree_map(move, x), tree_map(move, y), _batch_size(x, y)))
        if not self.batches:
            raise ValueError("data yielded no batches: give at least one (x, y) batch to evaluate on")
        self.total = sum(n for _, _, n in self.batches)
        named_buffers = dict(module.named_buffers())
        self.buffers = {n: named_buffers[n].detach().to(self.device) for n in self.schema.buffer_names}
        self.metric_names: Optional[Tuple[str, ...]] = None
        self._modes = [(m, m.training) for m in module.modules()]
        module.eval()

    def restore(self) -> None:
        """Give the module back its train/eval modes."""
        for m, training in self._modes:
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
            self._evaluate_one(own)
        return self.metric_names

    def run(
        self,
        candidates: Iterable[Any],
        ids: Optional[Sequence[int]] = None,
        *,
        timing: bool = False,
    ) -> pa.Table:
        """Evaluate candidates; returns the results table (see `evaluate`).

        `ids` replaces 0…N−1 as `candidate_id`; `timing` adds `eval_seconds`.
        """
        statuses: List[str] = []
        errors: List[Optional[str]] = []
        values: List[Optional[Dict[str, float]]] = []
        seconds: List[float] = []
        for candidate in candidates:
            start = time.perf_counter()
            status, error, row = self._row(candidate)
            seconds.append(time.perf_counter() - start)
            statuses.append(status)
            errors.append(error)
            values.append(row)
        n = len(statuses)
        if self.metric_names is None and n:
            try:  # no candidate was ok: still give the table its metric columns
                self.probe_metric_names()
            except CandidateError:
                pass
        if ids is None:
            ids = range(n)
        elif len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} candidates")
        columns: Dict[str, pa.Array] = {
            "candidate_id": pa.array(list(ids), pa.int64()),
            "status": pa.array(statuses, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
        for name in self.metric_names or ():
            columns[name] = pa.array([None if v is None else v[name] for v in values], pa.float64())
        if timing:
            columns["eval_seconds"] = pa.array(seconds, pa.float64())
        return pa.table(columns)

    def _row(self, candidate: Any) -> Tuple[str, Optional[str], Optional[Dict[str, float]]]:
        if isinstance(candidate, Invalid):
            return INVALID, candidate.reason, None
        params, error = self.schema.check(candidate, self.device)
        if error is not None:
            return INVALID, error, None
        try:
            return OK, None, self._evaluate_one(params)
        except CandidateError as e:
            return FAILED, str(e), None

    def _evaluate_one(self, params: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        # Copies: a forward that writes into its weights (an Embedding with
        # max_norm, say) must not reach the caller's tensors or the module's.
        tensors = {n: t.detach().to(self.device, copy=True) for n, t in params.items()}
        given = {n: tensors.pop(n) for n in list(tensors) if n in self.buffers}
        # Buffers are cloned per candidate so a forward that writes to them
        # cannot leak state into the module or the next candidate.
        for n, b in self.buffers.items():
            tensors[n] = given[n] if n in given else b.clone()
        sums: Dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for x, y, n in self.batches:
                    out = functional_call(self.module, tensors, (x,), strict=True)
                    got = self.metrics(out, y)
                    for name, value in self._check_metrics(got).items():
                        term = value * n
                        sums[name] = sums[name] + term if name in sums else term
        except CandidateError:
            raise
        except Exception as e:  # noqa: BLE001 - any error in user code fails this row only
            raise CandidateError(f"{type(e).__name__}: {e}") from e
        result = {name: float(total.item()) / self.total for name, total in sums.items()}
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
