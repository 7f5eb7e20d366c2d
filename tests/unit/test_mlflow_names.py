"""MLflow-safe names, checked up front: config keys (MLflow params) and metric names.

The rule in `sweep.sinks.mlflow` mirrors `mlflow.utils.validation`; these tests hold it
against MLflow's own validators on the same names, so an MLflow upgrade that
changes the rules shows up here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.utils import validation as mlflow_validation

import sweep
from sweep import ConfigError, SweepError
from sweep.config import flatten, load_config, parse_config
from sweep.sinks.mlflow import (MLFLOW_MAX_EXPERIMENT_NAME_LENGTH, MLFLOW_MAX_KEY_LENGTH, check_metric_names,
                                logged_metric_names, mlflow_name_problem)

from tests.conftest import with_changes  # noqa: E402

REPO = Path(sweep.__file__).resolve().parent.parent
CHECKPOINTS = REPO / "sweep" / "examples" / "checkpoints"

BASE = {
    "name": "mlflow-names",
    "model": {"factory": "sweep.examples.digits:make_model", "kwargs": {"hidden": 64}},
    "data": {"loader": "sweep.examples.digits:eval_batches", "kwargs": {"batch_size": 250}},
    "metrics": {"function": "sweep.examples.digits:metrics", "objective": "accuracy", "mode": "max"},
    "study": {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "seed*.safetensors")]},
}

#: Names MLflow refuses, each for one of its rules.
MLFLOW_REFUSES = [
    "a b/../c",  # resolves to another path
    "/leading",  # absolute
    "trailing/",  # normalises to another name
    "a//b", "a/./b", "./a", "..", "../up", "..dots", ".",
    "",  # empty
    "bad!name", "semi;colon", "tab\tname", "new\nline", "quote'", "hash#", "per%cent", "emoji\U0001F600",
    "x" * (MLFLOW_MAX_KEY_LENGTH + 1),  # too long
]
#: Names MLflow takes (and so does sweep).
MLFLOW_TAKES = ["loss", "accuracy", "val/loss", "top-1 acc", "a.b.c", "model.kwargs.hidden", "précision", "x" * 250,
                "a_b-c.d/e f", "0", "batch.loss.min", "model.kwargs./x", "model.kwargs.."]


def mlflow_takes_param(name: str) -> bool:
    try:
        mlflow_validation._validate_param(name, "value")
    except MlflowException:
        return False
    return True


def mlflow_takes_metric(name: str) -> bool:
    try:
        mlflow_validation._validate_metric(name, 1.0, 0, 0)
    except MlflowException:
        return False
    return True


def config(**changes):
    return with_changes(copy.deepcopy(BASE), changes, sep="__")


def test_limits_are_mlflows():
    assert MLFLOW_MAX_KEY_LENGTH == mlflow_validation.MAX_ENTITY_KEY_LENGTH
    assert MLFLOW_MAX_EXPERIMENT_NAME_LENGTH == mlflow_validation.MAX_EXPERIMENT_NAME_LENGTH


@pytest.mark.parametrize("name", MLFLOW_REFUSES, ids=repr)
def test_names_mlflow_refuses_are_refused(name):
    assert not mlflow_takes_param(name) and not mlflow_takes_metric(name)  # MLflow's own verdict
    assert mlflow_name_problem(name) is not None
    with pytest.raises(SweepError):
        check_metric_names(["loss", name])


@pytest.mark.parametrize("name", MLFLOW_TAKES, ids=repr)
def test_names_mlflow_takes_are_taken(name):
    assert mlflow_takes_param(name) and mlflow_takes_metric(name)
    assert mlflow_name_problem(name) is None


def test_where_sweep_is_stricter_than_mlflow():
    """':' (which MLflow refuses on Windows only: the tracking server may be one) and a trailing newline
    (which MLflow's `$` lets through)."""
    for name in ("acc:top1", "loss\n"):
        assert mlflow_takes_param(name) == (not mlflow_validation.is_windows())
        assert mlflow_name_problem(name) is not None


name_pieces = st.sampled_from(["a", "Z", "0", "_", "-", ".", "..", "/", " ", ":", "\n", "!", "é", "€", "\t", "#",
                               "x" * 60])


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.lists(name_pieces, max_size=8).map("".join), st.text(max_size=12)))
def test_agrees_with_mlflows_own_validators(name):
    ours = mlflow_name_problem(name) is None
    assert mlflow_takes_param(name) == mlflow_takes_metric(name)
    theirs = mlflow_takes_param(name)
    if ours:
        assert theirs, name  # never take a name MLflow refuses
    elif theirs:  # the only names sweep refuses and MLflow takes
        assert ":" in name or name.endswith("\n"), name


# --------------------------------------------------------------------------- metric names


