"""Property-based tests over the config schema.

Valid configs of each study kind (pointing at the repo's example checkpoints)
are mutated at random: wrong types, unknown keys at any depth, out-of-range,
huge and non-finite numbers, true/false for numbers, empty lists, bad globs,
bad import paths, duplicated paths and keys, null or non-mapping sections,
non-string keys, broken YAML. Whatever the mutation, the outcome is either a
config that round-trips (to_dict → JSON → YAML → the same config) or one
`sweep.ConfigError` whose single-line message names the offending field path,
raised before anything runs. Deterministic (`derandomize=True`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sweep
from sweep import ConfigError
from sweep.config import SweepConfig, dump_config, flatten, load_config, parse_config
from sweep.settings import MAX_INT64, MAX_ROWS_PER_FILE, MAX_SECONDS, MAX_WORKER_RESOURCE, MAX_WORKERS
from sweep.sinks.mlflow import mlflow_name_problem
from sweep.yaml_io import read_yaml
from sweep.studies import plan
from sweep.studies.interpolate import MAX_ALPHAS
from sweep.studies.perturb import MAX_COUNT

CHECKPOINTS = Path(sweep.__file__).parent / "examples" / "checkpoints"
GOOD = sorted(p for p in CHECKPOINTS.glob("*.safetensors") if not p.name.startswith("bad-"))
BAD = sorted(CHECKPOINTS.glob("bad-*.safetensors"))
SWEEP_CLI = Path(sys.executable).parent / "sweep"

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def base(kind: str) -> Dict[str, Any]:
    """A valid config of study `kind`, every field written out so any of them can be mutated."""
    study = {
        "checkpoints": {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "seed*.safetensors"), *map(str, BAD)]},
        "interpolate": {"kind": "interpolate", "endpoints": [str(GOOD[2]), str(GOOD[3])],
                        "alphas": {"start": -0.25, "stop": 1.25, "num": 7}},
        "interpolate-list": {"kind": "interpolate", "endpoints": [str(GOOD[2]), str(GOOD[3]), str(GOOD[4])],
                             "alphas": [0.0, 0.5, 1.0, 1.5, 2.0]},
        "perturb": {"kind": "perturb", "base": str(GOOD[0]), "sigma": 0.05, "count": 100, "seed": 3},
    }[kind]
    return {
        "name": f"fuzz-{kind}",
        "model": {"factory": "sweep.examples.digits:make_model", "kwargs": {"hidden": 64},
                  "weights": str(GOOD[-1]), "seed": 0},
        "data": {"loader": "sweep.examples.digits:eval_batches", "kwargs": {"batch_size": 250}},
        "metrics": {"function": "sweep.examples.digits:metrics", "objective": "accuracy", "mode": "max"},
        "study": study,
        "evaluation": {"precision": "fp32", "compile": False, "chunk_size": "auto"},
        "workers": {"count": 2, "cpus": 1, "gpus": 0, "device": "cpu", "batch_size": "auto", "max_in_flight": 2},
        "sinks": {
            "parquet": {"enabled": True, "path": "results", "rows_per_file": 1000, "flush_seconds": 5.0},
            "mlflow": {"enabled": True, "tracking_uri": "sqlite:///mlflow.db", "experiment": "fuzz",
                       "max_candidate_metrics": 10_000, "retry_seconds": 60},
        },
    }


KINDS = ("checkpoints", "interpolate", "interpolate-list", "perturb")


def parse(raw: Any, tmp: Path) -> SweepConfig:
    return parse_config(plain_ints(raw), base_dir=tmp)


def plain_ints(value: Any) -> Any:
    """`Huge` markers (see below) as the plain ints they stand for."""
    if isinstance(value, Huge):
        return int(value)
    if isinstance(value, dict):
        return {k: plain_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_ints(v) for v in value]
    return value


def get_at(raw: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    node: Any = raw
    for part in path:
        node = node[part]
    return node


def set_at(raw: Dict[str, Any], path: Tuple[str, ...], value: Any) -> None:
    get_at(raw, path[:-1])[path[-1]] = value


def dotted(path: Tuple[str, ...]) -> str:
    return ".".join(path)


def printable(text: str) -> str:
    """`text` as a one-line message shows it: control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def names_field(message: str, field: str) -> bool:
    """Whether `message` reports a problem at `field` (the path, then ':', '.' or '['); '' is the top level."""
    if field == "":
        return "top level: " in message
    return re.search(rf"(^|: |; ){re.escape(printable(field))}[:.\[]", message) is not None


