"""Recipes: K candidates described compactly, materialised as stacked tensors on the device.

A recipe splits into *anchors* (the heavy tensors: a base, directions) that
travel to a worker once, and *rows* (coefficients, seeds) that are all a batch
carries. On the device, a chunk of rows becomes one stacked tensor per
parameter, shape `[k, *param_shape]`, ready for `vmap(functional_call)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from . import noise
from .lazy import torch
from .results import arrow_array
from .types import ParamDict

AnchorSet = Dict[str, Dict[str, "torch.Tensor"]]
"""Anchor name ('base', 'direction_0', …) → parameter dict."""

#: Above this many directions an Affine chunk is one addmm; below, one addcmul per direction.
ADDMM_DIRECTIONS = 4
#: Seeds of `Noise` candidates: non-negative int64 (the noise table reads each as a 64-bit word).
MAX_SEED = 2**63 - 1


def anchor_set(base: Optional[Dict[str, torch.Tensor]], directions: Sequence[Dict[str, torch.Tensor]]) -> AnchorSet:
    """The anchors `base` and `direction_0 … direction_{D−1}` (base None: the module's own parameters)."""
    out: AnchorSet = {"base": base}  # type: ignore[dict-item]
    for i, d in enumerate(directions):
        out[f"direction_{i}"] = d
    return out


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
        #: what a kind of rows derives from the anchors once (SLERP angles, TIES merges), by its own keys
        self.cache: Dict[Any, torch.Tensor] = {}

    def release(self) -> None:
        """Drop the scratch buffer and derived tensors (after running out of memory with them)."""
        self._scratch = None
        self.cache.clear()

    def segment_sizes(self) -> torch.Tensor:
        """The number of values of each batched tensor, on the anchors' device (for repeat_interleave)."""
        if "sizes" not in self.cache:
            self.cache["sizes"] = torch.tensor(self.sizes, dtype=torch.long, device=self.flats["base"].device)
        return self.cache["sizes"]

    def per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """[k, T] values, one per batched tensor → [k, P], each repeated over its tensor's values."""
        return torch.repeat_interleave(values, self.segment_sizes(), dim=1)

    def point(self, j: int) -> torch.Tensor:
        """[P]: the base (j = 0) or direction j − 1, for recipes whose anchors are points, not differences."""
        return self.flats["base"] if j == 0 else self.flats["directions"][j - 1]

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


class Rows(Protocol):
    """The light part of a recipe: what one batch of candidates carries.

    `AffineRows`, `NoiseRows`, `SlerpRows` and `MergeRows` implement it; a
    new kind of rows is any class with these methods.
    """

    def __len__(self) -> int:
        """The number of candidates."""
        ...

    def slice(self, start: int, stop: int) -> "Rows":
        """Candidates `start:stop` alone."""
        ...

    def columns(self) -> Dict[str, pa.Array]:
        """The recipe columns that describe the candidates in the results."""
        ...

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The chunk as one [k, P] float32 tensor on `device` (written into `out` when given)."""
        ...

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        """An upper bound on each row's largest |value| ([k]), or None when there is none (every row is then
        checked for NaN and inf after materialising)."""
        ...


@dataclass
class AffineRows:
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
            return {name: arrow_array(values) for name, values in self.extra.items()}
        return {name: arrow_array(self.coeffs[:, d], pa.float64()) for d, name in enumerate(self.names)}

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
class NoiseRows:
    seeds: np.ndarray  # [k] int64
    sigma: float

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def slice(self, start: int, stop: int) -> "NoiseRows":
        return NoiseRows(self.seeds[start:stop], self.sigma)

    def columns(self) -> Dict[str, pa.Array]:
        return {"seed": arrow_array(self.seeds, pa.int64())}

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        if out is None:
            out = torch.empty((len(self), base.numel()), dtype=torch.float32, device=device)
        noise.epsilon(self.seeds, base.numel(), device, out=out)
        return torch.add(base, out, alpha=self.sigma, out=out)

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        # Every ε is read from the table, so |base + sigma·ε| ≤ max|base| + |sigma|·max|ε|.
        bound = prepared.absmax["base"].to(device, torch.float64) + abs(self.sigma) * noise.largest(device)
        return torch.nan_to_num(bound, nan=float("inf")).expand(len(self))


#: Above this |cos| between two tensors SLERP falls back to linear interpolation (mergekit's threshold).
SLERP_DOT_THRESHOLD = 0.9995


def slerp_angles(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per tensor: the angle between a's and b's values ([T] float64), and where SLERP is linear ([T] bool)."""
    omegas, linear = [], []
    for pa_, pb_ in zip(torch.split(a.double(), list(sizes)), torch.split(b.double(), list(sizes))):
        na, nb = pa_.norm(), pb_.norm()
        if na == 0 or nb == 0:
            omegas.append(torch.zeros((), dtype=torch.float64, device=a.device))
            linear.append(True)
            continue
        cos = torch.clamp(torch.dot(pa_, pb_) / (na * nb), -1.0, 1.0)
        omegas.append(torch.arccos(cos))
        linear.append(bool(cos.abs() > SLERP_DOT_THRESHOLD))
    return torch.stack(omegas), torch.tensor(linear, device=a.device)


