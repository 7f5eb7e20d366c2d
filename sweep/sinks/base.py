"""The sink contract: `write` a table of rows, `flush`, `close` with the sweep's summary."""

from __future__ import annotations

from typing import Any, Dict, Protocol

import pyarrow as pa


class Sink(Protocol):
    def write(self, table: pa.Table) -> None:
        """Take rows; a sink may buffer them but must not lose them."""
        ...

    def flush(self) -> None:
        """Make every row taken so far durable (or hand it to the service)."""
        ...

    def close(self, summary: Dict[str, Any]) -> None:
        """Flush, record the summary where the sink has a place for it, release resources."""
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
