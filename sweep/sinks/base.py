"""The sink contract: a sink module opens a `Sink` from a `SinkContext`; the sink takes tables of rows
(`write`), makes them durable (`flush`) and ends with the sweep's summary (`close`).

A sink module (registered in `sweep.sinks.SINKS`) provides `Config` (its section of `sinks:`, a `Section`
with `enabled: bool`) and `open(context) -> Sink`, and may provide `check(config)` (whole-config checks
at load time), `check_columns(names)` (refuses column names it cannot record, before any row) and
`columns_logged(schema)` (the columns it records beside the metrics, for that check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import pyarrow as pa


@dataclass
class SinkContext:
    """What opening a sink may need beyond its own config section."""

    #: the sweep's config (a `sweep.config.SweepConfig`); the sink's own section is `config.sinks.<name>`
    config: Any
    #: the results schema, each column with its role (`sweep.results`)
    schema: pa.Schema
    #: what the metrics function returns, in its order
    metric_names: Sequence[str]
    #: where the Parquet results go (on resume: where run.json says they are), None when sinks.parquet is off
    results: Optional[str]
    #: the run folder, runs/<name>
    run_dir: Path
    #: candidates the sweep makes
    total: int
    #: workers evaluating them
    workers: int
    #: tags that say which sweep wrote what: sweep.name, sweep.config_digest, sweep.version.*
    stamp: Dict[str, str]
    #: run.json as it was when the sweep started (a resumed sweep finds its MLflow run there)
    record: Dict[str, Any]
    #: writes fields into run.json: `update_record(mlflow_run_id=...)`
    update_record: Callable[..., None]
    #: the MLflow params: the flattened config (on resume, the saved config's)
    params: Dict[str, Any]


class Sink(Protocol):
    #: what went wrong on the way, for the user (read after `close`); a sink that fails loudly leaves it empty
    warnings: List[str]

    def write(self, table: pa.Table) -> None:
        """Take rows; a sink may buffer them but must not lose them."""
        ...

    def flush(self) -> None:
        """Make every row taken so far durable (or hand it to the service)."""
        ...

    def close(self, summary: Dict[str, Any]) -> None:
        """Flush, record the summary where the sink has a place for it, release resources."""
        ...

    def outcome(self) -> Dict[str, Any]:
        """What the sink adds to the sweep's result once closed (an MLflow run id, metrics it missed)."""
        ...


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order: missing ones null, types cast.

    Every batch of one sweep is written with one schema, so the dataset reads
    as one table even when a batch had only invalid rows (and no metric values).
    """
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise ValueError(f"rows carry columns {extra} that the results schema does not have")
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)
