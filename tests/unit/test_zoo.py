"""sweep.zoo: transformers models built offline from local configs, torchvision models by name, the config's
`model.transformers` / `model.torchvision`, and the four families (GPT-2, BERT, ViT, a ResNet-18-shaped
ResNet) evaluated through `sweep.evaluate` with recipes and explicit dicts, equal to a plain functional_call
loop. Tiny configs (hidden 32, 2 layers) keep each test to a second or two."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import sweep
from sweep import bench, zoo
from sweep.config import load_config, parse_config
from sweep.errors import ConfigError
from sweep.evaluator import Evaluator
from sweep.examples import zoo as Z
from sweep.model import build_module, read_weights_file
from sweep.validate import Schema


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - torchvision built for another torch raises RuntimeError on import
        return False
    return True


HAS_TRANSFORMERS = _importable("transformers")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
#: Relative tolerance of every comparison with the functional_call loop (fp32), and the absolute floor.
RTOL, ATOL = 1e-5, 1e-6
#: Each family: its data and metrics (sweep.examples.zoo).
FAMILIES = {
    "gpt2": (lambda: Z.token_batches(), Z.causal_lm),
    "bert": (lambda: Z.label_batches(), Z.classification),
    "vit": (lambda: Z.image_batches(size=16), Z.classification),
    "resnet": (lambda: Z.image_batches(size=32), Z.classification),
}


def built(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Z.tiny(kind, **overrides)


def rows_equal(table, expected, metrics=("loss", "accuracy")) -> None:
    """Every row ok and each metric equal to the reference loop's (RTOL relative, ATOL absolute)."""
    assert table.column("status").to_pylist() == ["ok"] * len(expected), table.column("error").to_pylist()
    for name in metrics:
        got = table.column(name).to_pylist()
        want = [row[name] for row in expected]
        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), name


def loop_warnings(caught) -> list:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# --------------------------------------------------------------------------- transformers_model


@needs_transformers
def test_a_config_file_or_its_folder_builds_the_model_under_the_callers_seed(tmp_path):
    file = Z.write_config("gpt2", tmp_path / "gpt2")
    torch.manual_seed(7)
    from_file = zoo.transformers_model(file)
    torch.manual_seed(7)
    from_folder = zoo.transformers_model(str(file.parent))
    torch.manual_seed(8)
    other_seed = zoo.transformers_model(file)

    assert type(from_file).__name__ == "GPT2LMHeadModel"  # config.architectures[0]
    assert not from_file.training and not any(m.training for m in from_file.modules())
    assert from_file.config._attn_implementation == "eager"
    assert from_file.config.use_cache is False
    assert from_file.lm_head.weight is from_file.transformer.wte.weight  # tied as transformers ties them
    state, folder_state = from_file.state_dict(), from_folder.state_dict()
    assert all(torch.equal(state[k], folder_state[k]) for k in state)
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"],
                           other_seed.state_dict()["transformer.h.0.attn.c_attn.weight"])


@needs_transformers
def test_auto_class_overrides_and_dtype(tmp_path):
    file = Z.write_config("gpt2", tmp_path / "gpt2")
    bare = zoo.transformers_model(file, auto_class="AutoModel")
    assert type(bare).__name__ == "GPT2Model"
    assert zoo.transformers_model(file, auto_class="GPT2LMHeadModel", n_layer=1).config.n_layer == 1
    no_architectures = Z.write_config("gpt2", tmp_path / "plain", architectures=None)
    assert type(zoo.transformers_model(no_architectures)).__name__ == "GPT2Model"

    bert = zoo.transformers_model(Z.write_config("bert", tmp_path / "bert"), num_labels=5, dtype="bfloat16")
    assert bert.classifier.weight.shape == (5, 32)
    assert bert.classifier.weight.dtype == torch.bfloat16
    assert bert.bert.embeddings.position_ids.dtype == torch.int64  # integer buffers keep their dtype
    sdpa = zoo.transformers_model(file, attn_implementation="sdpa", use_cache=True)
    assert sdpa.config._attn_implementation == "sdpa" and sdpa.config.use_cache is True

    with pytest.raises(TypeError, match=r"'n_layers' is not a setting of GPT2Config .*did you mean 'n_layer'"):
        zoo.transformers_model(file, n_layers=1)
    with pytest.raises(ValueError, match=r"dtype should be one of float32, float16, bfloat16, float64, got 'half'"):
        zoo.transformers_model(file, dtype="half")