def refused(raw: Any, tmp: Path) -> str:
    """The ConfigError message for `raw`; any other outcome fails the test."""
    try:
        config = parse(raw, tmp)
    except ConfigError as e:
        message = str(e)
        assert message.isprintable() and "\n" not in message, repr(message)
        return message
    raise AssertionError(f"accepted: {config!r}")


def accepted_or_refused(raw: Any, tmp: Path):
    """(config, None) or (None, message); never another exception."""
    try:
        return parse(raw, tmp), None
    except ConfigError as e:
        message = str(e)
        assert message.isprintable() and "\n" not in message, repr(message)
        return None, message


def assert_round_trips(config: SweepConfig, tmp: Path) -> None:
    """A config that loads is one the rest of sweep can use: JSON, YAML, the worker's re-validation, MLflow."""
    spec = config.to_dict()
    text = json.dumps(spec, sort_keys=True)
    flat = flatten(spec)
    assert all(isinstance(k, str) for k in flat)
    again = SweepConfig.model_validate(spec, context={"check_files": False})  # what a worker does
    assert again.digest() == config.digest()
    reread = parse_config(read_yaml(dump_config(config), source="dump"), base_dir=tmp, check_imports=False)
    assert json.dumps(reread.to_dict(), sort_keys=True) == text
    if config.sinks.mlflow.enabled:
        bad = {k: mlflow_name_problem(k) for k in flat if mlflow_name_problem(k)}
        assert not bad, bad


# --------------------------------------------------------------------------- the fields and their bad values

INT_FIELDS = {  # path: (lowest, highest)
    ("model", "seed"): (0, MAX_INT64),
    ("workers", "max_in_flight"): (1, 64),
    ("sinks", "parquet", "rows_per_file"): (1, MAX_ROWS_PER_FILE),
    ("sinks", "mlflow", "max_candidate_metrics"): (0, MAX_INT64),
}
AUTO_INT_FIELDS = {
    ("workers", "count"): (1, MAX_WORKERS),
    ("workers", "batch_size"): (1, 1_000_000),
    ("evaluation", "chunk_size"): (1, 1_000_000),
}
FLOAT_FIELDS = {  # path: (lowest, whether the lowest is allowed, highest)
    ("workers", "cpus"): (0.0, False, MAX_WORKER_RESOURCE),
    ("workers", "gpus"): (0.0, True, MAX_WORKER_RESOURCE),
    ("sinks", "parquet", "flush_seconds"): (0.0, False, MAX_SECONDS),
    ("sinks", "mlflow", "retry_seconds"): (0.0, True, MAX_SECONDS),
}
STUDY_INT_FIELDS = {
    "perturb": {("study", "count"): (1, MAX_COUNT), ("study", "seed"): (0, 2**31 - 1)},
    "interpolate": {("study", "alphas", "num"): (1, MAX_ALPHAS)},
}
STUDY_FLOAT_FIELDS = {
    "perturb": {("study", "sigma"): (0.0, False, math.inf)},
    "interpolate": {("study", "alphas", "start"): (-math.inf, True, math.inf),
                    ("study", "alphas", "stop"): (-math.inf, True, math.inf)},
}
CHOICE_FIELDS = {
    ("metrics", "mode"): {"min", "max"},
    ("evaluation", "precision"): {"fp32", "bf16"},
    ("workers", "device"): {"auto", "cpu", "cuda"},
}
BOOL_FIELDS = [("evaluation", "compile"), ("sinks", "parquet", "enabled"), ("sinks", "mlflow", "enabled")]
IMPORT_FIELDS = [("model", "factory"), ("data", "loader"), ("metrics", "function")]
SECTIONS = [("model",), ("data",), ("metrics",), ("study",), ("evaluation",), ("workers",), ("sinks",),
            ("sinks", "parquet"), ("sinks", "mlflow")]
REQUIRED = [("name",), ("model",), ("data",), ("metrics",), ("study",), ("model", "factory"), ("data", "loader"),
            ("metrics", "function")]
