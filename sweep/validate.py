"""Strict validation of candidate dicts against a module's parameters and buffers.

Every problem of one candidate is collected and reported in one message that
names each key with what was expected and what came, in the spirit of torch's
strict `load_state_dict`.

The checks come in two kinds. Metadata (keys, shapes, dtypes, devices,
layouts) is cheap to read, so a population is checked one candidate at a time,
and a candidate whose metadata matches one found valid before costs one tuple
comparison (`FastCheck`). Values (finite, tied weights agreeing) are checked
once per chunk on the stacked tensors, one op per key (`bad_rows`); only a row
found bad there is checked again in full, so its error is the one `check` gives.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .lazy import torch
from .types import ParamDict

#: At most this many problems are spelled out in one error; the rest are counted.
MAX_PROBLEMS_SHOWN = 20
#: At most this many metadata signatures of valid candidates are remembered (a population has one or a few:
#: with and without buffers, say); the oldest is forgotten first.
MAX_SIGNATURES = 64


@dataclass(frozen=True)
class Slot:
    """One tensor the module needs: its canonical name, aliases (tied weights) and type (a torch.dtype; its
    name, 'float32', in a schema `sweep.check_cache` kept)."""

    name: str
    aliases: Tuple[str, ...]
    shape: Tuple[int, ...]
    dtype: Any
    is_buffer: bool


@dataclass(frozen=True)
class Plan:
    """Where a candidate's tensors go, read from its metadata alone (keys, shapes, dtypes, devices, layouts).

    `chosen` pairs each canonical name the candidate gives with the key whose
    tensor is used (the first of its names given, in the module's order);
    `tied` pairs a canonical name with each other name given for the same
    tensor, whose values must equal the chosen one's; `finite` names the
    chosen tensors whose values must be finite; `error` holds the metadata
    problems (None when there are none). The value checks are left to
    whoever holds the values.
    """

    chosen: Tuple[Tuple[str, str], ...]
    tied: Tuple[Tuple[str, str], ...]
    finite: Tuple[str, ...]
    error: Optional[str]


def describe(shape: Tuple[int, ...], dtype: torch.dtype) -> str:
    dims = "scalar" if not shape else f"({shape[0]},)" if len(shape) == 1 else "(" + "×".join(map(str, shape)) + ")"
    return f"shape {dims} {str(dtype).removeprefix('torch.')}"


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return describe(tuple(value.shape), value.dtype)
    return f"a {type(value).__name__}"


class Schema:
    """What a candidate for `module` must look like.

    Parameters are required; buffers are optional and default to the module's
    own. Tied weights (one tensor under several names) may be given under any
    of their names; giving several names with different values is an error.
    """

    def __init__(self, module: torch.nn.Module):
        slots: List[Slot] = []
        for is_buffer, named in (
            (False, module.named_parameters(remove_duplicate=False)),
            (True, module.named_buffers(remove_duplicate=False)),
        ):
            seen: Dict[int, int] = {}
            for name, tensor in named:
                if tensor is None:
                    continue
                key = id(tensor)
                if key in seen:
                    slot = slots[seen[key]]
                    slots[seen[key]] = Slot(slot.name, slot.aliases + (name,), slot.shape, slot.dtype, is_buffer)
                    continue
                seen[key] = len(slots)
                slots.append(Slot(name, (name,), tuple(tensor.shape), tensor.dtype, is_buffer))
        self.slots: Tuple[Slot, ...] = tuple(slots)
        self.by_alias: Dict[str, Slot] = {alias: s for s in slots for alias in s.aliases}
        self.param_names = tuple(s.name for s in slots if not s.is_buffer)
        self.buffer_names = tuple(s.name for s in slots if s.is_buffer)

    def check(self, candidate: Any, device: torch.device, *,
              finite: bool = True) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[str]]:
        """Validate one candidate.

        Returns `(tensors by canonical name, None)` when valid, else
        `(None, error)` with every problem in one message. Tensors are returned
        as given (never copied or mutated here). `finite=False` skips the
        NaN/inf check (recipe directions).
        """
        if not isinstance(candidate, Mapping):
            return None, _not_a_mapping(candidate)
        problems, chosen, _ = self._inspect(candidate, device, finite, values=True)
        if problems:
            return None, _join(problems)
        return {name: value for name, (_, value) in chosen.items()}, None

    def plan(self, candidate: Mapping[str, Any], device: torch.device) -> Plan:
        """What `candidate`'s metadata says: where each tensor goes and the problems it shows (see `Plan`).

        The value checks (finite values, tied weights agreeing) are not made
        here; a candidate whose plan has no error is valid when its values pass
        them, and its error, when they do not, is the one `check` gives.
        """
        problems, chosen, tied = self._inspect(candidate, device, False, values=False)
        slots = {s.name: s for s in self.slots}
        return Plan(
            chosen=tuple((name, key) for name, (key, _) in chosen.items()),
            tied=tuple(tied),
            finite=tuple(name for name in chosen if slots[name].dtype.is_floating_point or slots[name].dtype.is_complex),
            error=_join(problems) if problems else None,
        )

    def _inspect(self, candidate: Mapping[str, Any], device: torch.device, finite: bool, values: bool
                 ) -> Tuple[List[str], Dict[str, Tuple[str, torch.Tensor]], List[Tuple[str, str]]]:
        """The problems of one candidate, in the order they are reported; the tensor chosen for each canonical
        name (its key and value); and, when `values` is false, the other names given for a chosen tensor
        (their values are not compared here, nor checked for being finite)."""
        problems: List[str] = []
        chosen: Dict[str, Tuple[str, torch.Tensor]] = {}
        tied: List[Tuple[str, str]] = []
        unexpected = [k for k in candidate if not isinstance(k, str) or k not in self.by_alias]
        for slot in self.slots:
            for key in slot.aliases:
                if key not in candidate:
                    continue
                value = candidate[key]
                problem = self._check_tensor(key, slot, value, device, finite and values)
                if problem:
                    problems.append(problem)
                elif slot.name not in chosen:
                    chosen[slot.name] = (key, value)
                elif not values:
                    tied.append((slot.name, key))
                elif not _same_values(chosen[slot.name][1], value):
                    problems.append(
                        f"tied weights '{chosen[slot.name][0]}' and '{key}' are one tensor in the module "
                        f"but were given different values; give one of them, or equal values"
                    )

        missing = [s for s in self.slots if not s.is_buffer and not any(a in candidate for a in s.aliases)]
        for slot in missing:
            problems.append(f"missing key '{slot.name}' (expected {describe(slot.shape, slot.dtype)})")
        missing_names = [s.name for s in missing]
        for key in unexpected:
            hint = difflib.get_close_matches(str(key), missing_names or list(self.by_alias), n=1, cutoff=0.6)
            text = f"unexpected key {key!r} ({_describe_value(candidate[key])})"
            if hint:
                text += f" — did you mean '{hint[0]}'?"
            problems.append(text)
        return problems, chosen, tied

    def _check_tensor(self, key: str, slot: Slot, value: Any, device: torch.device, finite: bool) -> Optional[str]:
        expected = describe(slot.shape, slot.dtype)
        if not isinstance(value, torch.Tensor):
            return f"key '{key}': expected a tensor of {expected}, got {_describe_value(value)}"
        if value.layout != torch.strided or value.is_quantized:
            kind = "quantized" if value.is_quantized else str(value.layout).removeprefix("torch.")
            return f"key '{key}': expected a dense tensor of {expected}, got a {kind} tensor"
        wrong = []
        if tuple(value.shape) != slot.shape or value.dtype != slot.dtype:
            wrong.append(f"expected {expected}, got {_describe_value(value)}")
        if value.device.type == "meta":
            wrong.append("tensor is on the meta device (it holds no values)")
        elif value.device != device and value.device.type != "cpu":
            wrong.append(f"expected a tensor on {device} or cpu, got one on {value.device}")
        if wrong:
            return f"key '{key}': " + "; ".join(wrong)
        if finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            n_nan = int(torch.isnan(value).sum())
            n_inf = int(torch.isinf(value).sum())
            return f"key '{key}': expected finite values, got {n_nan} NaN and {n_inf} inf"
        return None


def _not_a_mapping(candidate: Any) -> str:
    return f"candidate must be a mapping of parameter name → tensor, got {type(candidate).__name__}"


class FastCheck:
    """Candidates checked against a schema for one device, metadata first.

    A candidate's signature is what every check but the value checks reads:
    each key with its value's type, shape, dtype, device and layout, in the
    candidate's order. A candidate whose signature is that of a candidate
    found valid before costs one tuple comparison (or one dict lookup); any
    other (or one whose values have no such metadata: no tensors) is
    checked in full with `Schema.check`, so its error is exactly that one. The
    value checks of the candidates that pass are left to the caller, once per
    chunk (`bad_rows`).
    """

    def __init__(self, schema: Schema, device: torch.device):
        self.schema = schema
        self.device = device
        self._plans: Dict[Tuple[Any, ...], Plan] = {}
        self._last: Optional[Tuple[Tuple[Any, ...], Plan]] = None

    def metadata(self, candidate: Any) -> Tuple[Optional[Plan], Optional[str]]:
        """`(plan, None)` for a candidate whose metadata is valid (its values still to be checked), else
        `(None, error)` with every problem in one message, values included."""
        if type(candidate) is dict or isinstance(candidate, Mapping):
            try:
                sig: Optional[Tuple[Any, ...]] = tuple(
                    [(k, type(v), v.shape, v.dtype, v.device, v.layout) for k, v in candidate.items()])
            except Exception:  # noqa: BLE001 - a value that is no tensor: the full check names it
                sig = None
            if sig is not None:
                last = self._last
                if last is not None and last[0] == sig:
                    return last[1], None
                try:
                    plan = self._plans.get(sig)
                except TypeError:  # metadata that does not hash: not a tensor's
                    plan, sig = None, None
                if plan is not None:
                    self._last = (sig, plan)  # type: ignore[assignment]
                    return plan, None
        else:
            sig = None
        _, error = self.schema.check(candidate, self.device)
        if error is not None:
            return None, error
        plan = self.schema.plan(candidate, self.device)
        if sig is not None:
            if len(self._plans) >= MAX_SIGNATURES:
                del self._plans[next(iter(self._plans))]
            self._plans[sig] = plan
            self._last = (sig, plan)
        return plan, None


def bad_rows(k: int, finite: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]],
             tied: Iterable[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]) -> List[int]:
    """The rows of a stacked chunk of `k` candidates whose values fail a check, in order.

    `finite` holds `(tensor, rows)` pairs: a floating (or complex) `[k', ...]`
    tensor whose rows must be finite. `tied` holds `(a, b, rows)`: two
    `[k', ...]` tensors given for one tied weight, whose rows must be equal.
    `rows` (a long tensor of k' row indices) says which of the chunk's rows a
    tensor's rows are; None means all k in order.

    A row's sum is finite when all its values are, so the finite check is one
    sum per row (a reduction, cheaper than an elementwise `isfinite`); only
    the rows whose sum is not finite (a NaN or inf, or finite values whose sum
    overflows) are checked exactly. One device synchronisation when every row
    passes, two when some do not.
    """
    finite = [(t, rows) for t, rows in finite if t.is_floating_point() or t.is_complex()]
    tied = list(tied)
    if not finite and not tied:
        return []
    with torch.no_grad():
        suspect = _rows_where(k, [(~torch.isfinite(_per_row(t).sum(1)), rows) for t, rows in finite])
        found: List[torch.Tensor] = []
        if suspect is not None:
            rows_suspect = suspect.nonzero().flatten()
            if len(rows_suspect):
                for t, rows in finite:
                    # Which of this tensor's rows are suspect, and the exact check of those alone.
                    at = (rows_suspect if rows is None else _positions(rows, rows_suspect)).to(t.device)
                    if len(at):
                        bad = ~torch.isfinite(_per_row(t.index_select(0, at))).all(1)
                        found.append((at if rows is None else rows.to(t.device).index_select(0, at))[bad])
        differ = _rows_where(k, [(_per_row(a != b.to(a.device)).any(1), rows) for a, b, rows in tied])
        if differ is not None:
            found.append(differ.nonzero().flatten())
    if not found:
        return []
    return sorted(set(torch.cat([f.cpu() for f in found]).tolist()))


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """`t`'s rows, each flattened: `[k, n]`."""
    return t.reshape(t.shape[0], -1) if t.numel() else t.new_zeros((t.shape[0], 0))


def _rows_where(k: int, marks: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> Optional[torch.Tensor]:
    """One bool per chunk row: whether any of `marks` (a bool per row of a tensor, and which chunk rows those
    are, None for all) marks it; None when there are no marks."""
    out: Optional[torch.Tensor] = None
    for mark, rows in marks:
        if rows is not None:
            mark = torch.zeros(k, dtype=torch.bool, device=mark.device).index_copy_(0, rows.to(mark.device), mark)
        out = mark if out is None else out | mark.to(out.device)
    return out


def _positions(rows: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The positions in `rows` (sorted chunk row indices) of those among `wanted`."""
    rows = rows.to(wanted.device)
    return torch.isin(rows, wanted).nonzero().flatten()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return bool(torch.equal(a, b.to(a.device)))


def _join(problems: List[str]) -> str:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    text = "; ".join(shown)
    if len(problems) > len(shown):
        text += f"; and {len(problems) - len(shown)} more problems"
    return text


def check_candidate(module: torch.nn.Module, candidate: ParamDict) -> Optional[str]:
    """The error a candidate would get against `module`, or None when it is valid."""
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    return Schema(module).check(candidate, device)[1]
