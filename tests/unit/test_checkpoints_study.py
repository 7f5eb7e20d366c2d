"""The `checkpoints` study: files in a stable order, bad files as invalid candidates, and the
digits example checkpoints evaluating as expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import save_file

import sweep
from sweep.config import load_config
from sweep.examples import digits
from sweep.studies import STUDIES, plan
from sweep.studies.checkpoints import Checkpoints, Config, FileContents

COMMITTED = Path(digits.__file__).with_name("checkpoints")


def study_config(paths, base_dir: Path) -> Config:
    return Config.model_validate({"kind": "checkpoints", "paths": paths}, context={"base_dir": base_dir})


def tiny_files(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        path = folder / name
        save_file({"weight": torch.full((1, 2), float(i)), "bias": torch.zeros(1)}, str(path))
        out.append(path)
    return out


def all_batches(study, batch_size, skip=frozenset()):
    return list(study.batches(batch_size, skip))


def test_checkpoints_is_registered():
    assert "checkpoints" in STUDIES


def test_batches_give_ids_and_paths_in_order(tmp_path):
    tiny_files(tmp_path / "ck", ["c.safetensors", "a.safetensors", "e.safetensors", "b.safetensors", "d.safetensors"])
    study = Checkpoints(study_config(["ck/*.safetensors"], tmp_path))
    assert len(study) == 5
    assert study.columns == {"path": pa.string()}
    batches = all_batches(study, 2)
    assert [b.ids for b in batches] == [[0, 1], [2, 3], [4]]
    assert [len(b) for b in batches] == [2, 2, 1]
    paths = [p for b in batches for p in b.columns["path"]]
    assert paths == [str(tmp_path / "ck" / f"{c}.safetensors") for c in "abcde"]
    # each batch's candidates are the files' tensors, in the same order
    weights = [c["weight"][0, 0].item() for b in batches for c in b.source.candidates()]
    order = ["c", "a", "e", "b", "d"]  # file i holds value i
    assert weights == [float(order.index(c)) for c in "abcde"]


@pytest.mark.parametrize("batch_size", [1, 3, 5, 100])
def test_batch_sizes_cover_every_id_once(tmp_path, batch_size):
    tiny_files(tmp_path, [f"{i:02d}.safetensors" for i in range(5)])
    study = Checkpoints(study_config(["*.safetensors"], tmp_path))
    batches = all_batches(study, batch_size)
    assert [i for b in batches for i in b.ids] == [0, 1, 2, 3, 4]
    assert all(len(b) <= batch_size for b in batches)


def test_skip_leaves_ids_out(tmp_path):
    tiny_files(tmp_path, [f"{i}.safetensors" for i in range(5)])
    study = Checkpoints(study_config(["*.safetensors"], tmp_path))
    batches = all_batches(study, 2, frozenset({1, 3}))
    assert [b.ids for b in batches] == [[0, 2], [4]]
    assert [p for b in batches for p in b.columns["path"]] == [str(tmp_path / f"{i}.safetensors") for i in (0, 2, 4)]


def test_pattern_order_kept_and_each_file_once(tmp_path):
    tiny_files(tmp_path, ["a.safetensors", "b.safetensors", "z.safetensors"])
    study = Checkpoints(study_config(["z.safetensors", "*.safetensors", "a.safetensors"], tmp_path))
    assert study.paths == [str(tmp_path / n) for n in ("z.safetensors", "a.safetensors", "b.safetensors")]
    assert len(study) == 3


def test_file_deleted_after_planning_is_an_invalid_candidate(tmp_path):
    files = tiny_files(tmp_path, ["a.safetensors", "b.safetensors", "c.safetensors"])
    study = Checkpoints(study_config(["*.safetensors"], tmp_path))
    files[1].unlink()
    batches = all_batches(study, 10)  # must not raise
    cands = batches[0].source.candidates()
    assert len(cands) == 3
    assert isinstance(cands[1], sweep.Invalid)
    assert str(files[1]) in cands[1].reason
    assert isinstance(cands[0], dict) and isinstance(cands[2], dict)

    module = torch.nn.Linear(2, 1)
    table = sweep.evaluate(module, cands, [(torch.ones(3, 2), torch.ones(3))], lambda o, y: {"m": o.mean()})
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "invalid", "ok"]
    assert str(files[1]) in rows[1]["error"]
    assert rows[2]["m"] == pytest.approx(4.0)  # file c holds weight 2 → 2 * (1 + 1)


def test_corrupt_and_unsupported_files_are_invalid_candidates(tmp_path):
    files = tiny_files(tmp_path, ["a.safetensors", "b.safetensors"])
    whole = files[1].read_bytes()
    files[1].write_bytes(whole[: len(whole) // 2])
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file at all, just text")
    study = Checkpoints(study_config(["*.safetensors"], tmp_path))
    cands = all_batches(study, 10)[0].source.candidates()
    assert isinstance(cands[0], dict)
    assert isinstance(cands[1], sweep.Invalid) and "b.safetensors" in cands[1].reason
    assert isinstance(cands[2], sweep.Invalid) and "c.safetensors" in cands[2].reason


def test_file_contents_with_read_error_and_unknown_suffix():
    source = FileContents(["/x/a.safetensors", "/x/b.ckpt"], ["/x/a.safetensors: cannot read: gone", b"abc"])
    cands = source.candidates()
    assert cands[0] == sweep.Invalid("/x/a.safetensors: cannot read: gone")
    assert isinstance(cands[1], sweep.Invalid) and "b.ckpt" in cands[1].reason


def test_plan_from_a_loaded_config(tmp_path):
    tiny_files(tmp_path / "ck", ["x.safetensors", "y.safetensors"])
    raw = {
        "name": "plan",
        "model": {"factory": "sweep.examples.digits:make_model"},
        "data": {"loader": "sweep.examples.digits:eval_batches"},
        "metrics": {"function": "sweep.examples.digits:metrics"},
        "study": {"kind": "checkpoints", "paths": ["ck/*.safetensors"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = plan(load_config(path).study)
    assert isinstance(study, Checkpoints)
    assert study.paths == [str(tmp_path / "ck" / "x.safetensors"), str(tmp_path / "ck" / "y.safetensors")]


# --------------------------------------------------------------------------- the digits example


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-ckpt")
    paths = digits.write_checkpoints(out)
    return out, paths


def _evaluate_study(folder: Path, reference):
    study = Checkpoints(study_config([str(folder / "*.safetensors")], folder))
    module = digits.make_model()
    data = digits.eval_batches(batch_size=120)  # 120 ×4 + 20: unequal batches
    rows, cands_ok = [], []
    for batch in study.batches(3):
        cands = batch.source.candidates()
        table = sweep.evaluate(module, cands, data, digits.metrics)
        for path, cand, row in zip(batch.columns["path"], cands, table.to_pylist()):
            rows.append((Path(path).name, row))
            if row["status"] == "ok":
                cands_ok.append((Path(path).name, cand))
    want = dict(zip([n for n, _ in cands_ok], reference(module, [c for _, c in cands_ok], data, digits.metrics)))
    return dict(rows), want


def test_written_digits_checkpoints_evaluate(written, reference, close):
    folder, paths = written
    names = {p.name for p in paths}
    expected_trained = {f"{stem}.safetensors" for stem, *_ in digits.RECIPES}
    assert expected_trained <= names
    assert {"bad-hidden32.safetensors", "bad-truncated.safetensors"} <= names
    rows, want = _evaluate_study(folder, reference)
    assert set(rows) == names
    for name in expected_trained:
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        assert row["accuracy"] > 0.8, (name, row["accuracy"])
        close(row, want[name])
    assert rows["bad-hidden32.safetensors"]["status"] == "invalid"
    assert "(32×64)" in rows["bad-hidden32.safetensors"]["error"]
    assert rows["bad-truncated.safetensors"]["status"] == "invalid"
    assert "truncated" in rows["bad-truncated.safetensors"]["error"]
    # more training helps: 30 epochs do at least as well as 2
    assert rows["seed0-epoch30.safetensors"]["accuracy"] >= rows["seed0-epoch02.safetensors"]["accuracy"]


def test_committed_digits_checkpoints_evaluate(reference, close, tmp_path):
    folder = tmp_path / "committed"
    shutil.copytree(COMMITTED, folder)
    rows, want = _evaluate_study(folder, reference)
    assert len(rows) == 7
    ok = {n for n, r in rows.items() if r["status"] == "ok"}
    assert ok == {f"{stem}.safetensors" for stem, *_ in digits.RECIPES}
    for name in ok:
        assert rows[name]["accuracy"] > 0.8
        close(rows[name], want[name])
    assert {n for n, r in rows.items() if r["status"] == "invalid"} == {
        "bad-hidden32.safetensors", "bad-truncated.safetensors"}
