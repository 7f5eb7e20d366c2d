"""A failing batch is split down to its bad candidate on a real Ray: the good candidates come back `ok`.
And a SIGKILLed `sweep run` takes the local Ray it started with it.

The batches here carry `Scales`, a source of candidates for the Fragile model
(tests.integration.helpers) made on the worker; one scale is a trap that makes
the worker raise (as a crafted file once made the safetensors parser raise)
or kills the worker process outright.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List

import pyarrow as pa
import pytest
import ray
import torch
from safetensors.torch import save_file

from sweep.config import parse_config
from sweep.results import failed_rows
from sweep.studies.base import CandidateBatch
from tests.conftest import BIN
from tests.integration.helpers import fragile_data
from workers.driver import describe_workers, worker_factory
from workers.pool import MAX_ATTEMPTS, Pool

pytestmark = pytest.mark.integration

#: A scale whose candidate makes `candidates()` raise on the worker.
RAISES = -7.0
#: A scale whose candidate ends the worker process.
EXITS = -9.0


@dataclass
class Scales:
    """Candidates w = 1, scale = s of the Fragile model, one per scale, made on the worker."""

    scales: List[float]

    def candidates(self) -> List[Dict[str, torch.Tensor]]:
        for s in self.scales:
            if s == RAISES:
                raise RecursionError("maximum recursion depth exceeded while decoding a JSON header")
            if s == EXITS:
                os._exit(1)
        return [{"w": torch.ones(4, 1), "scale": torch.full((1,), s)} for s in self.scales]


def expected_mse(scale: float) -> float:
    (x, y), = fragile_data()
    return float(((x @ torch.ones(4, 1) + scale - y) ** 2).mean())


def batch_of(ids: List[int], trap: Dict[int, float]) -> CandidateBatch:
    scales = [trap.get(i, i / 10) for i in ids]
    return CandidateBatch(list(ids), {"scale": list(scales)}, Scales(scales))


@pytest.fixture
def pool(tmp_path, ray_cluster):
    a = {"w": torch.ones(4, 1), "scale": torch.zeros(1)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(a, str(tmp_path / "b.safetensors"))
    raw = {
        "name": "pool-split",
        "model": {"factory": "tests.integration.helpers:fragile"},
        "data": {"loader": "tests.integration.helpers:fragile_data"},
        "metrics": {"function": "tests.integration.helpers:mse"},
        "study": {"kind": "interpolate", "endpoints": ["a.safetensors", "b.safetensors"], "alphas": [0.0],
                  "barrier": False},
        "sinks": {"mlflow": {"enabled": False}},
    }
    config = parse_config(raw, base_dir=tmp_path)
    pool = Pool(worker_factory(config, None, {}), 2, max_in_flight=2)
    describe_workers(pool.actors)
    yield pool
    for actor in pool.actors:
        ray.kill(actor)


def rows_of(pool: Pool, batches: List[CandidateBatch]) -> Dict[int, dict]:
    tables = [table for _, table in pool.map_unordered(batches, failed_rows)]
    rows = pa.concat_tables(tables, promote_options="default").to_pylist()
    ids = sorted(r["candidate_id"] for r in rows)
    assert ids == sorted(i for b in batches for i in b.ids), "every candidate exactly once"
    return {r["candidate_id"]: r for r in rows}


@pytest.mark.parametrize("trap, cause", [(RAISES, "the worker raised: RecursionError: maximum recursion depth"),
                                         (EXITS, "the worker died: ")], ids=["raises", "exits"])
def test_one_bad_candidate_fails_alone(pool, trap, cause):
    batches = [batch_of(range(0, 4), {}), batch_of(range(4, 10), {7: trap}), batch_of(range(10, 14), {})]
    rows = rows_of(pool, batches)
    bad = rows.pop(7)
    assert [i for i, r in rows.items() if r["status"] != "ok"] == [], "the good candidates came back"
    for i, r in rows.items():
        assert r["error"] is None and r["scale"] == i / 10
        assert r["mse"] == pytest.approx(expected_mse(i / 10), rel=1e-6)
    assert bad["status"] == "failed" and bad["scale"] == trap and bad["mse"] is None
    assert bad["error"].startswith(cause), bad["error"]
    assert bad["error"].endswith(f"({MAX_ATTEMPTS} attempts, each alone on a worker; "
                                 f"split out of a batch of 6 candidates)"), bad["error"]
    # Finding it took at most ceil(log2 6) splits, then its own attempts.
    assert 1 <= pool.splits <= math.ceil(math.log2(6))
    if trap == RAISES:
        assert pool.replacements == 0
        assert pool.retries == 2 * pool.splits + MAX_ATTEMPTS - 1
    else:
        # The first death may have hit it in company (not yet its doing); every later one was alone.
        assert pool.splits + MAX_ATTEMPTS <= pool.replacements <= 1 + pool.splits + MAX_ATTEMPTS


def test_one_raising_candidate_among_64_costs_log_n_runs(pool):
    rows = rows_of(pool, [batch_of(range(64), {37: RAISES})])
    assert [i for i, r in rows.items() if r["status"] != "ok"] == [37]
    assert "split out of a batch of 64 candidates" in rows[37]["error"]
    assert pool.splits == 6, "one split per halving, log2(64)"
    assert pool.retries == 2 * 6 + MAX_ATTEMPTS - 1, "not 64 × 3 runs"


def test_workers_dying_at_every_batch_still_stop_the_pool(pool):
    # Every candidate kills its worker: splitting finds no good half, and nothing comes back.
    pool.max_replacements = 2
    with pytest.raises(RuntimeError, match=r"workers died 2 times in a row with no batch coming back .*the worker died"):
        rows_of(pool, [batch_of(range(4), {i: EXITS for i in range(4)})])


#: Seconds a SIGKILLed driver's local Ray may take to go, every process of it.
#: Ray SIGKILLs its GCS and raylet with the driver (PR_SET_PDEATHSIG) and the workers follow in
#: a second or two; its dashboard and runtime-env agents alone would wait 60 s on the dead GCS.
RAY_GONE_SECONDS = 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Ray's fate-sharing is Linux's")
def test_sigkilled_driver_leaves_no_ray_processes(repo, tmp_path):
    psutil = pytest.importorskip("psutil")  # Ray ships it; importable once ray is imported
    mark = uuid.uuid4().hex
    # A Ray temp dir of its own (short: Unix socket paths stop at 107 bytes), so the run starts its
    # own local cluster and joins none the tests started.
    ray_tmp = tempfile.mkdtemp(prefix="sw", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": ray_tmp, "SWEEP_TEST_RUN": mark})
    log = tmp_path / "sweep.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "sweep"), "run", str(repo / "configs/perturb.yaml"), "--out", str(tmp_path / "out"),
             "--no-progress", "--set", "study.count=2000000", "--set", "workers.count=1",
             "--set", "sinks.mlflow.enabled=false"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def of_the_run() -> Dict[int, str]:
        """The live processes of the run: in the driver's session, or started with its environment."""
        found = {}
        for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                ours = os.getsid(p.pid) == proc.pid or p.environ().get("SWEEP_TEST_RUN") == mark
            except (OSError, psutil.Error):
                continue
            if ours:
                found[p.pid] = " ".join(p.info["cmdline"] or [p.info["name"] or "?"]).strip()[:80]
        return found

    try:
        deadline = time.monotonic() + 180
        while not any(name.startswith("ray::SweepWorker") for name in of_the_run().values()):
            assert proc.poll() is None, f"the sweep ended before its workers ran: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no worker started in 180 s: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        left = of_the_run()
        while left and time.monotonic() < killed + RAY_GONE_SECONDS:
            time.sleep(0.2)
            left = of_the_run()
        took = time.monotonic() - killed
        assert not left, (f"{len(left)} processes of the killed sweep still run {took:.0f} s after it: "
                          f"{sorted(left.values())}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in of_the_run():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
