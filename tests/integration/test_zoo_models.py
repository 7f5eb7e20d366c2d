"""transformers models through the real CLI: `sweep validate` and `sweep run` of configs with `model.transformers`,
a `checkpoints` study over safetensors files made here (random weights from each config), on 2 local Ray
workers; every row equal to a plain functional_call loop, the tied-weight rows as the issue asks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch.func import functional_call

from sweep.examples import zoo as Z
from sweep.model import build_module, read_weights_file
from tests.conftest import sweep_cli

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

#: Relative tolerance against the functional_call loop (fp32), and the absolute floor.
RTOL, ATOL = 1e-5, 1e-6


def reference(module, params, data, metrics):
    """One candidate's metrics by a plain functional_call loop, each batch weighted by its size."""
    sums, total = {}, 0
    with torch.no_grad():
        for x, y in data:
            for name, value in metrics(functional_call(module, params, (x,)), y).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(y)
            total += len(y)
    return {name: value / total for name, value in sums.items()}


def random_state(kind: str, seed: int, scale_buffers: bool = False):
    """The state dict of a fresh model of `kind` under `seed` (tied tensors cloned apart: safetensors refuses
    shared memory); BatchNorm running statistics moved off their defaults when `scale_buffers`."""
    torch.manual_seed(seed)
    state = {n: t.detach().clone() for n, t in Z.tiny(kind).state_dict().items()}
    if scale_buffers:
        for name, t in state.items():
            if name.endswith("running_mean"):
                state[name] = 0.1 * torch.randn_like(t)
            elif name.endswith("running_var"):
                state[name] = 0.5 + torch.rand_like(t)
    return state


def write_config(folder: Path, model: dict, loader: str, loader_kwargs: dict, metrics: str, paths: list) -> Path:
    """folder/sweep.yaml: a checkpoints study of `model` on 2 workers, one file per task, MLflow off."""
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"zoo-{folder.name}", "model": model, "data": {"loader": loader, "kwargs": loader_kwargs},
        "metrics": {"function": metrics}, "study": {"kind": "checkpoints", "paths": paths},
        "workers": {"count": 2, "batch_size": 1}, "sinks": {"mlflow": {"enabled": False}}}, sort_keys=False))
    return path


