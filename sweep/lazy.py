"""torch, imported where it is first used rather than where it is named.

The modules a config is read and checked through (the config, the studies,
the sinks, the model's loading) name `torch` at their top, but reading a
config needs none of it: `sweep validate` and the start of `sweep run` leave
torch's import (1.5 s and more) out. Those modules take `torch` from here;
the first attribute read of it imports torch and keeps it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable, Optional, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: The module proxied; set on the first attribute read.
_torch: Optional[ModuleType] = None


class _LazyTorch:
    """`torch`, imported on the first read of one of its attributes."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_torch if _torch is not None else _load(), name)

    def __repr__(self) -> str:
        return repr(_torch) if _torch is not None else "<torch, not imported yet>"


def _load() -> ModuleType:
    global _torch
    module = importlib.import_module("torch")
    _torch = module
    return module


torch: Any = _LazyTorch()


def no_grad(function: F) -> F:
    """`@torch.no_grad()` for a function of a module that leaves torch's import to the first call."""

    @functools.wraps(function)
    def without_grad(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return function(*args, **kwargs)

    return without_grad  # type: ignore[return-value]
