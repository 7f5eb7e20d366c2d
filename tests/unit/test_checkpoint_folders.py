"""Checkpoints as people have them: folders (one safetensors file, shards with their index, `pytorch_model.bin`,
sharded `.bin`), keys under a prefix the module does not use, the checks before a run over folders, and a
worker that reads paths itself (or sends back what it cannot reach)."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

import sweep
import sweep.checkpoint_keys as checkpoint_keys
import sweep.model as model
from sweep.checkpoint_keys import ModuleKeys, reading_for
from sweep.config import parse_config
from sweep.errors import ConfigError, WeightsError
from sweep.examples import digits
from sweep.model import (FOLDER_FILES, build_module, checkpoint_bytes, checkpoint_stamp, load_checkpoint,
                         load_into, read_weights_file)
from sweep.preflight import ModuleFit, plan_checked, read_entries
from sweep.studies import checkpoints as checkpoints_study
from sweep.studies.base import CandidateBatch, read_weights
from sweep.studies.checkpoints import Checkpoints, Config, FileContents, expand
from sweep.validate import Schema

DATA = digits.eval_batches(batch_size=300)


def digits_state(seed: int) -> dict:
    """A digits MLP's weights (64 → 64 → 10) from its own seed."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in digits.make_model().state_dict().items()}


def shards_of(state: dict, n: int) -> list:
    keys = list(state)
    return [{k: state[k] for k in keys[i::n]} for i in range(n)]


