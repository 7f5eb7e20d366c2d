"""Shared helpers for the unit tests: an independent reference evaluator and module snapshots."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import pytest
import torch
from torch.func import functional_call


def reference_eval(
    module: torch.nn.Module,
    candidates: Iterable[Mapping[str, torch.Tensor]],
    data: List[Any],
    metrics: Callable[[Any, Any], Mapping[str, Any]],
) -> List[Dict[str, float]]:
    """A plain, independent per-candidate loop: functional_call in eval mode,
    metrics averaged over batches weighted by batch size (len(y)).

    Candidates must be valid and give parameters under the module's own names;
    buffers not given default to the module's own (cloned).
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        own_buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        results = []
        for cand in candidates:
            tensors = {n: t.detach().clone() for n, t in cand.items()}
            for n, b in own_buffers.items():
                tensors.setdefault(n, b.clone())
            sums: Dict[str, float] = {}
            total = 0
            with torch.no_grad():
                for x, y in data:
                    n = len(y)
                    out = functional_call(module, tensors, (x,))
                    for name, value in metrics(out, y).items():
                        sums[name] = sums.get(name, 0.0) + float(value) * n
                    total += n
            results.append({k: v / total for k, v in sums.items()})
        return results
    finally:
        for m, training in modes:
            m.train(training)


_MASK64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function on one 64-bit word, in plain Python integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=1)
def noise_table() -> torch.Tensor:
    """The documented noise table, made here on its own: randn(TABLE_SIZE) from a CPU generator."""
    from sweep.noise import TABLE_SEED, TABLE_SIZE

    return torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED))


def noise_by_contract(seed: int, size: int) -> torch.Tensor:
    """ε(seed, size) as `sweep.noise` documents it, one piece and one slice at a time (no code shared)."""
    from sweep.noise import SEGMENT, TABLE_SIZE

    half = TABLE_SIZE // 2
    table = noise_table()
    key = splitmix64(int(seed) & _MASK64)
    m = min(size, max(2, math.ceil(size / SEGMENT)))
    parts = []
    for j in range(m):
        start, stop = j * size // m, (j + 1) * size // m
        offset = splitmix64((key + j) & _MASK64) % (half - (stop - start) + 1)
        first = half * (j % 2) + offset
        parts.append(table[first: first + stop - start])
    return torch.cat(parts) if parts else torch.zeros(0)


def noise_by_hand(module: torch.nn.Module, base: Dict[str, torch.Tensor], sigma: float,
                  seed: int) -> Dict[str, torch.Tensor]:
    """base + sigma·ε, ε = ε(seed) of the documented noise table laid over the floating parameters in
    named_parameters() order."""
    named = dict(module.named_parameters())
    names = [n for n, p in named.items() if p.is_floating_point()]
    eps = noise_by_contract(seed, sum(named[n].numel() for n in names))
    cand = {k: v.clone() for k, v in base.items()}
    offset = 0
    for n in names:
        size = named[n].numel()
        cand[n] = base[n] + sigma * eps[offset: offset + size].reshape(named[n].shape)
        offset += size
    return cand


def snapshot(module: torch.nn.Module) -> Dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": [(name, m.training) for name, m in module.named_modules()],
    }


def assert_unchanged(module: torch.nn.Module, before: Dict[str, Any]) -> None:
    after = module.state_dict()
    assert set(after) == set(before["state"])
    for k, v in before["state"].items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), f"module tensor {k!r} was modified"
    assert [(name, m.training) for name, m in module.named_modules()] == before["training"]


def assert_rows_close(got: Dict[str, Optional[float]], want: Dict[str, float], tol: float = 1e-6) -> None:
    for name, value in want.items():
        assert got[name] is not None, name
        assert abs(got[name] - value) <= tol * max(1.0, abs(value)), (name, got[name], value)


@pytest.fixture
def reference():
    return reference_eval


@pytest.fixture
def snap():
    """snap(module) -> a snapshot; snap.check(module, snapshot) asserts nothing changed."""

    class Snap:
        def __call__(self, module):
            return snapshot(module)

        check = staticmethod(assert_unchanged)

    return Snap()


@pytest.fixture
def close():
    return assert_rows_close


@pytest.fixture
def drawn(monkeypatch) -> Dict[str, Any]:
    """Every matplotlib figure saved during a test, by file name (saved as usual): what a figure drew is read from it."""
    from matplotlib.figure import Figure as Canvas

    figures: Dict[str, Any] = {}
    real = Canvas.savefig

    def savefig(self, fname, *args, **kwargs):
        figures[Path(fname).name] = self
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Canvas, "savefig", savefig)
    return figures
