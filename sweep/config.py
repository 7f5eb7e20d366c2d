"""The typed sweep config: YAML in, unknown keys rejected, paths resolved.

Every problem is raised as one `ConfigError` that names the field path
(`study.paths`, `sinks.parquet.rows_per_file`, …), before any work starts:
wrong types (true/false is not a number), numbers out of range, NaN and
infinities, files that are not there, import paths that do not import, YAML
that cannot be read (duplicate keys included), factory and loader kwargs that
are not plain data, and config keys MLflow would refuse as param names.
"""

from __future__ import annotations

import datetime
import difflib
import errno
import hashlib
import json
import math
import os
import posixpath
import re
import reprlib
import stat
from pathlib import Path
from typing import (Annotated, Any, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple,
                    Union, get_args, get_origin)

import yaml
from pydantic import (AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict,
                      Tag, ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .errors import ConfigError, SweepError
from .files import checks_files, check_file, glob_matches_a_file, path_kind, resolve_file, resolve_files, resolve_path
from .messages import first_line as _first_line, kind_of as _kind, one_line as _one_line, short as _short
from .model import import_callable
from .settings import (MAX_INT64, MIN_INT64, MAX_WORKERS, MAX_WORKER_RESOURCE, MAX_BATCH_SIZE, MAX_IN_FLIGHT,
                       MAX_ROWS_PER_FILE, MAX_SECONDS, MAX_NESTING, MAX_VALUES, Float, ImportPath, Int, Kwargs,
                       Section, Text)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


#: MLflow's rules for metric names and param keys (mlflow/utils/validation.py): at most
#: MAX_ENTITY_KEY_LENGTH characters, only the characters of `validate_param_and_metric_name`
#: (it allows ':' too, except on Windows; a tracking server may run anywhere, so ':' is refused
#: here), and `path_not_unique`: the name must be its own normalised relative path.
MLFLOW_MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MLFLOW_KEY_PATTERN = re.compile(r"[/\w.\- ]*")  # fullmatch; MLflow's own `$` also lets one trailing newline by
#: MLflow refuses empty experiment names and those longer than this (MAX_EXPERIMENT_NAME_LENGTH).
MLFLOW_MAX_EXPERIMENT_NAME_LENGTH = 500


class ModelSection(Section):
    """The shared module every candidate is evaluated against."""

    factory: ImportPath = Field(description="'package.module:function' returning a torch.nn.Module")
    kwargs: Kwargs = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: Optional[Text] = Field(None, description="safetensors file loaded into the module (optional)")
    seed: Int = Field(0, ge=0, le=MAX_INT64, description="torch seed the factory runs under, so every worker builds the same module")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        return resolve_file(v, info)


class DataSection(Section):
    """The eval data: a loader that returns an iterable of (x, y) batches."""

    loader: ImportPath = Field(description="'package.module:function' returning an iterable of (x, y) batches")
    kwargs: Kwargs = Field(default_factory=dict)


class MetricsSection(Section):
    """The metrics function and which metric ranks candidates."""

    function: ImportPath = Field(description="'package.module:function', metrics(output, y) -> {name: scalar}")
    objective: Optional[Text] = Field(None, min_length=1, description="metric that ranks candidates (default: the first one)")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher objective is better")


class EvaluationSection(Section):
    """How each worker evaluates a chunk of candidates."""

    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 stores the materialised weights in bfloat16")
    compile: bool = Field(False, description="torch.compile the vmapped call (compile time reported apart)")
    chunk_size: Union[Literal["auto"], Int] = Field(
        "auto", description="candidates per vmapped call; auto measures at start-up")

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH_SIZE:
            raise ValueError(f"must be 'auto' or an integer from 1 to {MAX_BATCH_SIZE}")
        return v


class WorkersSection(Section):
    """Ray workers: how many, what each reserves, how work is batched."""

    count: Union[Literal["auto"], Int] = Field("auto", description="'auto' uses the CPUs (or GPUs) Ray reports")
    cpus: Float = Field(1.0, gt=0, le=MAX_WORKER_RESOURCE, description="CPUs reserved per worker")
    gpus: Float = Field(0.0, ge=0, le=MAX_WORKER_RESOURCE, description="GPUs per worker; fractions share a device")
    device: Text = Field("auto", description="'auto' (cuda when the worker has a GPU), 'cpu' or 'cuda[:N]'")
    batch_size: Union[Literal["auto"], Int] = Field(
        "auto", description="candidates per task sent to a worker; auto: 8 files, or 4096 recipe rows")
    max_in_flight: Int = Field(2, ge=1, le=MAX_IN_FLIGHT, description="tasks queued per worker")

    @field_validator("count")
    @classmethod
    def _count(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= MAX_WORKERS:
            raise ValueError(f"must be 'auto' or an integer from 1 to {MAX_WORKERS}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH_SIZE:
            raise ValueError(f"must be 'auto' or an integer from 1 to {MAX_BATCH_SIZE}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]{1,4}", v):
            return v
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


class ParquetSink(Section):
    """Results as a Parquet dataset (default: <out>/runs/<name>/results/)."""

    enabled: bool = True
    path: Optional[Text] = Field(
        None, description="where the dataset goes: a local folder or a pyarrow.fs URI (s3://, gs://, file://)")
    rows_per_file: Int = Field(100_000, ge=1, le=MAX_ROWS_PER_FILE, description="rows buffered before a file is written")
    flush_seconds: Float = Field(30.0, gt=0, le=MAX_SECONDS, description="longest time rows wait in the buffer")

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None or "://" in v:
            return v
        return resolve_path(v, info)


class MlflowSink(Section):
    """One MLflow run per sweep."""

    enabled: bool = True
    tracking_uri: Optional[Text] = Field(
        None, min_length=1, description="default: $MLFLOW_TRACKING_URI, else MLflow's default")
    experiment: Optional[Text] = Field(
        None, min_length=1, max_length=MLFLOW_MAX_EXPERIMENT_NAME_LENGTH, description="default: the sweep's name")
    max_candidate_metrics: Int = Field(
        10_000, ge=0, le=MAX_INT64,
        description="sweeps with more candidates log per-batch summaries, not one step per candidate")
    retry_seconds: Float = Field(
        120.0, ge=0, le=MAX_SECONDS,
        description="how long one logging request is retried (with backoff) while a server that has answered is "
                    "away; one that has not answered yet is tried for 15 s at most")


class SinksSection(Section):
    parquet: ParquetSink = Field(default_factory=ParquetSink)
    mlflow: MlflowSink = Field(default_factory=MlflowSink)


def _study_kind(value: Any) -> Optional[str]:
    """The study's `kind`, for choosing its Config. Only a string can name one: pydantic's own tag
    lookup would hash and print any value, and a list or a 5000-digit integer there ends up as an
    'Exception ignored' on stderr."""
    if isinstance(value, dict):
        if "kind" not in value:
            return None
        kind = value["kind"]
    else:
        kind = getattr(value, "kind", None)
    return kind if isinstance(kind, str) else _NOT_A_KIND


_NOT_A_KIND = "\0not a study kind"


def _study_union() -> Any:
    from .studies import STUDIES

    configs = tuple(Annotated[study.Config, Tag(kind)] for kind, study in STUDIES.items())
    if len(configs) == 1:
        return STUDIES[next(iter(STUDIES))].Config
    return Annotated[Union[configs], Discriminator(_study_kind)]  # type: ignore[valid-type]


class SweepConfig(Section):
    """A whole sweep: what to evaluate, on what, with which workers, into which sinks."""

    name: str = Field(pattern=NAME_PATTERN, max_length=200, description="names the run folder and MLflow experiment")
    model: ModelSection
    data: DataSection
    metrics: MetricsSection
    study: _study_union()  # type: ignore[valid-type]
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    sinks: SinksSection = Field(default_factory=SinksSection)

    @model_validator(mode="after")
    def _mlflow_names(self) -> "SweepConfig":
        """The flattened config becomes MLflow params: each key must be one MLflow takes."""
        if not self.sinks.mlflow.enabled:
            return self
        how = "rename it, or set sinks.mlflow.enabled: false"
        seen: Dict[str, Tuple[Any, ...]] = {}
        for key, at, _ in _param_items(self.to_dict()):
            problem = mlflow_name_problem(key)
            if problem is not None:
                raise PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": (
                    f"becomes the MLflow param {_short(key)}, which MLflow refuses: it {problem}; {how}")})
            if key in seen:
                raise PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": (
                    f"becomes the MLflow param {_short(key)}, and so does the setting at "
                    f"{' → '.join(_short(k) for k in seen[key])}; rename one of them")})
            seen[key] = at
        objective = self.metrics.objective
        if objective is not None:
            problem = _metric_name_problem(objective)
            if problem is not None:
                raise PydanticCustomError("sweep_at", "{reason}", {"at": ("metrics", "objective"), "reason": (
                    f"{_short(objective)} is logged as an MLflow metric, which MLflow refuses: {problem}; {how}")})
        return self

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short hash of what decides the rows (the resolved config less NOT_IN_DIGEST), stored with them.

        Where and how fast they were made is left out, so a `sweep resume` on other workers, or the same
        sweep written elsewhere under another name, stamps the same digest.
        """
        decides = {key: value for key, value in self.to_dict().items() if key not in NOT_IN_DIGEST}
        text = json.dumps(decides, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Top-level sections that decide where and how fast rows are made, not what they hold: `name` (the run
#: folder, the MLflow experiment), `workers` (how many, what each reserves, batching) and `sinks` (where
#: rows go, file sizes, flush timing, MLflow settings). `evaluation` stays in: its precision changes the
#: metrics, and compile and chunk size can change their last bits.
NOT_IN_DIGEST = ("name", "workers", "sinks")


IMPORT_FIELDS = (("model", "factory"), ("data", "loader"), ("metrics", "function"))


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_imports: bool = True) -> SweepConfig:
    """Read, override (`key.path=value`, value parsed as YAML) and validate a config file."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(_one_line(f"{_short(path)}: a config file is named by a path, not {_kind(path)}"))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(_one_line(f"{path}: config file not found")) from None
    except IsADirectoryError:
        raise ConfigError(_one_line(f"{path}: is a folder, not a config file")) from None
    except OSError as e:
        raise ConfigError(_one_line(f"{path}: cannot read config: {e.strerror or e}")) from None
    except UnicodeDecodeError as e:
        raise ConfigError(_one_line(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})")) from None
    except ValueError as e:  # a NUL character in the path
        raise ConfigError(_one_line(f"{path!r}: cannot read config: {e}")) from None
    raw = read_yaml(text, source=str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(_one_line(f"{path}: the config must be a mapping of sections, got {_kind(raw)}"))
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path), check_imports=check_imports)


