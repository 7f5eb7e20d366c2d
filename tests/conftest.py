"""Shared fixtures: paths of the repository, one real local Ray per session, a real MLflow server."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The chunk-size cache stays out of the user's home during tests (Ray workers inherit this).
os.environ["SWEEP_CACHE_DIR"] = "off"
#: The caches of the `sweep` commands the tests run (`sweep_cli`), as a user's would be kept between commands:
#: chunk sizes measured once, checks before a run kept while the code is unchanged. Removed at the end.
CLI_CACHE = Path(tempfile.mkdtemp(prefix="sweep-tests-cli-cache-"))

# Hypothesis keeps its example database in memory and its other files (the constants it collects from
# the source) in a temporary folder removed at the end: nothing of a test run lands in the checkout.
settings.register_profile("sweep", database=None)
settings.load_profile("sweep")
HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="sweep-tests-hypothesis-"))
set_hypothesis_home_dir(HYPOTHESIS_HOME)

#: What the tests may leave in the checkout: the environment they run in and Python's byte code.
CHECKOUT_OWN = frozenset({".git", ".venv", "__pycache__", ".pytest_cache", "sweep.egg-info"})


def checkout_files(root: Path = REPO) -> Dict[str, Tuple[int, int]]:
    """Every file under the checkout (outside `CHECKOUT_OWN`) with its size and modification time."""
    found: Dict[str, Tuple[int, int]] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in CHECKOUT_OWN]
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def pytest_sessionstart(session):
    session.config.stash[_CHECKOUT] = checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under their temporary folders: a file the run added to the checkout or changed
    there (an MLflow store, `mlruns/` artifacts, a results folder) fails the run, naming the files."""
    shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)
    shutil.rmtree(CLI_CACHE, ignore_errors=True)
    before = session.config.stash.get(_CHECKOUT, None)
    if before is None:
        return
    after = checkout_files()
    touched = sorted(p for p, stat in after.items() if before.get(p) != stat)
    if touched:
        shown = ", ".join(touched[:10]) + (f" and {len(touched) - 10} more" if len(touched) > 10 else "")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        files = "1 file" if len(touched) == 1 else f"{len(touched)} files"
        message = f"the tests wrote {files} into the checkout {REPO}: {shown}"
        if reporter is not None:
            reporter.write_sep("=", "files written outside the tests' temporary folders", red=True)
            reporter.write_line(message)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_CHECKOUT = pytest.StashKey[Dict[str, Tuple[int, int]]]()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a SQLite store and its own artifact root."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc = None

    def start(self, timeout: float = 90.0) -> None:
        mlflow = shutil.which("mlflow", path=str(BIN)) or "mlflow"
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=self.root,
            # The server's job runner (a dozen huey consumer processes) serves nothing sweep logs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def edited_quickstart(repo: Path, changes: dict, sep: str = ".") -> dict:
    """configs/quickstart.yaml as a dict, its globs made absolute, with `changes` (dotted keys) applied."""
    import yaml

    raw = yaml.safe_load((repo / "configs/quickstart.yaml").read_text())
    raw["study"]["paths"] = [str(repo / "sweep/examples/checkpoints/*.safetensors")]
    return with_changes(raw, changes, sep)


def with_changes(raw: dict, changes: dict, sep: str = ".") -> dict:
    """`raw` with each `a.b.c` (or `a__b__c`) key of `changes` set, creating sections as needed."""
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def repo_config(repo: Path, file: str, drop: tuple = (), **changes):
    """configs/<file>, parsed, with `drop` (keys of its study section) left out and `changes` (dotted keys) set."""
    import yaml

    from sweep.config import parse_config

    raw = yaml.safe_load((repo / "configs" / file).read_text())
    for key in drop:
        del raw["study"][key]
    return parse_config(with_changes(raw, changes), base_dir=repo / "configs")


def digits_reference(module, params, data) -> dict:
    """The digits metrics of one candidate by a plain functional_call loop, weighted by batch size."""
    import torch
    from torch.func import functional_call

    from sweep.examples import digits

    total, n = {"loss": 0.0, "accuracy": 0.0}, 0
    with torch.no_grad():
        for x, y in data:
            m = digits.metrics(functional_call(module, params, (x,)), y)
            for k in total:
                total[k] += float(m[k]) * len(y)
            n += len(y)
    return {k: v / n for k, v in total.items()}


def sweep_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run the installed `sweep` command as a user would."""
    full_env = {**os.environ, "SWEEP_CACHE_DIR": str(CLI_CACHE), **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "sweep"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


class Warnings(logging.Handler):
    """The sink's warnings as they are logged, for waiting on one without sleeping."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.messages.append(record.getMessage())
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first warning containing `text`, once it has been logged (at most `timeout` seconds from now)."""
        with self._changed:
            self._changed.wait_for(lambda: any(text in m for m in self.messages), timeout)
            found = [m for m in self.messages if text in m]
        assert found, f"no warning with {text!r}; got {self.messages}"
        return found[0]


@pytest.fixture
def sink_warnings():
    handler = Warnings()
    logger = logging.getLogger("sweep.sinks.mlflow")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