def test_a_missing_path_is_named_and_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # the path is checked before transformers is needed
    with pytest.raises(FileNotFoundError) as e:
        zoo.transformers_model("openai-community/gpt2")
    text = str(e.value)
    assert "openai-community/gpt2: no such file or folder" in text
    assert "looks like a Hugging Face Hub id, and sweep never downloads" in text
    assert "hf download openai-community/gpt2 --local-dir DIR" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no config.json"):
        zoo.transformers_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"nothere.json: no such file or folder") as e:
        zoo.transformers_model(tmp_path / "nothere.json")
    assert "Hub id" not in str(e.value)


def test_config_files_that_are_not_transformers_configs_are_named(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    with pytest.raises(ValueError, match=r"bad.json: not valid JSON: Expecting value at line 1, column 1"):
        zoo.read_config_dict(write("bad.json", "not json"))
    with pytest.raises(ValueError, match=r"list.json: a transformers config is a JSON object of settings, got list"):
        zoo.read_config_dict(write("list.json", "[1, 2]"))
    with pytest.raises(ValueError, match=r"untyped.json: no 'model_type'"):
        zoo.read_config_dict(write("untyped.json", json.dumps({"n_embd": 32})))


@needs_transformers
def test_model_types_and_classes_transformers_lacks_are_refused(tmp_path):
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"model_type": "gtp2", "auto_map": {"AutoModel": "modeling.MyModel"}}))
    with pytest.raises(ValueError, match=r"model_type 'gtp2' is not one transformers .* knows \(did you mean "
                                         r"'gpt2'\?\); sweep builds only transformers' own models"):
        zoo.transformers_model(custom)
    gpt2 = Z.write_config("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"auto_class 'AutoModelForCasualLM' is not a model class of transformers "
                                         r".*did you mean 'AutoModelForCausalLM'"):
        zoo.transformers_model(gpt2, auto_class="AutoModelForCasualLM")
    with pytest.raises(ValueError) as e:
        zoo.transformers_model(gpt2, auto_class="AutoModelForImageClassification")
    assert str(e.value).startswith("AutoModelForImageClassification cannot build the model of ")
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    with pytest.raises(ValueError, match=r"BertModel takes a BertConfig, and .* is a GPT2Config"):
        zoo.transformers_model(gpt2, auto_class="BertModel")


def test_without_transformers_the_error_names_the_extra(tmp_path, monkeypatch):
    file = tmp_path / "config.json"
    file.write_text(json.dumps(Z.TINY["gpt2"]))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError) as e:
        zoo.transformers_model(file)
    assert "needs the optional package transformers, which is not installed" in str(e.value)
    assert str(e.value).endswith("pip install 'sweep[transformers]'")
    # and sweep itself, its config and its bench still import and build their own models
    assert bench.missing_requirement(next(s for s in bench.MODELS if s.name.startswith("gpt2-small"))).startswith(
        "not measured: transformers is not importable")
    assert bench.missing_requirement(bench.MODELS[0]) is None


# --------------------------------------------------------------------------- torchvision_model


def test_without_torchvision_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"needs the optional package torchvision, which is not installed .*"
                                          r": pip install 'sweep\[torchvision\]'$"):
        zoo.torchvision_model("resnet18")


