"""The results table contract: its schema, and the running summary of a sweep."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .types import FAILED, INVALID, OK

#: Where a column's role is written in its Parquet field metadata.
ROLE_KEY = b"sweep.role"
#: The roles a results column plays. `key`: candidate_id; `outcome`: status and error; `recipe`: what
#: describes a candidate (alpha, seed, a hyperparameter); `lineage`: who a row descends from and when
#: (member, generation, parent, step); `metric`: what the metrics function returned; `provenance`:
#: where and how fast the row was made (worker, node, eval_seconds).
KEY, OUTCOME, RECIPE, LINEAGE, METRIC, PROVENANCE = "key", "outcome", "recipe", "lineage", "metric", "provenance"
ROLES = (KEY, OUTCOME, RECIPE, LINEAGE, METRIC, PROVENANCE)

LEADING = (("candidate_id", pa.int64(), KEY), ("status", pa.string(), OUTCOME), ("error", pa.string(), OUTCOME))
TRAILING = (("worker", pa.string(), PROVENANCE), ("node", pa.string(), PROVENANCE),
            ("eval_seconds", pa.float64(), PROVENANCE))


#: Most bytes a string column is built from directly (Arrow's `string` has 32-bit offsets).
_MAX_STRING_BYTES = 2**31 - 1


def arrow_array(values: Any, type: Optional[pa.DataType] = None, mask: Optional[np.ndarray] = None) -> pa.Array:
    """`pa.array(values, type, mask=mask)` for what results columns hold, built from buffers.

    `pa.array` and `pa.scalar` import pandas on their first call (pyarrow looks for pandas objects),
    ~0.3 s of a one-shot `sweep.evaluate` in a fresh process. Numbers and bools in a 1-D numpy array,
    and strings with None in a list or a numpy array, are built here without it; anything else goes to
    `pa.array`. `mask`: True where the value is null. NaN stays a value, as with `pa.array`.
    """
    array = _numpy_array(values, type, mask) if isinstance(values, np.ndarray) and values.ndim == 1 else None
    if array is None and (isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.ndim == 1
                                                                 and values.dtype.kind in "OU")):
        array = _string_array(values, type, mask)
    if array is None:
        return pa.array(values, type, mask=mask)
    return array


def _validity(mask: Optional[np.ndarray], n: int):
    """(validity bitmap buffer or None, null count) for a null `mask` of n rows."""
    if mask is None:
        return None, 0
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({n},)")
    nulls = int(mask.sum())
    if nulls == 0:
        return None, 0
    return pa.py_buffer(np.packbits(~mask, bitorder="little")), nulls


def _numpy_array(values: np.ndarray, type: Optional[pa.DataType], mask: Optional[np.ndarray]) -> Optional[pa.Array]:
    if values.dtype.kind not in "biuf":
        return None
    if type is None:
        type = pa.from_numpy_dtype(values.dtype)
    if type == pa.bool_():
        if values.dtype.kind != "b":
            return None
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
    elif pa.types.is_integer(type) or pa.types.is_floating(type):
        if pa.types.is_integer(type) and values.dtype != pa_dtype(type):
            return None  # pa.array's rules for other numbers into integers (and its errors) apply
        data = pa.py_buffer(np.ascontiguousarray(values, dtype=pa_dtype(type)))
    else:
        return None
    validity, nulls = _validity(mask, len(values))
    return pa.Array.from_buffers(type, len(values), [validity, data], null_count=nulls)


def pa_dtype(type: pa.DataType) -> np.dtype:
    """The numpy dtype of an Arrow integer or floating type (without pandas: `to_pandas_dtype` imports it)."""
    return np.dtype({pa.float64(): "float64", pa.float32(): "float32", pa.float16(): "float16",
                     pa.int64(): "int64", pa.int32(): "int32", pa.int16(): "int16", pa.int8(): "int8",
                     pa.uint64(): "uint64", pa.uint32(): "uint32", pa.uint16(): "uint16",
                     pa.uint8(): "uint8"}[type])


def _string_array(values: Any, type: Optional[pa.DataType], mask: Optional[np.ndarray]) -> Optional[pa.Array]:
    if type is not None and type != pa.string():
        return None
    if len(values) == 0:
        return pa.Array.from_buffers(pa.string(), 0, [None, pa.py_buffer(np.zeros(1, np.int32)), pa.py_buffer(b"")]) \
            if type is not None else None
    nulls = np.zeros(len(values), dtype=bool) if mask is None else np.array(mask, dtype=bool)
    if nulls.shape != (len(values),):
        return None  # pa.array names the problem
    parts = []
    strings = False
    for i, value in enumerate(values):
        if value is None:
            nulls[i] = True
            parts.append(b"")
        elif isinstance(value, str):
            strings = True
            parts.append(b"" if nulls[i] else value.encode())
        else:
            return None  # not a string column: pa.array decides
    if not strings and type is None:
        return None  # all None: pa.array's null column
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    if lengths.sum() > _MAX_STRING_BYTES:
        return None
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    validity, count = _validity(nulls, len(parts))
    return pa.Array.from_buffers(pa.string(), len(parts), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(parts))],
                                 null_count=count)


def column(name: str, type: pa.DataType, role: str = RECIPE) -> pa.Field:
    """A results column with its role in the field metadata."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return pa.field(name, type, metadata={ROLE_KEY: role.encode()})


