"""What the studies along paths and grids share (interpolate, align, landscape, merge); not a study itself.

Alphas as a list or a range, the coefficients of a path through endpoints,
endpoints read and checked against each other, and the rows kept for a path's
loss barrier.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional, Union

import numpy as np
import pyarrow as pa
from pydantic import Discriminator, Field, Tag

from ..analysis import barrier, metric_mode
from ..errors import ConfigError
from ..lazy import torch
from ..settings import Float, Int, Section
from ..types import OK
from .base import StudyContext, read_weights

#: Largest number of alphas a range may ask for.
MAX_ALPHAS = 100_000_000
#: An alpha this close to an endpoint's (0, 1, …) is taken for it.
ENDPOINT_TOLERANCE = 1e-9


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


#: Significant digits, at the scale of a range's larger end, that its values are rounded to: a value whose
#: decimal has no more digits than this (0.5, 0.1, -0.25, 0) comes out as exactly the float of that decimal.
RANGE_DIGITS = 12
#: 10^k is an exact float64 for k up to this.
EXACT_POWERS_OF_TEN = 22
#: Ranges within ±this are left as `np.linspace` gives them (10^e for their unit would underflow).
SMALLEST_ROUNDED_SCALE = 1e-280


def alpha_values(alphas: Union[AlphaRange, List[float]]) -> np.ndarray:
    """The alphas of a list (as written) or a range, as float64."""
    if isinstance(alphas, AlphaRange):
        return range_values(alphas.start, alphas.stop, alphas.num)
    return np.asarray(alphas, dtype=np.float64)


def range_values(start: float, stop: float, num: int) -> np.ndarray:
    """`num` evenly spaced values from `start` to `stop`, both included, rounded to `RANGE_DIGITS`
    significant digits at the scale of the larger end: `np.linspace` gives 0.49999999999999994 and
    -2.7755575615628914e-17 where the grid means 0.5 and 0, and a query such as `alpha = 0.5` would find
    neither. Each value is an integer count of 10^e (e the scale's exponent less the digits), divided or
    multiplied by an exact power of ten, so it is the float nearest to its decimal."""
    values = np.linspace(start, stop, num, dtype=np.float64)
    scale = max(abs(start), abs(stop))
    if not np.isfinite(scale) or scale < SMALLEST_ROUNDED_SCALE:
        return values
    exponent = int(np.floor(np.log10(scale))) - (RANGE_DIGITS - 1)
    if abs(exponent) > EXACT_POWERS_OF_TEN:  # rare scales: the decimal spelled out, parsed
        rounded = np.array([float(f"{round(v / 10.0 ** exponent)}e{exponent}") for v in values.tolist()])
    elif exponent < 0:
        unit = 10.0 ** -exponent
        rounded = np.round(values * unit) / unit
    else:
        unit = 10.0 ** exponent
        rounded = np.round(values / unit) * unit
    rounded[rounded == 0.0] = 0.0  # no -0.0
    return rounded


def path_coefficients(alphas: np.ndarray, segments: int) -> np.ndarray:
    """[K, segments] coefficients of the directions E_{j+1} − E_j for each alpha."""
    j = np.clip(np.floor(alphas), 0, segments - 1).astype(np.int64)
    t = alphas - j
    coeffs = (np.arange(segments)[None, :] < j[:, None]).astype(np.float64)
    coeffs[np.arange(len(alphas)), j] = t
    return coeffs


def with_endpoints(alphas: np.ndarray, segments: int) -> np.ndarray:
    """`alphas` followed by each endpoint's alpha (0 … segments) that they miss."""
    missing = [float(j) for j in range(segments + 1)
               if not np.isclose(alphas, j, rtol=0.0, atol=ENDPOINT_TOLERANCE).any()]
    return np.concatenate([alphas, np.asarray(missing, np.float64)]) if missing else alphas


def load_endpoints(paths: List[str], field: str = "study.endpoints") -> List[Dict[str, torch.Tensor]]:
    """The weights files of a path; their keys and shapes must match the first's (errors name `field`[i])."""
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


def in_module_order(state: Dict[str, torch.Tensor], context: Optional[StudyContext]) -> Dict[str, torch.Tensor]:
    """`state` with its keys in the module's own order (forward order for a plain model).

    Weight matching reads the layers in that order; safetensors files store
    keys sorted by name, which puts `bn1` before `conv1`.
    """
    if context is None:
        return state
    order = [k for k in context.module().state_dict() if k in state]
    return {k: state[k] for k in order + [k for k in state if k not in set(order)]}


class PathRows:
    """Keeps (path, alpha, metrics) of ok rows as they land, for the barrier at the end."""

    def __init__(self) -> None:
        self.parts: List[pa.Table] = []

    def add(self, table: pa.Table, columns: List[str]) -> None:
        present = [c for c in columns if c in table.column_names]
        self.parts.append(table.select(["status"] + present))

    def barriers(self, metrics: List[str], objective: Optional[str], mode: str, segments: int,
                 path: Optional[str] = None, prefix: str = "") -> Dict[str, float]:
        """`<prefix>barrier_<metric>` and `<prefix>barrier_<metric>_alpha` of each metric (on `path` alone when
        given), each metric better the way `mode` says for the objective and lower for the others."""
        if not self.parts:
            return {}
        table = pa.concat_tables(self.parts, promote_options="default")
        keep = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == OK)
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
