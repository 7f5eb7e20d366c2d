"""Analyses of a study's rows that need all of them: the loss barrier of a path.

Pure numpy on the results' columns, shared by the driver's summary and
`sweep report`, so the number in MLflow and the one drawn are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Barrier:
    """The height of a path's bump above the chord between its endpoints.

    `height` is max over the path of `sign · (m(α) − chord(α))`, where the chord
    runs straight between the values at the endpoints of α's segment and
    `sign` is +1 when lower is better (a loss), −1 when higher is (accuracy).
    `alpha` is where the maximum lies; `value` and `chord` are m and the
    chord there.
    """

    height: float
    alpha: float
    value: float
    chord: float


def metric_mode(name: str, objective: Optional[str], mode: str) -> str:
    """Which way a metric is better: the objective's configured mode; for the others, lower is
    better when the name speaks of a loss or an error (perplexity too), higher otherwise."""
    if name == objective:
        return mode
    lowered = name.lower()
    return "min" if any(word in lowered for word in ("loss", "error", "perplexity")) else "max"


def barrier(alpha: np.ndarray, values: np.ndarray, segments: int, mode: str = "min") -> Optional[Barrier]:
    """The barrier of the path through `segments` + 1 endpoints at α = 0 … segments.

    Only alphas within [0, segments] count (extrapolated points are not on the
    path between the endpoints). None when an endpoint's value is missing or
    not finite, or no point lies on the path. Non-finite points in between
    count as an infinite barrier: the path leaves the region where the model
    computes anything.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    alpha = np.asarray(alpha, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if alpha.shape != values.shape or alpha.ndim != 1:
        raise ValueError("alpha and values must be 1-D arrays of one length")
    ends = []
    for j in range(segments + 1):
        at = np.flatnonzero(np.isclose(alpha, j, rtol=0.0, atol=1e-9))
        if not len(at) or not np.isfinite(values[at[0]]):
            return None
        ends.append(values[at[0]])
    inside = (alpha >= -1e-9) & (alpha <= segments + 1e-9)
    if not inside.any():
        return None
    order = np.argsort(alpha[inside], kind="stable")  # rows land in any order; ties go to the smallest alpha
    a, v = alpha[inside][order], values[inside][order]
    j = np.clip(np.floor(a + 1e-9), 0, segments - 1).astype(np.int64)
    t = a - j
    ends_array = np.asarray(ends)
    chord = (1.0 - t) * ends_array[j] + t * ends_array[j + 1]
    sign = 1.0 if mode == "min" else -1.0
    height = np.where(np.isfinite(v), sign * (v - chord), np.inf)
    i = int(np.argmax(height))
    return Barrier(height=float(height[i]), alpha=float(a[i]), value=float(v[i]), chord=float(chord[i]))
