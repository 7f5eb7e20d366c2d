"""A population of candidates held as stacked tensors: `sweep.Stacked`.

What `torch.func.stack_module_state` returns (one `[K, *shape]` tensor per
parameter), or the `[K, P]` matrix that evolution-strategy libraries
(EvoTorch, evosax) hold, evaluated without a Python step per candidate: the
metadata is checked once per key, chunks are views (`t[start:stop]`), and the
value checks run once per chunk, one op per key.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch

from .validate import Plan, Schema

#: At most this many parameters are listed when a flat matrix's width does not match the module.
MAX_NAMES_SHOWN = 8


class Stacked:
    """K candidates as stacked tensors, one row per candidate.

    `params` is either a mapping of name → `[K, *shape]` tensor, named as
    `module.named_parameters()` names them (tied weights under any of their
    names, as for a candidate dict), or a 2-D `[K, P]` tensor whose row k is
    candidate k's parameters flattened and concatenated in
    `module.named_parameters()` order (each tied tensor once, as
    `named_parameters()` lists it), P being the module's parameter count. A
    flat matrix is resolved against the module at evaluate time into views,
    one per parameter; its dtype must be the parameters'. Chunks of rows are
    views; each is copied once on its way to the module (moved to the
    device, cast to the precision, or cloned), so a forward that writes to
    its weights never writes to the caller's tensors.

    Buffers: the module's own, shared by every candidate, unless `buffers`
    gives some of them as `[K, *shape]` tensors (one value per candidate);
    a mapping `params` may hold buffers too. `torch.func.stack_module_state`'s
    `(params, buffers)` pair goes in as `Stacked(params, buffers)`, or whole as
    `Stacked(pair)`.

    Each key is checked once against the module (keys, shapes after the first
    dimension, dtypes, devices, layouts) with the wording a candidate dict
    gets; finite values and tied weights agreeing are checked per row. A row
    that fails gets, as its error, the one its own candidate dict would get
    (`sweep.check_candidate`); the other rows are evaluated. Row k is
    `candidate_id` k. A Stacked pickles with its tensors (a Ray task can
    carry it).
    """

    def __init__(self, params: Mapping[str, torch.Tensor] | torch.Tensor,
                 buffers: Optional[Mapping[str, torch.Tensor]] = None):
        if buffers is None and isinstance(params, tuple) and len(params) == 2 and all(
                isinstance(p, Mapping) for p in params):
            params, buffers = params  # stack_module_state's (params, buffers)
        self.flat: Optional[torch.Tensor] = None
        self.params: Dict[str, torch.Tensor] = {}
        if isinstance(params, torch.Tensor):
            if params.dim() != 2:
                raise ValueError(
                    f"Stacked: a tensor of params must be the flat [K, P] matrix (one row of P parameter values per "
                    f"candidate), got a {params.dim()}-d tensor of shape {tuple(params.shape)}; give a mapping of "
                    f"name → [K, *shape] tensor otherwise")
            self.flat = params
        elif isinstance(params, Mapping):
            self.params = _stacked_tensors("params", params)
        else:
            raise TypeError(
                f"Stacked: params must be a mapping of name → [K, *shape] tensor or a [K, P] tensor, "
                f"got {type(params).__name__}")
        if buffers is not None and not isinstance(buffers, Mapping):
            raise TypeError(f"Stacked: buffers must be a mapping of name → [K, *shape] tensor, "
                            f"got {type(buffers).__name__}")
        self.buffers: Dict[str, torch.Tensor] = _stacked_tensors("buffers", buffers or {})
        both = sorted(set(self.params) & set(self.buffers), key=str)
        if both:
            raise ValueError(f"Stacked: key {', '.join(map(repr, both))} given in both params and buffers; "
                             f"give each tensor once")
        if self.flat is None and not self.params:
            raise ValueError("Stacked: params holds no tensors; give one [K, *shape] tensor per parameter")
        counts: Dict[int, List[str]] = {}
        if self.flat is not None:
            counts.setdefault(int(self.flat.shape[0]), []).append("the flat params matrix")
        for key, t in list(self.params.items()) + list(self.buffers.items()):
            counts.setdefault(int(t.shape[0]), []).append(repr(key))
        if len(counts) > 1:
            parts = "; ".join(f"K={k} for {', '.join(keys)}" for k, keys in sorted(counts.items()))
            raise ValueError(f"Stacked: every tensor must hold the same number K of candidates in its first "
                             f"dimension, got {parts}")
        self.k = next(iter(counts))

    def __len__(self) -> int:
        return self.k

    def __repr__(self) -> str:
        what = f"flat [{self.k}, {self.flat.shape[1]}]" if self.flat is not None else f"{len(self.params)} params"
        extra = f", {len(self.buffers)} buffers" if self.buffers else ""
        return f"Stacked(K={self.k}, {what}{extra})"

    def resolve(self, schema: Schema, device: torch.device) -> "Population":
        """The population as `schema`'s module sees it, checked once per key (see `Population`)."""
        if self.flat is not None:
            names = [s for s in schema.slots if not s.is_buffer]
            sizes = [_numel(s.shape) for s in names]
            width = int(self.flat.shape[1])
            if width != sum(sizes):
                shown = ", ".join(f"{s.name} {n:,}" for s, n in zip(names[:MAX_NAMES_SHOWN], sizes))
                if len(names) > MAX_NAMES_SHOWN:
                    shown += f", and {len(names) - MAX_NAMES_SHOWN} more"
                error = (f"the flat params matrix has P={width:,} columns, expected P={sum(sizes):,}: the module's "
                         f"parameter count, each parameter flattened in named_parameters() order ({shown})")
                return Population(self, schema, device, None, sizes, error=error)
            return Population(self, schema, device, [(s.name, s.shape) for s in names], sizes)
        return Population(self, schema, device, None, [])


