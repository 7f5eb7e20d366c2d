"""Checkpoint folders through the `sweep` command on a real local Ray with 2 workers: a `checkpoints` study of
folders (one safetensors file, shards with their index, `pytorch_model.bin`, sharded `.bin` saved under DDP's
`module.` prefix) and an `interpolate` between two folders, each row equal to a plain functional_call loop; the
workers read the paths themselves (the driver ships nothing). And a worker that cannot reach a path: the pool
sends that checkpoint's bytes, and an unreadable one is the row it always was."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray
import torch
import yaml
from safetensors.torch import save_file

from sweep.config import parse_config
from sweep.examples import digits
from sweep.results import failed_rows
from sweep.studies import plan
from tests.conftest import digits_reference, sweep_cli
from workers.driver import describe_workers, worker_factory
from workers.pool import Pool

pytestmark = pytest.mark.integration

DATA_KWARGS = {"batch_size": 250}


def digits_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in digits.make_model().state_dict().items()}


def write_folders(root: Path) -> dict:
    """Four checkpoint folders and a file, as people have them; name → the state each holds (module's keys)."""
    states = {name: digits_state(i) for i, name in enumerate(["single", "sharded", "bin", "ddp-bin", "plain"])}
    single = root / "single"
    single.mkdir(parents=True)
    save_file(states["single"], str(single / "model.safetensors"))
    (single / "config.json").write_text('{"architectures": ["Sequential"]}')
    for name, stem, suffix, prefix in (("sharded", "model", "safetensors", ""),
                                       ("ddp-bin", "pytorch_model", "bin", "module.")):
        folder = root / name
        folder.mkdir()
        keys = list(states[name])
        weight_map = {}
        for i, part in enumerate([keys[:2], keys[2:]]):
            shard = f"{stem}-{i + 1:05d}-of-00002.{suffix}"
            tensors = {prefix + k: states[name][k] for k in part}
            if suffix == "safetensors":
                save_file(tensors, str(folder / shard))
            else:
                torch.save(tensors, folder / shard)
            weight_map.update({k: shard for k in tensors})
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "bin").mkdir()
    torch.save(states["bin"], root / "bin" / "pytorch_model.bin")
    save_file(states["plain"], str(root / "plain.safetensors"))
    return states


