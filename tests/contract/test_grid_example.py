"""The README's worked example of a study kind: `grid`, one file plus one registry line."""

from __future__ import annotations

import re

import pyarrow.dataset as ds
import pytest

from sweep.examples import digits
from sweep.model import read_weights_file
from sweep.studies import STUDIES, grid
from tests.conftest import digits_reference, repo_config
from workers.driver import run

pytestmark = pytest.mark.integration


def test_the_readme_shows_the_whole_study_file(repo):
    readme = (repo / "README.md").read_text()
    section = readme.split("## Writing a study", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert (repo / "sweep/studies/grid.py").read_text() in blocks
    assert STUDIES["grid"] is grid and '"grid": grid,' in (repo / "sweep/studies/__init__.py").read_text()


def test_the_grid_config_matches_a_plain_functional_call_loop(repo, tmp_path, ray_cluster):
    config = repo_config(repo, "grid.yaml", **{"sinks.mlflow.enabled": False, "study.steps.num": 5,
                                               "workers.batch_size": 7})
    result = run(config, tmp_path, progress=False)
    table = ds.dataset(result.results_dir, format="parquet").to_table().sort_by("candidate_id")
    assert table.column("candidate_id").to_pylist() == list(range(25))
    assert set(table.column("status").to_pylist()) == {"ok"}
    centre = read_weights_file(config.study.centre)
    a = read_weights_file(config.study.directions["toward_seed1"])
    b = read_weights_file(config.study.directions["toward_seed2"])
    module, data = digits.make_model(), digits.eval_batches()
    for row in table.to_pylist()[::6]:
        s, t = row["toward_seed1"], row["toward_seed2"]
        params = {k: centre[k] + s * (a[k] - centre[k]) + t * (b[k] - centre[k]) for k in centre}
        expected = digits_reference(module, params, data)
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    steps = sorted(set(table.column("toward_seed1").to_pylist()))
    assert steps == pytest.approx([-0.5, 0.0, 0.5, 1.0, 1.5])