def _stacked_tensors(what: str, tensors: Mapping[Any, Any]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Stacked: {what} key {key!r} must be a [K, *shape] tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"Stacked: {what} key {key!r} must be a [K, *shape] tensor with one row per "
                             f"candidate, got a 0-d tensor")
        out[key] = t
    return out


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dense(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized


class Population:
    """A `Stacked` resolved against a module's schema, for one evaluation device.

    `error` is the metadata problem every row shares (None when there is
    none); `plan` maps the tensors to the module's names (see
    `sweep.validate.Plan`). `chunk(start, stop)` gives the rows' tensors by
    key (views, or copies on the device); `row(views, i)` is row i of a chunk
    as a candidate dict, to check in full.
    """

    def __init__(self, stacked: Stacked, schema: Schema, device: torch.device,
                 flat_names: Optional[List[Tuple[str, Tuple[int, ...]]]], sizes: List[int],
                 error: Optional[str] = None):
        self.stacked = stacked
        self.k = stacked.k
        self.device = device
        self.flat_names = flat_names
        self.sizes = sizes
        #: None when the population has no rows, or a flat matrix does not fit the module
        self.plan: Optional[Plan] = None
        self.error = error
        if error is not None or self.k == 0:
            return
        proxy = self._proxy(self.chunk(0, 1)[0])
        self.plan = schema.plan(proxy, device)
        self.error = self.plan.error

    def chunk(self, start: int, stop: int) -> Tuple[Dict[str, torch.Tensor], Set[str]]:
        """Rows `start:stop` by key, and the keys whose tensors are copies (the rest are views of the caller's
        tensors). Moved to the device once the metadata is known to be valid; before, or when it is not,
        they stay where they are (a row's full check names a tensor's own device)."""
        move = self.plan is not None and self.plan.error is None
        views: Dict[str, torch.Tensor] = {}
        copies: Set[str] = set()
        stacked = self.stacked
        if stacked.flat is not None and self.flat_names is not None:
            rows = stacked.flat[start:stop]
            moved = rows.to(self.device) if move else rows
            k = stop - start
            for (name, shape), part in zip(self.flat_names, torch.split(moved, self.sizes, dim=1)):
                views[name] = part.view((k,) + tuple(shape))
                if moved.data_ptr() != rows.data_ptr():
                    copies.add(name)
        for key, t in list(stacked.params.items()) + list(stacked.buffers.items()):
            if not _dense(t):  # its metadata error names it
                views[key] = t
                continue
            rows = t[start:stop]
            views[key] = rows.to(self.device) if move else rows
            if views[key].data_ptr() != rows.data_ptr():
                copies.add(key)
        return views, copies

    @staticmethod
    def _proxy(views: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Row 0 as a candidate dict; a tensor that is not dense stands for itself (its error names no shape)."""
        return {key: t[0] if _dense(t) else t for key, t in views.items()}

    def row(self, views: Mapping[str, torch.Tensor], i: int) -> Dict[str, torch.Tensor]:
        """Row `i` of a chunk as a candidate dict (for the full check of a row that failed a value check)."""
        return {key: t[i] if _dense(t) else t for key, t in views.items()}


