"""The language-model merge example: a byte-level transformers GPT-2 on Python's standard library.

Its data split and windows are deterministic, each per-package loss is that package's own mean whatever the
batches hold (checked against a direct computation), the training that remakes the checkpoints gives the same
bytes twice, the committed checkpoints fit the module under strict validation, the merge study's Pareto helper
and trade-off table agree with a brute-force search, and `align` refuses the GPT before any work starts.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import torch.nn.functional as F
from torch.func import functional_call

pytest.importorskip("transformers", reason="the stdlib_lm example needs the transformers extra")

import sweep  # noqa: E402
from sweep.config import parse_config  # noqa: E402
from sweep.errors import ConfigError  # noqa: E402
from sweep.examples import stdlib_lm as lm  # noqa: E402
from sweep.model import read_weights_file  # noqa: E402
from sweep.report import write_report  # noqa: E402
from sweep.results import RECIPE, column, results_schema  # noqa: E402
from sweep.studies import plan  # noqa: E402
from sweep.studies.base import StudyContext  # noqa: E402
from sweep.studies.merge import pareto_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = REPO / "sweep" / "examples" / "lm"
NAMES = ("base",) + lm.PACKAGES
#: A checkpoint is committed small.
MAX_CHECKPOINT_BYTES = 1_500_000


def fake_stdlib(root: Path) -> Path:
    """A standard library of known files: the fine-tune packages and a few pre-training modules."""
    for package, count in (("email", 9), ("asyncio", 5), ("json", 3)):
        for i in range(count):
            path = root / package / ("mime" if i >= 6 else "") / f"m{i:02d}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {package} {i}\n" + "x = 1\n" * 40)
    (root / "email" / "tests").mkdir()
    (root / "email" / "tests" / "test_x.py").write_text("never read\n")
    (root / "argparse.py").write_text("import sys\n" * 30)
    (root / "collections").mkdir()
    for name in ("__init__.py", "abc.py"):
        (root / "collections" / name).write_text(f"# collections/{name}\n" + "y = 2\n" * 30)
    return root


# --------------------------------------------------------------------------- the data


def test_each_part_is_split_by_sorted_name_every_fourth_file_from_the_second(tmp_path):
    root = fake_stdlib(tmp_path)
    files = [p.relative_to(root).as_posix() for p in lm.part_files("email", root)]
    assert files == sorted(files) and "email/tests/test_x.py" not in files and len(files) == 9
    train, held = lm.split_files(lm.part_files("email", root))
    assert [p.relative_to(root).as_posix() for p in held] == [files[1], files[5]]
    assert sorted(train + held) == sorted(lm.part_files("email", root)) and not set(train) & set(held)
    # The pre-training part: modules and packages of PRETRAIN that exist, none of the fine-tune packages.
    pre = [p.relative_to(root).as_posix() for p in lm.part_files(lm.PRETRAIN_PART, root)]
    assert pre == ["argparse.py", "collections/__init__.py", "collections/abc.py"]
    assert lm.split_files(lm.part_files(lm.PRETRAIN_PART, root))[1] == [root / "collections/__init__.py"]
    with pytest.raises(FileNotFoundError, match="standard library"):
        lm.part_files("json", tmp_path / "nowhere")


def test_the_split_of_this_machines_library_is_deterministic_and_keeps_the_packages_apart():
    for part in lm.PARTS:
        files = lm.part_files(part)
        train, held = lm.split_files(files)
        assert held and train and files == lm.part_files(part)
        assert torch.equal(lm.stream(part, "heldout"), lm.stream(part, "heldout"))
    pretrain = {p.relative_to(lm.stdlib()).parts[0].removesuffix(".py") for p in lm.part_files(lm.PRETRAIN_PART)}
    assert not pretrain & set(lm.PACKAGES)


def test_windows_are_cut_without_overlap_and_spread_evenly():
    data = torch.arange(1000)
    w = lm.windows(data, 9, 4)  # 100 windows of 10 bytes are available; 4 taken, evenly spread
    assert w.shape == (4, 10)
    assert w[:, 0].tolist() == [0, 330, 660, 990]
    assert torch.equal(w[1], torch.arange(330, 340))
    assert lm.windows(data, 9, 1000).shape == (100, 10)  # every window when fewer than asked
    with pytest.raises(ValueError, match="no window"):
        lm.windows(torch.arange(5), 9, 1)


def test_the_eval_batches_hold_one_part_each_with_its_counts():
    batches = lm.eval_batches(sequences=3, length=16)
    assert len(batches) == len(lm.PARTS)
    for j, (x, y) in enumerate(batches):
        assert x.shape == (3, 16) and y.shape == (3, 19) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :15], x[:, 1:])  # the targets are the next bytes
        assert y[:, 16].tolist() == [j] * 3 and y[:, 17].tolist() == [3] * 3
        assert y[:, 18].tolist() == [3 * len(lm.PARTS)] * 3
    again = lm.eval_batches(sequences=3, length=16)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


# --------------------------------------------------------------------------- the metrics


def direct_losses(module: torch.nn.Module, params, batches) -> dict:
    """Each part's mean cross-entropy per byte over all its held-out tokens, by F.cross_entropy."""
    out = {}
    with torch.no_grad():
        for j, (x, y) in enumerate(batches):
            logits = functional_call(module, params, (x,)).logits
            out[f"loss_{lm.PARTS[j]}"] = float(F.cross_entropy(logits.reshape(-1, lm.VOCAB),
                                                               y[:, : x.shape[1]].reshape(-1)))
    out["loss"] = sum(out[f"loss_{p}"] for p in lm.PACKAGES) / len(lm.PACKAGES)
    return out


