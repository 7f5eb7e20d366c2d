"""Result sinks: one small interface (write, flush, close), many implementations."""

from .base import Sink, conform
from .parquet import ParquetSink, read_results

__all__ = ["Sink", "conform", "ParquetSink", "read_results"]