def slerp_weights(t: torch.Tensor, omega: torch.Tensor, linear: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[k] positions, [T] angles → the weights of the start and the end point, each [k, T] (float64).

    sin((1 − t)Ω)/sin Ω and sin(tΩ)/sin Ω, or 1 − t and t where the two
    tensors are (nearly) parallel. t outside [0, 1] follows the same arc on.
    """
    t = t.double()[:, None]
    sin = torch.sin(omega)[None, :]
    safe = torch.where(linear[None, :], torch.ones_like(sin), sin)
    s0 = torch.where(linear[None, :], 1.0 - t, torch.sin((1.0 - t) * omega[None, :]) / safe)
    s1 = torch.where(linear[None, :], t, torch.sin(t * omega[None, :]) / safe)
    return s0, s1


@dataclass
class SlerpRows:
    """Spherical interpolation along a path of points: row k lies at `t[k]` on segment `segments[k]`.

    The anchors are the points themselves: `base` is point 0 and
    `direction_{j}` is point j + 1. Each tensor of the model moves along its
    own great circle (the per-tensor SLERP of model merging tools).
    """

    segments: np.ndarray  # [k] int64
    t: np.ndarray  # [k] float64
    extra: Optional[Dict[str, np.ndarray]] = None

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def slice(self, start: int, stop: int) -> "SlerpRows":
        extra = {k: v[start:stop] for k, v in self.extra.items()} if self.extra is not None else None
        return SlerpRows(self.segments[start:stop], self.t[start:stop], extra)

    def columns(self) -> Dict[str, pa.Array]:
        if self.extra is not None:
            return {name: arrow_array(values) for name, values in self.extra.items()}
        return {"t": arrow_array(self.t, pa.float64())}

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        if out is None:
            out = torch.empty((len(self), base.numel()), dtype=torch.float32, device=device)
        for j in np.unique(self.segments).tolist():
            key = ("slerp", j)
            if key not in prepared.cache:
                prepared.cache[key] = slerp_angles(prepared.point(j), prepared.point(j + 1), prepared.sizes)
            omega, linear = prepared.cache[key]
            rows = np.flatnonzero(self.segments == j)
            s0, s1 = slerp_weights(torch.tensor(self.t[rows], device=device), omega, linear)
            part = prepared.per_tensor(s0.float()) * prepared.point(j)
            part.addcmul_(prepared.per_tensor(s1.float()), prepared.point(j + 1))
            if len(rows) == len(self):
                out.copy_(part)
            else:
                out[torch.as_tensor(rows, device=device)] = part
        return out

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        return None  # none computed: every row gets the NaN/inf check


MERGE_METHODS = ("ties", "dare", "dare_ties")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: each row of [N, P] keeps its `density` fraction of largest magnitudes (ties at the cut kept)."""
    p = tau.shape[1]
    keep = int(density * p)
    if keep >= p:
        return tau.clone()
    if keep <= 0:
        return torch.zeros_like(tau)
    magnitude = tau.abs()
    cut = magnitude.kthvalue(p - keep + 1, dim=1, keepdim=True).values
    return torch.where(magnitude >= cut, tau, torch.zeros_like(tau))


def elect_and_merge(tau: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean of [N, P] task vectors → [P] ([k, N, P] → [k, P], row by row).

    Each parameter's sign is that of the sum of the task vectors; where that
    sum is zero, the majority of the elected signs (TIES' reference code),
    and + where the majority is a tie too (as mergekit). The merged value is
    the mean of the entries that agree with it, zeros not counted.
    """
    sign = torch.sign(tau.sum(dim=-2))
    majority = torch.sign(sign.sum(dim=-1, keepdim=True))
    majority = torch.where(majority == 0, torch.ones_like(majority), majority)
    sign = torch.where(sign == 0, majority, sign).unsqueeze(-2)
    agree = torch.where(sign > 0, tau > 0, tau < 0)
    selected = tau * agree
    counts = agree.sum(dim=-2).clamp(min=1)
    return selected.sum(dim=-2) / counts


#: Values of the [rows, N, P] DARE'd task vectors one step of a merge chunk holds (16 MiB in float32).
DARE_BLOCK_VALUES = 2**22


def dare_keep(seeds: Any, densities: Any, shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """DARE's masks: [k, *shape] bool, entry kept iff ε(seeds[r]) < Φ⁻¹(densities[r]) (`sweep.noise`).

    Row r reads ε(seeds[r], prod(shape)) from the shared noise table — the
    values a `Noise` candidate with that seed adds — in row-major order of
    `shape`; each entry is kept with probability densities[r].
    """
    size = int(np.prod(shape)) if len(shape) else 1
    eps = noise.epsilon(seeds, size, device)
    limits = [noise.keep_threshold(float(d)) for d in np.asarray(densities, np.float64).reshape(-1)]
    limits_t = torch.tensor(limits, dtype=torch.float32).to(eps.device)
    return (eps < limits_t[:, None]).view((eps.shape[0],) + tuple(shape))


def dare(tau: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE of [N, P] task vectors: each entry kept with probability `density` (the mask of `seed`, see
    `dare_keep`), the kept ones rescaled by 1/density."""
    keep = dare_keep([seed], [density], tau.shape, tau.device)[0]
    return torch.where(keep, tau / density, torch.zeros_like(tau))


@dataclass
class MergeRows:
    """Merges of N task vectors into one base, one method per batch of rows.

    The anchors are the base and `direction_i` = model_i − base (task vector i).
    - `ties`: base + λ · disjoint mean of the sign-elected, trimmed task vectors.
    - `dare`: base + Σ_i λ_i · DARE(τ_i) (λ_i = λ unless `lambdas` is [k, N]).
    - `dare_ties`: base + λ · disjoint mean of the sign-elected DARE'd task vectors.
    DARE's masks come from the shared noise table (`sweep.noise`): row r keeps entry
    (i, p) iff ε(seeds[r], N·P)[i·P + p] < Φ⁻¹(density), so a row is rebuilt from its
    seed alone (`dare_keep`), and a block of rows is one read of the table.
    """

    method: str
    lambdas: np.ndarray  # [k] float64, or [k, N] per model (dare only)
    densities: np.ndarray  # [k] float64 in (0, 1]
    seeds: np.ndarray  # [k] int64
    extra: Optional[Dict[str, np.ndarray]] = None

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {self.method!r}")
        if self.lambdas.ndim == 2 and self.method != "dare":
            raise ValueError(f"{self.method} scales the merged vector by one λ; per-model λ is for dare")

    def __len__(self) -> int:
        return int(self.densities.shape[0])

    def slice(self, start: int, stop: int) -> "MergeRows":
        extra = {k: v[start:stop] for k, v in self.extra.items()} if self.extra is not None else None
        return MergeRows(self.method, self.lambdas[start:stop], self.densities[start:stop], self.seeds[start:stop],
                         extra)

    def columns(self) -> Dict[str, pa.Array]:
        if self.extra is not None:
            return {name: arrow_array(values) for name, values in self.extra.items()}
        out = {"density": arrow_array(self.densities, pa.float64()), "seed": arrow_array(self.seeds, pa.int64())}
        if self.lambdas.ndim == 2:
            out.update({f"lambda_{i}": arrow_array(self.lambdas[:, i], pa.float64()) for i in range(self.lambdas.shape[1])})
        else:
            out["lambda"] = arrow_array(self.lambdas, pa.float64())
        return out

    def materialise(self, prepared: Prepared, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = prepared.flats["base"]
        tau = prepared.flats["directions"]
        if out is None:
            out = torch.empty((len(self), base.numel()), dtype=torch.float32, device=device)
        if self.method == "ties":
            for i in range(len(self)):
                key = ("ties", float(self.densities[i]))
                if key not in prepared.cache:
                    prepared.cache[key] = elect_and_merge(trim(tau, float(self.densities[i])))
                torch.add(base, prepared.cache[key], alpha=float(self.lambdas[i]), out=out[i])
            return out
        # DARE: the masks of a block of rows are one read of the noise table, [rows, N, P].
        block = max(1, DARE_BLOCK_VALUES // max(1, tau.numel()))
        for r0 in range(0, len(self), block):
            r1 = min(len(self), r0 + block)
            keep = dare_keep(self.seeds[r0:r1], self.densities[r0:r1], tau.shape, device)
            density = torch.tensor(self.densities[r0:r1], dtype=torch.float32).to(device)
            dropped = torch.where(keep, tau / density[:, None, None], torch.zeros((), device=device))
            lambdas = torch.tensor(self.lambdas[r0:r1], dtype=torch.float32).to(device)
            if self.method == "dare_ties":
                torch.addcmul(base, lambdas[:, None], elect_and_merge(dropped), out=out[r0:r1])
                continue
            weights = lambdas if lambdas.ndim == 2 else lambdas[:, None].expand(r1 - r0, tau.shape[0])
            torch.add(base, torch.bmm(weights.unsqueeze(1), dropped).squeeze(1), out=out[r0:r1])
        return out

    def bound(self, prepared: Prepared, device: torch.device) -> Optional[torch.Tensor]:
        # A disjoint mean is no larger than its largest entry; DARE scales entries by 1/density.
        largest = prepared.absmax["directions"].to(torch.float64)
        scale = torch.tensor(1.0 / self.densities if self.method != "ties" else np.ones(len(self)),
                             dtype=torch.float64, device=device)
        lambdas = torch.tensor(np.abs(self.lambdas), dtype=torch.float64, device=device)
        if self.method == "dare":
            spread = (lambdas if lambdas.ndim == 2 else lambdas[:, None]) * largest[None, :]
            total = spread.sum(dim=1)
        else:
            total = lambdas * largest.max()
        bound = prepared.absmax["base"].to(torch.float64) + total * scale
        return torch.nan_to_num(bound, nan=float("inf"))


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
        return anchor_set(self.base, self.directions)

    def rows(self) -> AffineRows:
        return AffineRows(self.coeffs, self.names)


class Noise(Recipe):
    """Candidate k is `base + sigma · ε(seeds[k])`, ε ~ N(0, I) read from the shared noise table.

    ε(seed) is a slice of one fixed table of N(0, 1) values (`sweep.noise`:
    its size, how a seed picks the slice, and how candidates overlap), laid
    over the floating parameters in the module's `named_parameters()` order.
    The same seed gives the same candidate in any process, at any chunk size,
    on the CPU or a GPU; `Noise.epsilon(seed, like=module)` rebuilds one
    candidate's ε alone. Only floating parameters are perturbed; buffers come
    from `base` (or the module). `base=None` perturbs the module's own parameters.
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

    @staticmethod
    def epsilon(seed: int, like: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
                device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The ε that candidate `seed` adds (times sigma) to each floating parameter, as the engine used it.

        `like` is the module (its `named_parameters()`), or its parameters as
        a mapping in that order (e.g. `dict(module.named_parameters())`); the
        order decides which values each tensor gets. The candidate is then
        `{name: base[name] + sigma * eps[name]}`. Float32 tensors on `device`
        (default: the device of `like`'s first tensor, else the CPU).
        """
        if isinstance(like, torch.nn.Module):
            named = [(n, p) for n, p in like.named_parameters()]
        elif isinstance(like, Mapping):
            named = list(like.items())
        else:
            raise TypeError("like must be a module or a mapping of parameter name → tensor, "
                            f"got {type(like).__name__}")
        floating = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if device is None:
            device = floating[0][1].device if floating else torch.device("cpu")
        if not MAX_SEED >= int(seed) >= 0:
            raise ValueError(f"seed must lie in [0, 2**63 − 1], got {seed}")
        sizes = [t.numel() for _, t in floating]
        flat = noise.epsilon(np.array([int(seed)], np.int64), sum(sizes), device)[0]
        return {n: part.reshape(t.shape) for (n, t), part in zip(floating, torch.split(flat, sizes))}

    def anchors(self) -> AnchorSet:
        return {"base": self.base}  # type: ignore[dict-item]

    def rows(self) -> NoiseRows:
        return NoiseRows(self.seeds, self.sigma)


class Slerp(Recipe):
    """Candidate k is the per-tensor spherical interpolation from `start` to `end` at `t[k]`.

    Each floating tensor moves along the great circle through its two values
    (linearly where they are nearly parallel); t outside [0, 1] continues the
    arc. The column is `name` (default `t`).
    """

    def __init__(self, start: ParamDict, end: ParamDict, t: Any, name: str = "t"):
        self.start = _as_dict(start, "start")
        self.end = _as_dict(end, "end")
        self.t = np.asarray(t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else t, np.float64)
        if self.t.ndim != 1:
            raise ValueError(f"t must be 1-D, got shape {self.t.shape}")
        self.name = name

    def anchors(self) -> AnchorSet:
        return anchor_set(self.start, [self.end])

    def rows(self) -> SlerpRows:
        return SlerpRows(np.zeros(len(self.t), np.int64), self.t, {self.name: self.t})


class Merge(Recipe):
    """Candidate k merges `models` (fine-tuned from `base`) by `method`: ties, dare or dare_ties.

    `lambdas[k]` scales the merge (dare also takes [K, N], one λ per model),
    `densities[k]` is the fraction kept (TIES: largest magnitudes; DARE: the
    keep probability), `seeds[k]` picks DARE's masks from the shared noise table
    (`dare_keep`). Columns are `lambda`
    (or `lambda_0 …`), `density` and `seed`.
    """

    def __init__(self, base: ParamDict, models: Sequence[ParamDict], method: str, lambdas: Any, densities: Any,
                 seeds: Any = None):
        self.base = _as_dict(base, "base")
        models = [_as_dict(m, f"models[{i}]") for i, m in enumerate(models)]
        if not models:
            raise ValueError("Merge needs at least one model")
        self.directions = [{k: m[k] - self.base[k] for k in m if k in self.base and m[k].is_floating_point()}
                           for m in models]
        lambdas = np.asarray(lambdas, np.float64)
        densities = np.asarray(densities, np.float64)
        if densities.ndim != 1 or lambdas.shape[0] != densities.shape[0]:
            raise ValueError("lambdas and densities must give one value (or one row) per candidate")
        if ((densities <= 0) | (densities > 1)).any():
            raise ValueError("densities must lie in (0, 1]")
        seeds = np.zeros(len(densities), np.int64) if seeds is None else np.asarray(seeds, np.int64)
        self._rows = MergeRows(method, lambdas, densities, seeds)

    def anchors(self) -> AnchorSet:
        return anchor_set(self.base, self.directions)

    def rows(self) -> MergeRows:
        return self._rows
