"""Study kind `interpolate`: the path through two or more checkpoints, straight or spherical.

With endpoints E_0 … E_{n−1}, `alpha` runs along the path: alpha = j is E_j,
alpha = j + t (0 ≤ t ≤ 1) is E_j + t·(E_{j+1} − E_j) (`method: linear`) or
the per-tensor SLERP between them (`method: slerp`), and alphas below 0 or
above n − 1 extend the first or last segment. The candidates travel as one
recipe: the endpoints go to each worker once, each batch carries alphas.

The endpoints themselves are evaluated too (added after the configured
alphas when those miss them; `barrier: false` leaves them out), so the loss barrier — the most the path rises
above the straight chord between its endpoints' values — is a summary metric
(`barrier_<metric>`). `align: weight_matching` first permutes each endpoint's
hidden units to match the one before it (Git Re-Basin), saving the aligned
checkpoints under `<run>/aligned/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, Iterator, List, Literal, Optional, Union

import numpy as np
import pyarrow as pa
import torch
from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from ..analysis import barrier, metric_mode
from ..files import resolve_files
from ..settings import Float, Int, Section, Text
from ..errors import ConfigError
from ..model import write_weights_file
from ..recipes import AffineRows, AnchorSet, Rows, SlerpRows, anchor_set
from .base import CandidateBatch, RecipeBatch, StudyBase, StudyContext, read_weights

#: Largest number of alphas a range may ask for.
MAX_ALPHAS = 100_000_000


class AlphaRange(Section):
    """`num` evenly spaced alphas from `start` to `stop`, both included."""

    start: Float = 0.0
    stop: Float = 1.0
    num: Int = Field(ge=1, le=MAX_ALPHAS)


def _alphas_form(value: Any) -> str:
    """A mapping is a range, anything else must be a list: errors then speak of the form that was meant."""
    return "range" if isinstance(value, (dict, AlphaRange)) else "list"


#: A list of finite alphas, or {start, stop, num}.
Alphas = Annotated[
    Union[Annotated[AlphaRange, Tag("range")], Annotated[List[Float], Tag("list")]],
    Discriminator(_alphas_form),
]


class Config(Section):
    """Evaluate the path through `endpoints` at each alpha."""

    kind: Literal["interpolate"]
    endpoints: List[Text] = Field(min_length=2, description="weights files along the path, in order")
    alphas: Alphas = Field(description="a list of alphas, or {start, stop, num}")
    method: Literal["linear", "slerp"] = Field("linear", description="straight lines, or per-tensor SLERP")
    align: Literal["none", "weight_matching"] = Field(
        "none", description="permute each endpoint's hidden units to match the one before it first")
    align_seed: Int = Field(0, ge=0, lt=2**31, description="seed of the weight matching's visiting order")
    barrier: bool = Field(True, description="also evaluate the endpoints the alphas miss, for the loss barrier")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, values: List[str], info: ValidationInfo) -> List[str]:
        return resolve_files(values, info)

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: Union[AlphaRange, List[float]]) -> Union[AlphaRange, List[float]]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one alpha")
        if isinstance(v, list) and len(v) > MAX_ALPHAS:
            raise ValueError(f"at most {MAX_ALPHAS} alphas")
        return v


def alpha_values(alphas: Union[AlphaRange, List[float]]) -> np.ndarray:
    if isinstance(alphas, AlphaRange):
        return np.linspace(alphas.start, alphas.stop, alphas.num, dtype=np.float64)
    return np.asarray(alphas, dtype=np.float64)


def path_coefficients(alphas: np.ndarray, segments: int) -> np.ndarray:
    """[K, segments] coefficients of the directions E_{j+1} − E_j for each alpha."""
    j = np.clip(np.floor(alphas), 0, segments - 1).astype(np.int64)
    t = alphas - j
    coeffs = (np.arange(segments)[None, :] < j[:, None]).astype(np.float64)
    coeffs[np.arange(len(alphas)), j] = t
    return coeffs


def load_endpoints(paths: List[str], field: str = "study.endpoints") -> List[Dict[str, torch.Tensor]]:
    endpoints = []
    for i, path in enumerate(paths):
        endpoints.append(read_weights(path, f"{field}[{i}]"))
    first = set(endpoints[0])
    for i, e in enumerate(endpoints[1:], 1):
        if set(e) != first:
            diff = sorted(first.symmetric_difference(e))
            raise ConfigError(f"{field}[{i}]: its keys differ from endpoint 0's: {diff[:5]}")
        for key in first:
            if e[key].shape != endpoints[0][key].shape:
                raise ConfigError(
                    f"{field}[{i}]: key '{key}' has shape {tuple(e[key].shape)}, endpoint 0 has {tuple(endpoints[0][key].shape)}")
    return endpoints


class PathRows:
    """Keeps (path, alpha, metrics) of ok rows as they land, for the barrier at the end."""

    def __init__(self) -> None:
        self.parts: List[pa.Table] = []

    def add(self, table: pa.Table, columns: List[str]) -> None:
        present = [c for c in columns if c in table.column_names]
        self.parts.append(table.select(["status"] + present))

    def barriers(self, metrics: List[str], objective: Optional[str], mode: str, segments: int,
                 path: Optional[str] = None, prefix: str = "") -> Dict[str, float]:
        if not self.parts:
            return {}
        table = pa.concat_tables(self.parts, promote_options="default")
        keep = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
        if path is not None:
            keep &= np.asarray(table.column("path").to_numpy(zero_copy_only=False) == path)
        alpha = table.column("alpha").to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        out: Dict[str, float] = {}
        for name in metrics:
            if name not in table.column_names:
                continue
            values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
            found = barrier(alpha, values, segments, metric_mode(name, objective, mode))
            if found is not None:
                out[f"{prefix}barrier_{name}"] = found.height
                out[f"{prefix}barrier_{name}_alpha"] = found.alpha
        return out


def path_rows(method: str, alphas: np.ndarray, segments: int, extra: Dict[str, np.ndarray]) -> Rows:
    """The rows for `alphas` along a path of `segments` segments, straight or spherical."""
    if method == "slerp":
        j = np.clip(np.floor(alphas), 0, segments - 1).astype(np.int64)
        return SlerpRows(j, alphas - j, extra)
    return AffineRows(path_coefficients(alphas, segments), [f"segment_{j}" for j in range(segments)], extra)


def path_anchors(method: str, endpoints: List[Dict[str, torch.Tensor]]) -> AnchorSet:
    """Straight paths carry the base and the differences; spherical ones the points themselves."""
    base = endpoints[0]
    floating = [k for k in base if base[k].is_floating_point()]
    if method == "slerp":
        return anchor_set(base, [{k: nxt[k] for k in floating} for nxt in endpoints[1:]])
    return anchor_set(base, [{k: b[k] - a[k] for k in floating} for a, b in zip(endpoints, endpoints[1:])])


def with_endpoints(alphas: np.ndarray, segments: int) -> np.ndarray:
    """`alphas` followed by each endpoint's alpha (0 … segments) that they miss."""
    missing = [float(j) for j in range(segments + 1) if not np.isclose(alphas, j, rtol=0.0, atol=1e-9).any()]
    return np.concatenate([alphas, np.asarray(missing, np.float64)]) if missing else alphas


