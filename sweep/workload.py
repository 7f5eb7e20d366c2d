"""Build what a worker holds from a config: the module, the eval data, the metrics."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .config import SweepConfig
from .evaluator import Evaluator
from .model import build_module, import_callable


def resolve_device(requested: str, gpus: float) -> torch.device:
    """'auto' is cuda when this worker reserved a GPU and one is visible, else cpu."""
    if requested == "auto":
        return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"workers.device is {requested!r} but this worker sees no CUDA device")
    return torch.device(requested)


def build_evaluator(config: SweepConfig, weights: Optional[Dict[str, torch.Tensor]] = None,
                    device: Optional[torch.device] = None, chunk_size: Optional[int] = None) -> Evaluator:
    """The module from its factory (and weights), the data from its loader, ready on `device`.

    `chunk_size` stands in for `evaluation.chunk_size: auto` when the caller knows better
    (a population shard: all its members in one chunk).
    """
    module = build_module(config.model.factory, config.model.kwargs, weights, seed=config.model.seed)
    device = device or resolve_device(config.workers.device, config.workers.gpus)
    data = import_callable(config.data.loader)(**config.data.kwargs)
    metrics = import_callable(config.metrics.function)
    e = config.evaluation
    return Evaluator(module, data, metrics, device=device, precision=e.precision, compile=e.compile,
                     chunk_size=chunk_size if e.chunk_size == "auto" else e.chunk_size)