def config_file(tmp_path: Path, study: dict, weights: str = None, **sinks) -> Path:
    raw = {"name": "folders", "model": {"factory": "sweep.examples.digits:make_model", "weights": weights},
           "data": {"loader": "sweep.examples.digits:eval_batches", "kwargs": DATA_KWARGS},
           "metrics": {"function": "sweep.examples.digits:metrics", "objective": "accuracy", "mode": "max"},
           "study": study, "workers": {"count": 2, "batch_size": 2},
           "sinks": {"mlflow": {"enabled": False}, **sinks}}
    path = tmp_path / "folders.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_rows(tmp_path: Path, config: Path) -> list:
    proc = sweep_cli("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--no-report",
                     cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not reach" not in proc.stderr, proc.stderr  # the driver shipped no file
    results = tmp_path / "out" / "runs" / "folders" / "results"
    return ds.dataset(str(results), format="parquet").to_table().sort_by("candidate_id").to_pylist()


def test_a_checkpoints_study_of_folders_through_the_cli(tmp_path):
    states = write_folders(tmp_path / "ckpts")
    tracking = tmp_path / "mlflow.db"
    # model.weights a folder too (sharded, under DDP's prefix): each worker loads it from its path
    config = config_file(tmp_path, {"kind": "checkpoints", "paths": ["ckpts/*"]}, weights="ckpts/ddp-bin",
                         mlflow={"enabled": True, "tracking_uri": f"sqlite:///{tracking}"})
    proc = sweep_cli("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # every folder fits (the ddp one once read away)
    rows = run_rows(tmp_path, config)
    names = ["bin", "ddp-bin", "plain.safetensors", "sharded", "single"]  # the glob's matches, sorted
    assert [Path(r["path"]).name for r in rows] == names
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    module, data = digits.make_model(), digits.eval_batches(**DATA_KWARGS)
    for row in rows:
        want = digits_reference(module, states[Path(row["path"]).name.removesuffix(".safetensors")], data)
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), row["path"]
        assert row["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), row["path"]
    # the count the driver keeps of the candidates whose files it sent: none, the workers read them all
    with sqlite3.connect(tracking) as db:
        shipped = db.execute("SELECT value FROM metrics WHERE key = 'summary.candidates_shipped'").fetchall()
    assert shipped == [(0.0,)]


def test_an_interpolation_between_two_folders_through_the_cli(tmp_path):
    states = write_folders(tmp_path / "ckpts")
    alphas = [0.0, 0.25, 0.5, 1.0]
    config = config_file(tmp_path, {"kind": "interpolate", "endpoints": ["ckpts/sharded", "ckpts/ddp-bin"],
                                    "alphas": alphas})
    rows = run_rows(tmp_path, config)
    assert [r["alpha"] for r in rows] == alphas and all(r["status"] == "ok" for r in rows)
    a, b = states["sharded"], states["ddp-bin"]
    module, data = digits.make_model(), digits.eval_batches(**DATA_KWARGS)
    for row in rows:
        t = row["alpha"]
        want = digits_reference(module, {k: a[k] + t * (b[k] - a[k]) for k in a}, data)
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), t
        assert row["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), t


def test_model_weights_a_worker_cannot_reach_come_from_the_object_store(tmp_path, ray_cluster):
    from sweep.model import checkpoint_bytes, checkpoint_stamp
    from workers.actor import ModelWeights

    states = write_folders(tmp_path / "ckpts")
    path = str(tmp_path / "ckpts" / "sharded")
    stamp = checkpoint_stamp(path)
    here = ModelWeights(path, stamp)
    assert here.read().keys() == states["sharded"].keys()  # read from its path
    other = tuple((name, size, mtime + 1) for name, size, mtime in stamp)  # other files there: another node's
    sent = ModelWeights(path, other, ray.put(checkpoint_bytes(path)))
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    got = sent.read()
    assert all(torch.equal(got[k], v) for k, v in states["sharded"].items())


def test_what_a_worker_cannot_reach_the_driver_sends(tmp_path, ray_cluster):
    states = write_folders(tmp_path / "ckpts")
    raw = yaml.safe_load(config_file(tmp_path, {"kind": "checkpoints", "paths": ["ckpts/*"]}).read_text())
    config = parse_config(raw, base_dir=tmp_path)
    study = plan(config.study)
    batch = next(study.batches(8))
    names = [Path(p).name for p in batch.columns["path"]]
    assert names == ["bin", "ddp-bin", "plain.safetensors", "sharded", "single"]
    # As on another node: other files at the sharded folder's path (a stamp that differs), the plain file gone.
    stamp = batch.source.stamps[3]
    batch.source.stamps[3] = tuple((name, size, mtime + 1) for name, size, mtime in stamp)
    os.unlink(tmp_path / "ckpts" / "plain.safetensors")
    pool = Pool(worker_factory(config, None, {}), 2, max_in_flight=2)
    try:
        describe_workers(pool.actors)
        tables = [table for _, table in pool.map_unordered([batch], failed_rows)]
    finally:
        for actor in pool.actors:
            ray.kill(actor)
    rows = {r["candidate_id"]: r for r in pa.concat_tables(tables, promote_options="default").to_pylist()}
    assert sorted(rows) == [0, 1, 2, 3, 4] and len(tables) == 2  # the reachable rows, then those sent again
    assert pool.shipped == 2
    gone = rows.pop(2)
    assert gone["status"] == "invalid"
    assert gone["error"] == f"{tmp_path / 'ckpts' / 'plain.safetensors'}: cannot read: No such file or directory"
    module, data = digits.make_model(), digits.eval_batches(**DATA_KWARGS)
    for i, row in rows.items():
        assert row["status"] == "ok", row["error"]
        want = digits_reference(module, states[names[i]], data)
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), names[i]