def role_of(field: pa.Field) -> Optional[str]:
    """The role written in a column's metadata, or None (results written before roles were)."""
    value = (field.metadata or {}).get(ROLE_KEY)
    return value.decode() if value is not None else None


def roles(schema: pa.Schema) -> Dict[str, Optional[str]]:
    """{column: role} for every column of a results schema (None where no role was written)."""
    return {f.name: role_of(f) for f in schema}


def columns_of(schema: pa.Schema, role: str) -> List[str]:
    """The columns of `schema` that play `role`, in schema order."""
    return [f.name for f in schema if role_of(f) == role]


def results_schema(study_columns: Union[Sequence[pa.Field], Mapping[str, pa.DataType]],
                   metric_names: Sequence[str]) -> pa.Schema:
    """candidate_id, status, error, the study's columns, one float64 per metric, worker, node, eval_seconds,
    each with its role in the field metadata.

    `study_columns`: fields made with `column` (a plain {name: type} mapping makes recipe columns).
    """
    if isinstance(study_columns, Mapping):
        study_columns = [column(n, t) for n, t in study_columns.items()]
    fields = [column(n, t, r) for n, t, r in LEADING]
    fields += [f if role_of(f) is not None else column(f.name, f.type) for f in study_columns]
    fields += [column(n, pa.float64(), METRIC) for n in metric_names]
    fields += [column(n, t, r) for n, t, r in TRAILING]
    names = [f.name for f in fields]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"metric names {clashes} clash with results columns; rename them in the metrics function")
    return pa.schema(fields)


def failed_rows(batch: Any, error: str) -> pa.Table:
    """Rows for a batch that could not be evaluated at all: `failed`, with the error and the recipe columns."""
    n = len(batch.ids)
    columns: Dict[str, Any] = {
        "candidate_id": arrow_array(batch.ids, pa.int64()),
        "status": arrow_array([FAILED] * n, pa.string()),
        "error": arrow_array([error] * n, pa.string()),
    }
    columns.update(batch.source_columns())
    for name, values in batch.columns.items():
        columns[name] = arrow_array(values)
    return pa.table(columns)


class Tally:
    """Counts and the best row so far, updated batch by batch as results stream in."""

    #: rows that were not ok, kept to show the user at the end
    MAX_PROBLEMS = 5

    def __init__(self, objective: Optional[str], mode: str = "min", label: Optional[str] = None):
        self.objective = objective
        self.mode = mode
        self.counts = {OK: 0, INVALID: 0, FAILED: 0}
        self.best_value: Optional[float] = None
        self.best_id: Optional[int] = None
        self.started = time.monotonic()
        self.label = label
        self.problems: List[Dict[str, Any]] = []

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def update(self, table: pa.Table) -> None:
        counts = pc.value_counts(table.column("status")).to_pylist()
        for item in counts:
            self.counts[item["values"]] = self.counts.get(item["values"], 0) + item["counts"]
        if len(self.problems) < self.MAX_PROBLEMS and self.counts[OK] < self.done:
            bad = table.filter(pc.not_equal(table.column("status"), OK)).slice(0, self.MAX_PROBLEMS)
            columns = ["candidate_id", "status", "error"] + ([self.label] if self.label in table.column_names else [])
            self.problems.extend(bad.select(columns).to_pylist()[: self.MAX_PROBLEMS - len(self.problems)])
        if self.objective is None or self.objective not in table.column_names:
            return
        values = table.column(self.objective)
        finite = pc.and_kleene(pc.is_finite(values), pc.is_valid(values))
        values = pc.filter(values, pc.fill_null(finite, False))
        if len(values) == 0:
            return
        index = pc.index(values, pc.min(values) if self.mode == "min" else pc.max(values)).as_py()
        value = values[index].as_py()
        better = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
        if better:
            ids = pc.filter(table.column("candidate_id"), pc.fill_null(finite, False))
            self.best_value, self.best_id = value, ids[index].as_py()

    def summary(self) -> Dict[str, Any]:
        seconds = time.monotonic() - self.started
        out: Dict[str, Any] = {
            "candidates": self.done,
            "ok": self.counts[OK],
            "invalid": self.counts[INVALID],
            "failed": self.counts[FAILED],
            "seconds": seconds,
            "candidates_per_s": self.done / seconds if seconds > 0 else 0.0,
        }
        if self.objective is not None and self.best_id is not None:
            out[f"best_{self.objective}"] = self.best_value
            out["best_candidate_id"] = self.best_id
        return out