def safetensors_folder(folder: Path, state: dict, extras: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if extras:  # what save_pretrained writes beside the weights: never read
        (folder / "config.json").write_text('{"architectures": ["Nothing"], "broken": ')
        (folder / "tokenizer.json").write_text("not json either")
    return folder


def sharded_folder(folder: Path, state: dict, n: int = 3, fmt: str = "safetensors") -> Path:
    """`n` shards and their index, as save_pretrained writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    for i, part in enumerate(shards_of(state, n)):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.{suffix}"
        if fmt == "safetensors":
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    index = f"{stem}.{suffix}.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def bin_folder(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digits_config(tmp_path: Path, study: dict, **model_section):
    raw = {"name": "t", "model": {"factory": "sweep.examples.digits:make_model", **model_section},
           "data": {"loader": "sweep.examples.digits:eval_batches"},
           "metrics": {"function": "sweep.examples.digits:metrics"}, "study": study}
    return parse_config(raw, base_dir=tmp_path)


def study_config(paths, base: Path, check_files: bool = True) -> Config:
    return Config.model_validate({"kind": "checkpoints", "paths": paths},
                                 context={"base_dir": base, "check_files": check_files})


# --------------------------------------------------------------------------- the layouts of a folder

@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_each_layout_reads_the_tensors_it_was_written_with(tmp_path, layout):
    state = digits_state(1)
    folder = tmp_path / layout
    if layout == "safetensors":
        safetensors_folder(folder, state)
    elif layout == "sharded":
        sharded_folder(folder, state, 3)
    elif layout == "bin":
        bin_folder(folder, state)
    else:
        sharded_folder(folder, state, 2, fmt="bin")
    assert same(read_weights_file(folder), state)
    # the same through a file:// URI (pyarrow.fs, as s3:// would be read)
    assert same(read_weights_file(f"file://{folder}"), state)
    # and as the driver sends it to a worker that cannot reach the folder
    assert same(load_checkpoint(checkpoint_bytes(str(folder)), str(folder)), state)


def test_safetensors_come_first_and_the_log_says_which_file_is_read(tmp_path, caplog):
    first, other = digits_state(1), digits_state(2)
    folder = safetensors_folder(tmp_path / "both", first)
    bin_folder(folder, other)
    sharded_folder(folder, other, 2)  # model.safetensors.index.json beside model.safetensors: one file first
    model._said.clear()
    with caplog.at_level(logging.WARNING, logger="sweep"):
        assert same(read_weights_file(folder), first)
        read_weights_file(folder)
    said = [r.getMessage() for r in caplog.records if "is read" in r.getMessage()]
    assert said == [f"sweep: {folder} holds model.safetensors.index.json, pytorch_model.bin too; model.safetensors "
                    f"is read (safetensors first, as transformers does; said once for every folder like it)"]
    (folder / "model.safetensors").unlink()
    assert same(read_weights_file(folder), other)  # the shards before pytorch_model.bin
    for name in ("model.safetensors.index.json",):
        (folder / name).unlink()
    torch.save(first, folder / "pytorch_model.bin")
    assert same(read_weights_file(folder), first)


def test_a_folder_without_a_checkpoint_is_named_with_what_was_looked_for(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    looked = ", ".join(FOLDER_FILES)
    with pytest.raises(WeightsError) as e:
        read_weights_file(folder)
    assert str(e.value) == f"{folder}: a folder without a checkpoint: it holds none of {looked}"
    with pytest.raises(ValidationError) as e:
        study_config(["empty"], tmp_path)
    assert f"{folder} is a folder without a checkpoint: it holds none of {looked}" in str(e.value)
    with pytest.raises(ConfigError) as e:
        digits_config(tmp_path, {"kind": "checkpoints", "paths": ["*.safetensors"]}, weights="empty")
    assert "model.weights" in str(e.value) and f"{folder} is a folder without a checkpoint" in str(e.value)


def shard_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def write_index(folder: Path, index) -> None:
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


def test_a_broken_index_is_named(tmp_path):
    state = digits_state(3)
    folder = sharded_folder(tmp_path / "ck", state, 3)
    index_path = folder / "model.safetensors.index.json"
    good = shard_index(folder)
    shard0 = "model-00001-of-00003.safetensors"

    def refused(index) -> str:
        write_index(folder, index)
        with pytest.raises(WeightsError) as e:
            read_weights_file(folder)
        return str(e.value)

    assert refused("{not json").startswith(f"{index_path}: not an index of shards: not JSON")
    assert refused({"metadata": {}}) == (f"{index_path}: not an index of shards: expected a JSON object with a "
                                         f"non-empty 'weight_map' of key → shard file name")
    twice = json.dumps(good).replace('"weight_map": {', '"weight_map": {"0.bias": "x.safetensors", ')
    assert refused(twice) == f"{index_path}: lists '0.bias' twice: each key lies in one shard"
    assert refused({"weight_map": {**good["weight_map"], "0.bias": "../elsewhere.safetensors"}}) == (
        f"{index_path}: the shard of '0.bias' is '../elsewhere.safetensors', not a file name in the index's folder "
        f"(shards lie beside their index)")
    assert refused({"weight_map": {**good["weight_map"], "0.bias": "model.bin"}}) == (
        f"{index_path}: the shard of '0.bias' is 'model.bin', not a model.safetensors shard (.safetensors)")
    # a shard listed but not there
    missing = {"weight_map": {**good["weight_map"], "extra.weight": "model-00004-of-00003.safetensors"}}
    assert refused(missing) == f"{index_path}: lists the shard 'model-00004-of-00003.safetensors', which is not in the folder"
    # a key the shards hold that the map leaves out
    left_out = {k: v for k, v in good["weight_map"].items() if k != "0.weight"}
    holder = good["weight_map"]["0.weight"]
    assert refused({"weight_map": left_out}) == (
        f"{folder / holder}: holds '0.weight', which {index_path} does not list (its weight_map names the shard "
        f"of every key)")
    # a key the map places in another shard than the one holding it
    moved = {**good["weight_map"], "0.weight": shard0 if holder != shard0 else "model-00002-of-00003.safetensors"}
    assert f"holds '0.weight', which {index_path} places in" in refused({"weight_map": moved})
    # a key the map lists that its shard does not hold
    write_index(folder, {"weight_map": {**good["weight_map"], "ghost.weight": shard0}})
    with pytest.raises(WeightsError, match=f"lists 'ghost.weight' in {shard0}, which does not hold it"):
        read_weights_file(folder)
    # a key in two shards
    write_index(folder, good)
    second = "model-00002-of-00003.safetensors"
    part = shards_of(state, 3)[1]
    save_file({**part, "0.weight": state["0.weight"]}, str(folder / second))
    with pytest.raises(WeightsError) as e:
        read_weights_file(folder)
    assert holder == shard0  # read first: the second shard holding it is the one named
    assert str(e.value) == f"{folder}: '0.weight' is in two shards: {holder} and {second}"


def test_a_shard_cut_short_is_named_by_the_folder_and_the_shard(tmp_path):
    folder = sharded_folder(tmp_path / "ck", digits_state(4), 2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16])
    study = Checkpoints(study_config(["ck"], tmp_path))
    (cand,) = next(study.batches(4)).source.candidates()
    assert isinstance(cand, sweep.Invalid)
    assert cand.reason.startswith("ck/model-00002-of-00002.safetensors: truncated safetensors file")


# --------------------------------------------------------------------------- one candidate per folder

def test_a_checkpoints_study_over_folders_evaluates_each_as_a_plain_loop_does(tmp_path, reference, close):
    states = [digits_state(i) for i in range(5)]
    safetensors_folder(tmp_path / "runs" / "a", states[0])
    sharded_folder(tmp_path / "runs" / "b", states[1], 3)
    bin_folder(tmp_path / "runs" / "c", states[2])
    sharded_folder(tmp_path / "runs" / "d", states[3], 2, fmt="bin")
    save_file(states[4], str(tmp_path / "runs" / "e.safetensors"))  # a plain file beside them
    (tmp_path / "runs" / "logs").mkdir()  # a folder without a checkpoint: a glob leaves it out
    study = Checkpoints(study_config(["runs/*"], tmp_path))
    assert study.paths == [str(tmp_path / "runs" / n) for n in ("a", "b", "c", "d", "e.safetensors")]
    module = digits.make_model()
    rows = []
    for batch in study.batches(2):
        table = sweep.evaluate(module, batch.source.candidates(), DATA, digits.metrics)
        rows += table.to_pylist()
    want = reference(module, states, DATA, digits.metrics)
    assert [r["status"] for r in rows] == ["ok"] * 5
    for got, expected in zip(rows, want):
        close(got, expected)


def test_batches_hold_few_large_checkpoints(tmp_path, monkeypatch):
    for i in range(5):
        safetensors_folder(tmp_path / f"f{i}", digits_state(i), extras=False)
    size = (tmp_path / "f0" / "model.safetensors").stat().st_size
    study = Checkpoints(study_config(["f*"], tmp_path))
    assert [len(b) for b in study.batches(8)] == [5]
    monkeypatch.setattr(checkpoints_study, "MAX_BATCH_BYTES", 2 * size)
    assert [len(b) for b in study.batches(8)] == [2, 2, 1]
    monkeypatch.setattr(checkpoints_study, "MAX_BATCH_BYTES", size // 2)  # each larger than a batch: one a batch
    assert [len(b) for b in study.batches(8)] == [1] * 5


def test_uris_are_kept_as_they_are_and_read_where_the_candidates_are_made(tmp_path):
    state = digits_state(5)
    safetensors_folder(tmp_path / "ck", state)
    uri = f"file://{tmp_path / 'ck'}"
    config = study_config([uri, "file:///nowhere/at/all.safetensors"], tmp_path)
    assert config.paths == [uri, "file:///nowhere/at/all.safetensors"]  # not resolved, not checked
    batches = list(Checkpoints(config).batches(8))
    assert [len(b) for b in batches] == [1, 1]  # sizes the driver does not know: one a batch
    assert all(b.source.stamps == [None] and b.source.unreached() == [] for b in batches)  # the driver does not look
    (first,), (second,) = (b.source.candidates() for b in batches)
    assert same(first, state)
    assert isinstance(second, sweep.Invalid) and second.reason.startswith("file:///nowhere/at/all.safetensors: ")
    with pytest.raises(ValidationError, match="a URI is read as it is, not matched as a pattern"):
        study_config(["s3://bucket/run/*.safetensors"], tmp_path)


# --------------------------------------------------------------------------- key prefixes

class Wrapped(torch.nn.Module):
    """The digits MLP under `body.`, as a model with a head around its backbone names it."""

    def __init__(self):
        super().__init__()
        self.body = digits.make_model()

    def forward(self, x):
        return self.body(x)


def test_a_ddp_prefix_is_read_away_and_said_once(tmp_path, caplog, reference, close):
    state = digits_state(6)
    for i in range(2):
        safetensors_folder(tmp_path / f"ddp{i}", {f"module.{k}": v for k, v in state.items()})
    module = digits.make_model()
    checkpoint_keys._said.clear()
    study = Checkpoints(study_config(["ddp*"], tmp_path))
    with caplog.at_level(logging.WARNING, logger="sweep"), reading_for(ModuleKeys.of(module)):
        cands = next(study.batches(8)).source.candidates()
    assert all(same(c, state) for c in cands)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["sweep: ddp0: keys read without the prefix 'module.' (the same for every checkpoint like it; "
                    "said once)"]
    table = sweep.evaluate(module, cands, DATA, digits.metrics)
    close(table.to_pylist()[0], reference(module, [state], DATA, digits.metrics)[0])


def test_a_prefix_the_module_uses_is_added_and_model_weights_load_through_it(tmp_path):
    state = digits_state(7)
    folder = safetensors_folder(tmp_path / "bare", state)
    keys = ModuleKeys.of(Wrapped())
    mapping, error = keys.match(state)
    assert error is None and mapping.add == "body." and not mapping.strip
    with reading_for(keys):
        assert same(read_weights_file(folder), {f"body.{k}": v for k, v in state.items()})
    # the other way round: a wrapped checkpoint into the bare module
    wrapped = {f"body.{k}": v for k, v in state.items()}
    assert ModuleKeys.of(digits.make_model()).match(wrapped)[0].strip == "body."
    # model.weights: loaded (as build_module loads them) under the module's own names
    loaded = Wrapped()
    load_into(loaded, read_weights_file(folder), "model.weights")
    assert same({k: v.detach() for k, v in loaded.state_dict().items()}, wrapped)
    with pytest.raises(WeightsError, match="^model.weights does not fit the module: missing key 'body.2.bias'"):
        load_into(Wrapped(), {k: v for k, v in wrapped.items() if k != "body.2.bias"}, "model.weights")


def test_a_task_head_on_one_side_only_is_refused_naming_it_and_the_fix():
    body = digits_state(8)
    with_head = {**{f"body.{k}": v for k, v in body.items()}, "classifier.weight": torch.zeros(3, 10),
                 "classifier.bias": torch.zeros(3)}
    keys = ModuleKeys(Schema(digits.make_model()), (), "Bare")
    mapping, error = keys.match(with_head)
    assert not mapping
    assert error == ("its keys would fit Bare read without the prefix 'body.' but for the file's classifier.* (2 keys), "
                     "which the module lacks: the checkpoint holds a task head the module lacks: build the model "
                     "class it was saved from (transformers: the one under `architectures` in its config.json) in "
                     "model.factory, or leave the head out of the file")

    class Headed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = digits.make_model()
            self.lm_head = torch.nn.Linear(10, 5)

    mapping, error = ModuleKeys.of(Headed()).match(body)
    assert not mapping and error.startswith("its keys would fit Headed read with the prefix 'body.' but for the "
                                            "module's lm_head.* (2 keys), which the file lacks: the module has a "
                                            "task head the checkpoint lacks")
    # a head alone that differs, the rest as it is
    other = {**{f"body.{k}": v for k, v in body.items()}, "cls.weight": torch.zeros(5, 10)}
    mapping, error = ModuleKeys.of(Headed()).match(other)
    assert error.startswith("its keys fit Headed but for the file's cls.weight, which the module lacks and the "
                            "module's lm_head.* (2 keys), which the file lacks: the checkpoint's task head is not")
    with pytest.raises(WeightsError, match=r"^h\.safetensors: its keys would fit Headed read with the prefix"):
        checkpoint_keys.fit_keys(dict(body), ModuleKeys.of(Headed()), "h.safetensors")


def test_two_prefixes_that_fit_are_refused_rather_than_guessed():
    class Twice(torch.nn.Module):
        """One layer under two names (tied): `a.` and `b.` both make a bare file fit."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)
            self.b = self.a

    mapping, error = ModuleKeys.of(Twice()).match({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    assert not mapping and error == ("its keys fit Twice read with the prefix 'a.' or read with the prefix 'b.': "
                                     "which is meant cannot be told; save the checkpoint with the module's own keys")


def test_keys_that_fit_no_prefix_are_left_to_validation_to_name():
    module = digits.make_model()
    odd = {"0.weight": torch.zeros(64, 64), "zz.bias": torch.zeros(64), "2.weight": torch.zeros(10, 64),
           "2.bias": torch.zeros(10)}
    mapping, error = ModuleKeys.of(module).match(odd)
    assert not mapping and error is None
    table = sweep.evaluate(module, [checkpoint_keys.fit_keys(odd, ModuleKeys.of(module), "x")], DATA, digits.metrics)
    assert "missing key '0.bias'" in table.to_pylist()[0]["error"]


def test_a_candidate_whose_head_differs_is_an_invalid_row_naming_the_head(tmp_path):
    body = digits_state(9)
    safetensors_folder(tmp_path / "headed", {**body, "score.weight": torch.zeros(2, 10)})
    study = Checkpoints(study_config(["headed"], tmp_path))
    module = digits.make_model()
    with reading_for(ModuleKeys.of(module)):
        (cand,) = next(study.batches(2)).source.candidates()
    assert isinstance(cand, sweep.Invalid)
    assert cand.reason.startswith("headed: its keys fit Sequential but for the file's score.weight, which the module "
                                  "lacks: the checkpoint holds a task head the module lacks")


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0)


def test_gpt2_folders_with_and_without_their_head_read_into_either_class(tmp_path):
    transformers, config = tiny_gpt2()
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config)
    lm.save_pretrained(tmp_path / "lm")  # transformer.* keys, the tied lm_head left out
    assert "lm_head.weight" not in read_weights_file(tmp_path / "lm")
    bare = build_module("transformers:GPT2Model", {"config": config}, read_weights_file(tmp_path / "lm"))
    assert torch.equal(bare.wte.weight, lm.transformer.wte.weight)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "bare")
    headed = build_module("transformers:GPT2LMHeadModel", {"config": config}, read_weights_file(tmp_path / "bare"))
    assert headed.lm_head.weight is headed.transformer.wte.weight  # one of a tied pair fills both
    # an older GPT-2 checkpoint with its attention masks (`attn.bias`): left out, as the class says
    state = {k: v for k, v in read_weights_file(tmp_path / "lm").items()}
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    mapping, error = ModuleKeys.of(lm).match(state)
    assert error is None and mapping.drop == {"transformer.h.0.attn.bias"}
    assert "transformer.h.0.attn.bias" not in mapping.apply(state)


