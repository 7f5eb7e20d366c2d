"""Study kind `interpolate`: the straight path through two or more checkpoints.

With endpoints E_0 … E_{n−1}, `alpha` runs along the path: alpha = j is E_j,
alpha = j + t (0 ≤ t ≤ 1) is E_j + t·(E_{j+1} − E_j), and alphas below 0 or
above n − 1 extend the first or last segment. The candidates travel as one
Affine recipe: the endpoints go to each worker once, each batch carries alphas.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, Iterator, List, Literal, Union

import numpy as np
import pyarrow as pa
import torch
from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from ..config import Float, Int, Section, Text, check_file, checks_files, resolve_path
from ..errors import ConfigError, WeightsError
from ..model import read_weights_file
from ..recipes import AffineRows, AnchorSet, anchor_key
from .base import CandidateBatch, RecipeBatch

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

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, values: List[str], info: ValidationInfo) -> List[str]:
        resolved = [resolve_path(v, info) for v in values]
        if checks_files(info):
            for path in resolved:
                check_file(path)
        return resolved

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
        try:
            endpoints.append(read_weights_file(path))
        except WeightsError as e:
            raise ConfigError(f"{field}[{i}]: {e}") from None
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


class Interpolate:
    columns = {"alpha": pa.float64()}
    default_batch_size = 4096

    def __init__(self, config: Config):
        endpoints = load_endpoints(config.endpoints)
        self.alphas = alpha_values(config.alphas)
        base = endpoints[0]
        anchors: AnchorSet = {"base": base}
        for j in range(len(endpoints) - 1):
            anchors[f"direction_{j}"] = {
                k: endpoints[j + 1][k] - endpoints[j][k] for k in base if base[k].is_floating_point()
            }
        self._anchors = anchors
        self.key = anchor_key(anchors)
        self.coeffs = path_coefficients(self.alphas, len(endpoints) - 1)
        self.names = [f"segment_{j}" for j in range(len(endpoints) - 1)]

    def __len__(self) -> int:
        return len(self.alphas)

    def anchors(self) -> Dict[str, AnchorSet]:
        return {self.key: self._anchors}

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        todo = np.array([i for i in range(len(self)) if i not in skip], dtype=np.int64) if skip else np.arange(len(self))
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            rows = AffineRows(self.coeffs[ids], self.names, {"alpha": self.alphas[ids]})
            yield CandidateBatch(ids, {}, RecipeBatch(self.key, rows))


def plan(config: Config) -> Interpolate:
    return Interpolate(config)