STUDY_REQUIRED = {"checkpoints": [("study", "paths")], "interpolate": [("study", "endpoints"), ("study", "alphas")],
                  "perturb": [("study", "sigma"), ("study", "count")]}


def kind_of(kind: str) -> str:
    return "interpolate" if kind.startswith("interpolate") else kind


def int_fields(kind: str) -> Dict[Tuple[str, ...], Tuple[int, int]]:
    fields = dict(INT_FIELDS)
    if kind != "interpolate-list":
        fields.update(STUDY_INT_FIELDS.get(kind_of(kind), {}))
    return fields


def float_fields(kind: str) -> Dict[Tuple[str, ...], Tuple[float, bool, float]]:
    fields = dict(FLOAT_FIELDS)
    if kind != "interpolate-list":
        fields.update(STUDY_FLOAT_FIELDS.get(kind_of(kind), {}))
    return fields


not_a_number_text = st.text(max_size=12).filter(lambda s: not _is_number(s))
containers = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


class Huge(int):
    """An integer too long for str() (Python refuses over 4300 digits), shown by its size so reports can print it."""

    def __repr__(self) -> str:
        return f"Huge(10**{len(str(abs(int(self)) // 10**4000)) + 3999})"


HUGE = Huge(10**5000)
huge_ints = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1), st.just(HUGE),
                      st.just(-(10**400)))
beyond_floats = st.sampled_from([10**400, -(10**400), HUGE])  # no float holds them
non_finite = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def bad_ints(low: int, high: int, auto: bool) -> st.SearchStrategy:
    text = not_a_number_text.filter(lambda s: s != "auto") if auto else st.text(max_size=12)
    return st.one_of(
        st.booleans(),  # lax mode would read true as 1
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not float(f).is_integer()),
        st.integers(max_value=low - 1),
        st.integers(min_value=high + 1),
        huge_ints,
        text,
        st.integers(low, min(high, 10**6)).map(str),  # a quoted number is not an integer
        st.none(),
        containers,
    )


def bad_floats(low: float, low_ok: bool, high: float) -> st.SearchStrategy:
    out_of_range = []
    if math.isfinite(low):
        out_of_range.append(st.floats(max_value=low, exclude_max=low_ok, allow_nan=False, allow_infinity=False))
    if math.isfinite(high):
        out_of_range.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
        out_of_range.append(st.integers(min_value=int(high) + 1))
    return st.one_of(st.booleans(), non_finite, not_a_number_text, st.none(), containers, beyond_floats, *out_of_range)


def bad_import_paths() -> st.SearchStrategy:
    ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
    return st.one_of(
        st.sampled_from([
            "sweep.examples.digits.make_model",  # no ':'
            "sweep.examples.digits:make_model:x",  # two
            ":make_model", "sweep.examples.digits:", "..x:f", "sweep..digits:f", "sweep.examples.digits:.f",
            "sweep.examples.digits:N_TRAIN",  # not callable
            "sweep.examples.digits:make model", "sweep/examples/digits.py:make_model", "", " ",
        ]),
        ident.map(lambda m: f"no_such_module_{m}:f"),
        ident.map(lambda a: f"sweep.examples.digits:{a}_not_there"),
        ident.map(lambda a: f"sweep.examples.{a}_absent:make_model"),
        st.text(max_size=20).filter(lambda s: s.count(":") != 1),
        st.none(), st.integers(), st.booleans(), containers,
    )


