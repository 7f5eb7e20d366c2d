"""Drive one sweep: plan the study, start workers, stream results to the sinks.

Every study runs through one loop: its batches go to an executor — a `Pool`
of interchangeable workers, or `Members` when the study keeps a population on
its workers (`study.population`) — and the rows that come back go to every
enabled sink, the tally and the study. The driver knows studies and sinks only
through their registries and interfaces; the Parquet results store is the one
sink it reads (to resume, or to refuse to overwrite).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pyarrow as pa

import ray

import sweep
from sweep.claim import CLAIM_NAMES, claim
from sweep.config import SweepConfig, dump_config, flatten, load_config
from sweep.errors import SweepError, WeightsError
from sweep.messages import last_line
from sweep.files import write_atomically
from sweep.model import checkpoint_bytes, checkpoint_stamp
from sweep.preflight import plan_checked
from sweep.results import Tally, failed_rows, results_schema
from sweep.sinks import check_columns, close_sinks, open_sinks, prepare_sinks
from sweep.sinks.base import SinkContext
from sweep.sinks.parquet import ResultsWriteError, clear, dataset, has_results, results_location

from .actor import ModelWeights, RemoteSweepWorker
from .members import Members
from .pool import Pool

log = logging.getLogger("sweep")

#: Seconds between progress lines when stderr is not a terminal.
LOG_INTERVAL = 10.0


@dataclass
class RunResult:
    name: str
    run_dir: Path
    results_dir: str
    summary: Dict[str, Any]
    problems: List[Dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    #: the tracking URI that run lives at, absolute (also in run.json)
    mlflow_tracking_uri: Optional[str] = None
    warnings: List[str] = field(default_factory=list)
    #: what the study found over all rows (a path's barrier, the greedy soup's value)
    findings: Dict[str, float] = field(default_factory=dict)


def run_dir_for(config: SweepConfig, out: Path) -> Path:
    return Path(out).resolve() / "runs" / config.name


def connect(address: Optional[str] = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); else Ray joins a `ray start` cluster
    on this machine if one runs, or starts a local one.

    Ray's token authentication stays as Ray sets it: on for a local cluster,
    and a remote cluster's token is read from RAY_AUTH_TOKEN or ~/.ray/auth_token.
    """
    global _may_grow
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    _may_grow = address is not None
    if address is not None:
        _present_token()
    kwargs: Dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = False
        _start_reaper()
    try:
        ray.init(address=address, **kwargs)
    finally:
        os.environ.pop(REAPER_MARK, None)  # only what ray.init starts carries it
    global _started_here
    # ray.init() without an address joins a cluster `ray start` runs on this machine, if any: then it is
    # not the head. Only a cluster this process started is its own to leave to the reaper at exit.
    _started_here = address is None and bool(getattr(ray._private.worker._global_node, "head", False))
    if not os.environ.get("SWEEP_DEBUG"):
        _hide_start_tracebacks()


#: Whether `connect` started a local cluster of this process's own (not one it joined).
_started_here = False


def started_own_cluster() -> bool:
    """Whether this process started the local Ray cluster it is connected to: at exit, Ray's GCS and raylet
    die with it (PR_SET_PDEATHSIG) and the reaper ends the rest, so a command that is done can leave
    without `ray.shutdown()` (two seconds and more of tearing down what dies anyway)."""
    return _started_here and ray.is_initialized()


#: What Ray's worker prints (then its traceback) when a worker's constructor raised.
START_FAILURE = "Exception raised in creation task"


#: The environment variable that marks the processes of the local cluster this driver starts.
REAPER_MARK = "SWEEP_LOCAL_RAY"
#: Seconds the reaper leaves a local cluster to stop by itself once its driver is gone.
REAPER_GRACE_SECONDS = 2.0
_reaper: Optional[subprocess.Popen] = None
_reaper_mark = uuid.uuid4().hex


