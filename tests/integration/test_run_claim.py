"""One sweep per run folder, and how a sweep ends when it cannot go on, on a real local Ray:

- two `sweep run` of one name into one --out, started together: one is refused naming the other, and
  the table holds each candidate once; a `sweep resume` of the live run is refused too;
- a worker that cannot start: one line on stderr (its traceback only with SWEEP_DEBUG=1);
- a results write that fails (a full disk): the message says how many rows are safe and how to finish,
  and `sweep resume` then finishes each candidate exactly once, with the same digest and MLflow params.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

import sweep.sinks.parquet as parquet
from sweep.config import parse_config
from sweep.errors import SweepError
from tests.conftest import BIN, sweep_cli
from workers.driver import resume, run

pytestmark = pytest.mark.integration

USER_CODE = '''
import os, time
from sweep.examples import digits

GATE = {gate!r}

def gated(output, y):
    """The digits metrics, once the test has created the file GATE (bounded: 5 minutes)."""
    deadline = time.monotonic() + 300
    while not os.path.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.05)
    return digits.metrics(output, y)

def broken_factory():
    raise RuntimeError("this model needs a GPU")
'''


def perturb_raw(repo, name, count, **changes):
    raw = yaml.safe_load((repo / "configs/perturb.yaml").read_text())
    raw["name"] = name
    raw["study"]["base"] = str(repo / "sweep/examples/checkpoints/seed0-epoch30.safetensors")
    raw["study"]["count"] = count
    raw["study"]["base_row"] = False  # exactly `count` rows
    raw["workers"] = {"count": 1, "batch_size": 250}
    raw["sinks"] = {"mlflow": {"enabled": False}}
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def user_code(tmp_path):
    """A module of user code in `tmp_path`, the CLI's working folder (Ray puts the driver's working folder on
    its workers' path; PYTHONPATH puts it on the CLI's), and the environment for the CLI."""
    (tmp_path / "sweeptest_user.py").write_text(USER_CODE.format(gate=str(tmp_path / "gate")))
    return {"PYTHONPATH": str(tmp_path)}


def wait_for(condition, what, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_two_runs_of_one_name_started_together_write_each_candidate_once(repo, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **user_code(tmp_path)}
    config = tmp_path / "perturb.yaml"
    config.write_text(yaml.safe_dump(perturb_raw(repo, "twice", 2000,
                                                 **{"metrics.function": "sweeptest_user:gated"})))
    out = tmp_path / "out"
    run_dir = out / "runs" / "twice"
    command = [str(BIN / "sweep"), "run", str(config), "--out", str(out), "--no-progress", "--no-report"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        # The winner waits at the gate with its claim held; the other one is refused meanwhile.
        wait_for(lambda: any(p.poll() is not None for p in procs), "one of the two runs to end")
        refused = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not refused)
        stdout, stderr = refused.communicate()
        assert refused.returncode == 1, stderr
        line = [ln for ln in stderr.splitlines() if ln.startswith("sweep:")]
        assert len(line) == 1, stderr
        assert line[0].startswith(f"sweep: {run_dir} is in use by another sweep: pid {winner.pid} on host "), stderr
        assert f"sweep run {config} --out {out} --no-progress --no-report`)" in line[0]
        assert "wait for it to finish, or stop it" in line[0]

        # A resume of the live run is refused the same way.
        wait_for(lambda: (run_dir / "run.json").is_file(), "the winner to write run.json")
        resumed = sweep_cli("resume", str(run_dir), "--no-progress", cwd=tmp_path, env=env)
        assert resumed.returncode == 1
        assert f"sweep: {run_dir} is in use by another sweep: pid {winner.pid} on host " in resumed.stderr

        (tmp_path / "gate").write_text("")
        stdout, stderr = winner.communicate(timeout=300)
        assert winner.returncode == 0, stderr[-3000:]
    finally:
        (tmp_path / "gate").write_text("")
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    ids = ds.dataset(str(run_dir / "results"), format="parquet").to_table(columns=["candidate_id"])
    assert sorted(ids.column("candidate_id").to_pylist()) == list(range(2000)), "each id exactly once"
    assert not (run_dir / ".sweep-claim").exists(), "the claim is given up at the end"


@pytest.mark.parametrize("debug", [False, True])
def test_a_worker_that_cannot_start_is_one_line_its_traceback_only_in_debug(repo, tmp_path, debug):
    env = user_code(tmp_path)
    if debug:
        env["SWEEP_DEBUG"] = "1"
    config = tmp_path / "perturb.yaml"
    config.write_text(yaml.safe_dump(perturb_raw(repo, "nostart", 100,
                                                 **{"model.factory": "sweeptest_user:broken_factory"})))
    proc = sweep_cli("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path, env=env,
                     timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = "sweep: a worker could not start: RuntimeError: this model needs a GPU"
    assert proc.stderr.count(line) == 1, proc.stderr
    if debug:
        assert "Traceback (most recent call last)" in proc.stderr and 'in broken_factory' in proc.stderr
    else:
        assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr
        assert "creation task" not in proc.stderr and "pid=" not in proc.stderr, proc.stderr


def test_a_full_disk_says_what_is_safe_and_resume_finishes_each_candidate_once(repo, tmp_path, ray_cluster,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts of a SQLite store go to ./mlruns
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = perturb_raw(repo, "full", 3000, **{"workers.count": 2, "sinks.parquet.rows_per_file": 500,
                                             "sinks.parquet.flush_seconds": 3600.0,
                                             "sinks.mlflow": {"enabled": True, "tracking_uri": tracking}})
    config = parse_config(raw, base_dir=repo / "configs")
    real_write = pq.write_table
    calls = []

    def write_table(table, where, **kwargs):
        """Two files are written; the third meets a full disk (/dev/full: a real ENOSPC) after a partial write."""
        calls.append(where)
        if len(calls) <= 2:
            return real_write(table, where, **kwargs)
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        if os.path.exists("/dev/full"):
            return real_write(table, "/dev/full", **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(parquet.pq, "write_table", write_table)
    run_dir = tmp_path / "runs" / "full"
    results = run_dir / "results"
    with pytest.raises(SweepError) as failed:
        run(config, tmp_path, progress=False)
    assert str(failed.value) == (f"cannot write results to {results}: No space left on device. 1,000 rows are safe "
                                 f"in {results}; free space, then `sweep resume {run_dir}` finishes the rest.")
    assert len(list(results.glob("part-*.parquet"))) == 2
    assert [p.name for p in results.iterdir() if not p.name.startswith("part-")] == [], \
        "no partial file left taking space"
    assert not (run_dir / ".sweep-claim").exists()

    monkeypatch.setattr(parquet.pq, "write_table", real_write)  # space freed
    result = resume(run_dir, ["workers.count=1"], progress=False)
    assert result.summary["completed"] and result.summary["candidates"] == 3000
    table = ds.dataset(str(results), format="parquet").to_table(columns=["candidate_id"])
    assert sorted(table.column("candidate_id").to_pylist()) == list(range(3000)), "each id exactly once"
    # Another worker count is not another sweep: the same digest in every file, the MLflow params as they were.
    digests = {pq.read_schema(p).metadata[b"sweep.config_digest"] for p in results.glob("part-*.parquet")}
    assert digests == {config.digest().encode()}
    assert json.loads((run_dir / "run.json").read_text())["config_digest"] == config.digest()
    assert not [w for w in result.warnings if "params" in w], result.warnings
    params = MlflowClient(tracking_uri=tracking).get_run(result.mlflow_run_id).data.params
    assert params["workers.count"] == "2"
