"""One MLflow run per sweep, logged from a background thread.

Evaluation never waits for MLflow: rows are queued and a thread sends them
with `log_batch` inside MLflow's limits. A request that fails is retried with
backoff for up to `retry_seconds`, so a server that goes away and comes back
receives everything it missed; one that stays away costs a warning and a note
in the summary, never the sweep (the Parquet results stay complete). A server
that has not answered once (a wrong URI, no server there) is tried for
`connect_seconds` only. The first failed request is reported at once, with how
long the sink keeps trying, not only when it gives up.

Small sweeps log every candidate's metrics with `step = candidate_id`; larger
ones log per-batch summaries (`batch.<metric>.min|mean|max`, one step per
batch) so the UI stays usable, and point at the full table.

Rows that follow members over generations (population-based training: the
results schema has the lineage columns `member` and `generation`) go to child
runs: each member gets a child run of the sweep's run, nested under it in the
UI, with its metrics, its numeric recipe columns (its hyperparameters) and the
other lineage columns at one step per generation. The sweep's run keeps its
params, tags, summary and per-batch summaries.

The config's keys become MLflow params and the metric names MLflow metrics:
`check` (at load time) and `check_columns` (once the metric names are known)
refuse names MLflow would refuse, before any row, naming them.

The tracking URI is resolved once, when the sink opens (`resolve_tracking_uri`: the config's, else
$MLFLOW_TRACKING_URI, else MLflow's default, with a relative SQLite or file path made absolute against the
working directory), and recorded in run.json as `mlflow_tracking_uri`: `resume` and `report` use that
record, so they find the run from any directory. An experiment the sink creates in a SQLite store keeps its
artifacts beside the database file (`<database folder>/mlruns`), not in whatever directory the sweep
happened to start from.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from pydantic_core import PydanticCustomError

from ..errors import SweepError
from ..messages import first_line, kind_of, one_line, short
from ..results import LINEAGE, RECIPE, role_of
from ..settings import MAX_INT64, MAX_SECONDS, Float, Int, Section, Text, leaves
from .base import SinkContext

log = logging.getLogger(__name__)

#: MLflow's limits for one `log_batch` request.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
#: MLflow refuses param values longer than this.
MAX_PARAM_VALUE_LENGTH = 6000
#: Backoff between attempts of one request: doubles from the first to the last.
FIRST_BACKOFF = 0.5
LONGEST_BACKOFF = 8.0
#: How long a server that has not answered once yet is tried (a wrong URI, no server there):
#: far shorter than `retry_seconds`, which bridges an outage of a server that did answer.
FIRST_CONTACT_SECONDS = 15.0
#: Seconds the logging thread gathers what arrives before sending it: rounds that land meanwhile go in one
#: request per run (the metrics reach MLflow at most this much later).
MERGE_SECONDS = 0.5
#: Seconds `close` waits for the queue to drain beyond the retry window.
CLOSE_GRACE = 30.0
#: Longest error text a warning quotes.
MAX_REASON_LENGTH = 300
#: Suffix of the companion metric that marks a NaN or ±inf value (MLflow stores NaN as 0 with a flag and clamps inf).
NONFINITE_SUFFIX = ".nonfinite"
#: The per-batch summaries of a metric `{name}`, logged instead of one step per candidate in sweeps of more
#: than `max_candidate_metrics` candidates: the finite values' min, mean and max, and how many were not finite.
BATCH_METRICS = {"min": "batch.{name}.min", "mean": "batch.{name}.mean", "max": "batch.{name}.max",
                 "nonfinite": "batch.{name}" + NONFINITE_SUFFIX}
#: Prefix of the sweep's summary numbers as metrics (`summary.best_<objective>`, `summary.candidates`, …).
SUMMARY_PREFIX = "summary."
#: The lineage columns that give each member its own child run: one per `member`, one step per `generation`.
CHILD_KEY = "member"
CHILD_STEP = "generation"
#: Where member slots take new trials in waves: one child run per `trial`, one step per training `step`.
TRIAL_KEY = "trial"
TRIAL_STEP = "step"

#: MLflow's rules for metric names and param keys (mlflow/utils/validation.py): at most
#: MAX_ENTITY_KEY_LENGTH characters, only the characters of `validate_param_and_metric_name`
#: (it allows ':' too, except on Windows; a tracking server may run anywhere, so ':' is refused
#: here), and `path_not_unique`: the name must be its own normalised relative path.
MLFLOW_MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MLFLOW_KEY_PATTERN = re.compile(r"[/\w.\- ]*")  # fullmatch; MLflow's own `$` also lets one trailing newline by
#: MLflow refuses empty experiment names and those longer than this (MAX_EXPERIMENT_NAME_LENGTH).
MLFLOW_MAX_EXPERIMENT_NAME_LENGTH = 500

_STOP = object()


class Config(Section):
    """One MLflow run per sweep."""

    enabled: bool = True
    tracking_uri: Optional[Text] = Field(
        None, min_length=1, description="default: $MLFLOW_TRACKING_URI, else MLflow's default")
    experiment: Optional[Text] = Field(
        None, min_length=1, max_length=MLFLOW_MAX_EXPERIMENT_NAME_LENGTH, description="default: the sweep's name")
    max_candidate_metrics: Int = Field(
        10_000, ge=0, le=MAX_INT64,
        description="sweeps with more candidates log per-batch summaries, not one step per candidate")
    retry_seconds: Float = Field(
        120.0, ge=0, le=MAX_SECONDS,
        description="how long one logging request is retried (with backoff) while a server that has answered is "
                    "away; one that has not answered yet is tried for 15 s at most")


def open(context: SinkContext) -> "MlflowSink":
    """The sweep's MLflow run: created, or on resume reopened from run.json's `mlflow_run_id` (its id goes
    into run.json as soon as it is known); members get child runs when the schema's lineage says so."""
    config = context.config
    settings = config.sinks.mlflow
    uri = context.record.get(TRACKING_URI_RECORD) or resolve_tracking_uri(settings.tracking_uri)
    recorded = context.record.get(TRACKING_URI_RECORD)

    def on_uri(resolved: str) -> None:  # MLflow's default is known once the sink's thread has asked MLflow
        if resolved != recorded:
            context.update_record(**{TRACKING_URI_RECORD: resolved})
    return MlflowSink(
        settings.experiment or config.name,
        run_name=config.name,
        tracking_uri=uri,
        params=context.params,
        tags={**context.stamp, "sweep.git_commit": git_commit(), "sweep.workers": str(context.workers)},
        metric_names=context.metric_names,
        per_candidate=context.total <= settings.max_candidate_metrics,
        results_uri=context.results,
        retry_seconds=settings.retry_seconds,
        run_id=context.record.get("mlflow_run_id"),
        on_run=lambda run_id: context.update_record(mlflow_run_id=run_id),
        on_uri=on_uri,
        children=children_of(context.schema),
    )


