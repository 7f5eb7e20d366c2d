"""The typed sweep config: YAML in, unknown keys rejected, paths resolved.

Every problem is raised as one `ConfigError` that names the field path
(`study.paths`, `sinks.parquet.rows_per_file`, …), before any work starts:
wrong types (true/false is not a number), numbers out of range, NaN and
infinities, files that are not there, import paths that do not import, YAML
that cannot be read (duplicate keys included), factory and loader kwargs that
are not plain data, and what a sink refuses (MLflow: config keys it would
refuse as param names).

The `study:` section is the union of the registered studies' configs
(`sweep.studies.STUDIES`), told apart by `kind`; the `sinks:` section has one
sub-section per registered sink (`sweep.sinks.SINKS`). The YAML reader lives
in `sweep.yaml_io`, the error messages in `sweep.config_errors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Sequence, Tuple, Type, Union

from pydantic import (Discriminator, Field, Tag, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from . import check_cache, zoo
from .config_errors import describe_errors
from .errors import ConfigError
from .files import checks_files, resolve_file, resolve_path
from .messages import first_line, kind_of, one_line, short
from .model import import_callable, missing_module_hint
from .settings import (IMPORT_FIELDS, MAX_BATCH_SIZE, MAX_IN_FLIGHT, MAX_INT64, MAX_WORKER_RESOURCE, MAX_WORKERS, Float,
                       ImportPath, Int, Kwargs, Section, Text, leaves)
from .sinks import SINKS, enabled_sinks
from .studies import STUDIES
from .yaml_io import dump_yaml, read_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ModelSection(Section):
    """The shared module every candidate is evaluated against.

    It is built by `factory`, or, written shorter, from a `transformers` config (`transformers: path`, with
    `auto_class` naming the head) or a torchvision model (`torchvision: name`), with `kwargs` either way.
    Exactly one of the three is given; the shorter forms become `factory` and `kwargs` once checked
    (`sweep.zoo:transformers_model` with `path` and `auto_class`, `sweep.zoo:torchvision_model` with `name`)
    and are then None, so the resolved config saved beside the results, and everything that builds the
    module, read `factory` and `kwargs` alone.
    """

    factory: Optional[ImportPath] = Field(None, description="'package.module:function' returning a torch.nn.Module")
    transformers: Optional[Text] = Field(
        None, exclude=True, description="a local transformers config.json, or a checkpoint folder holding one: the "
        "model is built from it (random weights; nothing is downloaded)")
    auto_class: Optional[Text] = Field(
        None, exclude=True, description="with `transformers`: the class that builds it (AutoModelForCausalLM, …; "
        "default: the config's architectures[0], else AutoModel)")
    torchvision: Optional[Text] = Field(
        None, exclude=True, description="a torchvision model name (resnet18, vit_b_16, …), built with weights=None")
    kwargs: Kwargs = Field(default_factory=dict, description="keyword arguments for the factory (for `transformers`: "
                           "config settings; for `torchvision`: the model's keyword arguments)")
    weights: Optional[Text] = Field(None, description="safetensors file loaded into the module (optional)")
    seed: Int = Field(0, ge=0, le=MAX_INT64, description="torch seed the factory runs under, so every worker builds the same module")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        return resolve_file(v, info)

    @field_validator("transformers")
    @classmethod
    def _transformers(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        """Resolved against the config's folder and, where files are checked, a readable config.json there."""
        if v is None:
            return v
        path = resolve_path(v, info)
        if checks_files(info):
            try:
                zoo.read_config_dict(zoo.config_file(path))
            except FileNotFoundError as e:
                raise ValueError(str(e) + zoo.hub_id_hint(v)) from None
            except (TypeError, ValueError) as e:
                raise ValueError(str(e)) from None
        return path

    @field_validator("auto_class", "torchvision")
    @classmethod
    def _class_name(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is not None and not v.isidentifier():
            example = "AutoModelForCausalLM" if info.field_name == "auto_class" else "resnet18"
            raise ValueError(f"should be a name such as {example!r}")
        return v

    @model_validator(mode="after")
    def _one_factory(self) -> "ModelSection":
        """Exactly one of factory, transformers and torchvision; the shorter two become factory and kwargs."""
        given = [name for name in MODEL_SOURCES if getattr(self, name) is not None]
        if not given:
            raise _at(("factory",), "required field is missing: give model.factory ('package.module:function'), "
                      "or model.transformers (a config.json or a checkpoint folder) or model.torchvision (a model name)")
        if len(given) > 1:
            raise _at((given[1],), f"give one of model.{', model.'.join(MODEL_SOURCES)}, not several "
                      f"(model.{given[0]} is given too)")
        if self.auto_class is not None and self.transformers is None:
            raise _at(("auto_class",), "names the class that builds a model.transformers model; give "
                      "model.transformers too, or leave auto_class out")
        source = given[0]
        if source == "factory":
            return self
        kwargs = dict(self.kwargs)
        if source == "transformers":
            built = {"path": self.transformers, **({"auto_class": self.auto_class} if self.auto_class else {})}
            problem = zoo.extra_missing("transformers")
        else:
            built = {"name": self.torchvision}
            problem = zoo.extra_missing("torchvision")
            for key in ("weights", "weights_backbone"):
                if kwargs.get(key) is not None:
                    raise _at(("kwargs", key), "sweep builds torchvision models with weights=None and never downloads "
                              "weights; give the weights as model.weights or as the study's files")
                kwargs.pop(key, None)
        if problem is not None:
            raise _at((source,), problem)
        for key in built:
            if key in kwargs:
                raise _at(("kwargs", key), f"model.{source} gives the {key}; leave {key} out of model.kwargs")
        # Frozen: set once, while being validated. The shorter form is then gone, so the section equals the
        # one its saved config.yaml reads back as.
        object.__setattr__(self, "factory", MODEL_FACTORIES[source])
        object.__setattr__(self, "kwargs", {**built, **kwargs})
        for name in ("transformers", "auto_class", "torchvision"):
            object.__setattr__(self, name, None)
        self.__pydantic_fields_set__.update({"factory", "kwargs"})
        return self


#: Where a module comes from, one of them per config; and the factory each shorter form stands for.
MODEL_SOURCES = ("factory", "transformers", "torchvision")
MODEL_FACTORIES = {"transformers": "sweep.zoo:transformers_model", "torchvision": "sweep.zoo:torchvision_model"}


def _at(at: Tuple[Any, ...], reason: str) -> PydanticCustomError:
    """An error reported at `at` below the section being validated (`model.kwargs.weights: …`)."""
    return PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": reason})


class DataSection(Section):
    """The eval data: a loader that returns an iterable of (x, y) batches."""

    loader: ImportPath = Field(description="'package.module:function' returning an iterable of (x, y) batches")
    kwargs: Kwargs = Field(default_factory=dict)


#: `metrics.describe`: longest description of one metric (it goes into figure labels), and most metrics described.
MAX_DESCRIPTION_CHARS = 60
MAX_DESCRIBED_METRICS = 64


class MetricsSection(Section):
    """The metrics function and which metric ranks candidates."""

    function: ImportPath = Field(description="'package.module:function', metrics(output, y) -> {name: scalar}")
    objective: Optional[Text] = Field(None, min_length=1, description="metric that ranks candidates (default: the first one)")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher objective is better")
    describe: Dict[Text, Text] = Field(
        default_factory=dict, exclude_if=lambda value: not value,  # left out when empty: digests stay as they were
        description="what each metric is, for the report's labels, e.g. "
        "{loss: 'cross-entropy, nats'} (default: the metrics function's own `describe` dict, if it has one)")

    @field_validator("describe")
    @classmethod
    def _describe(cls, value: Dict[str, str]) -> Dict[str, str]:
        if len(value) > MAX_DESCRIBED_METRICS:
            raise ValueError(f"describe at most {MAX_DESCRIBED_METRICS} metrics, got {len(value)}")
        for name, text in value.items():
            if not name.strip():
                raise ValueError("a metric name must not be empty")
            if not text.strip() or "\n" in text or len(text) > MAX_DESCRIPTION_CHARS:
                raise ValueError(f"{name!r}: give one line of 1 to {MAX_DESCRIPTION_CHARS} characters (it goes "
                                 f"into figure labels, e.g. 'cross-entropy, nats'), got {len(text)} characters: "
                                 f"{short(text)}")
        return value


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


def _sinks_section() -> Type[Section]:
    """The `sinks:` section: one sub-section per registered sink, each its module's `Config` (defaults
    when left out); a name no sink is registered under is refused, naming the known ones."""
    fields: Dict[str, Any] = {name: (module.Config, Field(default_factory=module.Config))
                              for name, module in SINKS.items()}
    return create_model("SinksSection", __base__=Section, __module__=__name__,
                        __doc__="Where the rows go: one section per sink.", **fields)


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
    """The `study:` section: the Config of the registered study its `kind` names."""
    configs = tuple(Annotated[study.Config, Tag(kind)] for kind, study in STUDIES.items())
    if len(configs) == 1:
        return STUDIES[next(iter(STUDIES))].Config
    return Annotated[Union[configs], Discriminator(_study_kind)]  # type: ignore[valid-type]


SinksSection = _sinks_section()
StudySection = _study_union()


class SweepConfig(Section):
    """A whole sweep: what to evaluate, on what, with which workers, into which sinks."""

    name: str = Field(pattern=NAME_PATTERN, max_length=200, description="names the run folder and MLflow experiment")
    model: ModelSection
    data: DataSection
    metrics: MetricsSection
    study: StudySection  # type: ignore[valid-type]
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    sinks: SinksSection = Field(default_factory=SinksSection)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _sinks_accept(self) -> "SweepConfig":
        """Each enabled sink's own checks of the whole config (MLflow: every key must make a param it takes)."""
        for _, module in enabled_sinks(self):
            check = getattr(module, "check", None)
            if check is not None:
                check(self)
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


#: The model `parse_config` validates with: SweepConfig, or what `rebuild` made of it.
_model: Type[SweepConfig] = SweepConfig


def rebuild() -> Type[SweepConfig]:
    """Build the `study:` and `sinks:` sections again from the registries as they are now.

    A study or sink is registered by its line in `STUDIES` or `SINKS`, read when this module is imported;
    one added to (or removed from) a registry later reaches `parse_config` and `load_config` once this is
    called. Returns the model they now validate with: a subclass of `SweepConfig` (`SweepConfig` itself,
    and what calls its `model_validate` directly, keep the registries as they were at import).
    """
    global _model
    sinks = _sinks_section()
    _model = create_model("SweepConfig", __base__=SweepConfig, __module__=__name__, __doc__=SweepConfig.__doc__,
                          study=(_study_union(), ...), sinks=(sinks, Field(default_factory=sinks)))
    return _model


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_imports: bool = True) -> SweepConfig:
    """Read, override (`key.path=value`, value parsed as YAML) and validate a config file."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(one_line(f"{short(path)}: a config file is named by a path, not {kind_of(path)}"))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(one_line(f"{path}: config file not found")) from None
    except IsADirectoryError:
        raise ConfigError(one_line(f"{path}: is a folder, not a config file")) from None
    except OSError as e:
        raise ConfigError(one_line(f"{path}: cannot read config: {e.strerror or e}")) from None
    except UnicodeDecodeError as e:
        raise ConfigError(one_line(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})")) from None
    except ValueError as e:  # a NUL character in the path
        raise ConfigError(one_line(f"{path!r}: cannot read config: {e}")) from None
    raw = read_yaml(text, source=str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(one_line(f"{path}: the config must be a mapping of sections, got {kind_of(raw)}"))
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path), check_imports=check_imports)


def parse_config(raw: Dict[str, Any], *, base_dir: Path, source: str = "config",
                 check_imports: bool = True, check_files: bool = True) -> SweepConfig:
    """Validate a config given as a mapping; every problem is a `ConfigError` naming its field.

    `check_files=False` leaves out the checks that the files it names are there (a run folder looked at
    away from its checkpoints, a config re-read on a worker node).
    """
    try:
        config = _model.model_validate(raw, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as e:
        raise ConfigError(one_line(f"{source}: " + "; ".join(describe_errors(e, _model, list(STUDIES))))) from None
    # An earlier check of this config whose code is unchanged vouches for its imports (`sweep.check_cache`).
    if check_imports and check_cache.lookup(config) is None:
        for section, field in IMPORT_FIELDS:
            spec = getattr(getattr(config, section), field)
            try:
                import_callable(spec)
            except (Exception, SystemExit) as e:  # an import error in the user's module is theirs to read
                hint = missing_module_hint(e, spec, base_dir)
                message = f"{source}: {section}.{field}: {first_line(e)}" + (f". {hint}" if hint else "")
                raise ConfigError(one_line(message)) from None
    return config


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one `--set key.path=value` to the raw config dict."""
    if not isinstance(item, str):
        raise ConfigError(one_line(f"--set {short(item)}: expected a string key.path=value"))
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(one_line(f"--set {item!r}: expected key.path=value"))
    parsed = read_yaml(value, source=f"--set {item!r}", at=key.strip())
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(one_line(f"--set {item!r}: '{'.'.join(parts[: i + 1])}' is not a section"))
        node = child
    node[parts[-1]] = parsed


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}: the config as MLflow params."""
    return {name: value for name, _, value in leaves(mapping, prefix)}


def dump_config(config: SweepConfig) -> str:
    """The resolved config as the config.yaml saved beside the results."""
    return dump_yaml(config.to_dict())


__all__: Tuple[str, ...] = ("SweepConfig", "load_config", "parse_config", "apply_override", "flatten", "dump_config",
                            "rebuild", "NOT_IN_DIGEST")
