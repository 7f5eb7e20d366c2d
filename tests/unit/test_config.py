"""The sweep config: unknown keys, missing fields and files, imports, paths, overrides, types."""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path

import pytest
import yaml
from pydantic import Field
from pydantic_core import PydanticCustomError

import sweep
from sweep import ConfigError
from sweep.config import SweepConfig, dump_config, load_config, rebuild
from sweep.settings import Int, Section
from sweep.sinks import SINKS

REPO = Path(sweep.__file__).resolve().parent.parent
CHECKPOINTS = REPO / "sweep" / "examples" / "checkpoints"

BASE = {
    "name": "unit-test",
    "model": {"factory": "sweep.examples.digits:make_model", "kwargs": {"hidden": 64}},
    "data": {"loader": "sweep.examples.digits:eval_batches", "kwargs": {"batch_size": 250}},
    "metrics": {"function": "sweep.examples.digits:metrics", "objective": "accuracy", "mode": "max"},
    "study": {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "*.safetensors")]},
    "workers": {"count": 2, "batch_size": 2},
    "sinks": {"parquet": {"rows_per_file": 100000, "flush_seconds": 10}, "mlflow": {"enabled": True}},
}


def write(folder: Path, raw, name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def base():
    return copy.deepcopy(BASE)


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_config_error_is_a_sweep_error():
    assert issubclass(ConfigError, sweep.SweepError)


def test_valid_config_loads(tmp_path):
    config = load_config(write(tmp_path, base()))
    assert config.name == "unit-test"
    assert config.model.factory == "sweep.examples.digits:make_model"
    assert config.model.kwargs == {"hidden": 64}
    assert config.workers.count == 2 and config.workers.batch_size == 2
    assert config.sinks.parquet.rows_per_file == 100000
    assert config.study.kind == "checkpoints"
    assert config.study.paths == [str(CHECKPOINTS / "*.safetensors")]
    assert config.metrics.mode == "max"


def test_repo_quickstart_resolves_against_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near configs/
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert config.study.paths == [str(CHECKPOINTS / "*.safetensors")]


def test_defaults_when_sections_omitted(tmp_path):
    raw = base()
    del raw["workers"], raw["sinks"]
    config = load_config(write(tmp_path, raw))
    assert config.workers.count == "auto" and config.workers.device == "auto"
    assert config.sinks.parquet.enabled and config.sinks.mlflow.enabled


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key(tmp_path):
    raw = base()
    raw["worker"] = {"count": 1}
    err = error_of(write(tmp_path, raw))
    assert "worker" in err and "unknown key" in err
    assert "did you mean 'workers'" in err


def test_unknown_nested_key(tmp_path):
    raw = base()
    raw["sinks"]["parquet"]["rows_per_fil"] = 10
    err = error_of(write(tmp_path, raw))
    assert "sinks.parquet.rows_per_fil" in err
    assert "did you mean 'rows_per_file'" in err


def test_unknown_key_in_study(tmp_path):
    raw = base()
    raw["study"]["path"] = ["x"]
    err = error_of(write(tmp_path, raw))
    assert "study.path" in err and "did you mean 'paths'" in err


def test_unknown_key_in_model(tmp_path):
    raw = base()
    raw["model"]["factroy"] = "x:y"
    err = error_of(write(tmp_path, raw))
    assert "model.factroy" in err and "did you mean 'factory'" in err


def test_unknown_sink_names_the_known_ones(tmp_path):
    raw = base()
    raw["sinks"]["parquett"] = {"enabled": True}
    err = error_of(write(tmp_path, raw))
    assert "sinks.parquett: unknown key (did you mean 'parquet'?)" in err
    assert f"known keys: {', '.join(SINKS)}" in err


# --------------------------------------------------------------------------- sinks registered at runtime


def memory_sink() -> types.ModuleType:
    """A sink module as a plugin writes one: its Config, and a check of the whole config."""

    class Config(Section):
        enabled: bool = True
        capacity: Int = Field(10, ge=1)

    def check(config) -> None:
        count = config.workers.count
        if isinstance(count, int) and config.sinks.memory.capacity < count:
            raise PydanticCustomError("sweep_at", "{reason}", {"at": ("sinks", "memory", "capacity"), "reason": (
                f"holds {config.sinks.memory.capacity} rows, fewer than workers.count {count}")})

    module = types.ModuleType("memory")
    module.Config, module.check = Config, check
    return module


@pytest.fixture
def memory_registered(monkeypatch):
    """The memory sink in SINKS, and the config rebuilt for it; both as they were afterwards."""
    module = memory_sink()
    with monkeypatch.context() as patch:
        patch.setitem(SINKS, "memory", module)
        rebuild()
        try:
            yield module
        finally:
            patch.undo()
            rebuild()


def test_a_sink_registered_at_runtime_gets_its_config_section(tmp_path, memory_registered):
    path = write(tmp_path, base())
    config = load_config(path, ["sinks.memory.capacity=3"])
    assert isinstance(config, SweepConfig) and isinstance(config.sinks.memory, memory_registered.Config)
    assert config.sinks.memory.capacity == 3 and config.sinks.parquet.rows_per_file == 100000
    assert "memory:\n    enabled: true\n    capacity: 3\n" in dump_config(config)
    assert load_config(path).sinks.memory == memory_registered.Config(), "left out: its defaults"
    assert "sinks.memory.capacity: Input should be greater than or equal to 1 (got 0)" in \
        error_of(path, ["sinks.memory.capacity=0"])
    assert "sinks.memory.capacity: holds 1 rows, fewer than workers.count 2" in \
        error_of(path, ["sinks.memory.capacity=1"])
    assert load_config(path, ["sinks.memory.capacity=1", "sinks.memory.enabled=false"]).sinks.memory.capacity == 1
    assert "known keys: parquet, mlflow, memory" in error_of(path, ["sinks.memroy.enabled=true"])


def test_a_sink_removed_from_the_registry_leaves_the_config(tmp_path, memory_registered):
    del SINKS["memory"]  # put back by the fixture
    rebuild()
    assert "sinks.memory: unknown key" in error_of(write(tmp_path, base()), ["sinks.memory.capacity=3"])


def test_a_sink_registered_without_rebuilding_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(SINKS, "memory", memory_sink())
    with pytest.raises(sweep.SweepError, match=r"sinks.memory section: call sweep.config.rebuild\(\)"):
        load_config(write(tmp_path, base()))


def test_the_config_is_as_imported_once_rebuilt_without_changes(tmp_path):
    rebuild()
    config = load_config(write(tmp_path, base()))
    assert isinstance(config, SweepConfig)
    assert list(type(config).model_fields) == list(SweepConfig.model_fields)
    assert list(type(config.sinks).model_fields) == list(SINKS)


# --------------------------------------------------------------------------- missing fields and files


@pytest.mark.parametrize(
    "section, field",
    [("model", "factory"), ("data", "loader"), ("metrics", "function"), ("study", "paths"), (None, "name"),
     (None, "model"), (None, "study")],
)
def test_missing_required_field(tmp_path, section, field):
    raw = base()
    del (raw[section] if section else raw)[field]
    err = error_of(write(tmp_path, raw))
    where = f"{section}.{field}" if section else field
    assert where in err and "missing" in err


def test_missing_weights_file(tmp_path):
    raw = base()
    raw["model"]["weights"] = "no/such/weights.safetensors"
    err = error_of(write(tmp_path, raw))
    assert "model.weights" in err and "not found" in err
    assert str(tmp_path / "no" / "such" / "weights.safetensors") in err


def test_missing_study_path(tmp_path):
    raw = base()
    raw["study"]["paths"] = [str(CHECKPOINTS / "seed0-epoch02.safetensors"), "absent.safetensors"]
    err = error_of(write(tmp_path, raw))
    assert "study.paths" in err and "not found" in err and "absent.safetensors" in err


def test_glob_matching_nothing(tmp_path):
    raw = base()
    raw["study"]["paths"] = [str(tmp_path / "nothing-here" / "*.safetensors")]
    err = error_of(write(tmp_path, raw))
    assert "study.paths" in err and "matched no files" in err


def test_empty_study_paths(tmp_path):
    raw = base()
    raw["study"]["paths"] = []
    err = error_of(write(tmp_path, raw))
    assert "study.paths" in err


def test_missing_config_file(tmp_path):
    err = error_of(tmp_path / "absent.yaml")
    assert "absent.yaml" in err and "not found" in err


@pytest.mark.parametrize("text", ["name: [unclosed", "- just\n- a list\n", "42\n"])
def test_not_a_yaml_mapping(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text))


