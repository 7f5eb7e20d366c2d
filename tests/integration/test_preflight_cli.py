"""The checks before a run, through the `sweep` command a user types: a study whose files do not fit the module
stops before Ray starts; candidate files that will be invalid rows are warnings; rows with one error are
printed once."""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sweep.cli import MAX_ERROR_SHOWN
from sweep.examples.models import cnn
from sweep.model import write_weights_file
from tests.conftest import sweep_cli

pytestmark = pytest.mark.integration


def cnn_config(tmp_path: Path, study: dict, channels: int = 16) -> Path:
    """A user's CNN config with its weights files under tmp_path/runs/ (written from an 8-channel CNN)."""
    raw = {"name": "cnn", "model": {"factory": "sweep.examples.models:cnn", "kwargs": {"channels": channels}},
           "data": {"loader": "sweep.examples.models:image_batches", "kwargs": {"batch": 16, "size": 8}},
           "metrics": {"function": "sweep.examples.models:classification"},
           "study": study, "workers": {"count": 1},
           "sinks": {"mlflow": {"enabled": False}}}
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def eight_channel_files(tmp_path: Path, count: int) -> list:
    files = []
    for i in range(count):
        torch.manual_seed(i)
        files.append(str(write_weights_file(cnn(8).state_dict(), tmp_path / "runs" / f"e{i}.safetensors")))
    return files


def expected_misfit(field: str) -> str:
    return (f"sweep: config error: {field} runs/e0.safetensors does not fit the module built by "
            f"sweep.examples.models:cnn {{channels: 16}}: conv1.weight: module has shape (16×3×3×3) float32, "
            f"file has shape (8×3×3×3) float32; conv1.bias: module has shape (16,) float32, file has shape (8,) "
            f"float32; bn1.weight: module has shape (16,) float32, file has shape (8,) float32; and 10 more keys")


def test_a_wrong_architecture_is_a_config_error_in_validate_and_run_before_ray_starts(tmp_path):
    eight_channel_files(tmp_path, 2)
    config = cnn_config(tmp_path, {"kind": "interpolate", "endpoints": ["runs/e0.safetensors", "runs/e1.safetensors"],
                                   "alphas": {"start": 0.0, "stop": 1.0, "num": 11}})
    proc = sweep_cli("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [expected_misfit("study.endpoints[0]")] and proc.stdout == ""

    ray_tmp = tmp_path / "ray-tmp"  # where a Ray this process started would keep its session
    started = time.monotonic()
    proc = sweep_cli("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path,
                     env={"RAY_TMPDIR": str(ray_tmp)}, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [expected_misfit("study.endpoints[0]")]
    assert not ray_tmp.exists(), "Ray was started"
    assert "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a config that cannot run"
    assert took < 60, f"{took:.0f} s"


def test_validate_warns_of_the_quickstart_s_two_bad_files_and_passes(repo):
    proc = sweep_cli("validate", str(repo / "configs/quickstart.yaml"), cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("quickstart.yaml: ok — study 'checkpoints' with 7 candidates")
    lines = proc.stderr.splitlines()
    assert lines[0] == "warning: 2 of 7 candidate files (in sweep/examples/checkpoints) will be invalid rows:"
    assert lines[1].startswith("warning:   bad-hidden32.safetensors: does not fit the module built by "
                               "sweep.examples.digits:make_model {hidden: 64}: 0.weight: module has shape (64×64) "
                               "float32, file has shape (32×64) float32;")
    assert lines[2] == ("warning:   bad-truncated.safetensors: truncated safetensors file: its tensors need 19240 "
                        "bytes after the header, the file holds 9480")
    assert len(lines) == 3
    # and it stays light: neither Ray nor MLflow is imported
    probe = ("import sys; from sweep.cli import main; code = main(['validate', 'configs/quickstart.yaml']); "
             "print(code, 'ray' in sys.modules, 'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 False False", proc.stdout + proc.stderr


def test_rows_with_one_error_are_printed_once_with_their_count(tmp_path):
    """Seven candidate files of the wrong architecture: a warning before, seven invalid rows, one line for them."""
    files = eight_channel_files(tmp_path, 7)
    config = cnn_config(tmp_path, {"kind": "checkpoints", "paths": ["runs/*.safetensors"]})
    proc = sweep_cli("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[:2] == [
        "warning: 7 of 7 candidate files (in runs) will be invalid rows:",
        "warning:   7 files (e0.safetensors, e1.safetensors, e2.safetensors, …): does not fit the module built by "
        "sweep.examples.models:cnn {channels: 16}: conv1.weight: module has shape (16×3×3×3) float32, file has "
        "shape (8×3×3×3) float32; conv1.bias: module has shape (16,) float32, file has shape (8,) float32; "
        "bn1.weight: module has shape (16,) float32, file has shape (8,) float32; and 10 more keys"]

    proc = sweep_cli("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--no-report",
                     cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cnn: 7 candidates: 0 ok, 7 invalid, 0 failed" in proc.stdout
    problem_lines = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    # the one error every row has, in full, from the results (independent of what the CLI printed)
    import pyarrow.dataset as ds

    table = ds.dataset(str(tmp_path / "out/runs/cnn/results"), format="parquet").to_table()
    errors = set(table.column("error").to_pylist())
    assert len(errors) == 1 and table.num_rows == len(files)
    error = errors.pop()
    assert len(error) > 3 * MAX_ERROR_SHOWN and error.startswith("key 'conv1.weight': expected shape (16×3×3×3) float32, ")
    assert len(problem_lines) == 2, proc.stdout
    head, shown = problem_lines[0].split(": ", 1)
    assert re.fullmatch(r"  5 invalid candidates \((\d+, ){4}\d+\)", head), head
    assert shown.endswith(f" … ({len(error):,} characters)") and error.startswith(shown.split(" … (")[0])
    assert len(problem_lines[0]) < MAX_ERROR_SHOWN + 100
    assert problem_lines[1] == ("  the first 5 of 7 rows that are not ok; all: sweep show out/runs/cnn --where "
                                "\"status != 'ok'\" --columns candidate_id,status,error --format csv")
    # the command it names prints every row with its whole error
    shown = sweep_cli(*shlex.split(problem_lines[1].split(": sweep ", 1)[1]), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert len(rows) == 7 and {row["error"] for row in rows} == {error} and {row["status"] for row in rows} == {"invalid"}


PYTHON_API = """
import sys
import ray
from sweep.config import load_config
from sweep.errors import ConfigError
from workers.driver import run

try:
    run(load_config(sys.argv[1]), sys.argv[2])
except ConfigError as e:
    print(e)
print("ray started" if ray.is_initialized() else "ray not started")
"""


def test_the_python_api_run_checks_before_ray_starts(tmp_path):
    """`workers.driver.run` (what the CLI calls, and Python users call) refuses the study before `ray.init`."""
    eight_channel_files(tmp_path, 2)
    config = cnn_config(tmp_path, {"kind": "merge", "base": "runs/e0.safetensors",
                                   "models": ["runs/e1.safetensors", "runs/e0.safetensors"],
                                   "methods": ["task_arithmetic"]})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PYTHON_API, str(config), str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "study.base runs/e0.safetensors does not fit the module built by sweep.examples.models:cnn {channels: 16}: "
        "conv1.weight: module has shape (16×3×3×3) float32, file has shape (8×3×3×3) float32; conv1.bias: module "
        "has shape (16,) float32, file has shape (8,) float32; bn1.weight: module has shape (16,) float32, file has "
        "shape (8,) float32; and 10 more keys",
        "ray not started"]
    assert not (tmp_path / "out").exists()