def test_bert_base_into_a_classifier_names_the_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    classifier = transformers.BertForSequenceClassification(config)
    with reading_for(ModuleKeys.of(classifier)), pytest.raises(WeightsError) as e:
        read_weights_file(tmp_path / "bert")
    assert str(e.value).startswith(f"{tmp_path / 'bert'}: its keys would fit BertForSequenceClassification read "
                                   f"with the prefix 'bert.' but for the module's classifier.* (2 keys), which the "
                                   f"file lacks: the module has a task head the checkpoint lacks")


# --------------------------------------------------------------------------- the checks before a run

def test_preflight_reads_every_shard_header_and_no_tensor_data(tmp_path):
    state = {f"layer{i}.weight": torch.zeros(1024, 1024) for i in range(4)}  # 16 MB in 2 shards
    folder = sharded_folder(tmp_path / "big", state, 2)
    tracemalloc.start()
    try:
        entries = read_entries(str(folder))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entries == {k: ((1024, 1024), "float32") for k in state}
    assert peak < 1 * 2**20, f"reading the headers took {peak:,} bytes"
    # the index held against the shards from their headers alone
    index = shard_index(folder)
    del index["weight_map"]["layer0.weight"]
    write_index(folder, index)
    with pytest.raises(WeightsError, match="holds 'layer0.weight', which .* does not list"):
        read_entries(str(folder))