#: Threads opening a tracking store ahead of the sink (`prepare`), by the URI they open.
_PREPARING: Dict[Optional[str], threading.Thread] = {}


def prepare(config: Any) -> None:
    """Import MLflow and open the sweep's tracking store on a thread of its own, while Ray and the workers
    start: MLflow's import takes seconds, and a new SQLite store makes its tables. MLflow keeps one store
    per URI in a process, so the sink's client finds it open. Nothing is logged; a failure is left for the
    sink to meet and report. A server's store costs nothing to open and is not prepared."""
    uri = resolve_tracking_uri(config.sinks.mlflow.tracking_uri)
    if uri is not None and urlsplit(uri).scheme in ("http", "https", "databricks"):
        return
    if uri in _PREPARING:
        return

    def open_store() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the sink opens the store itself and says what is wrong
            pass

    thread = threading.Thread(target=open_store, name="sweep-mlflow-prepare", daemon=True)
    _PREPARING[uri] = thread
    thread.start()


def _prepared(uri: Optional[str]) -> None:
    """Wait for a store being prepared at `uri`: two threads making one SQLite store's tables at once race."""
    thread = _PREPARING.get(uri)
    if thread is not None:
        thread.join()


#: The run.json field that holds the tracking URI the sweep's MLflow run lives at.
TRACKING_URI_RECORD = "mlflow_tracking_uri"
#: Folder beside a SQLite store's database file that holds the artifacts of the experiments the sink creates.
SQLITE_ARTIFACTS_FOLDER = "mlruns"