def run_cli(config: Path, tmp_path: Path):
    proc = sweep_cli("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--no-report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = config.parent.name
    table = ds.dataset(str(tmp_path / "out" / "runs" / f"zoo-{name}" / "results"), format="parquet").to_table()
    return proc, {Path(r["path"]).name: r for r in table.to_pylist()}


def test_gpt2_checkpoints_with_and_without_the_tied_head_on_two_workers(tmp_path):
    folder = tmp_path / "gpt2"
    Z.write_config("gpt2", folder / "model")
    states = [random_state("gpt2", seed) for seed in (1, 2, 3)]
    assert "lm_head.weight" in states[0] and torch.equal(states[0]["lm_head.weight"], states[0]["transformer.wte.weight"])
    save_file(states[0], str(folder / "both-equal.safetensors"))
    save_file({n: t for n, t in states[1].items() if n != "lm_head.weight"}, str(folder / "no-head.safetensors"))
    differ = dict(states[2], **{"lm_head.weight": states[2]["lm_head.weight"] + 0.5})
    save_file(differ, str(folder / "differ.safetensors"))
    config = write_config(folder, {"transformers": "model", "seed": 5}, "sweep.examples.zoo:token_batches",
                          {"vocab": 64, "length": 16, "batch": 4, "batches": 2}, "sweep.examples.zoo:causal_lm",
                          ["*.safetensors"])

    checked = sweep_cli("validate", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "study 'checkpoints' with 3 candidates" in checked.stdout
    assert "could not be built" not in checked.stderr  # the model was built (on the meta device) and the files fit

    proc, rows = run_cli(config, tmp_path)
    assert "2 ok, 1 invalid, 0 failed" in proc.stdout
    assert rows["differ.safetensors"]["status"] == "invalid"
    assert rows["differ.safetensors"]["error"] == (
        "tied weights 'transformer.wte.weight' and 'lm_head.weight' are one tensor in the module but were given "
        "different values; give one of them, or equal values")
    assert all(r["worker"] for r in rows.values())  # which of the two workers took which file is Ray's choice

    module = build_module("sweep.zoo:transformers_model", {"path": str(folder / "model")}, seed=5).eval()
    data = Z.token_batches(vocab=64, length=16, batch=4, batches=2)
    for name in ("both-equal.safetensors", "no-head.safetensors"):
        params = read_weights_file(folder / name)
        params.pop("lm_head.weight", None)  # functional_call takes one name of a tied pair
        expected = reference(module, params, data, Z.causal_lm)
        assert rows[name]["status"] == "ok", rows[name]["error"]
        for metric, value in expected.items():
            assert rows[name][metric] == pytest.approx(value, rel=RTOL, abs=ATOL), (name, metric)


def test_resnet_checkpoints_with_batchnorm_statistics_on_two_workers(tmp_path):
    folder = tmp_path / "resnet"
    config_json = Z.write_config("resnet", folder / "model")
    for seed in (1, 2):
        save_file(random_state("resnet", seed, scale_buffers=True), str(folder / f"resnet-{seed}.safetensors"))
    config = write_config(folder, {"transformers": "model/config.json", "auto_class": "AutoModelForImageClassification"},
                          "sweep.examples.zoo:image_batches", {"size": 32, "classes": 3, "batch": 4, "batches": 2},
                          "sweep.examples.zoo:classification", ["resnet-1.safetensors", "resnet-2.safetensors"])
    proc, rows = run_cli(config, tmp_path)
    assert "2 ok, 0 invalid, 0 failed" in proc.stdout

    module = build_module("sweep.zoo:transformers_model", {"path": str(config_json),
                                                          "auto_class": "AutoModelForImageClassification"}).eval()
    data = Z.image_batches(size=32, classes=3, batch=4, batches=2)
    losses = []
    for seed in (1, 2):
        name = f"resnet-{seed}.safetensors"
        expected = reference(module, read_weights_file(folder / name), data, Z.classification)
        for metric, value in expected.items():
            assert rows[name][metric] == pytest.approx(value, rel=RTOL, abs=ATOL), (name, metric)
        losses.append(expected["loss"])
    assert losses[0] != pytest.approx(losses[1])  # the files differ, and so do their rows


@pytest.mark.parametrize("kind, loader, kwargs", [
    ("bert", "sweep.examples.zoo:label_batches", {"vocab": 64, "length": 16, "classes": 3, "batch": 4, "batches": 2}),
    ("vit", "sweep.examples.zoo:image_batches", {"size": 16, "classes": 3, "batch": 4, "batches": 2}),
])
def test_bert_and_vit_checkpoints_on_two_workers(tmp_path, kind, loader, kwargs):
    """BERT (its non-persistent position_ids / token_type_ids buffers are not in the files) and ViT through
    the CLI, each file's row equal to the functional_call loop."""
    folder = tmp_path / kind
    Z.write_config(kind, folder / "model")
    for seed in (1, 2):
        save_file(random_state(kind, seed), str(folder / f"{kind}-{seed}.safetensors"))
    config = write_config(folder, {"transformers": "model"}, loader, kwargs, "sweep.examples.zoo:classification",
                          [f"{kind}-1.safetensors", f"{kind}-2.safetensors"])
    proc, rows = run_cli(config, tmp_path)
    assert "2 ok, 0 invalid, 0 failed" in proc.stdout

    module = build_module("sweep.zoo:transformers_model", {"path": str(folder / "model")}).eval()
    function = loader.split(":")[1]
    data = getattr(Z, function)(**kwargs)
    losses = []
    for seed in (1, 2):
        name = f"{kind}-{seed}.safetensors"
        params = read_weights_file(folder / name)
        assert not any(k.endswith("position_ids") for k in params)  # buffers come from the module
        expected = reference(module, params, data, Z.classification)
        for metric, value in expected.items():
            assert rows[name][metric] == pytest.approx(value, rel=RTOL, abs=ATOL), (name, metric)
        losses.append(expected["loss"])
    assert losses[0] != pytest.approx(losses[1])
