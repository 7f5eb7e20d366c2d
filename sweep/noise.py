"""The shared noise table: every seeded Gaussian of a recipe is read from it, never drawn per candidate.

Salimans et al. (2017, OpenAI ES) evaluate a population by reading each
member's noise out of one fixed block of N(0, 1) values at an offset
derived from its seed. Here the block is made once per process and device,
and the noise of a chunk of K candidates is one gather per piece (below),
whatever K is.

The contract (what a seed means), enough to rebuild any ε by hand:

- The table T is `torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED))`
  (float32, made on the CPU and copied to the device, so CPU and CUDA
  tables hold the same values). It takes `TABLE_SIZE * 4` bytes (128 MiB)
  in each process and on each device it is used on, and about 0.2-0.4 s
  of one CPU to make, once per process. Its halves are
  H0 = T[:HALF] and H1 = T[HALF:].
- `mix(x)` is SplitMix64's output function on 64-bit words (arithmetic
  mod 2**64): x += 0x9E3779B97F4A7C15; x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9;
  x = (x ^ x >> 27) * 0x94D049BB133111EB; x ^= x >> 31. A seed is taken
  mod 2**64 (a negative int64 seed as its two's complement).
- ε(seed, P), the noise of P values, is cut into m = min(P, max(2,
  ceil(P / SEGMENT))) pieces, piece j covering values [j·P // m, (j+1)·P // m).
  Piece j, of length L, is H_(j mod 2)[o : o + L] with
  o = mix(mix(seed) + j) mod (HALF − L + 1).

So every value of ε is a value of T, N(0, 1). A candidate's pieces come from
different halves, so its values are distinct table entries as long as P ≤
HALF (16.8 M); a larger model reads several pieces from each half, and
values may repeat (shifted) within one candidate. Two seeds give the same ε
only when every piece's offset coincides (about 1 in (HALF − P)², never in
practice), but a pair shares one piece with probability about m/HALF:
in a million candidates some tens of thousands of pairs share half their
noise. Candidates whose offsets overlap share table values at shifted
positions, as in OpenAI ES: entry by entry they are uncorrelated, but they
are not independent draws.

`epsilon(seeds, size)` returns exactly the ε the engine used;
`sweep.Noise.epsilon(seed, like=module)` gives it per parameter. DARE's
masks read the same ε: an entry is kept iff ε < keep_threshold(density),
the normal quantile Φ⁻¹(density) rounded to float32, i.e. Φ(ε) < density.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .lazy import torch

#: The seed of the CPU generator that makes the table.
TABLE_SEED = 170_303_864  # after arXiv:1703.03864 (Salimans et al.)
#: Values in the table (float32): 2**25 values are 128 MiB per process and device.
TABLE_SIZE = 2**25
#: Pieces of ε alternate between the two halves of the table.
HALF = TABLE_SIZE // 2
#: Longest piece of ε read at one offset (each half then offers at least HALF/2 offsets).
SEGMENT = HALF // 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

_tables: Dict[str, Tuple[torch.Tensor, float]] = {}
_lock = threading.Lock()


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def table(device: Optional[torch.device] = None) -> torch.Tensor:
    """The noise table on `device` (default CPU): made on first use, then kept for the process."""
    return _table(torch.device("cpu") if device is None else torch.device(device))[0]


def largest(device: Optional[torch.device] = None) -> float:
    """The largest |ε| of any seed: max |T|."""
    return _table(torch.device("cpu") if device is None else torch.device(device))[1]


def _table(device: torch.device) -> Tuple[torch.Tensor, float]:
    device = _device_key(device)
    key = str(device)
    found = _tables.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _tables:
            cpu = _tables.get("cpu")
            if cpu is None:
                values = torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED),
                                     dtype=torch.float32)
                bound = float(values.abs().max())
                cpu = _tables["cpu"] = (values, bound)
            if device.type != "cpu":
                _tables[key] = (cpu[0].to(device), cpu[1])
        return _tables[key]


def release() -> None:
    """Drop the tables of every device (they are made again on next use)."""
    with _lock:
        _tables.clear()


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _as_words(seeds) -> np.ndarray:
    array = np.asarray(seeds)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"seeds must be a 1-D sequence of integers, got shape {array.shape} {array.dtype}")
    return array.astype(np.int64).view(np.uint64) if array.dtype != np.uint64 else array


def pieces(size: int) -> List[Tuple[int, int]]:
    """The (start, stop) of each piece of an ε of `size` values."""
    m = min(size, max(2, -(-size // SEGMENT)))
    return [(j * size // m, (j + 1) * size // m) for j in range(m)]


def offsets(seeds: Any, size: int) -> List[Tuple[int, int, np.ndarray]]:
    """Per piece of ε(·, size): (start, stop, o), o the [K] int64 offsets into half (piece index mod 2)."""
    with np.errstate(over="ignore"):
        keys = _mix(_as_words(seeds))
        out = []
        for j, (start, stop) in enumerate(pieces(size)):
            choices = np.uint64(HALF - (stop - start) + 1)
            out.append((start, stop, (_mix(keys + np.uint64(j)) % choices).astype(np.int64)))
    return out


def epsilon(seeds: Any, size: int, device: Optional[torch.device] = None, *,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ε for each seed: a [K, size] float32 tensor on `device` (written into `out` when given)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if size < 0:
        raise ValueError(f"size must be ≥ 0, got {size}")
    words = _as_words(seeds)
    k = int(words.shape[0])
    if out is None:
        out = torch.empty((k, size), dtype=torch.float32, device=device)
    elif tuple(out.shape) != (k, size) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(k, size)}, got {out.dtype} {tuple(out.shape)}")
    if k == 0 or size == 0:
        return out
    values = table(out.device)
    for j, (start, stop, o) in enumerate(offsets(words, size)):
        length = stop - start
        half = values[HALF * (j % 2): HALF * (j % 2 + 1)]
        windows = half.as_strided((HALF - length + 1, length), (1, 1))  # row o is half[o : o + length]
        torch.index_select(windows, 0, torch.from_numpy(o).to(out.device, non_blocking=True), out=out[:, start:stop])
    return out


def keep_threshold(density: float) -> float:
    """DARE keeps an entry iff ε < this: Φ⁻¹(density) rounded to float32 (+inf at density 1)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if density == 1.0:
        return math.inf
    return float(np.float32(statistics.NormalDist().inv_cdf(density)))
