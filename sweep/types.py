"""Domain nouns, named once and used everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Tuple

if TYPE_CHECKING:  # the statuses are read where torch is not imported (`sweep show`, the config)
    import torch

ParamDict = Mapping[str, "torch.Tensor"]
"""Parameter (and optional buffer) name → tensor, as `module.named_parameters()` names them."""

Batch = Tuple[Any, Any]
"""One `(x, y)` eval batch; the module is called as `module(x)`."""

MetricsFn = Callable[[Any, Any], Mapping[str, Any]]
"""`metrics(output, y)` → name → scalar tensor, averaged over batches by batch size."""

OK = "ok"
INVALID = "invalid"
FAILED = "failed"


@dataclass(frozen=True)
class Invalid:
    """A candidate that could not be produced (an unreadable file, say).

    Passed where a candidate dict goes, it becomes a row with `status=invalid`
    and `reason` as its error, so one bad input never stops the others.
    """

    reason: str