def parse_config(raw: Dict[str, Any], *, base_dir: Path, source: str = "config",
                 check_imports: bool = True) -> SweepConfig:
    """Validate a config given as a mapping; every problem is a `ConfigError` naming its field."""
    try:
        config = SweepConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(_one_line(f"{source}: " + "; ".join(_describe_errors(e)))) from None
    if check_imports:
        for section, field in IMPORT_FIELDS:
            spec = getattr(getattr(config, section), field)
            try:
                import_callable(spec)
            except (Exception, SystemExit) as e:  # an import error in the user's module is theirs to read
                raise ConfigError(_one_line(f"{source}: {section}.{field}: {_first_line(e)}")) from None
    return config


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one `--set key.path=value` to the raw config dict."""
    if not isinstance(item, str):
        raise ConfigError(_one_line(f"--set {_short(item)}: expected a string key.path=value"))
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(_one_line(f"--set {item!r}: expected key.path=value"))
    parsed = read_yaml(value, source=f"--set {item!r}", at=key.strip())
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(_one_line(f"--set {item!r}: '{'.'.join(parts[: i + 1])}' is not a section"))
        node = child
    node[parts[-1]] = parsed


# --------------------------------------------------------------------------- YAML


class _YamlValueError(yaml.YAMLError):
    """A value YAML parsed but could not construct (a date out of range, a huge integer, a duplicate key)."""

    def __init__(self, at: str, message: str):
        super().__init__(f"{at}: {message}" if at else message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and naming the key path of a value it cannot read."""

    paths: Dict[int, str] = {}

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, ArithmeticError) as e:  # int('9' * 5000), date(2024, 13, 45), …
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            reason = "too many digits" if "integer string conversion" in str(e) else _first_line(e)
            raise _YamlValueError(self._at(node), f"cannot read {_short(value)} (line {node.start_mark.line + 1}): "
                                                  f"{reason}") from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: PyYAML says so below
                    continue
                if duplicate:
                    at = self._at(node)
                    raise _YamlValueError(f"{at}.{key}" if at else str(key),
                                          f"duplicate key {_short(key)} (line {key_node.start_mark.line + 1}); "
                                          f"YAML would keep only the last one")
        return super().construct_mapping(node, deep=deep)

    def _at(self, node: yaml.Node) -> str:
        return self.paths.get(id(node), "")

    def construct_yaml_int(self, node: yaml.Node) -> int:
        """A decimal integer (the only kind YAML_12_SCALARS lets through untagged): '017' is 17, not octal."""
        return int(self.construct_scalar(node), 10)


