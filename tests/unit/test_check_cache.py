"""The checks before a run, kept for the next run while the code they ran is unchanged (`sweep.check_cache`).

Each check runs as a user meets it: a fresh `python -X importtime -m sweep.cli validate`, whose import
lines say whether torch was imported at all, against a module of the test's own beside its config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sweep import check_cache
from sweep.config import load_config
from sweep.preflight import plan_checked

REPO = Path(__file__).resolve().parents[2]

MODULE = textwrap.dedent('''
    import os

    import torch


    def make(width=4):
        width = int(os.environ.get("MYNET_WIDTH", width))  # what no stamp covers: the cache cannot see it
        return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


    def batches():
        return [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))]


    def metrics(output, y):
        return {"loss": float(torch.nn.functional.cross_entropy(output, y))}
''')


def weights(width: int) -> dict:
    torch.manual_seed(width)
    module = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    return {k: v.contiguous() for k, v in module.state_dict().items()}


@pytest.fixture
def project(tmp_path):
    """A module of the user's own beside a config of checkpoints (one that fits, one that does not) and
    `model.weights` of width 4; sweep's caches in a folder of the test's own."""
    (tmp_path / "mynet.py").write_text(MODULE)
    for name, width in (("w4.safetensors", 4), ("w8.safetensors", 8), ("w6.safetensors", 6)):
        save_file(weights(width), str(tmp_path / name))
    config = {"name": "cached", "model": {"factory": "mynet:make", "kwargs": {"width": 4}, "weights": "w4.safetensors"},
              "data": {"loader": "mynet:batches"}, "metrics": {"function": "mynet:metrics", "objective": "loss"},
              "study": {"kind": "checkpoints", "paths": ["w4.safetensors", "w6.safetensors"]}}
    (tmp_path / "sweep.yaml").write_text(json.dumps(config))
    return tmp_path


def validate(project: Path, *overrides: str, cache: str | None = None, env: dict | None = None):
    """`sweep validate` in a fresh process: (exit code, stdout, stderr without the import lines, the modules
    it imported by `import` statements: torch among them when the user's module or sweep's checks import it)."""
    full = {k: v for k, v in os.environ.items() if k != "MYNET_WIDTH"}
    full.update({"PYTHONPATH": str(project), check_cache_env(): cache or str(project / "cache"), **(env or {})})
    args = [sys.executable, "-X", "importtime", "-m", "sweep.cli", "validate", str(project / "sweep.yaml")]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=project, env=full, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc.returncode, proc.stdout, stderr, imported


def check_cache_env() -> str:
    from sweep.files import CACHE_ENV

    return CACHE_ENV


def records(project: Path) -> list:
    return sorted((project / "cache" / check_cache.CHECKS_FOLDER).glob("*.json"))


def test_a_second_check_imports_no_torch_and_says_the_same(project):
    first = validate(project)
    assert first[0] == 0, first[2]
    assert "torch" in first[3]
    assert len(records(project)) == 1
    second = validate(project)
    assert second[0] == 0, second[2]
    assert "torch" not in second[3]
    # the same verdict, warnings included: w6 does not fit the module of width 4
    assert second[1:3] == first[1:3]
    assert "w6.safetensors: does not fit the module built by mynet:make {width: 4}" in second[2]
    assert "0.weight: module has shape (4×3) float32, file has shape (6×3) float32" in second[2]


def test_an_edited_module_or_other_kwargs_are_checked_anew(project):
    assert validate(project)[0] == 0
    # other kwargs: another record, made by building the module
    code, _, stderr, imported = validate(project, "model.kwargs.width=8")
    assert code == 2 and "torch" in imported
    assert "model.weights" in stderr and "w4.safetensors does not fit the module built by mynet:make {width: 8}" in stderr
    # the module's file edited (as long as it was: its time of modification tells), so the record is not used
    source = (project / "mynet.py").read_text()
    edited = source.replace("torch.nn.Linear(width, 2)", "torch.nn.Linear(width, 3)")
    assert edited != source and len(edited) == len(source)
    (project / "mynet.py").write_text(edited)
    code, _, stderr, imported = validate(project)
    assert "torch" in imported
    assert code == 2 and "2.weight: module has shape (3×4) float32, file has shape (2×4) float32" in stderr


def test_a_kept_schema_never_refuses_a_file_by_itself(project):
    """A record made while MYNET_WIDTH=8 (which no stamp covers) holds a schema of width 8: the file of width 4
    that it would refuse is checked against the module built anew, which it fits."""
    assert validate(project, "model.weights=w8.safetensors", env={"MYNET_WIDTH": "8"})[0] == 0
    code, stdout, stderr, imported = validate(project)
    assert code == 0, stderr
    assert "ok — study 'checkpoints'" in stdout
    assert "torch" in imported  # the refusal was checked against the module built anew


def test_an_import_that_now_fails_is_reported(project):
    assert validate(project)[0] == 0
    source = (project / "mynet.py").read_text().replace("def batches():", "def batches_renamed():")
    (project / "mynet.py").write_text(source)
    code, _, stderr, _ = validate(project)
    assert code == 2 and "data.loader" in stderr and "batches" in stderr


def test_files_the_kwargs_name_are_stamped(project):
    layers = project / "layers.json"
    layers.write_text(json.dumps({"width": 4}))
    source = (project / "mynet.py").read_text() + textwrap.dedent('''

        def from_file(path):
            import json
            return make(json.load(open(path))["width"])
    ''')
    (project / "mynet.py").write_text(source)
    overrides = ("model.factory=mynet:from_file", f"model.kwargs={{path: {layers}}}")
    assert validate(project, *overrides)[0] == 0
    assert "torch" not in validate(project, *overrides)[3]
    layers.write_text(json.dumps({"width": 16}))  # another size: the record no longer holds
    code, _, stderr, imported = validate(project, *overrides)
    assert code == 2 and "torch" in imported
    assert "does not fit the module built by mynet:from_file" in stderr


def test_caches_off_keep_nothing(project):
    assert validate(project, cache="off")[0] == 0
    assert validate(project, cache="off")[0] == 0
    assert not (project / "cache").exists() and not (project / "off").exists()


def test_a_record_that_cannot_be_read_is_one_that_is_not_there(project):
    assert validate(project)[0] == 0
    (record,) = records(project)
    record.write_text("{not json")
    code, _, stderr, imported = validate(project)
    assert code == 0 and "torch" in imported, stderr
    json.loads(record.read_text())  # written anew


def test_a_process_that_imported_the_functions_checks_them_itself(project, monkeypatch):
    """In-process (a notebook, a test): the module may differ from its file, so no record is read."""
    monkeypatch.setenv(check_cache_env(), str(project / "cache"))
    monkeypatch.syspath_prepend(str(project))
    config = load_config(project / "sweep.yaml")  # imports mynet
    assert plan_checked(config).warnings
    assert records(project)
    assert check_cache.lookup(config) is None
    sys.modules.pop("mynet", None)
    kept = check_cache.lookup(config)
    assert kept is not None and [s.shape for s in kept.schema.slots] == [(4, 3), (4,), (2, 4), (2,)]
    assert all(s.dtype == "float32" and not s.is_buffer for s in kept.schema.slots)


def test_a_training_study_keeps_what_it_checks_of_the_users_code(tmp_path):
    """PBT's checks import the loss (its keywords) and build the module (batch-norm layers): kept as facts of
    the record, a second check imports no torch, and a hyperparameter the loss does not take is still refused."""
    env = {**os.environ, check_cache_env(): str(tmp_path / "cache")}

    def check(*overrides: str):
        args = [sys.executable, "-X", "importtime", "-m", "sweep.cli", "validate", str(REPO / "configs/pbt.yaml")]
        for item in overrides:
            args += ["--set", item]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        return proc.returncode, proc.stdout, "torch" in imported, proc.stderr

    first = check()
    assert first[0] == 0 and first[2]
    (record,) = (tmp_path / "cache" / check_cache.CHECKS_FOLDER).glob("*.json")
    facts = json.loads(record.read_text())["facts"]
    assert facts == {"keywords of the loss sweep.examples.digits:loss": ["label_smoothing"],
                     "imports sweep.examples.digits:train_batches": True,
                     "batch-norm layers of the module": []}
    second = check()
    assert second[:2] == (0, first[1]) and not second[2]
    code, _, _, stderr = check("study.hyperparameters.dropout=0.1")
    assert code == 2 and "study.hyperparameters.dropout: neither a hyperparameter of sgd" in stderr