def test_preflight_over_candidate_folders_and_anchors(tmp_path):
    good = digits_state(10)
    safetensors_folder(tmp_path / "ck" / "good", good)
    sharded_folder(tmp_path / "ck" / "ddp", {f"module.{k}": v for k, v in good.items()}, 2)
    narrow = {k: v[:32] if k.startswith("0.") else v[:, :32].contiguous() if k == "2.weight" else v
              for k, v in good.items()}
    safetensors_folder(tmp_path / "ck" / "narrow", narrow)
    safetensors_folder(tmp_path / "ck" / "headed", {**good, "lm_head.weight": torch.zeros(3, 10)})
    config = digits_config(tmp_path, {"kind": "checkpoints", "paths": ["ck/*"]})
    warnings = plan_checked(config).warnings
    assert warnings[0].startswith("2 of 4 candidate files")
    assert any(line.startswith("  narrow: does not fit the module built by sweep.examples.digits:make_model: "
                               "0.weight: module has shape (64×64) float32, file has shape (32×64) float32")
               for line in warnings)
    assert any(line.startswith("  headed: does not fit the module built by sweep.examples.digits:make_model: its "
                               "keys fit Sequential but for the file's lm_head.weight") for line in warnings)
    assert len(warnings) == 3  # the ddp folder fits once its prefix is read away
    # anchors: a folder endpoint that does not fit is a config error naming the field and the folder
    interpolate = {"kind": "interpolate", "endpoints": ["ck/good", "ck/narrow"], "alphas": [0.5]}
    with pytest.raises(ConfigError, match=r"^study\.endpoints\[1\] .*ck/narrow does not fit the module"):
        plan_checked(digits_config(tmp_path, interpolate))
    # and one under a prefix is read away before the study takes it
    interpolate["endpoints"] = ["ck/good", "ck/ddp"]
    study = plan_checked(digits_config(tmp_path, interpolate)).study
    assert len(study) == 3  # 0.5 and both endpoints
    with reading_for(ModuleFit.of(digits_config(tmp_path, interpolate))[0].keys):
        assert same(read_weights(str(tmp_path / "ck" / "ddp"), "study.endpoints[1]"), good)
    with pytest.raises(ConfigError, match=r"^study\.base: .*headed: its keys fit Sequential but for"):
        with reading_for(ModuleKeys.of(digits.make_model())):
            read_weights(str(tmp_path / "ck" / "headed"), "study.base")


