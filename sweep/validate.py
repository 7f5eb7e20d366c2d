"""Strict validation of candidate dicts against a module's parameters and buffers.

Every problem of one candidate is collected and reported in one message that
names each key with what was expected and what came, in the spirit of torch's
strict `load_state_dict`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .types import ParamDict

#: At most this many problems are spelled out in one error; the rest are counted.
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Slot:
    """One tensor the module needs: its canonical name, aliases (tied weights) and type."""

    name: str
    aliases: Tuple[str, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    is_buffer: bool


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
            return None, (
                f"candidate must be a mapping of parameter name → tensor, got {type(candidate).__name__}"
            )
        problems: List[str] = []
        chosen: Dict[str, Tuple[str, torch.Tensor]] = {}
        unexpected = [k for k in candidate if not isinstance(k, str) or k not in self.by_alias]
        for slot in self.slots:
            for key in slot.aliases:
                if key not in candidate:
                    continue
                value = candidate[key]
                problem = self._check_tensor(key, slot, value, device, finite)
                if problem:
                    problems.append(problem)
                elif slot.name not in chosen:
                    chosen[slot.name] = (key, value)
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

        if problems:
            return None, _join(problems)
        return {name: value for name, (_, value) in chosen.items()}, None

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
