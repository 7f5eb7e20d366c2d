"""Rolling Parquet files: buffered, written to a temporary name, fsynced, renamed.

A reader of the results folder (pyarrow, pandas, DuckDB, polars) only ever
sees complete files: temporary names start with '.', which dataset readers skip.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .base import conform


class ParquetSink:
    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema,
        *,
        rows_per_file: int = 100_000,
        flush_seconds: float = 30.0,
        metadata: Optional[Mapping[str, str]] = None,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {k.encode(): str(v).encode() for k, v in (metadata or {}).items()}
        self.schema = schema.with_metadata({**(schema.metadata or {}), **meta})
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self._buffer: List[pa.Table] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._seq = len(list(self.directory.glob("part-*.parquet")))
        self.files_written = 0
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(conform(table, self.schema))
        self._buffered += table.num_rows
        if self._buffered >= self.rows_per_file or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        name = f"part-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        self._seq += 1
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        pq.write_table(table, temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, final)
        _fsync_dir(self.directory)
        self.files_written += 1
        self.rows_written += table.num_rows

    def close(self, summary: Dict[str, Any]) -> None:
        self.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_results(directory: str | Path) -> pa.Table:
    """Every row written to a results folder, as one table (sorted by candidate_id)."""
    dataset = ds.dataset(str(directory), format="parquet")
    table = dataset.to_table()
    if table.num_rows and "candidate_id" in table.column_names:
        table = table.sort_by("candidate_id")
    return table
