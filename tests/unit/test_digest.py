"""What a config means: the digest stamped beside the rows covers what decides them, not where they
ran; and YAML values read as YAML 1.2 reads them (0x10, 1_000, 1:30, yes and on are strings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sweep
from sweep import ConfigError
from sweep.config import NOT_IN_DIGEST, dump_config, load_config
from sweep.yaml_io import read_yaml

REPO = Path(sweep.__file__).resolve().parent.parent
PERTURB = REPO / "configs" / "perturb.yaml"
INTERPOLATE = REPO / "configs" / "interpolate.yaml"


def digest(*overrides: str, path: Path = PERTURB) -> str:
    return load_config(path, overrides).digest()


@pytest.mark.parametrize("override", [
    "workers.count=7", "workers.cpus=0.5", "workers.batch_size=64", "workers.max_in_flight=5",
    "workers.device=cpu", "name=elsewhere", "sinks.parquet.path=/tmp/elsewhere", "sinks.parquet.rows_per_file=10",
    "sinks.parquet.flush_seconds=1", "sinks.mlflow.enabled=false", "sinks.mlflow.experiment=other",
    "sinks.mlflow.tracking_uri=http://127.0.0.1:5000",
])
def test_where_and_how_fast_do_not_change_the_digest(override):
    assert digest(override) == digest()


@pytest.mark.parametrize("override", [
    "study.sigma=0.02", "study.count=11", "study.seed=1", "model.seed=3", "model.kwargs.hidden=32",
    "data.kwargs.batch_size=100", "metrics.mode=max", "evaluation.precision=bf16",
])
def test_what_decides_the_rows_changes_the_digest(override):
    assert digest(override) != digest()


def test_the_digest_leaves_out_only_name_workers_and_sinks():
    assert NOT_IN_DIGEST == ("name", "workers", "sinks")
    assert digest("study.alphas.num=9", path=INTERPOLATE) != digest(path=INTERPOLATE)


# --------------------------------------------------------------------------- YAML 1.2 numbers and booleans


@pytest.mark.parametrize("text, value", [
    ("0x10", "0x10"), ("0o17", "0o17"), ("0b101", "0b101"), ("1_000", "1_000"), ("1:30", "1:30"),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("Yes", "Yes"),
    ("16", 16), ("-3", -3), ("+7", 7), ("017", 17), ("0", 0),
    ("1.5", 1.5), ("1e3", 1000.0), ("1.5e-3", 0.0015), (".5", 0.5), ("1.", 1.0), ("-.inf", float("-inf")),
    ("true", True), ("False", False), ("TRUE", True), ("~", None), ("null", None),
])
def test_plain_values_read_as_yaml_1_2_core_reads_them(text, value):
    assert read_yaml(text, source="t") == value


@pytest.mark.parametrize("override, message", [
    ("workers.count=0x10", "workers.count: should be 'auto' or a valid integer (got '0x10')"),
    ("workers.count=0o17", "workers.count: should be 'auto' or a valid integer (got '0o17')"),
    ("workers.count=1_000", "workers.count: should be 'auto' or a valid integer (got '1_000')"),
    ("workers.count=1:30", "workers.count: should be 'auto' or a valid integer (got '1:30')"),
    ("workers.count=0b101", "workers.count: should be 'auto' or a valid integer (got '0b101')"),
    ("workers.cpus=1_000", "workers.cpus: should be a number written in decimal, not a string (got '1_000')"),
    ("workers.cpus=0x10", "workers.cpus: should be a number written in decimal, not a string (got '0x10')"),
    ("sinks.parquet.enabled=yes", "sinks.parquet.enabled: should be true or false (got 'yes')"),
    ("sinks.mlflow.enabled=off", "sinks.mlflow.enabled: should be true or false (got 'off')"),
    ("evaluation.compile=1", "evaluation.compile: should be true or false (got 1)"),
])
def test_yaml_1_1_numbers_and_booleans_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(PERTURB, [override])
    assert message in str(info.value)


def test_the_same_quirks_in_a_config_file_are_refused_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PERTURB.read_text().replace("count: 2\n", "count: 0x10\n", 1))
    assert "count: 0x10" in path.read_text()
    with pytest.raises(ConfigError, match=r"workers\.count: should be 'auto' or a valid integer \(got '0x10'\)"):
        load_config(path)


def test_decimal_numbers_and_true_false_still_load():
    config = load_config(PERTURB, ["workers.count=16", "workers.cpus=1e0", "sinks.parquet.enabled=false",
                                   "study.sigma=5e-3"])
    assert (config.workers.count, config.workers.cpus, config.sinks.parquet.enabled, config.study.sigma) == \
        (16, 1.0, False, 0.005)


def test_the_saved_config_reads_back_the_same_whatever_its_strings_look_like(tmp_path):
    values = ["yes", "on", "0x10", "1e3", "1.5e3", "017", "1_000", "1:30", "true", "+1", ".5"]
    config = load_config(PERTURB, [f"model.kwargs.s{i}='{v}'" for i, v in enumerate(values)] +
                         ["name='1e3'"])
    text = dump_config(config)
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(tmp_path / "config.yaml", check_imports=False)
    assert again == config
    assert [again.model.kwargs[f"s{i}"] for i in range(len(values))] == values and again.name == "1e3"
    # and a YAML 1.1 reader (PyYAML's own) reads the same strings
    assert [yaml.safe_load(text)["model"]["kwargs"][f"s{i}"] for i in range(len(values))] == values
