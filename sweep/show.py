"""`sweep show`: look at a run's results without loading them all into memory.

DuckDB scans the Parquet dataset (through pyarrow, so any `pyarrow.fs`
location works) with the filter, order and limit pushed into the scan.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import yaml

from .errors import SweepError
from .sinks.parquet import dataset

#: Rows shown by default in table format (csv and json give every row unless --top is set).
DEFAULT_TOP = 20


def locate(run: str) -> Tuple[str, Dict[str, Any]]:
    """(results location, resolved config or {}) for a run folder, a results folder or a URI."""
    path = Path(run)
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
    record = path / "run.json"
    if record.is_file():
        return json.loads(record.read_text())["results"], config or {}
    if (path / "results").is_dir():
        return str(path / "results"), config or {}
    return run, {}


def query(run: str, *, top: Optional[int] = None, by: Optional[str] = None, descending: Optional[bool] = None,
          where: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The selected rows as an Arrow table."""
    import duckdb

    location, config = locate(run)
    try:
        results = dataset(location)
    except FileNotFoundError:
        raise SweepError(f"{run}: no results found (looked in {location})") from None
    names = results.schema.names
    for name in list(columns or []) + ([by] if by else []):
        if name not in names:
            raise SweepError(f"no column {name!r} in the results; columns: {', '.join(names)}")
    metrics = config.get("metrics") or {}
    if by and descending is None:
        descending = by == metrics.get("objective") and metrics.get("mode") == "max"
    select = ", ".join(_quote(c) for c in columns) if columns else "*"
    sql = f"SELECT {select} FROM results"
    if where:
        sql += f" WHERE {where}"
    order = f"{_quote(by)} {'DESC' if descending else 'ASC'} NULLS LAST, candidate_id" if by else "candidate_id"
    sql += f" ORDER BY {order}"
    if top is not None:
        sql += f" LIMIT {int(top)}"
    con = duckdb.connect()
    con.register("results", results)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        raise SweepError(f"cannot select with --where {where!r}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def format_rows(table: pa.Table, fmt: str, width: int = 60) -> str:
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, default=str, allow_nan=True)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(table.column_names)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row.values()])
        return out.getvalue().rstrip("\n")
    cells: List[List[str]] = [table.column_names]
    for row in rows:
        cells.append([_cell(v)[:width] for v in row.values()])
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.column_names))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