# --------------------------------------------------------------------------- workers that read paths themselves

def test_a_worker_reads_what_it_sees_as_the_driver_did_and_sends_back_the_rest(tmp_path):
    states = [digits_state(i) for i in range(3)]
    safetensors_folder(tmp_path / "a", states[0])
    sharded_folder(tmp_path / "b", states[1], 2)
    save_file(states[2], str(tmp_path / "c.safetensors"))
    study = Checkpoints(study_config(["a", "b", "c.safetensors"], tmp_path))
    batch = next(study.batches(8))
    source = batch.source
    assert source.contents == [None, None, None]  # the driver read nothing
    assert source.stamps == [checkpoint_stamp(str(tmp_path / n)) for n in ("a", "b", "c.safetensors")]
    assert source.unreached() == []
    # other files at the same path (another node's disk): a shard rewritten since the driver looked
    shard = tmp_path / "b" / "model-00002-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    (tmp_path / "c.safetensors").unlink()  # and one gone
    assert source.unreached() == [1, 2]
    rest = batch.take([1, 2])
    assert rest.ids == [1, 2] and rest.columns["path"] == [str(tmp_path / "b"), str(tmp_path / "c.safetensors")]
    shipped = rest.source.shipped()  # what the driver sends: read there
    assert isinstance(shipped.contents[0], dict) and sorted(shipped.contents[0]) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert shipped.contents[1] == f"{tmp_path / 'c.safetensors'}: cannot read: No such file or directory"
    assert shipped.unreached() == []
    b, c = shipped.candidates()
    assert same(b, states[1])
    assert c == sweep.Invalid(f"{tmp_path / 'c.safetensors'}: cannot read: No such file or directory")