# --------------------------------------------------------------------------- imports


@pytest.mark.parametrize("section, field", [("model", "factory"), ("data", "loader"), ("metrics", "function")])
@pytest.mark.parametrize(
    "spec",
    ["no_such_package_xyz.mod:fn", "sweep.examples.digits:no_such_function", "sweep.examples.digits.make_model",
     "sweep.examples.digits:N_TRAIN"],
    ids=["no-module", "no-attr", "no-colon", "not-callable"],
)
def test_bad_import_path_names_the_field(tmp_path, section, field, spec):
    raw = base()
    raw[section][field] = spec
    err = error_of(write(tmp_path, raw))
    assert f"{section}.{field}" in err
    assert spec in err or spec.split(":")[0] in err


# --------------------------------------------------------------------------- relative paths


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "project" / "conf"
    ck = tmp_path / "project" / "ck"
    ck.mkdir(parents=True)
    (ck / "a.safetensors").write_bytes((CHECKPOINTS / "seed0-epoch02.safetensors").read_bytes())
    (ck / "b.safetensors").write_bytes((CHECKPOINTS / "seed0-epoch10.safetensors").read_bytes())
    raw = base()
    raw["model"]["weights"] = "../ck/a.safetensors"
    raw["study"]["paths"] = ["../ck/*.safetensors", "../ck/b.safetensors"]
    path = write(conf_dir, raw)

    # a decoy with the same relative layout next to the cwd must not be picked up
    elsewhere = tmp_path / "elsewhere" / "cwd"
    (elsewhere.parent / "ck").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(path, elsewhere))
    assert config.model.weights == str(ck / "a.safetensors")
    assert config.study.paths == [str(ck / "*.safetensors"), str(ck / "b.safetensors")]

    # and with the cwd's copy missing the real files it still loads (the cwd is not used)
    monkeypatch.chdir(tmp_path)
    assert load_config(path).model.weights == str(ck / "a.safetensors")