@st.composite
def targeted_mutation(draw, kind: str) -> Tuple[str, Dict[str, Any], str]:
    """(what, a config with one known-bad change, the field path its error must name)."""
    raw = base(kind)
    what = draw(st.sampled_from(["int", "auto-int", "float", "choice", "bool", "import", "section", "required",
                                 "unknown-key", "non-string-key", "name", "study", "mlflow"]))
    if what == "int":
        path, (low, high) = draw(st.sampled_from(sorted(int_fields(kind).items())))
        set_at(raw, path, draw(bad_ints(low, high, auto=False)))
    elif what == "auto-int":
        path, (low, high) = draw(st.sampled_from(sorted(AUTO_INT_FIELDS.items())))
        set_at(raw, path, draw(bad_ints(low, high, auto=True)))
    elif what == "float":
        path, (low, low_ok, high) = draw(st.sampled_from(sorted(float_fields(kind).items())))
        set_at(raw, path, draw(bad_floats(low, low_ok, high)))
    elif what == "choice":
        path, allowed = draw(st.sampled_from(sorted(CHOICE_FIELDS.items())))
        set_at(raw, path, draw(st.one_of(st.text(max_size=10).filter(lambda s: s not in allowed and not
                                                                     re.fullmatch(r"cuda:[0-9]{1,4}", s)),
                                         st.none(), st.integers(), st.booleans(), containers)))
    elif what == "bool":
        path = draw(st.sampled_from(BOOL_FIELDS))
        set_at(raw, path, draw(st.one_of(st.integers().filter(lambda i: i not in (0, 1)), st.none(), containers,
                                         st.sampled_from(["maybe", "enabled", "2", "", "tru"]))))
    elif what == "import":
        path = draw(st.sampled_from(IMPORT_FIELDS))
        set_at(raw, path, draw(bad_import_paths()))
    elif what == "section":
        path = draw(st.sampled_from(SECTIONS))
        set_at(raw, path, draw(st.one_of(st.none(), st.integers(), st.text(max_size=8), st.booleans(),
                                         st.lists(st.integers(), max_size=2), st.floats())))
    elif what == "required":
        path = draw(st.sampled_from(REQUIRED + STUDY_REQUIRED[kind_of(kind)]))
        del get_at(raw, path[:-1])[path[-1]]
    elif what == "unknown-key":
        mappings = [()] + SECTIONS + ([("study", "alphas")] if kind == "interpolate" else [])
        section = draw(st.sampled_from(mappings))
        node = get_at(raw, section)
        key = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True).filter(lambda k: k not in node))
        node[key] = draw(st.integers())
        path = section + (key,)
    elif what == "non-string-key":
        mappings = [()] + SECTIONS + [("model", "kwargs"), ("data", "kwargs")]
        section = draw(st.sampled_from(mappings))
        get_at(raw, section)[draw(st.one_of(st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False)))] = 1
        return what, raw, dotted(section)
    elif what == "name":
        path = ("name",)
        set_at(raw, path, draw(st.one_of(
            st.text(max_size=20).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s)),
            st.text(alphabet="abc", min_size=201, max_size=260), st.integers(), st.none(), containers)))
    elif what == "study":
        path, value = draw(bad_study_value(kind))
        set_at(raw, path, value)
    else:  # a kwargs key or an objective MLflow would refuse as a name
        path, value = draw(bad_mlflow_value())
        set_at(raw, path, value)
    return what, raw, dotted(path)


def bad_study_value(kind: str) -> st.SearchStrategy:
    missing = str(CHECKPOINTS / "absent.safetensors")
    if kind == "checkpoints":
        return st.tuples(st.just(("study", "paths")), st.sampled_from([
            [],  # empty
            [str(CHECKPOINTS / "nothing-*.safetensors")],  # a glob matching nothing
            [str(CHECKPOINTS / "**" / "*.nothing")],
            [str(CHECKPOINTS / "[")],  # an unclosed bracket: matches nothing
            [str(CHECKPOINTS.parent / "check*")],  # matches only a folder
            [str(GOOD[0]), str(GOOD[0])],  # duplicated
            [str(GOOD[0]), str(CHECKPOINTS / ".." / "checkpoints" / GOOD[0].name)],  # the same file, spelt otherwise
            [str(CHECKPOINTS / "seed*.safetensors")] * 2,  # a glob twice
            ["*.safetensors"],  # relative: resolved against the config's folder, where there are none
            [missing], [str(CHECKPOINTS)],  # a folder
            [""], ["   "], ["a\x00b"], ["~no-such-user-x/a.safetensors"], ["x" * 5000],
            "one-string", None, [1], [None], [[str(GOOD[0])]], {"a": 1}, ["\ud800.safetensors"],
        ]))
    if kind_of(kind) == "interpolate":
        return st.one_of(
            st.tuples(st.just(("study", "endpoints")), st.sampled_from([
                [], [str(GOOD[0])], [str(GOOD[0]), missing], [str(GOOD[0]), str(CHECKPOINTS)],
                [str(GOOD[0]), str(CHECKPOINTS / "seed*.safetensors")], None, "a.safetensors", [str(GOOD[0]), 3],
                [str(GOOD[0]), ""], [str(GOOD[0]), "x" * 5000]])),
            st.tuples(st.just(("study", "alphas")), st.one_of(
                st.sampled_from([[], None, "0.5", {"start": 0, "stop": 1}, {"num": 0}, {"num": 3, "step": 1},
                                 [[0.5]], [None], {"start": "a", "stop": 1, "num": 2}]),
                st.lists(st.one_of(st.floats(), st.booleans(), st.text(max_size=3)), min_size=1, max_size=4)
                .filter(lambda xs: any(isinstance(x, (bool, str)) or not math.isfinite(x) for x in xs)
                        and not all(isinstance(x, str) and _is_number(x) and math.isfinite(float(x)) for x in xs)),
            )),
        )
    return st.tuples(st.just(("study", "base")), st.sampled_from(
        [missing, str(CHECKPOINTS), "", "x" * 5000, 5, ["a"], "~no-such-user-x/w.safetensors"]))