#: How a plain (unquoted) scalar becomes true/false or a number: YAML 1.2's core schema, with integers in
#: decimal only. YAML 1.1 (PyYAML's default) reads yes/no/on/off as true/false and 0x10, 0o17, 0b101,
#: 1_000 and 1:30 (base 60) as numbers; here those are strings, which a number field refuses, naming itself.
YAML_12_SCALARS = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
)
#: YAML 1.1's implicit types that YAML_12_SCALARS replaces, and its 'value' type (a lone `=`: a string here).
_YAML_11_SCALARS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                    "tag:yaml.org,2002:value")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_SCALARS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in YAML_12_SCALARS:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Writes a string quoted where YAML 1.1 or 1.2 would read it as something else ('yes', '1e3', '0x10'),
    so config.yaml reads back the same here and in any other YAML reader."""


_Dumper.yaml_implicit_resolvers = {first: list(resolvers)
                                   for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in YAML_12_SCALARS:
    _Dumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _node_paths(root: yaml.Node, prefix: str) -> Dict[int, str]:
    """id(node) -> the key path of every node under `root` (keys get their mapping's path)."""
    paths: Dict[int, str] = {}
    stack = [(root, prefix)]
    while stack:
        node, at = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = at
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((key_node, at))
                stack.append((value_node, f"{at}.{key}" if at else key))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(node.value))
    return paths