def test_relative_path_missing_next_to_config_even_if_present_in_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    raw = base()
    raw["model"]["weights"] = "w.safetensors"
    path = write(conf_dir, raw)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.safetensors").write_bytes(b"x")
    monkeypatch.chdir(cwd)
    err = error_of(path)
    assert "model.weights" in err and str(conf_dir / "w.safetensors") in err


# --------------------------------------------------------------------------- overrides


def test_override_scalar(tmp_path):
    config = load_config(write(tmp_path, base()), ["workers.count=1"])
    assert config.workers.count == 1 and isinstance(config.workers.count, int)


def test_override_creates_nested_sections(tmp_path):
    raw = base()
    del raw["sinks"], raw["workers"]
    config = load_config(
        write(tmp_path, raw),
        ["sinks.parquet.rows_per_file=7", "sinks.mlflow.enabled=false", "workers.device=cpu", "model.kwargs.hidden=32"],
    )
    assert config.sinks.parquet.rows_per_file == 7
    assert config.sinks.mlflow.enabled is False
    assert config.workers.device == "cpu"
    assert config.model.kwargs == {"hidden": 32}


def test_override_value_parsed_as_yaml(tmp_path):
    config = load_config(
        write(tmp_path, base()),
        [f"study.paths=[{CHECKPOINTS / 'seed0-epoch02.safetensors'}]", "workers.count=auto"],
    )
    assert config.study.paths == [str(CHECKPOINTS / "seed0-epoch02.safetensors")]
    assert config.workers.count == "auto"


def test_later_override_wins(tmp_path):
    config = load_config(write(tmp_path, base()), ["workers.count=3", "workers.count=5"])
    assert config.workers.count == 5


@pytest.mark.parametrize("item", ["workers.count", "workers.count:1", "=1", "workers..count=1", ".x=1"])
def test_bad_override(tmp_path, item):
    err = error_of(write(tmp_path, base()), [item])
    assert item in err


def test_override_through_a_non_section(tmp_path):
    err = error_of(write(tmp_path, base()), ["name.x=1"])
    assert "name" in err


def test_override_of_unknown_key_is_rejected(tmp_path):
    err = error_of(write(tmp_path, base()), ["workers.cuont=2"])
    assert "workers.cuont" in err and "did you mean 'count'" in err


def test_override_does_not_touch_the_file(tmp_path):
    path = write(tmp_path, base())
    before = path.read_text()
    load_config(path, ["workers.count=1"])
    assert path.read_text() == before
    assert load_config(path).workers.count == 2


# --------------------------------------------------------------------------- kinds and types


def test_unknown_study_kind(tmp_path):
    raw = base()
    raw["study"]["kind"] = "sweepgrid"
    err = error_of(write(tmp_path, raw))
    assert "study.kind" in err and "sweepgrid" in err


def test_missing_study_kind(tmp_path):
    raw = base()
    del raw["study"]["kind"]
    err = error_of(write(tmp_path, raw))
    assert "study.kind" in err


@pytest.mark.parametrize(
    "override, field",
    [
        ("workers.count=-1", "workers.count"),
        ("workers.count=0", "workers.count"),
        ("workers.count=many", "workers.count"),
        ("workers.device=tpu", "workers.device"),
        ("workers.device=cuda:x", "workers.device"),
        ("workers.batch_size=0", "workers.batch_size"),
        ("workers.cpus=0", "workers.cpus"),
        ("workers.gpus=-1", "workers.gpus"),
        ("sinks.parquet.rows_per_file=0", "sinks.parquet.rows_per_file"),
        ("sinks.parquet.flush_seconds=-1", "sinks.parquet.flush_seconds"),
        ("metrics.mode=biggest", "metrics.mode"),
        ("name=has spaces", "name"),
        ("model.kwargs=[1, 2]", "model.kwargs"),
    ],
)
def test_wrong_values(tmp_path, override, field):
    err = error_of(write(tmp_path, base()), [override])
    assert field in err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_devices(tmp_path, device):
    assert load_config(write(tmp_path, base()), [f"workers.device={device}"]).workers.device == device


def test_several_problems_all_reported(tmp_path):
    raw = base()
    raw["workers"]["count"] = -1
    raw["workers"]["device"] = "tpu"
    raw["sinks"]["parquet"]["rows_per_fil"] = 1
    err = error_of(write(tmp_path, raw))
    assert "workers.count" in err and "workers.device" in err and "sinks.parquet.rows_per_fil" in err