def bad_mlflow_value() -> st.SearchStrategy:
    """A kwargs key or an objective MLflow refuses. (A kwargs key is the end of a param name: '/x' or '..' there
    is fine, since 'model.kwargs./x' is a plain relative path.)"""
    anywhere = st.one_of(
        st.sampled_from(["a b/../c", "trail/", "a//b", "a/./b", "a/..", "semi;colon", "col:on", "bang!", "tab\there",
                         "new\nline", "é€", "x" * 250]),
        st.text(alphabet=st.characters(blacklist_characters="/_.- ", blacklist_categories=("L", "N", "Cs")),
                min_size=1, max_size=5).map(lambda s: "k" + s),
    )
    whole_name = st.one_of(anywhere, st.sampled_from(["/lead", "..", "..a", "./a", "a/.", "x" * 240]))
    return st.one_of(
        st.tuples(st.sampled_from([("model", "kwargs"), ("data", "kwargs")]), anywhere.map(lambda k: {k: 1})),
        st.tuples(st.just(("metrics", "objective")), whole_name),
        st.tuples(st.sampled_from([("model", "kwargs"), ("data", "kwargs")]),
                  st.just({"a.b": 1, "a": {"b": 2}})),  # two keys, one MLflow param
    )


@settings(FUZZ, max_examples=2000)
@given(data=st.data())
def test_known_bad_changes_are_refused_naming_the_field(tmp_path_factory, data):
    tmp = tmp_path_factory.getbasetemp()
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    what, raw, field = data.draw(targeted_mutation(kind), label="mutation")
    message = refused(raw, tmp)
    assert names_field(message, field), (what, field, message)
    if what == "mlflow":
        assert "MLflow" in message, message


def test_every_base_config_is_valid_and_plans(tmp_path):
    for kind in KINDS:
        config = parse(base(kind), tmp_path)
        assert_round_trips(config, tmp_path)
        study = plan(config.study)
        assert len(study) > 0
    # a checkpoints study may list broken files: they become invalid rows, not config errors
    assert len(plan(parse(base("checkpoints"), tmp_path).study)) == len(GOOD) + len(BAD)


# --------------------------------------------------------------------------- arbitrary values anywhere

json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(), st.text(max_size=8))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()), inner, max_size=3)),
    max_leaves=8,
)


def all_paths(raw: Dict[str, Any], prefix: Tuple[str, ...] = ()) -> List[Tuple[str, ...]]:
    out = []
    for key, value in raw.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out.extend(all_paths(value, prefix + (key,)))
    return out


@settings(FUZZ, max_examples=2000)
@given(data=st.data())
def test_any_value_anywhere_is_accepted_whole_or_refused_by_name(tmp_path_factory, data):
    tmp = tmp_path_factory.getbasetemp()
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    raw = base(kind)
    path = data.draw(st.sampled_from(all_paths(raw)), label="path")
    how = data.draw(st.sampled_from(["replace", "add-key", "delete"]), label="how")
    key = None
    if how == "add-key" and not isinstance(get_at(raw, path), dict):
        how = "delete"
    if how == "replace":
        set_at(raw, path, data.draw(json_values, label="value"))
    elif how == "add-key" and isinstance(get_at(raw, path), dict):
        key = data.draw(st.one_of(st.text(max_size=8), st.integers(), st.none()), label="key")
        get_at(raw, path)[key] = data.draw(json_values, label="value")
    else:
        del get_at(raw, path[:-1])[path[-1]]
    config, message = accepted_or_refused(raw, tmp)
    if config is not None:
        assert_round_trips(config, tmp)
        return
    # the error names the field changed, or (for a study's kind, which changes what the study means) the study
    field = dotted(path[:-1]) if path[-1] == "kind" and how != "add-key" else dotted(path)
    if how == "add-key" and isinstance(key, str):
        assert names_field(message, field) or names_field(message, dotted(path + (key,))), (field, key, message)
    else:
        assert names_field(message, field), (field, message)