def _start_reaper() -> None:
    """Start `workers.reaper` (once per process) and mark what `ray.init()` starts next for it: once
    this driver is gone, exited or SIGKILLed, the reaper kills what is left of those processes.

    Ray SIGKILLs its GCS and raylet with the driver (PR_SET_PDEATHSIG) and the
    workers follow within seconds, but the dashboard and runtime-env agents
    then spend 60 s telling the dead GCS that the raylet died. The processes
    ray.init starts carry REAPER_MARK in their environment; the reaper notes
    them and their descendants while this process lives, and kills those
    still running once the pipe it holds from this process closes.
    """
    global _reaper
    if not sys.platform.startswith("linux"):
        return  # elsewhere Ray starts a reaper of its own (it has no kernel fate-sharing there)
    if _reaper is None:
        env = {k: v for k, v in os.environ.items() if k != REAPER_MARK}
        # Kept referenced: the pipe must stay open for as long as this process lives.
        _reaper = subprocess.Popen([sys.executable, "-m", "workers.reaper", f"{REAPER_MARK}={_reaper_mark}",
                                    str(REAPER_GRACE_SECONDS)], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    os.environ[REAPER_MARK] = _reaper_mark


def _hide_start_tracebacks() -> None:
    """Leave out the traceback a worker that could not start prints, which Ray forwards to this process.

    The driver says the cause in one line ("a worker could not start: …"); `SWEEP_DEBUG=1` keeps
    the traceback. Everything else workers print is forwarded as Ray does. Ray 2.60 lets a driver
    filter forwarded lines only through its private dispatcher; in another release nothing is left out.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    forward = next((handler for name, handler in getattr(dispatcher, "handlers", ()) if name == "ray_print_logs"),
                   None)
    if forward is None:
        return
    failed: set = set()  # pids of workers that printed a start failure: the rest of their lines is its traceback

    def filtered(data: Dict[str, Any]) -> None:
        if data.get("pid") in failed:
            return
        lines = data.get("lines") or []
        for i, line in enumerate(lines):
            if START_FAILURE in str(line):
                failed.add(data.get("pid"))
                if i:
                    forward({**data, "lines": lines[:i]})
                return
        forward(data)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def _present_token() -> None:
    """Use token authentication towards a cluster whenever a token is at hand.

    Ray 2.60 does this by itself only for the local cluster `ray.init()`
    starts; for a cluster it joins, it sends the token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) only in RAY_AUTH_MODE=token.
    An explicit RAY_AUTH_MODE is respected.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray release: RAY_AUTH_MODE=token must be set by hand
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=True)


def check_fits(config: SweepConfig, count: int) -> None:
    """Workers the cluster cannot hold would wait for resources forever: say so before starting them.

    `ray.init()` without an address (called here) makes or joins a cluster on
    this machine, which does not grow: asking for more than it has is an error
    naming `workers.count`. A cluster given by address, or one the caller
    connected to before, may grow (an autoscaler): there it is a warning and
    the sweep waits.
    """
    w = config.workers
    have = ray.cluster_resources()
    short = [f"{need:g} {name}s (workers.count {count} × workers.{name.lower()}s {each:g}), the cluster has "
             f"{have.get(name, 0):g}" for name, each in (("CPU", w.cpus), ("GPU", w.gpus))
             for need in [count * each] if each > 0 and need > have.get(name, 0) + 1e-9]
    if not short:
        return
    message = f"the workers need {'; '.join(short)}"
    if _may_grow:
        log.warning("sweep: %s; waiting for the cluster to grow", message)
        return
    raise SweepError(f"{message}: lower workers.count (or set it to auto)")


#: Whether the cluster may grow: joined by address, or connected before `connect` was called.
_may_grow = True