def test_take_cuts_a_batch_at_any_positions():
    source = FileContents(["a", "b", "c", "d"], [None, b"x", "why", None], [None] * 4)
    batch = CandidateBatch([10, 11, 12, 13], {"path": ["a", "b", "c", "d"]}, source, meta={"n": 4, "k": [1, 2, 3, 4]})
    cut = batch.take([3, 1])
    assert cut.ids == [13, 11] and cut.columns == {"path": ["d", "b"]} and cut.meta == {"n": 4, "k": [4, 2]}
    assert cut.source.names == ["d", "b"] and cut.source.contents == [None, b"x"]


def test_expand_keeps_listed_folders_and_globbed_checkpoint_folders(tmp_path):
    safetensors_folder(tmp_path / "x" / "one", digits_state(0))
    (tmp_path / "x" / "notes").mkdir()
    assert expand([str(tmp_path / "x" / "*")]) == [str(tmp_path / "x" / "one")]
    assert expand([str(tmp_path / "x" / "one"), str(tmp_path / "x" / "*")]) == [str(tmp_path / "x" / "one")]


# --------------------------------------------------------------------------- a local safetensors file, read straight into its tensors

def test_a_safetensors_file_is_read_as_safetensors_reads_it(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
               "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(6).reshape(2, 3),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "u8": torch.arange(5, dtype=torch.uint8)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = model.read_safetensors_file(str(path))
    want = load_file(str(path))
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def safetensors_raw(entries: dict, body: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return len(header).to_bytes(8, "little") + header + body


@pytest.mark.parametrize("entries, body, expected", [
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8,
     "key 'a' begins at byte 4 of the data, where the tensor before it ends at 0: tensors lie end to end"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8,
     "key 'b' begins at byte 4 of the data, where the tensor before it ends at 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12,
     "its tensors take 4 bytes after the header, the file holds 12"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8,
     "truncated safetensors file: its tensors need 16 bytes after the header, the file holds 8"),
], ids=["gap", "overlap", "left-over", "truncated"])
def test_a_safetensors_file_whose_tensors_do_not_tile_its_data_is_refused(tmp_path, entries, body, expected):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_raw(entries, bytes(body)))
    with pytest.raises(WeightsError) as e:
        model.read_safetensors_file(str(path), "x.safetensors")
    assert str(e.value).startswith("x.safetensors: ") and expected in str(e.value)
    with pytest.raises(WeightsError):  # safetensors' own parser refuses the same bytes
        model.load_weights(path.read_bytes(), "x.safetensors")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_a_safetensors_file_takes_the_memory_of_its_tensors_alone(tmp_path):
    """A 64 MB file: reading it whole and parsing the bytes would peak at two or three times that."""
    import subprocess
    import sys

    path = tmp_path / "big.safetensors"
    save_file({"a": torch.zeros(8 * 2**20), "b": torch.ones(8 * 2**20)}, str(path))
    script = (
        "import sys, torch\n"
        "from sweep.model import read_safetensors_file\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))\n"
        "before = status('VmRSS:')\n"
        "got = read_safetensors_file(sys.argv[1])\n"
        "assert float(got['b'].sum()) == 8 * 2**20\n"
        "print(status('VmHWM:') - before)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    grew = int(proc.stdout.split()[-1])
    size = path.stat().st_size
    assert grew < 1.25 * size, f"reading a {size:,}-byte file took {grew:,} bytes more"