# --------------------------------------------------------------------------- YAML text and --set overrides


def yaml_text(kind: str) -> str:
    return yaml.safe_dump(base(kind), sort_keys=False)


@settings(FUZZ, max_examples=800)
@given(data=st.data())
def test_edited_yaml_files_load_or_fail_with_one_config_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("yaml")
    text = yaml_text(data.draw(st.sampled_from(KINDS), label="kind"))
    lines = text.splitlines(keepends=True)
    edit = data.draw(st.sampled_from(["insert", "delete", "duplicate-line", "replace-line", "append", "indent"]))
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    if edit == "insert":
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(max_size=6)) + text[at:]
    elif edit == "delete":
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + text[at + data.draw(st.integers(1, 20)):]
    elif edit == "duplicate-line":  # duplicated keys: refused, never the last one silently kept
        text = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
    elif edit == "replace-line":
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        key = lines[i].strip().split(":")[0]
        value = data.draw(st.sampled_from(["2024-13-45", "9" * 5000, "[" * 400, "!!binary zz", "&a [*a]", ".nan",
                                           "!!python/object:os.system {}", "{a: 1, a: 2}", "yes", "0x1F", "1e-3",
                                           "~", "'\\ud800'", '"\\ud800"', "2001-12-14t21:59:43.10-99:00"]))
        text = "".join(lines[:i] + [f"{indent}{key}: {value}\n"] + lines[i + 1:])
    elif edit == "append":
        text += data.draw(st.text(max_size=30))
    else:
        text = "".join(lines[:i] + ["\t" + lines[i]] + lines[i + 1:])
    path = tmp / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and str(e).isprintable(), repr(str(e))
        return
    assert_round_trips(config, tmp)


@settings(FUZZ, max_examples=200)
@given(blob=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_arbitrary_file_contents_are_a_config_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "config.yaml"
    path.write_bytes(blob)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).isprintable()


def test_duplicate_keys_are_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text("perturb") + "workers: {count: 1}\n")
    with pytest.raises(ConfigError, match=r"workers: duplicate key 'workers' \(line \d+\)"):
        load_config(path)
    path.write_text(yaml_text("perturb").replace("  count: 2\n", "  count: 2\n  count: 3\n"))
    with pytest.raises(ConfigError, match=r"workers\.count: duplicate key 'count'"):
        load_config(path)


@pytest.mark.parametrize("value, field", [
    ("2024-13-45", "workers.count"), ("9" * 5000, "workers.count"), ("[" * 2000 + "]" * 2000, "config"),
    ("'2001-12-14 21:59:43.10-99:00'", "workers.count"), ("!!timestamp 2001-12-14 21:59:43.10-99:00", "workers.count"),
])
def test_yaml_values_python_cannot_build_are_config_errors(tmp_path, value, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text("checkpoints"))
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"workers.count={value}"])
    message = str(info.value)
    assert message.isprintable() and (field in message or "not valid YAML" in message), message


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_overrides_apply_or_fail_with_one_config_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("override")
    path = tmp / "config.yaml"
    path.write_text(yaml_text(data.draw(st.sampled_from(KINDS))))
    paths = [dotted(p) for p in all_paths(base("checkpoints"))]
    key = data.draw(st.one_of(st.sampled_from(paths), st.text(max_size=12)), label="key")
    value = data.draw(st.one_of(st.text(max_size=12), st.sampled_from(["true", "1.5", "-1", "auto", "[]", "{}", "~",
                                                                         ".inf", "[a, b]", "{x: 1}", "9" * 5000])))
    try:
        config = load_config(path, [f"{key}={value}"])
    except ConfigError as e:
        assert str(e).isprintable(), repr(str(e))
        return
    assert_round_trips(config, tmp)


# --------------------------------------------------------------------------- studies at plan time, bounds, before anything runs