def resolve_tracking_uri(uri: Optional[str] = None) -> Optional[str]:
    """The tracking URI a sweep logs to, absolute: `uri`, else $MLFLOW_TRACKING_URI; None when neither is
    set (MLflow's own default applies: the sink asks MLflow in its thread, off the sweep's critical path,
    and resolves what it says). A relative SQLite database path (`sqlite:///mlflow.db`), a relative `file:`
    URI or a bare path is made absolute against the working directory, so the URI means the same store
    from any directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return None
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if database and not database.startswith("/") and not database.startswith(":memory:"):
            path, _, query = database.partition("?")
            return "sqlite:///" + os.path.abspath(path) + (f"?{query}" if query else "")
        return uri
    if parts.scheme == "file" and not parts.netloc and not parts.path.startswith("/"):
        return Path(os.path.abspath(parts.path)).as_uri()
    if parts.scheme == "" and uri:  # a bare path: MLflow's file store
        return Path(os.path.abspath(uri)).as_uri()
    return uri


def sqlite_artifacts(uri: str) -> Optional[str]:
    """Where the artifacts of an experiment created in the SQLite store at `uri` go: beside its database
    file. None for any other store (a server or a file store chooses for itself)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri[len("sqlite:///"):].partition("?")[0]
    if not database.startswith("/"):
        return None
    return (Path(database).parent / SQLITE_ARTIFACTS_FOLDER).as_uri()