def in_module_order(state: Dict[str, torch.Tensor], context: Optional[StudyContext]) -> Dict[str, torch.Tensor]:
    """`state` with its keys in the module's own order (forward order for a plain model).

    Weight matching reads the layers in that order; safetensors files store
    keys sorted by name, which puts `bn1` before `conv1`.
    """
    if context is None:
        return state
    order = [k for k in context.module().state_dict() if k in state]
    return {k: state[k] for k in order + [k for k in state if k not in set(order)]}


def aligned_chain(endpoints: List[Dict[str, torch.Tensor]], seed: int, context: Optional[StudyContext],
                  names: List[str]) -> List[Dict[str, torch.Tensor]]:
    """Each endpoint permuted to match the (already aligned) one before it; saved under `<run>/aligned/`."""
    from ..align import AlignError, align

    artifacts = context.artifacts if context is not None else None
    endpoints = [in_module_order(e, context) for e in endpoints]
    out = [endpoints[0]]
    for i in range(1, len(endpoints)):
        try:
            aligned, _ = align(out[-1], endpoints[i], seed=seed)
        except AlignError as e:
            raise ConfigError(f"study.align: endpoint {i}: {e}") from None
        out.append(aligned)
        if artifacts is not None:
            write_weights_file(aligned, artifacts / "aligned" / f"{i:02d}-{Path(names[i]).stem}.safetensors")
    return out


class Interpolate(StudyBase):
    columns = {"alpha": pa.float64()}
    default_batch_size = 4096

    def __init__(self, config: Config, context: Optional[StudyContext] = None):
        endpoints = load_endpoints(config.endpoints)
        if config.align == "weight_matching":
            endpoints = aligned_chain(endpoints, config.align_seed, context, config.endpoints)
        self.segments = len(endpoints) - 1
        self.alphas = alpha_values(config.alphas)
        if config.barrier:
            self.alphas = with_endpoints(self.alphas, self.segments)
        self.method = config.method
        self.use_anchors(path_anchors(config.method, endpoints))
        self.rows = PathRows()

    def __len__(self) -> int:
        return len(self.alphas)


    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        todo = np.array([i for i in range(len(self)) if i not in skip], dtype=np.int64) if skip else np.arange(len(self))
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            rows = path_rows(self.method, self.alphas[ids], self.segments, {"alpha": self.alphas[ids]})
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))

    def observe(self, table: pa.Table) -> None:
        self.rows.add(table, ["alpha", *self.metric_names])

    def summarise(self) -> Dict[str, float]:
        return self.rows.barriers(list(self.metric_names), self.objective, self.mode, self.segments)


def plan(config: Config, context: Optional[StudyContext] = None) -> Interpolate:
    return Interpolate(config, context)
