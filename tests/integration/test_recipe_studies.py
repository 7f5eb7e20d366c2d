"""interpolate and perturb through real Ray workers: anchors travel once, batches carry only rows."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.dataset as ds
import pytest

import sweep
from sweep.examples import digits
from sweep.model import read_weights_file
from sweep.studies import plan
from tests.conftest import digits_reference, repo_config, sweep_cli
from workers.driver import run

pytestmark = pytest.mark.integration


def test_interpolate_on_workers_matches_a_hand_built_path(repo, tmp_path, ray_cluster):
    config = repo_config(repo, "interpolate.yaml", **{"sinks.mlflow.enabled": False, "workers.batch_size": 16})
    result = run(config, tmp_path, progress=False)
    table = ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id")
    assert table.num_rows == 61 and table.column("candidate_id").to_pylist() == list(range(61))
    assert "alpha" in table.column_names and set(table.column("status").to_pylist()) == {"ok"}
    a = read_weights_file(config.study.endpoints[0])
    b = read_weights_file(config.study.endpoints[1])
    module = digits.make_model()
    data = digits.eval_batches()
    for row in table.to_pylist()[::10]:
        alpha = row["alpha"]
        expected = digits_reference(module, {k: a[k] + alpha * (b[k] - a[k]) for k in a}, data)
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert np.allclose(table.column("alpha").to_numpy(), np.linspace(-0.25, 1.25, 61))


def test_perturb_on_workers_is_reproducible_and_exactly_once(repo, tmp_path, ray_cluster):
    changes = {"sinks.mlflow.enabled": False, "study.count": 3000, "workers.batch_size": 512}
    first = run(repo_config(repo, "perturb.yaml", name="p1", **changes), tmp_path, progress=False)
    second = run(repo_config(repo, "perturb.yaml", name="p2", **{**changes, "workers.count": 1}), tmp_path, progress=False)
    t1 = ds.dataset(str(first.results_dir), format="parquet").to_table().sort_by("candidate_id")
    t2 = ds.dataset(str(second.results_dir), format="parquet").to_table().sort_by("candidate_id")
    assert t1.num_rows == 3001 and t1.column("candidate_id").to_pylist() == list(range(3001))
    assert t1.column("seed").to_pylist() == t2.column("seed").to_pylist()
    assert t1.column("seed")[3000].as_py() is None  # the unperturbed base, last
    # Two workers or one, batches in any order: the same seeds give the same candidates.
    # (Chunk sizes are measured per worker, so equal to float rounding, not bit for bit.)
    assert np.allclose(t1.column("loss").to_numpy(), t2.column("loss").to_numpy(), rtol=1e-6, atol=0)
    assert len(set(t1.column("worker").to_pylist())) == 2

    # Candidate 7 rebuilt alone from its seed: base + sigma * ε(seed), ε from the public regeneration function.
    config = repo_config(repo, "perturb.yaml")
    base = read_weights_file(config.study.base)
    module = digits.make_model()
    eps = sweep.Noise.epsilon(int(t1.column("seed")[7].as_py()), like=module)
    params = {n: base[n] + config.study.sigma * e for n, e in eps.items()}
    expected = digits_reference(module, params, digits.eval_batches())
    assert t1.column("loss")[7].as_py() == pytest.approx(expected["loss"], rel=1e-5)
    # The last row is the base itself.
    expected = digits_reference(module, {n: base[n] for n in eps}, digits.eval_batches())
    assert t1.column("loss")[3000].as_py() == pytest.approx(expected["loss"], rel=1e-5)


def test_batches_carry_rows_not_weights(repo):
    study = plan(repo_config(repo, "interpolate.yaml").study)
    anchor_bytes = sum(t.numel() * t.element_size() for a in study.anchors().values()
                       for d in a.values() for t in d.values())
    batch = next(study.batches(61))
    assert len(pickle.dumps(batch)) < anchor_bytes / 10


def test_million_row_config_validates(repo, tmp_path):
    proc = sweep_cli("validate", str(repo / "configs/perturb-million.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "1000000 candidates" in proc.stdout


def test_bench_prints_every_engine_variant(tmp_path):
    proc = sweep_cli("bench", "--json", "--models", "mlp-32", "--scale", "0.05", "--no-compile", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    (result,) = report["results"]
    assert result["candidates"] == 1000 and result["loop"] > 0
    assert set(result["engine"]) == {"fp32", "bf16"}
    assert result["ratio"]["fp32"] == pytest.approx(result["engine"]["fp32"] / result["loop"])
    assert result["strategy"] in ("vmap", "loop")