def test_good_metric_names_pass():
    check_metric_names(["loss", "accuracy", "val/loss", "top-1 acc"])
    check_metric_names([])


def test_bad_metric_name_is_named_with_the_rule():
    with pytest.raises(SweepError) as info:
        check_metric_names(["loss", "a b/../c"])
    text = str(info.value)
    assert "'a b/../c'" in text and "resolves to 'c'" in text and "sinks.mlflow.enabled" in text
    assert "\n" not in text and not isinstance(info.value, ConfigError)
    with pytest.raises(SweepError, match=r"holds '!'.*only letters, digits, underscores"):
        check_metric_names(["bad!"])
    with pytest.raises(SweepError, match=r"metric 3, .*is not a string \(it is a number\)"):
        check_metric_names([3])


def test_metric_name_length_counts_what_the_sink_derives_from_it():
    """The sink also logs `batch.<name>.nonfinite`, 16 characters more: that must fit too."""
    longest = max(logged_metric_names("m"), key=len)
    extra = len(longest) - 1
    assert extra == 16
    ok = "m" * (MLFLOW_MAX_KEY_LENGTH - extra)
    check_metric_names([ok])
    for derived in logged_metric_names(ok):
        assert mlflow_takes_metric(derived)
    too_long = ok + "m"
    with pytest.raises(SweepError, match=r"also logs it as 'batch\.m+.*\.nonfinite'.*251 characters"):
        check_metric_names([too_long])
    assert not mlflow_takes_metric(f"batch.{too_long}.nonfinite")


# --------------------------------------------------------------------------- config keys as MLflow params


def test_repo_configs_flatten_to_params_mlflow_takes():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        params = flatten(load_config(path).to_dict())
        assert params and all(mlflow_takes_param(k) for k in params), path


@pytest.mark.parametrize("key, rule", [
    ("a b/../c", "resolves to"),
    ("k" * 300, "characters long; MLflow allows at most 250"),
    ("bad!key", "holds '!'"),
    ("col:on", "holds ':'"),
    ("trail/", "resolves to"),
])
def test_factory_kwarg_mlflow_refuses_is_a_config_error(tmp_path, key, rule):
    assert not mlflow_takes_param(f"model.kwargs.{key}") or ":" in key
    with pytest.raises(ConfigError) as info:
        parse_config(config(model__kwargs={"hidden": 64, key: 1}), base_dir=tmp_path)
    text = str(info.value)
    assert f"model.kwargs.{key[:60]}" in text and rule in text and "MLflow param" in text, text


def test_nested_data_kwarg_is_named_by_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.kwargs\.outer\.in ner/\.\./x: becomes the MLflow param"):
        parse_config(config(data__kwargs={"outer": {"in ner/../x": 1}}), base_dir=tmp_path)


def test_a_long_key_path_is_refused_even_when_each_key_is_short(tmp_path):
    kwargs = {"k" * 60: {"k" * 60: {"k" * 60: {"k" * 60: 1}}}}
    with pytest.raises(ConfigError, match=r"model\.kwargs\.k+\.k+\.k+\.k+: .*characters long"):
        parse_config(config(model__kwargs=kwargs), base_dir=tmp_path)


def test_two_keys_that_become_one_param_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.kwargs\.a\.b: becomes the MLflow param 'model\.kwargs\.a\.b', "
                                          r"and so does the setting at 'model' → 'kwargs' → 'a\.b'"):
        parse_config(config(model__kwargs={"a.b": 1, "a": {"b": 2}}), base_dir=tmp_path)


def test_objective_mlflow_refuses_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.objective: '/acc' is logged as an MLflow metric"):
        parse_config(config(metrics__objective="/acc"), base_dir=tmp_path)


def test_names_are_only_checked_when_mlflow_is_on(tmp_path):
    raw = config(model__kwargs={"a b/../c": 1, "k" * 300: 2}, metrics__objective="/acc",
                 sinks__mlflow__enabled=False)
    parsed = parse_config(raw, base_dir=tmp_path)
    assert parsed.model.kwargs["a b/../c"] == 1


def test_experiment_name_follows_mlflows_limits(tmp_path):
    for bad in ("", "e" * (MLFLOW_MAX_EXPERIMENT_NAME_LENGTH + 1)):
        with pytest.raises(ConfigError, match=r"sinks\.mlflow\.experiment: should have at (least 1|most 500) characters"):
            parse_config(config(sinks__mlflow__experiment=bad), base_dir=tmp_path)
        with pytest.raises(MlflowException):
            mlflow_validation._validate_experiment_name(bad)
    name = "e" * MLFLOW_MAX_EXPERIMENT_NAME_LENGTH
    mlflow_validation._validate_experiment_name(name)
    assert parse_config(config(sinks__mlflow__experiment=name), base_dir=tmp_path).sinks.mlflow.experiment == name