def git_commit() -> str:
    """The commit of the checkout sweep runs from, or 'unknown' (an installed package, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Children:
    """Rows grouped into one child run each, one step per `step` value."""

    key: str = CHILD_KEY  # rows with the same value go to one child run
    step: str = CHILD_STEP  # the MLflow step of each row's metrics
    name: str = "member-{:03d}"  # run name of the child for key value k
    values: Sequence[str] = ()  # columns logged as metrics of the child, besides the sweep's metric names
    params: Dict[int, Dict[str, str]] = field(default_factory=dict)  # params of the child for key value k, logged once


def columns_logged(schema: pa.Schema) -> List[str]:
    """The columns logged to the child runs beside the metrics: when the schema has the lineage columns
    `member` and `generation`, its numeric recipe columns and other lineage columns; otherwise none."""
    if not _has_members(schema):
        return []
    key, step = _child_columns(schema)
    return [f.name for f in schema if f.name not in (key, step) and role_of(f) in (RECIPE, LINEAGE)
            and _numeric(f.type)]


def children_of(schema: pa.Schema) -> Optional[Children]:
    """One child run per member, one step per generation, when the schema's lineage has both; else None.
    Where members' slots take new trials in waves (a `trial` lineage column), one child run per trial, one
    step per training step."""
    if not _has_members(schema):
        return None
    key, step = _child_columns(schema)
    return Children(key=key, step=step, name=f"{key}-{{:03d}}", values=columns_logged(schema))


def _child_columns(schema: pa.Schema) -> Tuple[str, str]:
    lineage = {f.name for f in schema if role_of(f) == LINEAGE}
    return (TRIAL_KEY, TRIAL_STEP) if {TRIAL_KEY, TRIAL_STEP} <= lineage else (CHILD_KEY, CHILD_STEP)


def _has_members(schema: pa.Schema) -> bool:
    """Whether the rows follow members over generations: `member` and `generation` are lineage columns."""
    lineage = {f.name for f in schema if role_of(f) == LINEAGE}
    return {CHILD_KEY, CHILD_STEP} <= lineage


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


class MlflowSink:
    """Logs params, tags, metrics and the summary of one sweep to one MLflow run."""

    def __init__(
        self,
        experiment: str,
        *,
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        tags: Optional[Mapping[str, str]] = None,
        metric_names: Sequence[str] = (),
        per_candidate: bool = True,
        run_id: Optional[str] = None,
        results_uri: Optional[str] = None,
        retry_seconds: float = 120.0,
        connect_seconds: float = FIRST_CONTACT_SECONDS,
        on_run: Optional[Callable[[str], None]] = None,
        on_uri: Optional[Callable[[str], None]] = None,
        children: Optional[Children] = None,
    ):
        # Our own retries pace the requests; MLflow's would hold one request for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.experiment = experiment
        self.run_name = run_name or experiment
        self.tracking_uri = tracking_uri
        self.metric_names = tuple(metric_names)
        self.children = children
        # With children, they carry each member's metrics; the sweep's run gets per-batch summaries.
        self.per_candidate = per_candidate and children is None
        self.run_id = run_id
        self.reopened = run_id is not None
        self.results_uri = results_uri
        self.retry_seconds = retry_seconds
        self.connect_seconds = connect_seconds
        self.on_run = on_run
        self.on_uri = on_uri
        self.errors: List[str] = []
        self.missed_metrics = 0
        self.logged_metrics = 0
        self.reached = False  # whether the server has taken a request of this sweep
        self._uri = _shown(tracking_uri) if tracking_uri else "the default tracking URI"
        self._down = False  # the server did not answer within its window: one attempt per request from now on
        self._failing = False  # a request is failing and that was reported; cleared when one gets through
        self._retry_until = 0.0  # time.monotonic() at which the failing request is given up
        self._batches = 0
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._params = {k: _param_value(v) for k, v in (params or {}).items()}
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._experiment_id: Optional[str] = None
        self._child_runs: Dict[Any, str] = {}  # key value → run id of its child
        self._child_status: Dict[Any, str] = {}  # key value → status of its child, as last seen
        self._child_params: Dict[Any, Dict[str, str]] = {}  # key value → params its child has
        self._child_tags_due: set = set()  # key values whose child still lacks the stamp tags
        self._child_ready: set = set()  # key values whose child has its tags and params and is running
        self._noted: set = set()  # problems with the table already reported once
        self._thread = threading.Thread(target=self._work, name="sweep-mlflow", daemon=True)
        self._thread.start()

    @property
    def warnings(self) -> List[str]:
        """What went wrong with MLflow; the sweep went on regardless."""
        return list(self.errors)

    def outcome(self) -> Dict[str, Any]:
        """The MLflow run's id (None when it was never created), where it lives and the metric values it missed."""
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.tracking_uri,
                "mlflow_missed_metrics": self.missed_metrics}

    @property
    def child_run_ids(self) -> Dict[int, str]:
        """Run id of the child of each key value the sink has created or found so far (all of them after `close`)."""
        return self._child_runs.copy()

    # -- the sink contract -------------------------------------------------
    def write(self, table: pa.Table) -> None:
        names = [n for n in self.metric_names if n in table.column_names]
        if (not names and self.children is None) or table.num_rows == 0:
            return
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        if not ok.num_rows:
            return
        if self.children is not None:
            # Tables are immutable: the thread reads the columns it needs from this one.
            self._queue.put(("children", ok))
        if not names:
            return
        if self.per_candidate:
            ids = ok.column("candidate_id").to_numpy()
            self._queue.put(("rows", ids, {n: ok.column(n).to_numpy(zero_copy_only=False) for n in names}))
        else:
            step = self._batches
            self._batches += 1
            summary = {}
            for n in names:
                values = ok.column(n).to_numpy(zero_copy_only=False)
                finite = values[np.isfinite(values)]
                if len(finite):
                    summary.update({BATCH_METRICS["min"].format(name=n): finite.min(),
                                    BATCH_METRICS["mean"].format(name=n): finite.mean(),
                                    BATCH_METRICS["max"].format(name=n): finite.max()})
                if len(finite) < len(values):
                    summary[BATCH_METRICS["nonfinite"].format(name=n)] = float(len(values) - len(finite))
            self._queue.put(("batch", step, summary))

    def flush(self) -> None:
        """Logging is asynchronous; rows are sent as soon as the thread gets to them."""

    def close(self, summary: Dict[str, Any]) -> None:
        self._queue.put(("summary", summary))
        self._queue.put(_STOP)
        if self._failing and not self._down:
            left = max(0.0, self._retry_until - time.monotonic())
            log.warning("waiting up to %.0f s more for MLflow at %s to take what is queued; %s%s", left, self._uri,
                        self._safe(), self._interrupt())
        self._thread.join(self.retry_seconds + CLOSE_GRACE)
        if self._thread.is_alive():
            self._error(f"MLflow logging did not finish within {self.retry_seconds + CLOSE_GRACE:.0f} s; "
                        f"what was still queued is not in the MLflow run")

    # -- the logging thread ------------------------------------------------
    def _work(self) -> None:
        client = None
        try:
            client = self._start()
        except Exception as e:  # the sweep goes on without MLflow
            if self.reached or not self._down:  # a server never reached has had its warning
                self._error(f"could not start the MLflow run: {type(e).__name__}: "
                            f"{first_line(e, MAX_REASON_LENGTH)}")
        while True:
            items = self._gather()
            for item in items:
                if item is _STOP:
                    return
                self._handle(client, item)

    def _gather(self) -> List[Any]:
        """The next item, with what else arrives within MERGE_SECONDS, merged: every queued round's rows for
        one child run go in one request rather than one each (a request is a database transaction: the
        sweep's thread waits on the lock while they run). `_STOP` and a summary end a gathering."""
        items = [self._queue.get()]
        deadline = time.monotonic() + MERGE_SECONDS
        while items[-1] is not _STOP and items[-1][0] != "summary":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        children = [item[1] for item in items if item is not _STOP and item[0] == "children"]
        rows = [item for item in items if item is not _STOP and item[0] == "rows"]
        merged: List[Any] = []
        if children:
            merged.append(("children", children[0] if len(children) == 1 else
                           pa.concat_tables(children, promote_options="default")))
        by_names: Dict[tuple, List[Any]] = {}
        for r in rows:  # rows with the same metric columns (a round of invalid rows only has none)
            by_names.setdefault(tuple(r[2]), []).append(r)
        for names, group in by_names.items():
            merged.append(("rows", np.concatenate([r[1] for r in group]),
                           {n: np.concatenate([r[2][n] for r in group]) for n in names}))
        merged.extend(item for item in items if item is _STOP or item[0] not in ("children", "rows"))
        return merged

    def _handle(self, client: Any, item: Any) -> None:
        """Send one (merged) item; what cannot reach MLflow is counted as missed."""
        if client is None or self.run_id is None:
            if item[0] == "rows":
                self.missed_metrics += sum(len(v) for v in item[2].values())
            elif item[0] == "children":
                self.missed_metrics += sum(len(e) for e in self._child_entries(item[1]).values())
            return
        try:
            if item[0] == "rows":
                self._log_rows(client, item[1], item[2])
            elif item[0] == "children":
                self._log_children(client, item[1])
            elif item[0] == "batch":
                self._log_metrics(client, [(k, v, item[1]) for k, v in item[2].items()])
            elif item[0] == "summary":
                self._log_summary(client, item[1])
        except Exception as e:
            self._error(f"MLflow logging failed: {type(e).__name__}: {first_line(e, MAX_REASON_LENGTH)}")

    def _error(self, text: str) -> None:
        log.warning("%s; the sweep goes on%s", text,
                    " and the Parquet results stay complete" if self.results_uri else
                    "; sinks.parquet is off, so what MLflow misses is kept nowhere")
        self.errors.append(text)

    def _safe(self) -> str:
        """Where the rows MLflow does not get are kept, for the warnings."""
        if self.results_uri:
            return f"every row still goes to the Parquet results at {self.results_uri}"
        return "sinks.parquet is off, so what MLflow misses is kept nowhere"

    def _interrupt(self) -> str:
        if not self.results_uri:
            return ""
        return "; once the sweep's rows are all in, Ctrl-C during that wait loses none of them"

    def _start(self):
        _prepared(self.tracking_uri)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        self.tracking_uri = resolve_tracking_uri(client.tracking_uri)
        if self.on_uri is not None and self.tracking_uri:
            self.on_uri(self.tracking_uri)
        self._uri = _shown(client.tracking_uri)
        if self.run_id is None:
            experiment = self._call(lambda: client.get_experiment_by_name(self.experiment), "find the experiment")
            artifacts = sqlite_artifacts(client.tracking_uri)
            experiment_id = (experiment.experiment_id if experiment else self._call(
                lambda: client.create_experiment(self.experiment, artifact_location=artifacts),
                "create the experiment"))
            run = self._call(lambda: client.create_run(experiment_id, run_name=self.run_name), "create the run")
            self.run_id = run.info.run_id
            logged: Dict[str, str] = {}
        else:
            run = self._call(lambda: client.get_run(self.run_id), "reopen the run")
            logged = dict(run.data.params)
            if run.info.status != "RUNNING":
                self._call(lambda: client.update_run(self.run_id, status="RUNNING"), "reopen the run")
            if self.children is not None:
                self._find_children(client, run.info.experiment_id)
        self._experiment_id = run.info.experiment_id
        if self.on_run is not None:
            self.on_run(self.run_id)
        # Params are logged once: MLflow refuses a param re-logged with another value.
        changed = sorted(k for k, v in self._params.items() if k in logged and logged[k] != v)
        if changed:
            self._error(f"the reopened MLflow run has other values for params {changed[:5]}; they are kept as they were")
        params = [Param(k, v) for k, v in self._params.items() if k not in logged]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            chunk = params[i : i + MAX_PARAMS_PER_BATCH]
            self._call(lambda: client.log_batch(self.run_id, params=chunk), "log params")
        tags = self._stamp()
        for i in range(0, len(tags), MAX_TAGS_PER_BATCH):
            chunk = tags[i : i + MAX_TAGS_PER_BATCH]
            self._call(lambda: client.log_batch(self.run_id, tags=chunk), "log tags")
        return client

    def _stamp(self) -> list:
        """The tags of the sweep's run; its children get them too."""
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in self._tags.items()]
        if self.results_uri:
            tags.append(RunTag("sweep.results", self.results_uri))
        return tags

    def _log_rows(self, client, ids: np.ndarray, columns: Dict[str, np.ndarray]) -> None:
        entries = []
        for name, values in columns.items():
            _add_entries(entries, name, values.tolist(), ids.tolist())
        self._log_metrics(client, entries)

    def _log_metrics(self, client, entries: List[tuple], run_id: Optional[str] = None) -> None:
        from mlflow.entities import Metric

        run_id = run_id or self.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v, step in entries]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
            if self._try(lambda: client.log_batch(run_id, metrics=chunk)):
                self.logged_metrics += len(chunk)
            else:
                self.missed_metrics += len(chunk)

    def _log_summary(self, client, summary: Dict[str, Any]) -> None:
        entries = [(f"{SUMMARY_PREFIX}{k}", v, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._log_metrics(client, entries)
        if self.results_uri and not self.per_candidate and "://" not in self.results_uri \
                and os.path.isdir(self.results_uri):
            # Too many candidates for the UI: the full table goes along as an artifact.
            self._try(lambda: client.log_artifacts(self.run_id, self.results_uri, artifact_path="results"))
        if self.missed_metrics:
            self._try(lambda: client.set_tag(self.run_id, "sweep.mlflow_incomplete",
                                             f"{self.missed_metrics} metric values missed; the Parquet results are complete"))
        status = "FINISHED" if summary.get("completed", True) else "KILLED"
        # Every child ends as the sweep does, those a reopened run found and got no rows for included.
        for run_id in list(self._child_runs.values()):
            self._try(lambda: client.set_terminated(run_id, status=status))
        self._try(lambda: client.set_terminated(self.run_id, status=status))

    # -- child runs ------------------------------------------------------------
    def _find_children(self, client, experiment_id: str) -> None:
        """The children an earlier run of this sweep created, by their key value, to go on logging to them."""
        key = self.children.key
        found: List[Any] = []
        token = None
        while True:
            page = self._call(lambda: client.search_runs(
                [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
                order_by=["attributes.start_time ASC"], page_token=token), "find the child runs")
            found.extend(page)
            token = page.token
            if not token:
                break
        for run in found:
            tags = run.data.tags
            if tags.get("sweep.child_key") != key or f"sweep.{key}" not in tags:
                continue
            value = _key_value(tags[f"sweep.{key}"])
            if value in self._child_runs:  # two children for one value: the first created gets the rows
                continue
            self._child_runs[value] = run.info.run_id
            self._child_status[value] = run.info.status
            self._child_params[value] = dict(run.data.params)

    def _child_entries(self, table: pa.Table) -> Dict[Any, List[tuple]]:
        """(metric, value, step) of each key value in `table`, rows without a key or a step left out."""
        spec = self.children
        for column in (spec.key, spec.step):
            if column not in table.column_names:
                self._note(f"no column {column!r} in the results; no child run gets these rows")
                return {}
        columns = []
        for name in dict.fromkeys([*self.metric_names, *spec.values]):
            if name not in table.column_names:
                if name in spec.values:
                    self._note(f"no column {name!r} in the results; it is not logged to the child runs")
                continue
            kind = table.schema.field(name).type
            if pa.types.is_null(kind):  # no value in these rows (a rung column between rungs): nothing to log
                continue
            if not _numeric(kind):
                self._note(f"column {name!r} is {kind}, not a number; it is not logged to the child runs")
                continue
            columns.append(name)
        keys = table.column(spec.key).to_pylist()
        steps = table.column(spec.step).to_pylist()
        rows: Dict[Any, List[int]] = {}
        for i, (k, step) in enumerate(zip(keys, steps)):
            if k is not None and step is not None:
                rows.setdefault(k, []).append(i)
        entries: Dict[Any, List[tuple]] = {k: [] for k in rows}
        for name in columns:
            values = table.column(name).to_pylist()
            for k, index in rows.items():
                _add_entries(entries[k], name, [values[i] for i in index], [steps[i] for i in index])
        return entries

    def _log_children(self, client, table: pa.Table) -> None:
        for k, entries in self._child_entries(table).items():
            run_id = self._child(client, k)
            if run_id is None:
                self.missed_metrics += len(entries)
            else:
                self._log_metrics(client, entries, run_id)

    def _child(self, client, k: Any) -> Optional[str]:
        """The run id of the child for key value `k`: created on its first row, or found and set running again.

        Its tags and params go along once; what did not get through is tried again with its next rows.
        """
        from mlflow.entities import Param

        spec = self.children
        if k not in self._child_runs:
            tags = {"mlflow.parentRunId": self.run_id, "sweep.child_key": spec.key, f"sweep.{spec.key}": str(k)}
            made: List[Any] = []
            if not self._try(lambda: made.append(client.create_run(self._experiment_id, tags=tags,
                                                                     run_name=spec.name.format(k)))):
                return None
            self._child_runs[k] = made[0].info.run_id
            self._child_status[k] = "RUNNING"
            self._child_params[k] = {}
            self._child_tags_due.add(k)
        run_id = self._child_runs[k]
        if k in self._child_ready:
            return run_id
        if k in self._child_tags_due:
            stamp = self._stamp()
            if all(self._try(lambda: client.log_batch(run_id, tags=stamp[i : i + MAX_TAGS_PER_BATCH]))
                   for i in range(0, len(stamp), MAX_TAGS_PER_BATCH)):
                self._child_tags_due.discard(k)
        if self._child_status[k] != "RUNNING" and self._try(lambda: client.update_run(run_id, status="RUNNING")):
            self._child_status[k] = "RUNNING"
        # Params are logged once, as on the sweep's run: a reopened child keeps the values it has.
        logged = self._child_params[k]
        wanted = {name: _param_value(v) for name, v in spec.params.get(k, {}).items()}
        changed = sorted(name for name, v in wanted.items() if name in logged and logged[name] != v)
        if changed:
            self._note(f"the reopened child run of {spec.key} {k} has other values for params {changed[:5]}; "
                       f"they are kept as they were")
        params = [Param(name, v) for name, v in wanted.items() if name not in logged]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            chunk = params[i : i + MAX_PARAMS_PER_BATCH]
            if self._try(lambda: client.log_batch(run_id, params=chunk)):
                logged.update({p.key: p.value for p in chunk})
        if k not in self._child_tags_due and self._child_status[k] == "RUNNING" and wanted.keys() <= logged.keys():
            self._child_ready.add(k)
        return run_id

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self._error(text)

    # -- retries -------------------------------------------------------------
    def _try(self, call: Callable[[], Any]) -> bool:
        """Call with backoff; False (and a warning) when it never got through.

        A server that has answered before is tried for `retry_seconds` (an
        outage it comes back from), one that never has for `connect_seconds` at
        most. The first failure is reported at once, with that window. While the
        server is known to be away each request gets one attempt, so a server
        that never returns costs seconds, not the window per request.
        """
        window = 0.0 if self._down else (self.retry_seconds if self.reached
                                         else min(self.retry_seconds, self.connect_seconds))
        self._retry_until = time.monotonic() + window
        backoff = FIRST_BACKOFF
        while True:
            try:
                call()
            except Exception as e:
                if not self._failing and not self._down:
                    self._failing = True
                    self._report_failure(e, window)
                left = self._retry_until - time.monotonic()
                if left <= 0:
                    if not self._down:
                        if self.reached:
                            self._error(f"MLflow at {self._uri} did not answer for {window:g} s "
                                        f"({_reason(e)}); what it missed is not in the MLflow run")
                        else:
                            self._error(f"MLflow at {self._uri} was never reached ({_reason(e)}); gave up after "
                                        f"{window:g} s: MLflow is left out of this sweep")
                    self._down = True
                    return False
                time.sleep(min(backoff, left))  # the last attempt at the end of the window
                backoff = min(LONGEST_BACKOFF, backoff * 2)
                continue
            if self._failing or self._down:
                log.warning("MLflow at %s answers again; sending what was queued", self._uri)
            self._failing = self._down = False
            self.reached = True
            return True

    def _report_failure(self, error: BaseException, window: float) -> None:
        """The warning of a request that failed for the first time: printed now, not when the sink gives up."""
        again = f"for up to {window:g} s" if window else "no more"
        if self.reached:
            what = (f"MLflow at {self._uri} stopped answering ({_reason(error)}); {self._safe()}. "
                    f"The metrics wait in a queue and are sent when it is back: it is tried {again}")
        else:
            what = (f"MLflow at {self._uri} cannot be reached ({_reason(error)}); {self._safe()}. "
                    f"It has not answered yet, so it is tried {again}, then MLflow is left out of this sweep")
        log.warning("%s%s", what, self._interrupt())

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        result: List[Any] = []
        if not self._try(lambda: result.append(call())):
            raise RuntimeError(f"could not {what}")
        return result[0]


def _add_entries(entries: List[tuple], name: str, values: Sequence[Any], steps: Sequence[int]) -> None:
    """(name, value, step) for each value that is there, and a `NONFINITE_SUFFIX` flag beside NaN and ±inf."""
    for value, step in zip(values, steps):
        if value is None:
            continue
        entries.append((name, value, step))
        if not math.isfinite(value):
            entries.append((name + NONFINITE_SUFFIX, 1.0, step))


def _key_value(text: str) -> Any:
    """The key value a child's `sweep.<key>` tag holds: an int where it reads as one."""
    try:
        return int(text)
    except ValueError:
        return text


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - 1] + "…"
    return text


def _reason(error: BaseException) -> str:
    """Why a request failed, short: the operating system's word where a socket error is under it
    ("Connection refused", "Name or service not known"), else the error's first line."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        # requests and urllib3 keep the cause in args and `reason` as well as in the chain.
        linked = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        stack.extend(x for x in linked if isinstance(x, BaseException))
    return f"{type(error).__name__}: {first_line(error, MAX_REASON_LENGTH)}"


def _shown(uri: str) -> str:
    """`uri` as warnings show it: without a user name or password it may carry."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# --------------------------------------------------------------------------- MLflow names


def check(config: Any) -> None:
    """At load time: the flattened config becomes the run's params, so each key must be one MLflow takes, and
    no two settings may become one key; `metrics.objective`, when named, must be a metric name it takes."""
    how = "rename it, or set sinks.mlflow.enabled: false"
    seen: Dict[str, Tuple[Any, ...]] = {}
    for key, at, _ in leaves(config.to_dict()):
        problem = mlflow_name_problem(key)
        if problem is not None:
            raise PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": (
                f"becomes the MLflow param {short(key)}, which MLflow refuses: it {problem}; {how}")})
        if key in seen:
            raise PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": (
                f"becomes the MLflow param {short(key)}, and so does the setting at "
                f"{' → '.join(short(k) for k in seen[key])}; rename one of them")})
        seen[key] = at
    objective = config.metrics.objective
    if objective is not None:
        problem = _metric_name_problem(objective)
        if problem is not None:
            raise PydanticCustomError("sweep_at", "{reason}", {"at": ("metrics", "objective"), "reason": (
                f"{short(objective)} is logged as an MLflow metric, which MLflow refuses: {problem}; {how}")})


