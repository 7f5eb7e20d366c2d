"""Result sinks: a sink is one module here plus one line in `SINKS`.

Each module brings its `Config` (its section of the config's `sinks:`, with `enabled`), `open(context)`
and optionally `check(config)`, `check_columns(names)`, `columns_logged(schema)` (see `.base`) and
`prepare(config)`: called before Ray starts, to make ready on a thread of its own what `open` will need. The
config builds its `sinks:` section from `SINKS`; the driver opens, feeds and closes what is enabled, in
the order of `SINKS`.
"""

from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from ..errors import SweepError
from . import mlflow, parquet
from .base import Sink, SinkContext, conform
from .parquet import ResultsWriteError

SINKS: Dict[str, ModuleType] = {
    "parquet": parquet,
    "mlflow": mlflow,
}

__all__ = ["SINKS", "Sink", "SinkContext", "conform", "enabled_sinks", "check_columns", "prepare_sinks", "open_sinks",
           "close_sinks"]


def enabled_sinks(config: Any) -> List[Tuple[str, ModuleType]]:
    """(name, module) of each sink the config's `sinks:` section enables, in the order of `SINKS`."""
    enabled = []
    for name, module in SINKS.items():
        section = getattr(config.sinks, name, None)
        if section is None:
            raise SweepError(f"the sink {name!r} was registered in sweep.sinks.SINKS after the config was built, "
                             f"so the config has no sinks.{name} section: call sweep.config.rebuild() after "
                             f"registering it")
        if section.enabled:
            enabled.append((name, module))
    return enabled


def check_columns(config: Any, schema: pa.Schema, metric_names: Sequence[str]) -> None:
    """Before any row: each enabled sink refuses the names it could not record (a `SweepError` naming one):
    the metric names, and the columns it records beside them (`columns_logged`)."""
    for _, module in enabled_sinks(config):
        check = getattr(module, "check_columns", None)
        if check is None:
            continue
        logged = getattr(module, "columns_logged", None)
        check([*metric_names, *(logged(schema) if logged is not None else ())])


def prepare_sinks(config: Any) -> None:
    """Each enabled sink's `prepare(config)`, where it has one: work it starts in the background (it must
    not raise; a problem is for `open` to meet and report)."""
    for _, module in enabled_sinks(config):
        prepare = getattr(module, "prepare", None)
        if prepare is not None:
            prepare(config)


def open_sinks(context: SinkContext) -> List[Sink]:
    """The enabled sinks, opened in the order of `SINKS`; when one cannot be opened, those opened before
    it are closed (the sweep did not complete) and the error is raised."""
    sinks: List[Sink] = []
    try:
        for _, module in enabled_sinks(context.config):
            sinks.append(module.open(context))
    except BaseException:
        close_sinks(sinks, {"completed": False})
        raise
    return sinks


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