def worker_count(config: SweepConfig) -> int:
    w = config.workers
    if w.count != "auto":
        return int(w.count)
    resources = ray.cluster_resources()
    if w.gpus > 0:
        return max(1, int(resources.get("GPU", 0) // w.gpus))
    return max(1, int(resources.get("CPU", 1) // w.cpus))


def write_run_record(run_dir: Path, *, replace: bool = False, **fields: Any) -> None:
    """`run.json` beside the results: where they are, the config digest, the findings and what the sinks
    note there (the MLflow run). `replace`: a new run's record, nothing kept from an earlier one."""
    path = run_dir / "run.json"
    record = json.loads(path.read_text()) if path.exists() and not replace else {}
    record.update(fields)
    temporary = path.with_name(".run.json.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)


def run(
    config: SweepConfig,
    out: Path,
    *,
    address: Optional[str] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> RunResult:
    """Run a sweep to completion; rows land in `<out>/runs/<name>/results/` (or `sinks.parquet.path`).

    `on_batch(done, total)` is called after each batch of rows reaches the sinks.
    """
    run_dir = run_dir_for(config, out)
    results = results_location(config, run_dir)
    # Claimed before anything is written, held to the end: a second sweep here is refused, naming this one.
    with claim(run_dir, results):
        if config.sinks.parquet.enabled and has_results(results) and not overwrite:
            raise SweepError(f"{results} already holds results; pass --overwrite to replace them, "
                             f"`sweep resume {run_dir}` to finish them, or change `name`")
        # Planned before the results are touched and before Ray starts: a study the config cannot make, or
        # whose weights files do not fit the module, fails here, naming the field and the file.
        study = plan_checked(config, run_dir).study
        if config.sinks.parquet.enabled and has_results(results):
            clear(results, keep=CLAIM_NAMES)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
        write_run_record(run_dir, replace=True, name=config.name, results=results, config_digest=config.digest())
        return _sweep(config, run_dir, results, address=address, progress=progress, on_batch=on_batch,
                      study=study)


def resume(run_dir: Path, overrides: Sequence[str] = (), *, address: Optional[str] = None,
           progress: Optional[bool] = None, on_batch: Optional[Callable[[int, int], None]] = None,
           config: Optional[SweepConfig] = None) -> RunResult:
    """Finish a sweep from the rows its results already hold: each missing candidate once, none twice.

    The saved config is the one that runs; `overrides` (or a `config` given)
    may change only `workers.*` (where and how fast, not what): any other
    difference is refused, naming it.
    """
    run_dir = Path(run_dir).resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise SweepError(f"{run_dir}: not a run folder (no config.yaml); give runs/<name> of an earlier `sweep run`")
    saved = load_config(saved_path)
    wanted = config if config is not None else load_config(saved_path, overrides)
    differences = config_differences(saved, wanted)
    if differences:
        raise SweepError(f"resume refused: the config differs from the saved one in {'; '.join(differences[:5])}"
                         f"{' …' if len(differences) > 5 else ''} (only workers.* may change)")
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    results = record.get("results") or results_location(saved, run_dir)
    if not wanted.sinks.parquet.enabled:
        raise SweepError("resume needs the Parquet results (sinks.parquet.enabled is false)")
    with claim(run_dir, results):  # a run (or resume) still going here is refused, naming it
        # The MLflow run keeps the params it was started with: the workers of this resume go in its tags.
        return _sweep(wanted, run_dir, results, address=address, progress=progress, on_batch=on_batch,
                      resumed=True, params=flatten(saved.to_dict()))


def config_differences(saved: SweepConfig, wanted: SweepConfig) -> List[str]:
    a, b = flatten(saved.to_dict()), flatten(wanted.to_dict())
    return [f"{key}: saved {a.get(key)!r}, now {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if not key.startswith("workers.") and a.get(key) != b.get(key)]


def _done_ids(results: str, tally: Tally, study: Any) -> frozenset:
    """The candidate ids already in the results (their rows counted into `tally` and shown to the study)."""
    if not has_results(results):
        return frozenset()
    done = set()
    for batch in dataset(results).to_batches():
        table = pa.Table.from_batches([batch])
        tally.update(table)
        study.observe(table)
        done.update(table.column("candidate_id").to_pylist())
    return frozenset(done)


def _sweep(config: SweepConfig, run_dir: Path, results: str, *, address: Optional[str], progress: Optional[bool],
           on_batch: Optional[Callable[[int, int], None]], study: Any = None, resumed: bool = False,
           params: Optional[Dict[str, Any]] = None) -> RunResult:
    if study is None:  # a resume: planned as a run plans it (its anchors' keys matched to the module's)
        study = plan_checked(config, run_dir).study
    if resumed and not study.resumable:
        raise SweepError(f"a {config.study.kind} study cannot be resumed ({study.not_resumable}); "
                         f"run it again with --overwrite")
    weights = model_weights(config.model.weights) if config.model.weights else None
    try:
        return _evaluate(config, run_dir, results, study, weights, address=address, progress=progress,
                         on_batch=on_batch, resumed=resumed, params=params)
    except ResultsWriteError as e:
        raise SweepError(write_failure(e, run_dir, None if study.resumable else study.not_resumable)) from None


def model_weights(path: str) -> ModelWeights:
    """`model.weights` as the workers get it: its path and how the driver sees it (nothing read yet)."""
    try:
        stamp = checkpoint_stamp(path)
    except WeightsError as e:
        raise SweepError(f"model.weights: {e}") from None
    return ModelWeights(path, stamp)


def ship_model_weights(weights: Optional[ModelWeights]) -> Optional[ModelWeights]:
    """`weights` with its contents in the object store when a worker may run on another node than the driver's
    (the cluster has several, or may grow): such a worker that does not see the same files takes them from there.
    On one node the workers read the path themselves, and the driver reads nothing."""
    if weights is None or weights.stamp is None or weights.ref is not None:
        return weights
    nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    if len(nodes) <= 1 and not _may_grow:
        return weights
    try:
        data = checkpoint_bytes(weights.path)
    except WeightsError as e:
        raise SweepError(f"model.weights: {e}") from None
    return dataclasses.replace(weights, ref=ray.put(data))


def write_failure(error: ResultsWriteError, run_dir: Path, not_resumable: Optional[str] = None) -> str:
    """What a failed results write means to the user: the rows that are safe, and how to finish
    (`not_resumable`: why the study cannot be resumed, None when it can)."""
    try:
        safe = f"{dataset(error.location).count_rows():,} rows are" if has_results(error.location) else "no row is"
    except (OSError, ValueError) as e:
        safe = f"the rows in its complete part-*.parquet files are (they could not be counted: {last_line(e)})"
    fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
           errno.EACCES: "make it writable", errno.EPERM: "make it writable",
           errno.EROFS: "make it writable"}.get(error.errno, "fix that")
    finish = (f"`sweep resume {run_dir}` finishes the rest" if not_resumable is None
              else f"run it again with --overwrite (the study cannot be resumed: {not_resumable})")
    return f"{error}. {safe} safe in {error.location}; {fix}, then {finish}."


def _evaluate(config: SweepConfig, run_dir: Path, results: str, study: Any, weights: Optional[ModelWeights], *,
              address: Optional[str], progress: Optional[bool], on_batch: Optional[Callable[[int, int], None]],
              resumed: bool, params: Optional[Dict[str, Any]]) -> RunResult:
    """Start the workers, stream the study's rows through them to the sinks, and sum up."""
    prepare_sinks(config)  # what a sink can make ready while Ray and the workers start (MLflow's store)
    with waiting("starting Ray" if address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
                 else "joining Ray", progress):
        connect(address)
    count = worker_count(config)
    if study.population is not None:
        count = min(count, study.population.size)  # one shard of members per worker, none empty
    check_fits(config, count)
    make_actor = worker_factory(config, ship_model_weights(weights), study.anchors(), study.population)
    executor = (Pool(make_actor, count, config.workers.max_in_flight) if study.population is None
                else Members(make_actor, study.population, count))
    sinks: List[Any] = []
    tally: Optional[Tally] = None
    findings: Dict[str, float] = {}
    completed = False
    try:
        with waiting(_starting(count, config), progress):
            metric_names = describe_workers(executor.actors)
        schema = results_schema(study.fields(), metric_names)
        objective = check_metrics(config, metric_names, schema)
        study.bind(objective, config.metrics.mode, metric_names)
        tally = Tally(objective, config.metrics.mode, label=next(iter(study.columns), None))
        done = _done_ids(results, tally, study) if resumed else frozenset()
        sinks = open_sinks(sink_context(config, run_dir, results, schema, metric_names, len(study), count, params))
        batch_size = study.default_batch_size if config.workers.batch_size == "auto" else config.workers.batch_size
        with Progress(len(study), enabled=progress, done=len(done)) as reporter:
            batches = study.batches(batch_size, skip=done)
            for _, table in executor.map_unordered(batches, failed_rows):
                land(table, sinks, tally, study, reporter, on_batch)
        findings = study.summarise()
        save_members(study.saved_members(), getattr(executor, "member_file", None), run_dir)
        completed = True
    finally:
        summary = tally.summary() if tally is not None else {}
        summary.update(findings)
        summary["completed"] = completed
        summary["workers"] = count
        summary["worker_replacements"] = executor.replacements
        summary["batch_retries"] = executor.retries
        summary["candidates_shipped"] = getattr(executor, "shipped", 0)
        failure = close_sinks(sinks, summary)
        for actor in executor.actors:
            ray.kill(actor)
    if failure is not None:  # the last rows did not reach the results
        raise failure
    return finish(config, run_dir, results, summary, tally, sinks, findings)


def land(table: pa.Table, sinks: List[Any], tally: Tally, study: Any, reporter: "Progress",
         on_batch: Optional[Callable[[int, int], None]]) -> None:
    """Rows that came back: settled by the study, then to every sink, the tally, the study and the progress
    line."""
    table = study.settle(table)
    for sink in sinks:
        sink.write(table)
    tally.update(table)
    study.observe(table)
    reporter.advance(table.num_rows)
    if on_batch is not None:
        on_batch(tally.done, len(study))


def save_members(saved: Dict[str, int], member_file: Optional[Callable[[int, Dict[str, str]], bytes]],
                 run_dir: Path) -> None:
    """Write each member a study saves (file name → member) into the run folder, with its member id: the
    safetensors file its worker makes (`member_file(member, metadata)`), so the driver needs no torch."""
    if saved and member_file is None:
        raise SweepError(f"the study saves members ({', '.join(saved)}) but keeps no population on its workers")
    for name, member in saved.items():
        write_atomically(run_dir / name, member_file(member, {"member": str(member)}))


def finish(config: SweepConfig, run_dir: Path, results: str, summary: Dict[str, Any], tally: Tally,
           sinks: List[Any], findings: Dict[str, float]) -> RunResult:
    """The run's result once the sinks are closed; the findings recorded in run.json.

    What each sink adds (its `outcome()`) fills the fields of `RunResult` it
    names (an MLflow run id); the rest goes into the summary. Its `warnings`
    become the result's.
    """
    if findings:
        write_run_record(run_dir, findings=findings)
    warnings: List[str] = []
    outcome: Dict[str, Any] = {}
    for sink in sinks:
        warnings.extend(sink.warnings)
        outcome.update(sink.outcome())
    fields = {f.name for f in dataclasses.fields(RunResult)} - SET_BY_THE_DRIVER
    own = {k: outcome.pop(k) for k in list(outcome) if k in fields}
    summary.update(outcome)
    return RunResult(name=config.name, run_dir=run_dir, results_dir=results, summary=summary,
                     problems=tally.problems, warnings=warnings, findings=findings, **own)


#: The fields of `RunResult` no sink's outcome may set.
SET_BY_THE_DRIVER = frozenset({"name", "run_dir", "results_dir", "summary", "problems", "warnings", "findings"})


def sink_context(config: SweepConfig, run_dir: Path, results: str, schema: pa.Schema, metric_names: List[str],
                 total: int, workers: int, params: Optional[Dict[str, Any]] = None) -> SinkContext:
    """What the sinks open with; `params`: the MLflow run's params (default: the flattened config)."""
    path = run_dir / "run.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    stamp = {"sweep.name": config.name, "sweep.config_digest": config.digest(),
             **{f"sweep.version.{k}": v for k, v in versions().items()}}
    return SinkContext(
        config=config, schema=schema, metric_names=list(metric_names),
        results=results if config.sinks.parquet.enabled else None, run_dir=run_dir, total=total,
        workers=workers, stamp=stamp, record=record,
        update_record=lambda **fields: write_run_record(run_dir, **fields),
        params=params if params is not None else flatten(config.to_dict()))


def worker_factory(config: SweepConfig, weights: Optional[ModelWeights], anchors: Dict[str, Any],
                   population: Optional[Any] = None) -> Callable[..., Any]:
    """Makes worker actors; `model.weights` (by path, its contents already in the object store where a worker
    may need them), each recipe's anchors and the study's population plan (if any) enter the object store once
    for all of them. `make(members)` starts a worker holding those members of the plan."""
    options = {"num_cpus": config.workers.cpus, "num_gpus": config.workers.gpus}
    anchor_refs = {key: ray.put(value) for key, value in anchors.items()}
    plan_ref = ray.put(population) if population is not None else None
    spec = config.to_dict()
    serial = iter(range(1 << 62))
    stamp = uuid.uuid4().hex[:8]

    def make(members: Sequence[int] = ()) -> Any:
        # Named, so operators (and `ray list actors`) can tell a sweep's workers apart.
        name = f"sweep:{config.name}:{stamp}:worker-{next(serial)}"
        return RemoteSweepWorker.options(name=name, **options).remote(spec, weights, anchor_refs, plan_ref,
                                                                      list(members))

    return make


def check_metrics(config: SweepConfig, metric_names: List[str], schema: pa.Schema) -> Optional[str]:
    """The objective, once the workers have said which metrics there are.

    Each enabled sink checks now the names it records (the metrics, and the
    columns it logs beside them), rather than discovering a bad one mid-sweep.
    """
    check_columns(config, schema, metric_names)
    objective = config.metrics.objective or (metric_names[0] if metric_names else None)
    if objective is not None and objective not in metric_names:
        raise SweepError(f"metrics.objective is {objective!r}, but the metrics function returns {metric_names}")
    return objective


def describe_workers(actors: List[Any]) -> List[str]:
    """Wait for every worker to be ready; the metric names they report."""
    try:
        infos = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayActorError as e:
        raise SweepError(f"a worker could not start: {last_line(e)}") from e  # the traceback under SWEEP_DEBUG=1
    errors = [i["error"] for i in infos if i["error"]]
    if errors:
        raise SweepError(errors[0])
    return infos[0]["metric_names"]


def versions() -> Dict[str, str]:
    import pyarrow

    # torch's installed version (its `__version__`), read without importing it
    return {"sweep": sweep.__version__, "torch": importlib.metadata.version("torch"), "ray": ray.__version__,
            "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]}


def _starting(count: int, config: SweepConfig) -> str:
    what = "each imports torch, builds the model, loads the data and runs it once"
    if config.evaluation.compile:
        what += ", then compiles it"
    return f"starting {count} worker{'s' if count != 1 else ''} ({what})"


class waiting:
    """What a slow start is waiting for: on a terminal a spinner with `what` and the seconds so far;
    otherwise a line every LOG_INTERVAL seconds while it lasts (nothing when it ends sooner)."""

    def __init__(self, what: str, enabled: Optional[bool] = None):
        self.what = what
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self._done = threading.Event()
        self._status: Any = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "waiting":
        self.started = time.monotonic()
        if self.tty:
            from rich.console import Console

            self._status = Console(stderr=True).status(f"sweep: {self.what}…")
            self._status.__enter__()
        else:
            self._thread = threading.Thread(target=self._lines, name="sweep-waiting", daemon=True)
            self._thread.start()
        return self

    def _lines(self) -> None:
        while not self._done.wait(LOG_INTERVAL):
            print(f"sweep: {self.what}: {time.monotonic() - self.started:,.0f} s so far", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._status is not None:
            self._status.__exit__(*exc)


class Progress:
    """A rich progress bar on a terminal, a log line every few seconds otherwise."""

    def __init__(self, total: int, enabled: Optional[bool] = None, done: int = 0):
        self.total = total
        self.done = done
        self.start_done = done
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.last_line = self.started
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeRemainingColumn)

            self._bar = Bar(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("sweep", total=self.total, completed=self.done, rate="")
        return self

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:,.1f} cand/s")
        elif now - self.last_line >= LOG_INTERVAL:
            self.last_line = now
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            print(f"sweep: {self.done}/{self.total} candidates, {rate:,.1f}/s, ETA {eta:,.0f} s",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
