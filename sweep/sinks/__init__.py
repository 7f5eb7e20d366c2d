"""Result sinks: one small interface (write, flush, close), many implementations."""

from typing import Any, Dict, List, Optional

from .base import Sink, conform
from .parquet import ParquetSink, ResultsWriteError, read_results

__all__ = ["Sink", "conform", "ParquetSink", "read_results", "close_sinks"]


def close_sinks(sinks: List[Any], summary: Dict[str, Any]) -> Optional[ResultsWriteError]:
    """Close every sink, also after one failed to write its last rows (returned; the sinks after it are
    told the sweep did not complete)."""
    failure = None
    for sink in sinks:
        try:
            sink.close(summary)
        except ResultsWriteError as e:
            failure = failure or e
            summary["completed"] = False
    return failure