def read_yaml(text: str, *, source: str, at: str = "") -> Any:
    """Parse YAML with the safe loader; every problem is a one-line `ConfigError` starting with `source`."""
    loader = None
    try:
        loader = _Loader(text)  # refuses characters YAML does not allow
        node = loader.get_single_node()
        if node is None:
            return None
        loader.paths = _node_paths(node, at)
        return loader.construct_document(node)
    except _YamlValueError as e:
        raise ConfigError(_one_line(f"{source}: {e}")) from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_one_line(f"{source}: not valid YAML: {_yaml_problem(e)}")) from None
    except RecursionError:
        raise ConfigError(_one_line(f"{source}: not valid YAML: nested too deeply")) from None
    except Exception as e:  # the reader's own errors, whatever their type
        raise ConfigError(_one_line(f"{source}: not valid YAML: {_first_line(e)}")) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = error.problem or error.context or type(error).__name__
    if error.problem and error.context:
        text += f" ({error.context})"
    return where + text


# --------------------------------------------------------------------------- error messages


def _describe_errors(error: ValidationError) -> List[str]:
    """One message per problem, each starting with the field path the user wrote."""
    from .studies import STUDIES

    messages: List[Any] = []  # a str, or (where, errors) for a value no member of a union took
    alternatives: Dict[str, List[Dict[str, Any]]] = {}
    for err in error.errors():
        path, tp_parent, in_union = _walk(err["loc"])  # in_union: the value itself fit no member of a union
        kind = err["type"]
        got = f" (got {_short(err.get('input'))})"
        if kind == "sweep_at":
            where = _join_path(tuple(path) + tuple(err["ctx"]["at"])) or "top level"
            messages.append(f"{where}: {err['ctx']['reason']}")
            continue
        if kind == "invalid_key" or (path and path[-1] == "[key]"):
            # ('model', 'kwargs', 1, '[key]'): the key 1 of model.kwargs; (1,): the top-level key 1
            where = _join_path(path[:-2] if path and path[-1] == "[key]" else path[:-1]) or "top level"
            key = err.get("input")
            messages.append(f"{where}: the key {_short(key)} is {_kind(key)}; keys should be strings")
            continue
        where = _join_path(path) or "top level"
        if in_union:  # e.g. workers.count: neither 'auto' nor an integer
            if where not in alternatives:
                alternatives[where] = []
                messages.append((where, alternatives[where]))
            alternatives[where].append(err)
            continue
        if kind == "extra_forbidden":
            known = _fields_of(tp_parent)
            hint = difflib.get_close_matches(str(path[-1]), known, n=1) if path else []
            text = f"{where}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if known:
                text += f"; known keys: {', '.join(known)}"
        elif kind == "missing":
            text = f"{where}: required field is missing"
        elif kind in ("union_tag_invalid", "union_tag_not_found") and not isinstance(err.get("input"), dict):
            text = f"{where}: should be a mapping of settings, got {_kind(err.get('input'))}{got}"
        elif kind == "union_tag_invalid":
            tag = err["input"].get("kind")
            text = f"{where}.kind: unknown study kind {_short(tag)}; known kinds: {', '.join(STUDIES)}"
        elif kind == "union_tag_not_found":
            text = f"{where}.kind: required field is missing; known kinds: {', '.join(STUDIES)}"
        elif kind in ("too_short", "too_long") and isinstance(err.get("input"), str):
            bound = err.get("ctx", {}).get("min_length" if kind == "too_short" else "max_length")
            text = f"{where}: should have {'at least' if kind == 'too_short' else 'at most'} {bound} characters{got}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            text = f"{where}: should be a mapping of settings, got {_kind(err.get('input'))}{got}"
        else:
            text = f"{where}: {_message(err)}{got}"
        messages.append(text)
    # A value no member of a union took: one message saying what each member wanted.
    for i, item in enumerate(messages):
        if isinstance(item, tuple):
            where, errs = item
            wanted = " or ".join(dict.fromkeys(_message(e).removeprefix("Input should be ").removeprefix("should be ")
                                               for e in errs))
            messages[i] = f"{where}: should be {wanted} (got {_short(errs[0].get('input'))})"
    return messages


