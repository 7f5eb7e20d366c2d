"""The language-model merge example end to end: `sweep run configs/lm-merge.yaml` through the CLI on a real
local Ray with 2 workers (a smaller grid and fewer held-out sequences), rows checked against a plain
functional_call loop of the same merges built with `sweep.Merge`, the trade-off figure and its Pareto table
written; `sweep run` of an align study on the GPT refused before any work starts."""

from __future__ import annotations

import json
import re
from typing import Dict, List

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from torch.func import functional_call

pytest.importorskip("transformers", reason="the stdlib_lm example needs the transformers extra")

import sweep  # noqa: E402
from sweep.cli import EXIT_CONFIG  # noqa: E402
from sweep.examples import stdlib_lm as lm  # noqa: E402
from sweep.model import read_weights_file  # noqa: E402
from sweep.recipes import Prepared  # noqa: E402
from tests.conftest import sweep_cli  # noqa: E402

pytestmark = pytest.mark.integration

#: Held-out sequences per part in these tests (the config's default is lm.EVAL_SEQUENCES).
SEQUENCES = 6


def reference(module: torch.nn.Module, params: Dict[str, torch.Tensor], data) -> Dict[str, float]:
    """The example's metrics of one candidate by a plain functional_call loop, weighted by batch size."""
    sums: Dict[str, float] = {}
    n = sum(len(x) for x, _ in data)
    with torch.no_grad():
        for x, y in data:
            for name, value in lm.metrics(functional_call(module, params, (x,)), y).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(x) / n
    return sums


def merged(module: torch.nn.Module, base, models, method: str, lam: float, density: float,
           seed: int) -> Dict[str, torch.Tensor]:
    """One merge as `sweep.Merge` makes it, as a plain dict: its rows laid out flat in the module's parameter
    order, as the engine lays them (DARE's mask of seed s covers that flat vector)."""
    recipe = sweep.Merge(base, models, method, [lam], [density], [seed])
    anchors = recipe.anchors()
    names = [name for name, _ in module.named_parameters()]
    directions = sorted((k for k in anchors if k.startswith("direction_")), key=lambda k: int(k.split("_")[1]))

    def flat(d):
        return torch.cat([d[k].to(torch.float32).reshape(-1) for k in names])

    prepared = Prepared(names, [tuple(anchors["base"][k].shape) for k in names],
                        {"base": flat(anchors["base"]), "directions": torch.stack([flat(anchors[k]) for k in directions])},
                        {})
    rows = prepared.unflatten(recipe.rows().materialise(prepared, torch.device("cpu")), torch.float32)
    return {k: v[0] for k, v in rows.items()}


def test_lm_merge_runs_through_the_cli_on_two_workers_and_draws_the_tradeoff(repo, tmp_path):
    proc = sweep_cli("run", str(repo / "configs/lm-merge.yaml"), "--out", str(tmp_path), "--no-progress",
                     "--set", "sinks.mlflow.enabled=false", "--set", f"data.kwargs={{sequences: {SEQUENCES}}}",
                     "--set", "study.lambdas=[0.3, 1.0]", "--set", "study.densities=[0.5]",
                     "--set", "workers.batch_size=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "greedy_soup_loss:" in proc.stdout and "with 4 figures" in proc.stdout
    run_dir = tmp_path / "runs" / "lm-merge"
    rows: List[dict] = ds.dataset(str(run_dir / "results"), format="parquet").to_table() \
        .sort_by("candidate_id").to_pylist()
    # base, 3 models, task arithmetic × 2, TIES × 2, DARE × 2, the uniform soup, 2 greedy rounds and the final soup
    assert len(rows) == 14 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert len({r["worker"] for r in rows}) == 2
    names = {"loss", "loss_pretrain", "loss_email", "loss_asyncio", "loss_json"}
    assert names <= set(rows[0])

    base = read_weights_file(repo / "sweep/examples/lm/base.safetensors")
    models = [read_weights_file(repo / f"sweep/examples/lm/{p}.safetensors") for p in lm.PACKAGES]
    module, data = lm.make_model(), lm.eval_batches(sequences=SEQUENCES)
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    checked = {
        "base": base,
        "model": models[0],
        "task_arithmetic": {k: base[k] + 0.3 * sum(m[k] - base[k] for m in models) for k in base},
        "uniform_soup": {k: sum(m[k] for m in models) / 3 for k in base},
    }
    for method in ("ties", "dare"):
        r = by_method[method][-1]
        checked[method] = merged(module, base, models, method, r["lambda"], r["density"], r["seed"] or 0)
    for method, params in checked.items():
        r = by_method[method][0] if method not in ("ties", "dare") else by_method[method][-1]
        want = reference(module, params, data)
        for name in names:
            assert r[name] == pytest.approx(want[name], rel=1e-4), (method, name)
    # Each fine-tune is the best single model on its own package.
    own = {lm.PACKAGES[int(r["soup"])]: r for r in by_method["model"]}
    for package in lm.PACKAGES:
        assert own[package][f"loss_{package}"] == min(o[f"loss_{package}"] for o in own.values())

    # The report: the trade-off figure and the Pareto set on the page.
    tradeoff = run_dir / "report" / "merge-tradeoff.png"
    assert tradeoff.stat().st_size > 20_000
    page = (run_dir / "report" / "report.html").read_text()
    assert '<figure id="merge-tradeoff">' in page and '<table id="pareto">' in page
    section = page[page.index('<table id="pareto">'):]
    listed = {int(i) for i in re.findall(r'<tr><td class="num">(\d+)</td>', section[: section.index("</table>")])}
    values = np.array([[r["loss_email"], r["loss_asyncio"], r["loss_json"]] for r in rows])
    dominated = {i for i in range(len(rows)) for j in range(len(rows))
                 if (values[j] <= values[i]).all() and (values[j] < values[i]).any()}
    assert listed == set(range(len(rows))) - dominated
    assert {1, 2, 3} <= listed  # a fine-tune is the best on its own package: nothing dominates it
    record = json.loads((run_dir / "run.json").read_text())
    assert record["findings"]["greedy_soup_loss"] == pytest.approx(min(r["loss"] for r in rows
                                                                       if r["method"] == "greedy_soup"))


def test_align_on_the_gpt_is_refused_before_any_work_starts(repo, tmp_path):
    config = yaml.safe_load((repo / "configs/lm-merge.yaml").read_text())
    config["name"] = "lm-align"
    config["study"] = {"kind": "align", "reference": str(repo / "sweep/examples/lm/email.safetensors"),
                       "model": str(repo / "sweep/examples/lm/json.safetensors")}
    path = tmp_path / "lm-align.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = sweep_cli("run", str(path), "--out", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "sweep: config error: study.kind: align permutes the hidden units of a plain network" in proc.stderr
    assert "attention (GPT2Attention)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "lm-align" / "results").exists()
