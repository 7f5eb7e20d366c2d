"""One MLflow run per sweep, logged from a background thread.

Evaluation never waits for MLflow: rows are queued and a thread sends them
with `log_batch` inside MLflow's limits. When the server cannot be reached the
sweep goes on (Parquet stays complete) and the summary says what MLflow missed.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: MLflow's limits for one `log_batch` request.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
#: MLflow refuses param values longer than this.
MAX_PARAM_VALUE_LENGTH = 6000
#: Attempts for each request before its data is counted as missed.
MAX_ATTEMPTS = 3
#: Seconds `close` waits for the queue to drain.
CLOSE_TIMEOUT = 120.0

_STOP = object()


class MlflowSink:
    """Logs params, tags, per-candidate metrics (step = candidate_id) and the summary."""

    def __init__(
        self,
        experiment: str,
        *,
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        tags: Optional[Mapping[str, str]] = None,
        metric_names: Sequence[str] = (),
    ):
        self.experiment = experiment
        self.run_name = run_name or experiment
        self.tracking_uri = tracking_uri
        self.metric_names = tuple(metric_names)
        self.run_id: Optional[str] = None
        self.errors: List[str] = []
        self.missed_metrics = 0
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._params = dict(params or {})
        self._tags = dict(tags or {})
        self._thread = threading.Thread(target=self._work, name="sweep-mlflow", daemon=True)
        self._thread.start()

    # -- the sink contract -------------------------------------------------
    def write(self, table: pa.Table) -> None:
        names = [n for n in self.metric_names if n in table.column_names]
        if not names or table.num_rows == 0:
            return
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        if ok.num_rows:
            columns = {n: ok.column(n).to_pylist() for n in names}
            self._queue.put(("rows", ok.column("candidate_id").to_pylist(), columns))

    def flush(self) -> None:
        """Logging is asynchronous; rows are sent as soon as the thread gets to them."""

    def close(self, summary: Dict[str, Any]) -> None:
        self._queue.put(("summary", summary))
        self._queue.put(_STOP)
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            self.errors.append(f"MLflow logging did not finish within {CLOSE_TIMEOUT:.0f} s")

    @property
    def healthy(self) -> bool:
        return not self.errors

    # -- the logging thread ------------------------------------------------
    def _work(self) -> None:
        client = None
        try:
            client = self._start()
        except Exception as e:  # the sweep goes on without MLflow
            self._error(f"could not start the MLflow run: {type(e).__name__}: {e}")
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if client is None or self.run_id is None:
                if item[0] == "rows":
                    self.missed_metrics += sum(len(v) for v in item[2].values())
                continue
            try:
                if item[0] == "rows":
                    self._log_rows(client, item[1], item[2])
                elif item[0] == "summary":
                    self._log_summary(client, item[1])
            except Exception as e:
                self._error(f"MLflow logging failed: {type(e).__name__}: {e}")

    def _error(self, text: str) -> None:
        log.warning("%s; the sweep goes on and the Parquet results stay complete", text)
        self.errors.append(text)

    def _start(self):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
        run = client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        params = [Param(k, _param_value(v)) for k, v in self._params.items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._retry(lambda chunk=params[i : i + MAX_PARAMS_PER_BATCH]: client.log_batch(self.run_id, params=chunk))
        tags = [RunTag(k, str(v)) for k, v in self._tags.items()]
        for i in range(0, len(tags), MAX_TAGS_PER_BATCH):
            self._retry(lambda chunk=tags[i : i + MAX_TAGS_PER_BATCH]: client.log_batch(self.run_id, tags=chunk))
        return client

    def _log_rows(self, client, ids: List[int], columns: Dict[str, List[Optional[float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, int(cid))
            for name, values in columns.items()
            for cid, value in zip(ids, values)
            if value is not None
        ]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
            if not self._retry(lambda: client.log_batch(self.run_id, metrics=chunk)):
                self.missed_metrics += len(chunk)

    def _log_summary(self, client, summary: Dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"summary.{k}", float(v), now, 0)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)
        ]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._retry(lambda chunk=metrics[i : i + MAX_METRICS_PER_BATCH]: client.log_batch(self.run_id, metrics=chunk))
        if self.errors or self.missed_metrics:
            client.set_tag(self.run_id, "sweep.mlflow_incomplete", f"{self.missed_metrics} metric values missed")
        client.set_terminated(self.run_id, status="FINISHED" if summary.get("completed", True) else "FAILED")

    def _retry(self, call) -> bool:
        for attempt in range(MAX_ATTEMPTS):
            try:
                call()
                return True
            except Exception as e:
                if attempt == MAX_ATTEMPTS - 1:
                    self._error(f"MLflow request failed {MAX_ATTEMPTS} times: {type(e).__name__}: {e}")
                    return False
                time.sleep(0.5 * 2**attempt)
        return False


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - 1] + "…"
    return text
