"""The claim a sweep holds on its run folder: a second sweep is refused naming the holder, and the claim
of a driver that died is taken over — on a local disk (flock) and on an object store (moto's S3 server)."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import sweep.claim
from sweep.claim import CLAIM_FILE, CLAIM_NAMES, CLAIMS_FOLDER, claim
from sweep.errors import SweepError
from sweep.sinks.parquet import clear, has_results

HOLDER = """
import sys
from pathlib import Path
from sweep.claim import claim
held = claim(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
sys.stdin.read()  # holds the claim until killed
"""


def start_holder(run_dir, results, tmp_path):
    """A process that claims `run_dir` and `results`, then waits to be killed; returns once it holds them."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(results), "sweep", "run", "x.yaml"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"the holder did not claim: {line!r} {proc.stderr.read()}")
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()


def test_a_second_claim_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "out" / "runs" / "perturb"
    holder = start_holder(run_dir, run_dir / "results", tmp_path)
    try:
        with pytest.raises(SweepError) as refused:
            claim(run_dir, str(run_dir / "results"))
        message = str(refused.value)
        assert f"{run_dir} is in use by another sweep: pid {holder.pid} on host {socket.gethostname()} since " in message
        assert "(`-c " in message and "sweep run x.yaml`)" in message  # the command it ran
        assert "wait for it to finish, or stop it" in message and "every candidate twice" in message
    finally:
        kill(holder)
    # The kernel let go of the dead holder's lock: the claim is taken, and given up without a trace.
    with claim(run_dir, str(run_dir / "results")):
        record = json.loads((run_dir / CLAIM_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert not (run_dir / CLAIM_FILE).exists()


def test_a_sweep_refused_before_the_holder_wrote_its_record_waits_for_it(tmp_path):
    """The holder locks first and writes who it is right after; a sweep refused in that moment names it."""
    import fcntl
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
    record = {"host": "h1", "pid": 4242, "since": "2026-01-01T00:00:00+00:00", "command": "sweep run a.yaml"}
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, json.dumps(record).encode(), 0))
    writer.start()
    try:
        with pytest.raises(SweepError) as refused:
            claim(folder, str(folder / "results"))
        assert "in use by another sweep: pid 4242 on host h1 since 2026-01-01" in str(refused.value)
        assert "(`sweep run a.yaml`)" in str(refused.value)
    finally:
        writer.join()
        os.close(fd)


def test_a_holder_that_never_writes_its_record_is_described_as_such(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(sweep.claim, "HOLDER_WAIT_S", 0.1)
    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(SweepError, match=r"another sweep \(it has not said who it is yet\)"):
            claim(folder, str(folder / "results"))
    finally:
        os.close(fd)


def test_one_process_cannot_claim_a_run_folder_twice(tmp_path):
    with claim(tmp_path / "run", str(tmp_path / "run" / "results")):
        with pytest.raises(SweepError, match=f"pid {os.getpid()} on host"):
            claim(tmp_path / "run", str(tmp_path / "run" / "results"))
    claim(tmp_path / "run", str(tmp_path / "run" / "results")).release()


def test_a_results_folder_outside_the_run_folder_is_claimed_too(tmp_path):
    results = tmp_path / "shared-results"
    with claim(tmp_path / "a" / "runs" / "x", str(results)):
        assert (results / CLAIM_FILE).is_file()
        with pytest.raises(SweepError, match=f"{results} is in use by another sweep: pid {os.getpid()}"):
            claim(tmp_path / "b" / "runs" / "x", str(results))
        assert not (tmp_path / "b").exists(), "a refused claim leaves no folder behind"


def test_clearing_the_results_keeps_the_claim(tmp_path):
    results = tmp_path / "results"
    with claim(tmp_path / "run", str(results)):
        pq.write_table(pa.table({"candidate_id": [1]}), results / "part-000000-a.parquet")
        (results / ".part-000001-b.parquet.tmp").write_bytes(b"partial")
        clear(str(results), keep=CLAIM_NAMES)
        assert not has_results(str(results))
        assert sorted(p.name for p in results.iterdir()) == [CLAIM_FILE]
        with pytest.raises(SweepError, match="in use by another sweep"):
            claim(tmp_path / "other", str(results))


def test_a_released_claim_removes_the_folders_it_made_when_they_stayed_empty(tmp_path):
    claim(tmp_path / "out" / "runs" / "a", str(tmp_path / "out" / "runs" / "a" / "results")).release()
    assert not (tmp_path / "out").exists()
    with claim(tmp_path / "out" / "runs" / "b", str(tmp_path / "out" / "runs" / "b" / "results")):
        (tmp_path / "out" / "runs" / "b" / "config.yaml").write_text("name: b\n")
    assert sorted(p.name for p in (tmp_path / "out" / "runs" / "b").iterdir()) == ["config.yaml"]


def test_an_unwritable_run_folder_is_a_sweep_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SweepError, match=f"cannot claim {tmp_path / 'file' / 'run'} for this sweep"):
        claim(tmp_path / "file" / "run", str(tmp_path / "file" / "run" / "results"))


# --------------------------------------------------------------------------- object store (moto's S3 server)


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("claims")
    yield fs, f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def markers(fs, prefix):
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/{CLAIMS_FOLDER}",
                                                                      allow_not_found=True)))