@pytest.mark.parametrize("bad", BAD, ids=lambda p: p.name)
def test_interpolate_endpoint_may_not_be_a_broken_file(tmp_path, bad):
    raw = base("interpolate")
    raw["study"]["endpoints"] = [str(GOOD[2]), str(bad)]
    config = parse(raw, tmp_path)  # the file is there; it is read when the study is planned
    with pytest.raises(ConfigError, match=r"^study\.endpoints\[1\]: "):
        plan(config.study)


def test_perturb_base_may_not_be_an_unreadable_file(tmp_path):
    raw = base("perturb")
    raw["study"]["base"] = str(CHECKPOINTS / "bad-truncated.safetensors")
    with pytest.raises(ConfigError, match=r"^study\.base: "):
        plan(parse(raw, tmp_path).study)


def test_alphas_list_bound(tmp_path, monkeypatch):
    import sweep.studies.interpolate as interpolate

    monkeypatch.setattr(interpolate, "MAX_ALPHAS", 4)
    raw = base("interpolate-list")
    assert "study.alphas: at most 4 alphas" in refused(raw, tmp_path)


BAD_CONFIGS = {
    "bool-count": (("workers", "count"), True, "workers.count"),
    "nan-cpus": (("workers", "cpus"), math.nan, "workers.cpus"),
    "bad-factory": (("model", "factory"), "sweep.examples.digits:nothere", "model.factory"),
    "kwargs-key": (("model", "kwargs"), {"a b/../c": 1}, "model.kwargs.a b/../c"),
    "empty-paths": (("study", "paths"), [], "study.paths"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_error_comes_before_anything_runs(tmp_path, monkeypatch, case):
    import sweep.examples.digits as digits
    import sweep.model as model

    called = []
    monkeypatch.setattr(model, "build_module", lambda *a, **k: called.append("build_module"))
    monkeypatch.setattr(digits, "make_model", lambda *a, **k: called.append("factory"))
    monkeypatch.setattr(digits, "eval_batches", lambda *a, **k: called.append("loader"))
    monkeypatch.chdir(tmp_path)
    ray_before = "ray" in sys.modules
    path, value, field = BAD_CONFIGS[case]
    raw = base("checkpoints")
    set_at(raw, path, value)
    message = refused(raw, tmp_path)
    assert names_field(message, field), message
    assert called == [] and list(tmp_path.iterdir()) == []
    assert ray_before or "ray" not in sys.modules


def test_validate_command_gives_one_line_and_exit_2(tmp_path):
    """A few generated bad configs through `sweep validate` (each costs a process start, so only a few)."""
    cases = []
    for path, value, field in [BAD_CONFIGS["kwargs-key"], (("study", "kind"), [1], "study.kind: unknown study kind")]:
        raw = base("checkpoints")
        set_at(raw, path, value)
        cases.append((yaml.safe_dump(raw), field))
    broken = yaml_text("perturb")
    cases.append((broken.replace("  count: 2\n", "  count: 2\n\tcpus: 1\n"), "not valid YAML: line"))  # a tab
    cases.append((broken + "workers: {count: 1}\n", "workers: duplicate key 'workers'"))
    cases.append((broken.replace("count: 100\n", "count: 2024-13-45\n"), "study.count: cannot read '2024-13-45'"))
    for i, (text, expected) in enumerate(cases):
        config = tmp_path / f"bad-{i}.yaml"
        config.write_text(text)
        env = {k: v for k, v in os.environ.items() if k != "SWEEP_DEBUG"}
        proc = subprocess.run([str(SWEEP_CLI), "validate", str(config)], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=env)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sweep: config error:"), proc.stderr
        assert expected in lines[0], (expected, lines[0])


@pytest.mark.parametrize("kind", [[1], {"a": 1}, HUGE, None, 3.5], ids=repr)
def test_a_study_kind_that_is_not_a_string_leaves_stderr_alone(tmp_path, kind):
    """pydantic's own tag lookup hashed and printed the kind: a list or a 5000-digit integer became an
    'Exception ignored in …' on stderr (an unraisable exception) beside the config error."""
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        raw = base("perturb")
        raw["study"]["kind"] = plain_ints(kind)
        message = refused(raw, tmp_path)
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert unraisable == [] and "study.kind: unknown study kind" in message, (unraisable, message)
