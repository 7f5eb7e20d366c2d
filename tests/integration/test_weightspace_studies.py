"""The weight-space study kinds through real Ray workers: landscape, merge (with the greedy
soup's rounds and a resume in the middle of them), align, and interpolate with alignment."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from sweep.examples import digits
from sweep.model import read_weights_file
from tests.conftest import digits_reference, repo_config, sweep_cli
from workers.driver import resume, run

pytestmark = pytest.mark.integration

QUIET = {"sinks.mlflow.enabled": False}


def rows(result):
    return ds.dataset(str(result.results_dir), format="parquet").to_table().sort_by("candidate_id").to_pylist()


class Stop(Exception):
    pass


def test_merge_greedy_soup_rounds_survive_an_interruption(repo, tmp_path, ray_cluster):
    changes = {**QUIET, "study.lambdas": [0.4, 1.0], "study.densities": [0.3, 1.0], "workers.batch_size": 3}
    whole = run(repo_config(repo, "merge.yaml", name="merge-whole", **changes), tmp_path, progress=False)
    want = rows(whole)
    # 1 base + 3 models + 2 task arithmetic + 4 ties + 4 dare + 1 uniform soup + 2 greedy steps + the final soup
    assert len(want) == 18 and all(r["status"] == "ok" for r in want)
    assert [r["method"] for r in want[-3:]] == ["greedy_step", "greedy_step", "greedy_soup"]

    # The greedy soup, decided independently from the models' own losses.
    base = read_weights_file(repo / "sweep/examples/checkpoints/seed0-epoch02.safetensors")
    models = [read_weights_file(repo / f"sweep/examples/studies/finetune-{c}.safetensors") for c in "abc"]
    module, data = digits.make_model(), digits.eval_batches()

    def loss_of(members):
        return digits_reference(module, {k: sum(models[i][k] for i in members) / len(members) for k in base},
                                data)["loss"]

    order = sorted(range(3), key=lambda i: loss_of([i]))
    soup, best, tried = [order[0]], loss_of([order[0]]), []
    for i in order[1:]:
        tried.append("+".join(str(j) for j in sorted(soup + [i])))
        value = loss_of(soup + [i])
        if value < best:
            soup, best = soup + [i], value
    assert [r["soup"] for r in want[-3:-1]] == tried
    assert want[-1]["soup"] == "+".join(str(j) for j in sorted(soup))
    assert want[-1]["loss"] == pytest.approx(best, rel=1e-5)
    assert whole.findings["greedy_soup_loss"] == pytest.approx(best, rel=1e-5)

    # Interrupted after the first greedy round; the resume replays the decision from the rows.
    config = repo_config(repo, "merge.yaml", name="merge-cut", **changes)

    def on_batch(done, total):
        if done >= 16:
            raise Stop()

    with pytest.raises(Stop):
        run(config, tmp_path, progress=False, on_batch=on_batch)
    run_dir = tmp_path / "runs" / "merge-cut"
    assert len(ds.dataset(str(run_dir / "results"), format="parquet").to_table()) == 16
    finished = resume(run_dir, progress=False)
    got = rows(finished)
    key = ("candidate_id", "method", "lambda", "density", "seed", "soup")
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert finished.findings["greedy_soup_loss"] == pytest.approx(best, rel=1e-5)


def test_landscape_on_workers_matches_the_plane_built_by_hand(repo, tmp_path, ray_cluster):
    changes = {**QUIET, "study.x": {"start": -0.5, "stop": 0.5, "num": 5},
               "study.y": {"start": -0.5, "stop": 0.5, "num": 4}, "workers.batch_size": 6}
    config = repo_config(repo, "landscape.yaml", **changes)
    result = run(config, tmp_path, progress=False)
    got = rows(result)
    assert len(got) == 20 and all(r["status"] == "ok" for r in got)
    # Directions drawn again from the seed, independently of the workers: the plan is deterministic.
    from sweep.studies import plan
    from sweep.studies.base import StudyContext

    study = plan(config.study, StudyContext.from_config(config))
    anchors = next(iter(study.anchors().values()))
    center, d0, d1 = anchors["base"], anchors["direction_0"], anchors["direction_1"]
    module, data = digits.make_model(), digits.eval_batches()
    for r in got[::7]:
        params = {k: center[k] + r["x"] * d0.get(k, 0) + r["y"] * d1.get(k, 0) for k in center}
        assert r["loss"] == pytest.approx(digits_reference(module, params, data)["loss"], rel=1e-5)
    xs = sorted({r["x"] for r in got})
    assert np.allclose(xs, np.linspace(-0.5, 0.5, 5))
    assert [r["x"] for r in got[:5]] == pytest.approx(list(np.linspace(-0.5, 0.5, 5)))


def test_align_on_workers_removes_the_barrier_and_saves_the_permuted_model(repo, tmp_path, ray_cluster):
    config = repo_config(repo, "align.yaml", **{**QUIET, "study.alphas": {"start": 0.0, "stop": 1.0, "num": 11}})
    result = run(config, tmp_path, progress=False)
    got = rows(result)
    assert len(got) == 22 and {r["path"] for r in got} == {"original", "aligned"}
    saved = tmp_path / "runs" / "align" / "aligned" / "deep-seed1.safetensors"
    aligned = read_weights_file(saved)
    module, data = digits.make_model(64, depth=3), digits.eval_batches()
    other = read_weights_file(config.study.model)
    assert not all(torch.equal(aligned[k], other[k]) for k in other), "the units were permuted"
    same = digits_reference(module, aligned, data)
    assert same["loss"] == pytest.approx(digits_reference(module, other, data)["loss"], rel=1e-5)
    end = {r["path"]: r for r in got if r["alpha"] == 1.0}
    assert end["aligned"]["loss"] == pytest.approx(end["original"]["loss"], rel=1e-5)
    f = result.findings
    assert f["original_barrier_loss"] > 0.3 > f["aligned_barrier_loss"] + 0.2
    record = json.loads((tmp_path / "runs" / "align" / "run.json").read_text())
    assert record["findings"]["original_barrier_loss"] == pytest.approx(f["original_barrier_loss"])


def test_interpolate_with_alignment_and_slerp_on_workers(repo, tmp_path, ray_cluster):
    changes = {**QUIET, "study.endpoints": ["../sweep/examples/studies/deep-seed0.safetensors",
                                            "../sweep/examples/studies/deep-seed1.safetensors"],
               "model.kwargs": {"hidden": 64, "depth": 3}, "study.alphas": [0.25, 0.5, 0.75]}
    plain = run(repo_config(repo, "interpolate.yaml", name="plain", **changes), tmp_path, progress=False)
    aligned = run(repo_config(repo, "interpolate.yaml", name="aligned", **changes, **{"study.align": "weight_matching"}),
                  tmp_path, progress=False)
    spherical = run(repo_config(repo, "interpolate.yaml", name="spherical", **changes,
                         **{"study.align": "weight_matching", "study.method": "slerp"}), tmp_path, progress=False)
    for result in (plain, aligned, spherical):
        got = rows(result)
        # The endpoints were added after the three configured alphas, so the barrier is known.
        assert [r["alpha"] for r in got] == [0.25, 0.5, 0.75, 0.0, 1.0]
    assert plain.findings["barrier_loss"] > 0.3 > aligned.findings["barrier_loss"] + 0.2
    assert (tmp_path / "runs" / "aligned" / "aligned" / "01-deep-seed1.safetensors").is_file()
    mid = {name: rows(r)[1]["loss"] for name, r in (("plain", plain), ("aligned", aligned), ("slerp", spherical))}
    assert mid["slerp"] != mid["aligned"] and mid["slerp"] < mid["plain"]


def test_cli_run_writes_the_report_and_logs_it_to_a_real_mlflow_server(repo, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    proc = sweep_cli("run", str(repo / "configs/merge.yaml"), "--out", str(tmp_path), "--no-progress",
                     "--set", f"sinks.mlflow.tracking_uri={mlflow_server.uri}", "--set", "name=merge-cli",
                     "--set", "study.lambdas=[0.5, 1.0]", "--set", "study.densities=[0.5]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "greedy_soup_loss:" in proc.stdout
    assert "with 3 figures (and to the MLflow run, under report/)" in proc.stdout
    run_dir = tmp_path / "runs" / "merge-cli"
    record = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    logged = {a.path for a in client.list_artifacts(record["mlflow_run_id"], "report")}
    assert {"report/report.html", "report/merge.png", "report/merge-summary.png"} <= logged
    page = (run_dir / "report" / "report.html").read_text()
    assert "data:image/png;base64," in page and "greedy_soup" in page
    metrics = client.get_run(record["mlflow_run_id"]).data.metrics
    assert metrics["summary.greedy_soup_loss"] == pytest.approx(record["findings"]["greedy_soup_loss"])

    # Written again on demand, without MLflow, with the PNGs replaced.
    (run_dir / "report" / "merge.png").unlink()
    again = sweep_cli("report", str(run_dir), "--no-mlflow", "--top", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "report" / "merge.png").stat().st_size > 10_000
    assert "(and to the MLflow run" not in again.stdout
    missing = sweep_cli("report", str(tmp_path / "runs" / "nothing-here"), cwd=tmp_path)
    assert missing.returncode == 1 and "runs/<name>" in missing.stderr
