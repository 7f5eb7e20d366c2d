"""Rolling Parquet files: buffered, then published whole.

On a local filesystem each file is written to a temporary name starting with
'.', fsynced and renamed; dataset readers (pyarrow, pandas, DuckDB, polars)
skip names starting with '.' or '_', so a reader only ever sees complete files,
also after the writer was killed. On an object store (`s3://`, `gs://`) an
object becomes visible only when its upload completes, so files are written
under their final name.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from ..errors import SweepError
from ..files import resolve_path
from ..settings import MAX_ROWS_PER_FILE, MAX_SECONDS, Float, Int, Section, Text
from .base import SinkContext, conform

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


class Config(Section):
    """Results as a Parquet dataset (default: <out>/runs/<name>/results/)."""

    enabled: bool = True
    path: Optional[Text] = Field(
        None, description="where the dataset goes: a local folder or a pyarrow.fs URI (s3://, gs://, file://)")
    rows_per_file: Int = Field(100_000, ge=1, le=MAX_ROWS_PER_FILE, description="rows buffered before a file is written")
    flush_seconds: Float = Field(30.0, gt=0, le=MAX_SECONDS, description="longest time rows wait in the buffer")

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None or "://" in v:
            return v
        return resolve_path(v, info)


def results_location(config: Any, run_dir: Path) -> str:
    """Where the Parquet dataset of a sweep goes: `sinks.parquet.path` (a folder or URI), else <run_dir>/results."""
    return config.sinks.parquet.path or str(Path(run_dir) / "results")


#: Schema metadata of every results file: the metric that ranks the rows and whether higher or lower is
#: better, so the results alone say which way is best (`sweep show --by`).
OBJECTIVE_KEY = "sweep.objective"
MODE_KEY = "sweep.mode"


def open(context: SinkContext) -> "ParquetSink":
    """The results store of a sweep: at `context.results` (else `results_location`), files stamped with the sweep."""
    settings = context.config.sinks.parquet
    location = context.results or results_location(context.config, context.run_dir)
    metrics = context.config.metrics
    objective = metrics.objective or (context.metric_names[0] if context.metric_names else None)
    ranking = {OBJECTIVE_KEY: objective, MODE_KEY: metrics.mode} if objective else {}
    return ParquetSink(location, context.schema, rows_per_file=settings.rows_per_file,
                       flush_seconds=settings.flush_seconds, metadata={**context.stamp, **ranking})


def resolve(location: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a `pyarrow.fs` URI (file://, s3://, gs://, …)."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def part_files(fs: pafs.FileSystem, root: str) -> List[str]:
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.path for i in info if i.type == pafs.FileType.File
                  and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(PART_SUFFIX))


class ParquetSink:
    """Rows buffered and published as whole Parquet files under one location."""

    def __init__(
        self,
        location: str,
        schema: pa.Schema,
        *,
        rows_per_file: int = 100_000,
        flush_seconds: float = 30.0,
        metadata: Optional[Mapping[str, str]] = None,
    ):
        self.location = str(location)
        self.fs, self.root = resolve(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)
        meta = {k.encode(): str(v).encode() for k, v in (metadata or {}).items()}
        self.schema = schema.with_metadata({**(schema.metadata or {}), **meta})
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self._buffer: List[pa.Table] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._seq = len(part_files(self.fs, self.root))
        # Dictionary-encode the strings only: ids, seeds and metrics are near-unique,
        # and dictionary-encoding them doubles the write time for nothing.
        self._dictionary = [f.name for f in self.schema if pa.types.is_string(f.type)]
        self.files_written = 0
        self.rows_written = 0
        #: a write that fails raises (ResultsWriteError): nothing is left to warn about
        self.warnings: List[str] = []

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
        name = f"{PART_PREFIX}{self._seq:06d}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
        self._seq += 1
        final = f"{self.root}/{name}"
        try:
            if self.local:
                temporary = f"{self.root}/.{name}.tmp"
                try:
                    pq.write_table(table, temporary, use_dictionary=self._dictionary)
                    with io.open(temporary, "rb+") as f:  # the built-in: this module's `open` opens the sink
                        os.fsync(f.fileno())
                    os.replace(temporary, final)
                except BaseException:
                    _remove(temporary)  # a partial file holds space a full disk lacks
                    raise
                _fsync_dir(self.root)
            else:
                with self.fs.open_output_stream(final) as stream:
                    pq.write_table(table, stream, use_dictionary=self._dictionary)
        except OSError as e:
            raise ResultsWriteError(self.location, e) from e
        self.files_written += 1
        self.rows_written += table.num_rows

    def close(self, summary: Dict[str, Any]) -> None:
        self.flush()

    def outcome(self) -> Dict[str, Any]:
        """Nothing beyond the results' location, which the sweep's result names already."""
        return {}


class ResultsWriteError(SweepError):
    """Rows could not be written to the results location: a full disk, a quota, no permission, …

    Every file published before stays whole; the rows of the file that failed are not in the results.
    """

    def __init__(self, location: str, error: OSError):
        self.location = location
        self.errno = error.errno
        self.reason = os.strerror(error.errno) if error.errno else (str(error).splitlines() or ["?"])[0]
        super().__init__(f"cannot write results to {location}: {self.reason}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
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


def dataset(location: str) -> "pyarrow.dataset.Dataset":
    """The results at a local path or URI as one pyarrow dataset (complete files only)."""
    import pyarrow.dataset as ds  # here: it imports pandas (a quarter second), which writing rows needs not

    fs, root = resolve(str(location))
    files = part_files(fs, root)
    if not files:
        raise FileNotFoundError(f"no results under {location}")
    return ds.dataset(files, filesystem=fs, format="parquet")


def read_results(location: str) -> pa.Table:
    """Every row written to a results folder, as one table (sorted by candidate_id)."""
    table = dataset(location).to_table()
    if table.num_rows and "candidate_id" in table.column_names:
        table = table.sort_by("candidate_id")
    return table


def clear(location: str, keep: Sequence[str] = ()) -> None:
    """Remove everything under a results location (for --overwrite) but the names in `keep` (the claim
    of the sweep that clears it)."""
    fs, root = resolve(str(location))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


def has_results(location: str) -> bool:
    fs, root = resolve(str(location))
    return bool(part_files(fs, root))
