"""Recipes: K candidates described compactly, materialised as stacked tensors on the device.

A recipe splits into *anchors* (the heavy tensors: a base, directions) that
travel to a worker once, and *rows* (coefficients, seeds) that are all a batch
carries. On the device, a chunk of rows becomes one stacked tensor per
parameter, shape `[k, *param_shape]`, ready for `vmap(functional_call)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from .types import ParamDict

AnchorSet = Dict[str, Dict[str, torch.Tensor]]
"""Anchor name ('base', 'direction_0', …) → parameter dict."""

#: Above this many directions an Affine chunk is one addmm; below, one addcmul per direction.
ADDMM_DIRECTIONS = 4
#: Seeds of `Noise` candidates must fit a torch generator seed.
MAX_SEED = 2**63 - 1


def anchor_key(anchors: AnchorSet) -> str:
    """A content hash of an anchor set: workers cache anchors on their device by it."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(anchors):
        h.update(name.encode())
        if anchors[name] is None:  # the module's own parameters
            h.update(b"<module>")
            continue
        for key in sorted(anchors[name]):
            t = anchors[name][key]
            h.update(key.encode())
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                if t.device.type != "meta":
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(type(t)).encode())
    return h.hexdigest()


class Prepared:
    """Validated anchors on one device, flattened for fast materialisation.

    `batched` lists the floating keys every candidate gets its own copy of;
    `shared` holds what all candidates of the recipe share (non-floating
    tensors of the base, and buffers the base does not give).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Tuple[int, ...]], flats: Dict[str, torch.Tensor],
                 shared: Dict[str, torch.Tensor]):
        self.names = list(names)
        self.shapes = list(shapes)
        self.sizes = [int(np.prod(s)) if s else 1 for s in shapes]
        self.flats = flats  # anchor name -> [P] float32 (all batched keys concatenated)
        self.shared = shared
        # Largest magnitude in each anchor (inf when it holds NaN or inf): bounds
        # every materialised value, so most chunks need no full finite check.
        self.absmax = {name: _absmax(t) for name, t in flats.items()}
        self._scratch: Optional[torch.Tensor] = None

    def release(self) -> None:
        """Drop the scratch buffer (after running out of memory with it)."""
        self._scratch = None

    def scratch(self, k: int) -> torch.Tensor:
        """A reused [k, P] float32 buffer for one chunk: no fresh allocation (and page faults) per chunk."""
        p = self.flats["base"].numel()
        if self._scratch is None or self._scratch.shape[0] < k:
            self._scratch = torch.empty((k, p), dtype=torch.float32, device=self.flats["base"].device)
        return self._scratch[:k]

    def unflatten(self, flat: torch.Tensor, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """[k, P] → {name: [k, *shape]} in `dtype` (one cast for the whole chunk)."""
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        k = flat.shape[0]
        out = {}
        for name, shape, part in zip(self.names, self.shapes, torch.split(flat, self.sizes, dim=1)):
            out[name] = part.reshape((k,) + tuple(shape))
        return out


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """Per-row max |value| of `t` ([P] → scalar, [D, P] → [D]); inf where a row is not finite."""
    if t.numel() == 0:
        return torch.zeros(t.shape[:-1], device=t.device)
    m = t.abs().amax(dim=-1)
    return torch.where(torch.isfinite(t).all(dim=-1), m, torch.full_like(m, float("inf")))


@dataclass
class Rows:
    """The light part of a recipe: what one batch of candidates carries."""

    def __len__(self) -> int:
        raise NotImplementedError

    def slice(self, start: int, stop: int) -> "Rows":
        raise NotImplementedError

    def columns(self) -> Dict[str, pa.Array]:
        raise NotImplementedError

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The chunk as one [k, P] float32 tensor on `device` (written into `out` when given)."""
        raise NotImplementedError

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        """An upper bound on each row's largest |value| ([k]), or None when there is none."""
        return None


@dataclass
class AffineRows(Rows):
    coeffs: np.ndarray  # [k, D] float64
    names: List[str]
    #: columns shown instead of the coefficients (a path's `alpha`, say)
    extra: Optional[Dict[str, np.ndarray]] = None

    def __len__(self) -> int:
        return int(self.coeffs.shape[0])

    def slice(self, start: int, stop: int) -> "AffineRows":
        extra = {k: v[start:stop] for k, v in self.extra.items()} if self.extra is not None else None
        return AffineRows(self.coeffs[start:stop], self.names, extra)

    def columns(self) -> Dict[str, pa.Array]:
        if self.extra is not None:
            return {name: pa.array(values) for name, values in self.extra.items()}
        return {name: pa.array(self.coeffs[:, d], pa.float64()) for d, name in enumerate(self.names)}

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        coeffs = torch.tensor(self.coeffs, dtype=torch.float32).to(device, non_blocking=True)
        dirs = prepared.flats["directions"]  # [D, P]
        if out is None:
            out = torch.empty((len(self), base.numel()), dtype=torch.float32, device=device)
        if dirs.shape[0] > ADDMM_DIRECTIONS:
            return torch.addmm(base.unsqueeze(0), coeffs, dirs, out=out)
        # Few directions: fused multiply-adds beat a GEMM whose inner dimension is D.
        torch.addcmul(base.unsqueeze(0), coeffs[:, :1], dirs[:1], out=out)
        for d in range(1, dirs.shape[0]):
            out.addcmul_(coeffs[:, d : d + 1], dirs[d : d + 1])
        return out

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        # |base + Σ c·dir| ≤ max|base| + Σ |c|·max|dir|, in float64 to keep the bound honest.
        coeffs = torch.tensor(np.abs(self.coeffs), dtype=torch.float64).to(device)
        dirs = prepared.absmax["directions"].to(torch.float64)
        bound = prepared.absmax["base"].to(torch.float64) + coeffs @ dirs
        # 0·inf is NaN: a non-finite direction makes every row suspect, as it should.
        return torch.nan_to_num(bound, nan=float("inf"))