def check_columns(names: Iterable[Any]) -> None:
    """Before any row: the metric names and `columns_logged`, each as `check_metric_names` checks it."""
    check_metric_names(names)


def mlflow_name_problem(name: Any) -> Optional[str]:
    """Why MLflow would refuse `name` as a metric name or param key (completing 'it …'), or None.

    Mirrors `mlflow.utils.validation` (`_validate_metric_name`, `_validate_param_name` and the
    MAX_ENTITY_KEY_LENGTH check), minus ':' (refused by MLflow on Windows) and a trailing newline.
    """
    if not isinstance(name, str):
        return f"is not a string (it is {kind_of(name)})"
    if not name:
        return "is empty"
    if not MLFLOW_KEY_PATTERN.fullmatch(name):
        bad = "".join(dict.fromkeys(c for c in name if not MLFLOW_KEY_PATTERN.fullmatch(c)))
        return (f"holds {short(bad)}; MLflow names may hold only letters, digits, "
                f"underscores, dashes, periods, spaces and slashes")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return (f"is not a plain relative path (MLflow stores names as paths, and this one resolves to "
                f"{short(norm)}): no leading '/' or '..', no '.' or '..' parts, no '//' and no trailing '/'")
    if len(name) > MLFLOW_MAX_KEY_LENGTH:
        return f"is {len(name)} characters long; MLflow allows at most {MLFLOW_MAX_KEY_LENGTH}"
    return None