def rebatched(batches, sizes):
    """The same sequences shuffled together and cut into batches of `sizes`: parts mixed, batches uneven."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    x, y = x[order], y[order]
    assert sum(sizes) == len(x)
    cuts = np.cumsum([0] + list(sizes))
    return [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_each_package_loss_is_that_packages_own_mean_whatever_the_batches_hold():
    module = lm.make_model()
    candidates = [read_weights_file(CHECKPOINTS / f"{name}.safetensors") for name in ("base", "json")]
    batches = lm.eval_batches(sequences=3, length=24)
    table = sweep.evaluate(module, candidates, batches, lm.metrics, chunk_size=2)
    mixed = sweep.evaluate(module, candidates, rebatched(batches, [5, 4, 2, 1]), lm.metrics, chunk_size=2)
    assert set(table.column("status").to_pylist()) == {"ok"}
    for k, params in enumerate(candidates):
        want = direct_losses(module, params, batches)
        assert set(want) == set(table.column_names) & set(want) == set(lm.metrics.describe)
        for name, value in want.items():
            assert table.column(name)[k].as_py() == pytest.approx(value, rel=1e-5), name
            assert mixed.column(name)[k].as_py() == pytest.approx(value, rel=1e-5), name
    # The json fine-tune is better than the base on json, worse on what the base was trained on.
    assert table.column("loss_json")[1].as_py() < table.column("loss_json")[0].as_py()
    assert table.column("loss_pretrain")[1].as_py() > table.column("loss_pretrain")[0].as_py()


# --------------------------------------------------------------------------- the checkpoints


def test_training_is_deterministic_and_depends_on_its_seed():
    data = lm.stream("json", "train")

    def trained(seed: int):
        torch.manual_seed(seed)
        model = lm.make_model(embed=16, layers=1, heads=2, context=32)
        return lm.checkpoint_state(lm.train(model, data, steps=3, lr=1e-3, seed=seed, batch=4, length=32))

    first, again, other = trained(0), trained(0), trained(1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_remake_script_writes_the_same_bytes_twice(tmp_path):
    a = lm.write_checkpoints(tmp_path / "a", pretrain_steps=1, finetune_steps=1)
    b = lm.write_checkpoints(tmp_path / "b", pretrain_steps=1, finetune_steps=1)
    assert [p.name for p in a] == [f"{name}.safetensors" for name in NAMES]
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name
    assert a[1].read_bytes() != a[2].read_bytes()  # each package's fine-tune is its own


def test_the_committed_checkpoints_are_small_and_load_strictly():
    module = lm.make_model()
    assert module.lm_head.weight is module.transformer.wte.weight  # GPT-2's tie
    assert 200_000 < sum(p.numel() for p in module.parameters()) < 400_000
    expected = set(module.state_dict()) - {"lm_head.weight"}
    x = lm.eval_batches(sequences=1, length=8)[0][0]
    for name in NAMES:
        path = CHECKPOINTS / f"{name}.safetensors"
        assert path.stat().st_size <= MAX_CHECKPOINT_BYTES, path
        state = read_weights_file(path)
        assert set(state) == expected and all(t.dtype == torch.float32 for t in state.values())
        assert sweep.check_candidate(module, state) is None
        # Strict functional_call: the tied head follows wte; every parameter is given.
        out = functional_call(module, state, (x,), strict=True, tie_weights=True).logits
        assert out.shape == (1, 8, lm.VOCAB) and torch.isfinite(out).all()
        copy = lm.make_model()
        missing, unexpected = copy.load_state_dict(state, strict=False)
        assert list(missing) == ["lm_head.weight"] and not unexpected
        assert torch.equal(copy.lm_head.weight, state["transformer.wte.weight"])
    # Both halves of the tie with different values are refused, naming both keys.
    bad = dict(read_weights_file(CHECKPOINTS / "base.safetensors"))
    bad["lm_head.weight"] = bad["transformer.wte.weight"] + 1
    error = sweep.check_candidate(module, bad)
    assert error is not None and "'transformer.wte.weight'" in error and "'lm_head.weight'" in error


def test_without_transformers_the_model_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'sweep\[transformers\]'"):
        lm.make_model()
    assert lm.eval_batches(sequences=1, length=8)[0][0].shape == (1, 8)  # the data needs no transformers


# --------------------------------------------------------------------------- the merge study's trade-off


def brute_force_front(values: np.ndarray) -> np.ndarray:
    n = len(values)
    finite = np.isfinite(values).all(axis=1)
    keep = finite.copy()
    for i, j in itertools.product(range(n), range(n)):
        if finite[i] and finite[j] and (values[j] <= values[i]).all() and (values[j] < values[i]).any():
            keep[i] = False
    return keep


def test_the_pareto_front_of_known_points():
    points = np.array([[1.0, 5.0], [2.0, 3.0], [3.0, 3.0], [4.0, 1.0], [2.0, 3.0], [5.0, 5.0], [np.nan, 0.0],
                       [0.5, 9.0]])
    assert pareto_mask(points).tolist() == [True, True, False, True, True, False, False, True]
    # Higher is better on the second column: the front turns over.
    turned = np.array([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0], [4.0, 5.0]])
    assert pareto_mask(turned).tolist() == [True, False, False, False]
    assert pareto_mask(turned, [False, True]).tolist() == [True, True, False, True]
    assert pareto_mask(np.zeros((0, 3))).tolist() == []
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        values = rng.integers(0, 6, size=(60, k)).astype(float)  # many ties and duplicates
        assert pareto_mask(values).tolist() == brute_force_front(values).tolist()


def merge_config(tmp_path: Path, **study) -> object:
    raw = {"name": "lm", "model": {"factory": "sweep.examples.stdlib_lm:make_model"},
           "data": {"loader": "sweep.examples.stdlib_lm:eval_batches"},
           "metrics": {"function": "sweep.examples.stdlib_lm:metrics", "objective": "loss"},
           "study": {"kind": "merge", "base": str(CHECKPOINTS / "base.safetensors"),
                     "models": [str(CHECKPOINTS / f"{p}.safetensors") for p in lm.PACKAGES], **study},
           "sinks": {"mlflow": {"enabled": False}}}
    return parse_config(raw, base_dir=tmp_path)


def test_the_tradeoff_names_two_or_more_metrics_the_metrics_function_returns(tmp_path):
    with pytest.raises(ConfigError, match="study.tradeoff.*2 to 4 metrics.*'loss_json'"):
        merge_config(tmp_path, tradeoff=["loss_json"])
    with pytest.raises(ConfigError, match="study.tradeoff.*each metric once"):
        merge_config(tmp_path, tradeoff=["loss_json", "loss_json"])
    config = merge_config(tmp_path, tradeoff=["loss_email", "loss_xml", "loss_json", "loss_css"],
                          methods=["task_arithmetic"], lambdas=[0.5])
    study = plan(config.study)
    names = ["loss_pretrain", "loss_email", "loss_asyncio", "loss_json", "loss"]
    with pytest.raises(ConfigError, match=r"study.tradeoff: 'loss_xml', 'loss_css' are not metrics: .*loss_asyncio"):
        study.bind("loss", "min", names)
    ok = plan(merge_config(tmp_path, tradeoff=["loss_email", "loss_json"], methods=["task_arithmetic"]).study)
    ok.bind("loss", "min", names)  # no error


def test_the_report_lists_exactly_the_pareto_set_and_draws_the_tradeoff(tmp_path):
    rng = np.random.default_rng(4)
    n = 40
    methods = ["base", "model", "model", "model"] + ["ties"] * 20 + ["dare"] * 16
    values = rng.uniform(1.6, 2.2, size=(n, 3))
    values[5] = [np.nan, 1.7, 1.7]  # a NaN: never on the front
    metrics = ["loss", "loss_email", "loss_asyncio", "loss_json"]
    data = {"candidate_id": list(range(n)), "status": ["ok"] * n, "error": [None] * n, "method": methods,
            "lambda": [None] * 4 + list(rng.uniform(0.2, 1, n - 4)), "density": [None] * 4 + [0.5] * (n - 4),
            "soup": [None, "0", "1", "2"] + [None] * (n - 4),
            "loss": list(np.nanmean(values, axis=1)), "loss_email": list(values[:, 0]),
            "loss_asyncio": list(values[:, 1]), "loss_json": list(values[:, 2]),
            "worker": ["w0"] * n, "node": ["n0"] * n, "eval_seconds": [0.01] * n}
    study_columns = [column("method", pa.string(), RECIPE), column("lambda", pa.float64(), RECIPE),
                     column("density", pa.float64(), RECIPE), column("soup", pa.string(), RECIPE)]
    schema = results_schema(study_columns, metrics)
    table = pa.Table.from_pydict({f.name: pa.array(data[f.name], f.type) for f in schema}, schema=schema)
    config = {"name": "lm-merge", "model": {"factory": "sweep.examples.stdlib_lm:make_model"},
              "data": {"loader": "sweep.examples.stdlib_lm:eval_batches"},
              "metrics": {"function": "sweep.examples.stdlib_lm:metrics", "objective": "loss"},
              "study": {"kind": "merge", "base": str(CHECKPOINTS / "base.safetensors"),
                        "models": [str(CHECKPOINTS / f"{p}.safetensors") for p in lm.PACKAGES],
                        "tradeoff": ["loss_email", "loss_asyncio", "loss_json"]},
              "sinks": {"mlflow": {"enabled": False}}}
    run_dir = tmp_path / "runs" / "lm-merge"
    (run_dir / "results").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "run.json").write_text(json.dumps({"name": "lm-merge", "results": str(run_dir / "results")}))
    pq.write_table(table, run_dir / "results" / "part-000000-abcdef01.parquet")

    result = write_report(run_dir, mlflow=False)
    assert not [w for w in result.warnings if "could not" in w], result.warnings
    assert (run_dir / "report" / "merge-tradeoff.png").stat().st_size > 10_000
    page = result.html.read_text()
    section = page[page.index('<table id="pareto">'):]
    section = section[: section.index("</table>")]
    listed = [int(v) for v in re.findall(r'<tr><td class="num">(\d+)</td>', section)]
    want = np.flatnonzero(brute_force_front(values))
    assert sorted(listed) == sorted(want.tolist()) and 5 not in listed
    # Best mean loss first; the models are named by their files.
    assert listed == sorted(listed, key=lambda i: data["loss"][i])
    for i, name in zip((1, 2, 3), lm.PACKAGES):
        if i in listed:
            assert f"<td>{name}</td>" in section
    assert f"Pareto set over loss_email, loss_asyncio, loss_json: {len(want)} of {n - 1} candidates" in page


# --------------------------------------------------------------------------- align refuses the GPT


def test_align_refuses_the_gpt_before_any_work_starts_saying_why_and_what_it_supports(tmp_path):
    raw = {"name": "lm-align", "model": {"factory": "sweep.examples.stdlib_lm:make_model"},
           "data": {"loader": "sweep.examples.stdlib_lm:eval_batches"},
           "metrics": {"function": "sweep.examples.stdlib_lm:metrics", "objective": "loss"},
           "study": {"kind": "align", "reference": str(CHECKPOINTS / "email.safetensors"),
                     "model": str(CHECKPOINTS / "json.safetensors")},
           "sinks": {"mlflow": {"enabled": False}}}
    config = parse_config(raw, base_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        plan(config.study, StudyContext.from_config(config, artifacts=tmp_path / "run"))
    message = str(caught.value)
    assert message.startswith("study.kind: align permutes the hidden units of a plain network")
    assert "GPT2LMHeadModel, which is not one" in message
    assert "attention (GPT2Attention): transformer.h.0.attn" in message
    assert "embeddings (Embedding): transformer.wte, transformer.wpe" in message
    assert "tied weights: lm_head.weight = transformer.wte.weight" in message
    assert "Interpolate or merge" in message
    assert not (tmp_path / "run").exists()  # nothing aligned, nothing written