def _message(err: Dict[str, Any]) -> str:
    return err["msg"].removeprefix("Value error, ")


def _walk(loc: Sequence[Any]) -> Tuple[List[Any], Any, bool]:
    """The user's field path for a pydantic error location (union member tags dropped), the type
    holding the last part, and whether a union member tag was dropped."""
    path: List[Any] = []
    tp: Any = SweepConfig
    parent: Any = None
    in_union = False
    for part in loc:
        tp = _unwrap(tp)
        if _is_union(tp):
            tp = _union_member(tp, part)
            in_union = True
            continue
        in_union = False
        parent = tp
        path.append(part if not (isinstance(part, int) and not isinstance(part, bool)) else [part])
        tp = _child(tp, part)
    return path, _unwrap(parent), in_union


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is Union:
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union


def _union_member(tp: Any, tag: Any) -> Any:
    """The member of a union that pydantic's location part `tag` names (a study kind, a class, a tag)."""
    for member in get_args(tp):
        inner = member
        tags = []
        while get_origin(inner) is Annotated:
            tags += [getattr(m, "tag", None) for m in get_args(inner)[1:]]
            inner = get_args(inner)[0]
        if tag is not None and tag in tags:
            return inner
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            kind = inner.model_fields.get("kind")
            if inner.__name__ == tag or (kind is not None and tag in get_args(kind.annotation)):
                return inner
        if isinstance(tag, str) and get_origin(inner) is list and tag.startswith("list["):
            return inner
    return None