def logged_metric_names(name: str) -> List[str]:
    """Every MLflow metric name the sink may log for a metric called `name`: itself, its NONFINITE_SUFFIX
    flag, its BATCH_METRICS and its best value in the summary."""
    return [name, name + NONFINITE_SUFFIX, *(template.format(name=name) for template in BATCH_METRICS.values()),
            f"{SUMMARY_PREFIX}best_{name}"]


def _metric_name_problem(name: Any) -> Optional[str]:
    problem = mlflow_name_problem(name)
    if problem is not None:
        return f"it {problem}"
    for logged in logged_metric_names(name)[1:]:
        problem = mlflow_name_problem(logged)
        if problem is not None:
            return f"sweep also logs it as {short(logged)}, which {problem}"
    return None


def check_metric_names(names: Iterable[Any]) -> None:
    """Raise `SweepError` naming the first metric name MLflow would refuse.

    `names` are what the metrics function returns; each must be a valid MLflow metric
    name, and so must every name the MLflow sink derives from it (`logged_metric_names`).
    """
    for name in names:
        problem = _metric_name_problem(name)
        if problem is not None:
            raise SweepError(one_line(
                f"the metrics function returns the metric {short(name)}, which MLflow refuses as a metric name: "
                f"{problem}; rename the metric, or set sinks.mlflow.enabled: false"))
