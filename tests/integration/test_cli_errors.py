"""A config that cannot run exits non-zero with one line naming the problem, before any worker starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import edited_quickstart, sweep_cli

pytestmark = pytest.mark.integration

CHECKPOINTS = Path(__file__).resolve().parents[2] / "sweep/examples/checkpoints"


def write_config(repo, tmp_path, **changes):
    config = edited_quickstart(repo, changes, sep="__")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"workers__cuont": 2}, "workers.cuont: unknown key (did you mean 'count'?)"),
        ({"model__weights": "missing.safetensors"}, "model.weights: file not found"),
        ({"study__paths": ["nowhere/*.safetensors"]}, "study.paths: pattern matched no files"),
        ({"model__factory": "sweep.examples.nothere:make_model"}, "model.factory: cannot import module"),
        ({"metrics__function": "sweep.examples.digits:nometrics"}, "metrics.function: module 'sweep.examples.digits' has no attribute"),
        ({"data__loader": "not-an-import-path"}, "data.loader:"),
        ({"model__weights": str(CHECKPOINTS / "bad-hidden32.safetensors")},
         f"model.weights {CHECKPOINTS / 'bad-hidden32.safetensors'} does not fit the module built by "
         f"sweep.examples.digits:make_model {{hidden: 64}}: 0.weight: module has shape (64×64) float32, file has "
         f"shape (32×64) float32; "),
        ({"model__weights": str(CHECKPOINTS / "bad-truncated.safetensors")},
         f"model.weights: {CHECKPOINTS / 'bad-truncated.safetensors'}: truncated safetensors file"),
    ],
)
def test_bad_config_fails_before_any_worker(repo, tmp_path, changes, expected):
    config = write_config(repo, tmp_path, **changes)
    out = tmp_path / "out"
    proc = sweep_cli("run", str(config), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sweep: config error:") and expected in lines[0]
    assert not out.exists(), "nothing may be written for a config that cannot run"
    assert "Ray" not in proc.stderr


def test_missing_config_file_and_bad_override(repo, tmp_path):
    proc = sweep_cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    proc = sweep_cli("run", str(repo / "configs/quickstart.yaml"), "--set", "workers.count", cwd=tmp_path)
    assert proc.returncode == 2 and "expected key.path=value" in proc.stderr


def test_validate_command(repo, tmp_path):
    proc = sweep_cli("validate", str(repo / "configs/quickstart.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "7 candidates" in proc.stdout


def test_more_workers_than_the_local_cluster_holds_is_an_error_not_a_wait(repo, tmp_path):
    # Two workers of more CPUs each than this machine has would wait for resources forever.
    cpus = 2 * (os.cpu_count() or 1)
    proc = sweep_cli("run", str(write_config(repo, tmp_path, workers__count=2, workers__cpus=cpus,
                                             sinks__mlflow__enabled=False)),
                     "--no-progress", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"the workers need {2 * cpus} CPUs (workers.count 2 × workers.cpus {cpus}), the cluster has" in proc.stderr
    assert "lower workers.count" in proc.stderr
    assert not list(tmp_path.glob("runs/*/results/*.parquet"))