def test_a_torchvision_that_fails_to_import_is_named_with_its_error(tmp_path, monkeypatch):
    """What PyPI's torchvision 0.28.0 wheel does on a CPU-only torch: it is installed, and its import raises."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(ImportError) as e:
        zoo.torchvision_model("resnet18")
    assert "torchvision, which is installed but fails to import (RuntimeError: operator torchvision::nms does not " \
           "exist): pip install 'sweep[torchvision]'" in str(e.value)


def test_torchvision_models_are_built_without_weights(tmp_path, monkeypatch):
    """torchvision's `get_model` API (a stand-in package: the real one cannot import on this machine): weights=None
    always, and weights_backbone=None for a model that would fetch a backbone's by default."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text("from . import models\n__version__ = '0.28.0'\n")
    (package / "models.py").write_text(textwrap.dedent("""
        import torch
        calls = []

        def resnet18(*, weights=None, progress=True, num_classes=1000):
            return torch.nn.Linear(2, num_classes)

        def fasterrcnn(*, weights=None, progress=True, weights_backbone="IMAGENET1K_V1"):
            return torch.nn.Linear(2, 2)

        BUILDERS = {"resnet18": resnet18, "fasterrcnn": fasterrcnn}

        def list_models():
            return sorted(BUILDERS)

        def get_model_builder(name):
            if name not in BUILDERS:
                raise ValueError(f"Unknown model {name}")
            return BUILDERS[name]

        def get_model(name, **config):
            calls.append((name, config))
            return get_model_builder(name)(**config)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    module = zoo.torchvision_model("resnet18", num_classes=10)
    assert isinstance(module, torch.nn.Linear) and module.out_features == 10 and not module.training
    zoo.torchvision_model("fasterrcnn")
    calls = sys.modules["torchvision.models"].calls
    assert calls == [("resnet18", {"weights": None, "num_classes": 10}),
                     ("fasterrcnn", {"weights": None, "weights_backbone": None})]
    with pytest.raises(ValueError, match=r"has no model 'resnet81'.*did you mean 'resnet18'"):
        zoo.torchvision_model("resnet81")
    with pytest.raises(ValueError, match=r"with weights=None: sweep never downloads weights"):
        zoo.torchvision_model("resnet18", weights="IMAGENET1K_V1")


@pytest.mark.skipif(not _importable("torchvision"), reason="torchvision does not import here")
def test_a_real_torchvision_resnet18(reference):
    torch.manual_seed(0)
    module = zoo.torchvision_model("resnet18", num_classes=3)
    data, metrics = Z.image_batches(size=32), Z.classification
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    dicts = [{n: t * (1 + 0.01 * k) for n, t in base.items()} for k in range(2)]
    rows_equal(sweep.evaluate(module, dicts, data, metrics, chunk_size=2), reference(module, dicts, data, metrics))


# --------------------------------------------------------------------------- the four families through evaluate


@needs_transformers
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_family_under_a_recipe_and_as_dicts_equals_the_functional_call_loop(kind, reference, snap):
    make_data, metrics = FAMILIES[kind]
    module, data = built(kind), make_data()
    before = snap(module)
    a = {n: p.detach().clone() for n, p in module.named_parameters()}
    g = torch.Generator().manual_seed(1)
    d = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in a.items()}
    alphas = [0.0, 0.5, 1.0, 1.5]
    dicts = [{n: a[n] + alpha * d[n] for n in a} for alpha in alphas]
    expected = reference(module, dicts, data, metrics)
    assert len({round(row["loss"], 6) for row in expected}) == len(alphas)  # the candidates differ

    # The recipe in one vmapped chunk: the module vmaps, no fallback, no warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluator = Evaluator(module, data, metrics, chunk_size=len(alphas))
        table = evaluator.run(sweep.Affine(a, [d], torch.tensor(alphas)[:, None], names=["alpha"]))
        evaluator.restore()
    assert evaluator.strategy == "vmap" and not loop_warnings(caught)
    assert table.column("alpha").to_pylist() == alphas
    rows_equal(table, expected)

    # The same candidates as explicit dicts, the chunk size measured (vmap or the loop, whichever is faster).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows_equal(sweep.evaluate(module, dicts, data, metrics), expected)
    assert not loop_warnings(caught)
    snap.check(module, before)


# --------------------------------------------------------------------------- tied weights and buffers


@needs_transformers
def test_gpt2_tied_weights_one_name_is_enough_two_names_must_agree(tmp_path, reference):
    module, data, metrics = built("gpt2"), Z.token_batches(), Z.causal_lm
    torch.manual_seed(3)
    other = {n: p.detach().clone() for n, p in Z.tiny("gpt2").named_parameters()}
    full = {n: t.clone() for n, t in other.items()} | {"lm_head.weight": other["transformer.wte.weight"].clone()}
    assert set(Schema(module).by_alias["lm_head.weight"].aliases) == {"transformer.wte.weight", "lm_head.weight"}

    without_head = {n: t for n, t in full.items() if n != "lm_head.weight"}  # as save_pretrained writes it
    only_head = {n: t for n, t in full.items() if n != "transformer.wte.weight"}
    differ = dict(full, **{"lm_head.weight": full["lm_head.weight"] + 0.1})
    # functional_call takes one name of a tied pair (two tensors for it are refused even when equal)
    expected = reference(module, [without_head], data, metrics)[0]

    # save_pretrained's own file leaves the tied head out; and a safetensors file of the state dict without it
    module.save_pretrained(tmp_path / "saved")
    saved = read_weights_file(tmp_path / "saved" / "model.safetensors")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    from safetensors.torch import save_file

    save_file(without_head, str(tmp_path / "no-head.safetensors"))
    from_file = read_weights_file(tmp_path / "no-head.safetensors")

    table = sweep.evaluate(module, [full, without_head, only_head, from_file, differ, saved], data, metrics)
    status = table.column("status").to_pylist()
    assert status == ["ok", "ok", "ok", "ok", "invalid", "ok"]
    for i in range(4):
        assert table.column("loss")[i].as_py() == pytest.approx(expected["loss"], rel=RTOL, abs=ATOL)
    assert table.column("loss")[5].as_py() == pytest.approx(reference(module, [saved], data, metrics)[0]["loss"],
                                                            rel=RTOL, abs=ATOL)
    error = table.column("error")[4].as_py()
    assert error == ("tied weights 'transformer.wte.weight' and 'lm_head.weight' are one tensor in the module but "
                     "were given different values; give one of them, or equal values")
    assert sweep.check_candidate(module, differ) == error
    assert sweep.check_candidate(module, without_head) is None


@needs_transformers
def test_bert_masked_lm_ties_its_decoder_to_the_word_embeddings():
    torch.manual_seed(0)
    module = Z.tiny("bert", architectures=["BertForMaskedLM"])
    schema = Schema(module)
    slot = schema.by_alias["cls.predictions.decoder.weight"]
    assert slot.name == "bert.embeddings.word_embeddings.weight"
    state = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert sweep.check_candidate(module, state) is None
    both = dict(state, **{"cls.predictions.decoder.weight": state["bert.embeddings.word_embeddings.weight"] * 2})
    assert "'bert.embeddings.word_embeddings.weight' and 'cls.predictions.decoder.weight'" in \
        sweep.check_candidate(module, both)


@needs_transformers
def test_bert_non_persistent_buffers_default_to_the_modules_own(reference):
    module, data, metrics = built("bert"), Z.label_batches(), Z.classification
    buffers = dict(module.named_buffers())
    assert {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"} <= set(buffers)
    state = module.state_dict()  # what a checkpoint holds: the non-persistent buffers are not in it
    assert "bert.embeddings.position_ids" not in state
    candidate = {n: t.clone() * 1.01 if t.is_floating_point() else t.clone() for n, t in state.items()}
    with_buffer = dict(candidate, **{"bert.embeddings.position_ids": buffers["bert.embeddings.position_ids"].clone()})
    wrong_buffer = dict(candidate, **{"bert.embeddings.position_ids": buffers["bert.embeddings.position_ids"].float()})
    table = sweep.evaluate(module, [candidate, with_buffer, wrong_buffer], data, metrics)
    assert table.column("status").to_pylist() == ["ok", "ok", "invalid"]
    assert table.column("error")[2].as_py() == ("key 'bert.embeddings.position_ids': expected shape (1×32) int64, "
                                               "got shape (1×32) float32")
    expected = reference(module, [candidate], data, metrics)[0]
    assert table.column("loss").to_pylist()[:2] == pytest.approx([expected["loss"]] * 2, rel=RTOL, abs=ATOL)


# --------------------------------------------------------------------------- the config's model.transformers / model.torchvision


def config_raw(model: dict) -> dict:
    return {"name": "zoo", "model": model,
            "data": {"loader": "sweep.examples.zoo:token_batches"},
            "metrics": {"function": "sweep.examples.zoo:causal_lm"},
            "study": {"kind": "perturb", "sigma": 0.01, "count": 2}}


def config_error(raw: dict, base_dir: Path, **options) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, base_dir=base_dir, **options)
    return str(e.value)


@needs_transformers
def test_model_transformers_resolves_against_the_config_and_becomes_factory_and_kwargs(tmp_path):
    Z.write_config("gpt2", tmp_path / "models" / "gpt2")
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "zoo.yaml"
    path.write_text(textwrap.dedent("""
        name: zoo
        model:
          transformers: ../models/gpt2
          auto_class: AutoModelForCausalLM
          kwargs: {n_layer: 1}
          seed: 3
        data: {loader: "sweep.examples.zoo:token_batches"}
        metrics: {function: "sweep.examples.zoo:causal_lm"}
        study: {kind: perturb, sigma: 0.01, count: 2}
        """))
    config = load_config(path)
    folder = str(tmp_path / "models" / "gpt2")
    assert config.model.factory == "sweep.zoo:transformers_model"
    assert config.model.kwargs == {"path": folder, "auto_class": "AutoModelForCausalLM", "n_layer": 1}
    saved = config.to_dict()["model"]
    assert saved == {"factory": "sweep.zoo:transformers_model", "kwargs": config.model.kwargs, "weights": None,
                     "seed": 3}
    again = parse_config(config.to_dict(), base_dir=tmp_path)  # the resolved config.yaml, read back
    assert again.digest() == config.digest() and again.model == config.model
    module = build_module(config.model.factory, config.model.kwargs, seed=config.model.seed)
    assert type(module).__name__ == "GPT2LMHeadModel" and module.config.n_layer == 1


def test_model_transformers_paths_that_hold_no_config_are_config_errors(tmp_path):
    err = config_error(config_raw({"transformers": "openai-community/gpt2"}), tmp_path)
    assert err.startswith("config: model.transformers: ")
    assert f"{tmp_path}/openai-community/gpt2: no such file or folder" in err
    assert "looks like a Hugging Face Hub id, and sweep never downloads" in err
    err = config_error(config_raw({"transformers": "."}), tmp_path)
    assert f"model.transformers: {tmp_path} holds no config.json" in err
    (tmp_path / "config.json").write_text("{}")
    assert "model.transformers: " in config_error(config_raw({"transformers": "config.json"}), tmp_path)
    assert "no 'model_type'" in config_error(config_raw({"transformers": "."}), tmp_path)
    # a config read back away from its files (a worker node) does not look for them
    parse_config(config_raw({"transformers": "elsewhere", "auto_class": "AutoModel"}), base_dir=tmp_path,
                 check_files=False, check_imports=False)


def test_model_takes_exactly_one_of_factory_transformers_torchvision(tmp_path):
    Z.write_config("gpt2", tmp_path / "gpt2")
    assert "model.factory: required field is missing: give model.factory" in config_error(config_raw({}), tmp_path)
    err = config_error(config_raw({"factory": "sweep.examples.zoo:tiny", "transformers": "gpt2"}), tmp_path)
    assert "model.transformers: give one of model.factory, model.transformers, model.torchvision, not several" in err
    err = config_error(config_raw({"factory": "sweep.examples.zoo:tiny", "auto_class": "AutoModel"}), tmp_path)
    assert "model.auto_class: names the class that builds a model.transformers model" in err
    err = config_error(config_raw({"transformers": "gpt2", "kwargs": {"path": "x"}}), tmp_path)
    assert "model.kwargs.path: model.transformers gives the path; leave path out of model.kwargs" in err
    err = config_error(config_raw({"transformers": "gpt2", "auto_class": "Auto Model"}), tmp_path)
    assert "model.auto_class: should be a name such as 'AutoModelForCausalLM'" in err
    err = config_error(config_raw({"torchvision": "resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}), tmp_path)
    assert "model.kwargs.weights: sweep builds torchvision models with weights=None and never downloads" in err


def test_model_torchvision_becomes_factory_and_kwargs_or_names_the_extra(tmp_path, monkeypatch):
    raw = config_raw({"torchvision": "resnet18", "kwargs": {"num_classes": 10}})
    if zoo.extra_missing("torchvision") is None:
        config = parse_config(raw, base_dir=tmp_path)
        assert config.model.factory == "sweep.zoo:torchvision_model"
        assert config.model.kwargs == {"name": "resnet18", "num_classes": 10}
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    assert ("model.torchvision: needs the optional package torchvision, which is not installed: "
            "pip install 'sweep[torchvision]'") in config_error(raw, tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    Z.write_config("gpt2", tmp_path / "gpt2")
    assert ("model.transformers: needs the optional package transformers, which is not installed: "
            "pip install 'sweep[transformers]'") in config_error(config_raw({"transformers": "gpt2"}), tmp_path)


# --------------------------------------------------------------------------- sweep bench's rows


def test_bench_rows_of_transformers_models_are_a_note_without_it(monkeypatch):
    names = [spec.name for spec in bench.MODELS if spec.requires == ("transformers",)]
    assert names == ["gpt2-small (1x32 tokens)", "resnet-18 (8 images 64x64)"]
    monkeypatch.setitem(sys.modules, "transformers", None)
    (result,) = bench.run_bench("cpu", ["gpt2-small"], compile=False, forms=False, first=False)
    assert not result.engine and result.notes["skipped"].startswith("not measured: transformers is not importable")
    assert result.notes["skipped"].endswith("pip install 'sweep[transformers]'")
    text = bench.format_table([result], bench.environment("cpu"))
    assert "gpt2-small skipped: not measured: transformers is not importable" in text
    assert not any(line.startswith("gpt2-small (1x32") for line in text.splitlines())


@needs_transformers
def test_bench_models_are_the_full_sized_ones():
    """GPT-2 small as GPT2Config's defaults make it, and ResNet-18's layout, built on the meta device (no memory)."""
    with torch.device("meta"):
        gpt2 = Z.gpt2_small()
        resnet = Z.resnet18(10)
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808
    assert (gpt2.config.n_layer, gpt2.config.n_embd, gpt2.config.vocab_size) == (12, 768, 50257)
    assert sum(p.numel() for p in resnet.parameters()) == 11_181_642  # torchvision's resnet18(num_classes=10) too
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules()) == 20


@needs_transformers
def test_bench_measures_a_transformers_model_by_its_main_row_on_the_cpu(monkeypatch):
    """The bench's rows for transformers models, on a tiny GPT-2: the HF output goes through the spot check, and
    on the CPU only the main row is measured, with a note saying so."""
    spec = bench.BenchModel("gpt2-tiny (4x16 tokens)", lambda: Z.tiny("gpt2"), Z.token_batches, Z.causal_lm,
                            {"cpu": 4, "cuda": 4}, {"cpu": 2, "cuda": 2}, requires=("transformers",),
                            cpu_main_only=True)
    monkeypatch.setattr(bench, "MODELS", (spec,))
    (result,) = bench.run_bench("cpu", ["gpt2-tiny"], compile=True, forms=True, first=True)
    assert set(result.engine) == {"fp32", "bf16"} and result.checked == ["fp32", "bf16"]
    assert result.compile_seconds is None and not result.forms and not result.first_call
    assert result.notes == {"measured": bench.CPU_MAIN_ONLY}
    assert result.strategy in ("vmap", "loop") and result.params == 28_544
    text = bench.format_table([result], bench.environment("cpu"))
    assert "gpt2-tiny measured: loop, fp32 and bf16 only on the CPU" in text
    assert "checked equal to the functional_call loop" in text and "gpt2-tiny fp32, bf16" in text


def test_bench_figures_below_ten_keep_two_decimals():
    assert [bench.figure(v) for v in (0.1749, 3.5, 9.994, 10.4, 12_345.6)] == ["0.17", "3.50", "9.99", "10", "12,346"]
