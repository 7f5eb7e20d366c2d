"""Analyses of a study's rows that need all of them: the loss barrier of a path, and the
lineage of a population-trained member (kinds `pbt` and `search`).

Pure numpy on the results' columns, shared by the driver's summary and
`sweep report`, so the number in MLflow and the one drawn are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa


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


#: Columns `lineage` reads.
LINEAGE_COLUMNS = ("member", "generation", "parent")


def _whole_number(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def lineage(table: pa.Table, member: int, generation: Optional[int] = None) -> List[Dict[str, Any]]:
    """The rows of `member`'s ancestry, generation 0 first, ending at (member, generation) (default: the last generation):
    walk back through `parent`: the row at generation g−1 is the parent's row. Its hyperparameter columns give the
    member's full schedule.

    Each row is a dict of the table's columns. The default generation is the last one the table holds
    for `member` (the run's last generation when the run finished). Rows of any status count (a failed
    row still names its parent); where one (member, generation) has several rows, an ok row is taken
    before the others, then the lowest candidate_id. ValueError, naming what is missing, when a column,
    the member, the generation or a row of the chain is absent, or a parent is null.
    """
    member = _whole_number(member, "member")
    if generation is not None:
        generation = _whole_number(generation, "generation")
        if generation < 0:
            raise ValueError(f"generation must be 0 or more, got {generation}")
    missing = [c for c in LINEAGE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"the table has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}: "
                         f"lineage needs {', '.join(LINEAGE_COLUMNS)} (rows of a pbt or search study)")

    def ints(name: str) -> np.ndarray:
        column = table.column(name)
        if not pa.types.is_integer(column.type):
            raise ValueError(f"column {name} should hold integers, got {column.type}")
        if column.null_count == 0:
            return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.array(column.to_pylist(), dtype=object)  # None where null

    members, generations, parents = ints("member"), ints("generation"), ints("parent")
    # a row without member or generation is never part of a chain
    keep = np.array([m is not None and g is not None for m, g in zip(members, generations)], dtype=bool) \
        if members.dtype == object or generations.dtype == object else np.ones(table.num_rows, dtype=bool)
    index = np.flatnonzero(keep)
    m = members[keep].astype(np.int64)
    g = generations[keep].astype(np.int64)
    if "status" in table.column_names:
        status = np.asarray(table.column("status").to_pylist(), dtype=object)[keep]
        not_ok = (status != "ok").astype(np.int64)
    else:
        not_ok = np.zeros(len(index), dtype=np.int64)
    ids = (np.asarray(table.column("candidate_id").to_numpy(zero_copy_only=False), dtype=np.float64)[keep]
           if "candidate_id" in table.column_names else np.arange(len(index), dtype=np.float64))
    # rows by (generation, member), the preferred row of each pair first: one search per step of the chain
    order = np.lexsort((np.nan_to_num(ids, nan=np.inf), not_ok, m, g))
    g_sorted, m_sorted, rows_sorted = g[order], m[order], index[order]

    def row_at(who: int, when: int) -> Optional[int]:
        lo = np.searchsorted(g_sorted, when, side="left")
        hi = np.searchsorted(g_sorted, when, side="right")
        at = lo + np.searchsorted(m_sorted[lo:hi], who, side="left")
        if at < hi and m_sorted[at] == who:
            return int(rows_sorted[at])
        return None

    own = g[m == member]
    if not len(own):
        raise ValueError(f"member {member} has no row in the table")
    if generation is None:
        generation = int(own.max())
    chain: List[int] = []
    who, when = member, generation
    at = row_at(who, when)
    if at is None:
        raise ValueError(f"no row for member {member} at generation {generation} "
                         f"(its rows span generations {int(own.min())}…{int(own.max())})")
    chain.append(at)
    while when > 0:
        parent = parents[at]
        if parent is None:
            raise ValueError(f"the row of member {who} at generation {when} has no parent: "
                             f"the lineage of member {member} stops there")
        parent = int(parent)
        at = row_at(parent, when - 1)
        if at is None:
            raise ValueError(f"the lineage of member {member} (generation {generation}) is broken: member {who} at "
                             f"generation {when} continued from member {parent}, which has no row at generation "
                             f"{when - 1}")
        who, when = parent, when - 1
        chain.append(at)
    chain.reverse()
    return table.take(pa.array(chain, pa.int64())).to_pylist()