@dataclass
class NoiseRows(Rows):
    seeds: np.ndarray  # [k] int64
    sigma: float

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def slice(self, start: int, stop: int) -> "NoiseRows":
        return NoiseRows(self.seeds[start:stop], self.sigma)

    def columns(self) -> Dict[str, pa.Array]:
        return {"seed": pa.array(self.seeds, pa.int64())}

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        if out is None:
            out = torch.empty((len(self), base.numel()), dtype=torch.float32, device=device)
        generator = torch.Generator(device=device)
        for i, seed in enumerate(self.seeds.tolist()):
            generator.manual_seed(int(seed))
            torch.randn(base.numel(), generator=generator, device=device, out=out[i])
        return out.mul_(self.sigma).add_(base)


class Recipe:
    """K candidates described by anchors and rows."""

    def anchors(self) -> AnchorSet:
        raise NotImplementedError

    def rows(self) -> Rows:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows())


def _as_dict(value: Any, what: str) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of parameter name → tensor, got {type(value).__name__}")
    return dict(value)


def _coeff_matrix(coeffs: Any, d: int) -> np.ndarray:
    array = coeffs.detach().cpu().double().numpy() if isinstance(coeffs, torch.Tensor) else np.asarray(coeffs, np.float64)
    if array.ndim == 1 and d == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != d:
        raise ValueError(f"coeffs must have shape (K, {d}) for {d} directions, got {tuple(array.shape)}")
    return np.ascontiguousarray(array)


class Affine(Recipe):
    """Candidate k is `base + Σ_d coeffs[k, d] · directions[d]`.

    Interpolation A→B is `Affine(A, [B − A], alphas[:, None], names=["alpha"])`;
    a plane is two directions. Non-floating tensors (integer buffers) are taken
    from `base` as they are. Columns are `names` (default `coeff_0 … coeff_{D−1}`).
    """

    def __init__(self, base: ParamDict, directions: Sequence[ParamDict], coeffs: Any,
                 names: Optional[Sequence[str]] = None):
        self.base = _as_dict(base, "base")
        self.directions = [_as_dict(d, f"directions[{i}]") for i, d in enumerate(directions)]
        if not self.directions:
            raise ValueError("Affine needs at least one direction")
        self.coeffs = _coeff_matrix(coeffs, len(self.directions))
        self.names = list(names) if names is not None else [f"coeff_{d}" for d in range(len(self.directions))]
        if len(self.names) != len(self.directions) or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be {len(self.directions)} distinct column names, got {self.names}")

    def anchors(self) -> AnchorSet:
        out = {"base": self.base}
        for i, d in enumerate(self.directions):
            out[f"direction_{i}"] = d
        return out

    def rows(self) -> AffineRows:
        return AffineRows(self.coeffs, self.names)


class Noise(Recipe):
    """Candidate k is `base + sigma · ε(seeds[k])`, ε ~ N(0, I) drawn on the device.

    Each candidate's noise comes from a generator seeded with its own seed, so
    the same seed gives the same candidate on any run on the same kind of
    device. Only floating parameters are perturbed; buffers come from `base`
    (or the module). `base=None` perturbs the module's own parameters.
    """

    def __init__(self, base: Optional[ParamDict], sigma: float, seeds: Any):
        self.base = None if base is None else _as_dict(base, "base")
        self.sigma = float(sigma)
        if not np.isfinite(self.sigma):
            raise ValueError(f"sigma must be finite, got {sigma}")
        seeds = seeds.detach().cpu().numpy() if isinstance(seeds, torch.Tensor) else np.asarray(seeds)
        if seeds.ndim != 1 or (seeds.size and not np.issubdtype(seeds.dtype, np.integer)):
            raise ValueError(f"seeds must be a 1-D sequence of integers, got shape {seeds.shape} {seeds.dtype}")
        if seeds.size and (seeds.min() < 0 or seeds.max() > MAX_SEED):
            raise ValueError("seeds must lie in [0, 2**63 − 1]")
        self.seeds = seeds.astype(np.int64)

    def anchors(self) -> AnchorSet:
        return {"base": self.base}  # type: ignore[dict-item]

    def rows(self) -> NoiseRows:
        return NoiseRows(self.seeds, self.sigma)


def is_recipe(value: Any) -> bool:
    return isinstance(value, Recipe)
