"""`sweep show`: look at a run's results without loading them all into memory.

DuckDB scans the Parquet dataset (through pyarrow, so any `pyarrow.fs`
location works) with the filter, order and limit pushed into the scan.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import yaml

from .errors import SweepError
from .sinks.parquet import MODE_KEY, OBJECTIVE_KEY, dataset

#: Rows shown by default in table format (csv and json give every row unless --top is set).
DEFAULT_TOP = 20


def locate(run: str) -> Tuple[str, Dict[str, Any]]:
    """(results location, resolved config or {}) for a run folder, a results folder or a URI. A results
    folder inside a run folder (`runs/<name>/results`) finds the run's config beside it."""
    path = Path(run)
    record = path / "run.json"
    if record.is_file():
        return json.loads(record.read_text())["results"], _config(path)
    if (path / "results").is_dir():
        return str(path / "results"), _config(path)
    if "://" not in run and path.is_dir():
        return run, _config(path.parent)
    return run, {}


def _config(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def ranking(schema: pa.Schema, config: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """(objective, mode) of a run's results: from the results' own metadata (written since the results
    recorded it), else from the run's config; (None, 'min') when neither says."""
    meta = schema.metadata or {}
    objective = meta.get(OBJECTIVE_KEY.encode())
    if objective:
        return objective.decode(), (meta.get(MODE_KEY.encode()) or b"min").decode()
    metrics = config.get("metrics") if isinstance(config.get("metrics"), dict) else {}
    return metrics.get("objective"), metrics.get("mode") or "min"


def query(run: str, *, top: Optional[int] = None, by: Optional[str] = None, descending: Optional[bool] = None,
          where: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The selected rows as an Arrow table. `by` orders best first when it is the run's objective (the
    mode the results record, else the run's config), smallest first otherwise, unless `descending` says."""
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
    if by and descending is None:
        objective, mode = ranking(results.schema, config)
        descending = by == objective and mode == "max"
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
        raise SweepError(_where_error(where, str(e), names)) from None
    finally:
        con.close()


def _where_error(where: Optional[str], error: str, names: Sequence[str]) -> str:
    """What is wrong with --where: a column the results lack is named with the columns there are (and the
    closest one); anything else quotes DuckDB's first line."""
    missing = re.search(r'Referenced column "((?:[^"]|"")+)" not found', error) or re.search(
        r'does not have a column named "((?:[^"]|"")+)"', error)
    if missing:
        name = missing.group(1).replace('""', '"')
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6) or [
            n for n in names if n.lower() == name.lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"--where {where!r}: no column {name!r}{hint}; columns are {', '.join(names)}"
    return f"cannot select with --where {where!r}: {error.splitlines()[0]}"


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