def put_marker(fs, prefix, record):
    with fs.open_output_stream(f"{prefix}/{CLAIMS_FOLDER}/other.json") as f:
        f.write(json.dumps(record).encode())


def test_results_on_an_object_store_hold_a_marker_and_a_second_sweep_is_refused(tmp_path, s3):
    fs, query = s3
    uri = f"s3://claims/live/results?{query}"
    with claim(tmp_path / "a", uri):
        [marker] = markers(fs, "claims/live/results")
        with fs.open_input_stream(marker) as f:
            record = json.loads(f.read())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["since"]
        with pytest.raises(SweepError) as refused:
            claim(tmp_path / "b", uri)
        assert f"s3://claims/live/results is in use by another sweep: pid {os.getpid()}" in str(refused.value)
        assert not (tmp_path / "b").exists()
        assert markers(fs, "claims/live/results") == [marker], "a refused sweep leaves no marker"
        with fs.open_output_stream("claims/live/results/part-000000-a.parquet") as f:
            pq.write_table(pa.table({"candidate_id": [1]}), f)
        clear(uri, keep=CLAIM_NAMES)  # --overwrite
        assert not has_results(uri) and markers(fs, "claims/live/results") == [marker]
    assert markers(fs, "claims/live/results") == []


def test_a_marker_of_a_dead_driver_on_this_host_is_taken_over_with_a_warning(tmp_path, s3, caplog):
    fs, query = s3
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    put_marker(fs, "claims/stale/results", {"host": socket.gethostname(), "pid": pid,
                                            "since": "2026-01-01T00:00:00+00:00", "command": "sweep run old.yaml"})
    with caplog.at_level(logging.WARNING, logger="sweep"):
        with claim(tmp_path / "run", f"s3://claims/stale/results?{query}"):
            assert len(markers(fs, "claims/stale/results")) == 1
    assert f"pid {pid} on host {socket.gethostname()} since 2026-01-01T00:00:00+00:00 (`sweep run old.yaml`) " \
           f"ended without giving up its claim" in caplog.text
    assert markers(fs, "claims/stale/results") == []


def test_a_marker_of_another_host_is_refused_saying_how_to_remove_it(tmp_path, s3):
    fs, query = s3
    put_marker(fs, "claims/remote/results", {"host": "node-7", "pid": 4242, "since": "2026-01-01T00:00:00+00:00",
                                             "command": "sweep run big.yaml"})
    with pytest.raises(SweepError) as refused:
        claim(tmp_path / "run", f"s3://claims/remote/results?{query}")
    message = str(refused.value)
    assert "pid 4242 on host node-7 since 2026-01-01T00:00:00+00:00 (`sweep run big.yaml`)" in message
    assert f"if you know it is no longer running, delete the object claims/remote/results/{CLAIMS_FOLDER}/other.json" \
           in message
    fs.delete_file(f"claims/remote/results/{CLAIMS_FOLDER}/other.json")
    claim(tmp_path / "run", f"s3://claims/remote/results?{query}").release()


class RivalAtTheSameMoment:
    """The S3 file system, where another sweep writes its marker just before this one writes its own."""

    def __init__(self, fs):
        self.fs = fs

    def open_output_stream(self, path, *args, **kwargs):
        put_marker(self.fs, path.split(f"/{CLAIMS_FOLDER}/")[0], {"host": "node-9", "pid": 7, "since": "now"})
        return self.fs.open_output_stream(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_of_two_sweeps_claiming_at_the_same_moment_neither_goes_on_unseen(tmp_path, s3, monkeypatch):
    fs, query = s3
    monkeypatch.setattr(sweep.claim, "resolve", lambda location: (RivalAtTheSameMoment(fs), "claims/race/results"))
    with pytest.raises(SweepError, match="pid 7 on host node-9 since now, which claimed it at the same moment"):
        claim(tmp_path / "run", f"s3://claims/race/results?{query}")
    assert markers(fs, "claims/race/results") == [f"claims/race/results/{CLAIMS_FOLDER}/other.json"], \
        "this sweep took its own marker back"