def _child(tp: Any, part: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = get_origin(tp)
    if origin is list:
        return get_args(tp)[0]
    if origin is dict:
        return get_args(tp)[1]
    return None


def _fields_of(tp: Any) -> List[str]:
    """Field names of a config section, for 'did you mean' hints."""
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _join_path(parts: Iterable[Any]) -> str:
    """('study', 'paths', [2]) -> 'study.paths[2]'; ints from a location are list indexes."""
    text = ""
    for part in parts:
        if isinstance(part, list):
            text += f"[{part[0]}]"
        elif isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text



# --------------------------------------------------------------------------- MLflow names


def mlflow_name_problem(name: Any) -> Optional[str]:
    """Why MLflow would refuse `name` as a metric name or param key (completing 'it …'), or None.

    Mirrors `mlflow.utils.validation` (`_validate_metric_name`, `_validate_param_name` and the
    MAX_ENTITY_KEY_LENGTH check), minus ':' (refused by MLflow on Windows) and a trailing newline.
    """
    if not isinstance(name, str):
        return f"is not a string (it is {_kind(name)})"
    if not name:
        return "is empty"
    if not MLFLOW_KEY_PATTERN.fullmatch(name):
        bad = "".join(dict.fromkeys(c for c in name if not MLFLOW_KEY_PATTERN.fullmatch(c)))
        return (f"holds {_short(bad)}; MLflow names may hold only letters, digits, "
                f"underscores, dashes, periods, spaces and slashes")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return (f"is not a plain relative path (MLflow stores names as paths, and this one resolves to "
                f"{_short(norm)}): no leading '/' or '..', no '.' or '..' parts, no '//' and no trailing '/'")
    if len(name) > MLFLOW_MAX_KEY_LENGTH:
        return f"is {len(name)} characters long; MLflow allows at most {MLFLOW_MAX_KEY_LENGTH}"
    return None


def logged_metric_names(name: str) -> List[str]:
    """Every MLflow metric name the MLflow sink may log for a metric called `name`."""
    from .sinks.mlflow import NONFINITE_SUFFIX

    return [name, name + NONFINITE_SUFFIX, f"batch.{name}.min", f"batch.{name}.mean", f"batch.{name}.max",
            f"batch.{name}{NONFINITE_SUFFIX}", f"summary.best_{name}"]


def _metric_name_problem(name: Any) -> Optional[str]:
    problem = mlflow_name_problem(name)
    if problem is not None:
        return f"it {problem}"
    for logged in logged_metric_names(name)[1:]:
        problem = mlflow_name_problem(logged)
        if problem is not None:
            return f"sweep also logs it as {_short(logged)}, which {problem}"
    return None


def check_metric_names(names: Iterable[Any]) -> None:
    """Raise `SweepError` naming the first metric name MLflow would refuse.

    `names` are what the metrics function returns; each must be a valid MLflow metric
    name, and so must every name the MLflow sink derives from it (`<name>.nonfinite`,
    `batch.<name>.min|mean|max|nonfinite`, `summary.best_<name>`).
    """
    for name in names:
        problem = _metric_name_problem(name)
        if problem is not None:
            raise SweepError(_one_line(
                f"the metrics function returns the metric {_short(name)}, which MLflow refuses as a metric name: "
                f"{problem}; rename the metric, or set sinks.mlflow.enabled: false"))


def _param_items(mapping: Dict[str, Any], prefix: str = "",
                 at: Tuple[Any, ...] = ()) -> Iterator[Tuple[str, Tuple[Any, ...], Any]]:
    """(flattened key, path of keys, value) for every leaf, as `flatten` makes MLflow params."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _param_items(value, name + ".", at + (key,))
        else:
            yield name, at + (key,), value


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}: the config as MLflow params."""
    return {name: value for name, _, value in _param_items(mapping, prefix)}


def dump_config(config: SweepConfig) -> str:
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False)


__all__: Tuple[str, ...] = ("SweepConfig", "load_config", "parse_config", "apply_override", "flatten", "dump_config",
                            "check_metric_names", "mlflow_name_problem", "read_yaml")
