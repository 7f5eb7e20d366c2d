"""The typed sweep config: YAML in, unknown keys rejected, paths resolved.

Every problem is raised as one `ConfigError` that names the field path
(`study.paths`, `sinks.parquet.rows_per_file`, …), before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError
from .model import import_callable

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def checks_files(info: ValidationInfo) -> bool:
    """False where a config is re-read away from its files (on a worker node)."""
    return (info.context or {}).get("check_files", True)


def resolve_path(value: str | Path, info: ValidationInfo) -> str:
    """Resolve `value` against the config file's folder (passed as context)."""
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path)


class ModelSection(Section):
    """The shared module every candidate is evaluated against."""

    factory: str = Field(description="'package.module:function' returning a torch.nn.Module")
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: Optional[str] = Field(None, description="safetensors file loaded into the module (optional)")
    seed: int = Field(0, ge=0, lt=2**63, description="torch seed the factory runs under, so every worker builds the same module")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None:
            return v
        path = resolve_path(v, info)
        if checks_files(info) and not Path(path).is_file():
            raise ValueError(f"file not found: {path}")
        return path


class DataSection(Section):
    """The eval data: a loader that returns an iterable of (x, y) batches."""

    loader: str = Field(description="'package.module:function' returning an iterable of (x, y) batches")
    kwargs: Dict[str, Any] = Field(default_factory=dict)


class MetricsSection(Section):
    """The metrics function and which metric ranks candidates."""

    function: str = Field(description="'package.module:function', metrics(output, y) -> {name: scalar}")
    objective: Optional[str] = Field(None, description="metric that ranks candidates (default: the first one)")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher objective is better")


class EvaluationSection(Section):
    """How each worker evaluates a chunk of candidates."""

    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 stores the materialised weights in bfloat16")
    compile: bool = Field(False, description="torch.compile the vmapped call (compile time reported apart)")
    chunk_size: Union[Literal["auto"], int] = Field(
        "auto", description="candidates per vmapped call; auto measures at start-up")

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= 1_000_000:
            raise ValueError("must be 'auto' or an integer from 1 to 1000000")
        return v


class WorkersSection(Section):
    """Ray workers: how many, what each reserves, how work is batched."""

    count: Union[Literal["auto"], int] = Field("auto", description="'auto' uses the CPUs (or GPUs) Ray reports")
    cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    gpus: float = Field(0.0, ge=0, description="GPUs per worker; fractions share a device")
    device: str = Field("auto", description="'auto' (cuda when the worker has a GPU), 'cpu' or 'cuda[:N]'")
    batch_size: Union[Literal["auto"], int] = Field(
        "auto", description="candidates per task sent to a worker; auto: 8 files, or 4096 recipe rows")
    max_in_flight: int = Field(2, ge=1, le=64, description="tasks queued per worker")

    @field_validator("count")
    @classmethod
    def _count(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or a positive integer")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= 1_000_000:
            raise ValueError("must be 'auto' or an integer from 1 to 1000000")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu") or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")


class ParquetSink(Section):
    """Results as a Parquet dataset (default: <out>/runs/<name>/results/)."""

    enabled: bool = True
    path: Optional[str] = Field(
        None, description="where the dataset goes: a local folder or a pyarrow.fs URI (s3://, gs://, file://)")
    rows_per_file: int = Field(100_000, ge=1, description="rows buffered before a file is written")
    flush_seconds: float = Field(30.0, gt=0, description="longest time rows wait in the buffer")

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None or "://" in v:
            return v
        return resolve_path(v, info)


class MlflowSink(Section):
    """One MLflow run per sweep."""

    enabled: bool = True
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI, else MLflow's default")
    experiment: Optional[str] = Field(None, description="default: the sweep's name")
    max_candidate_metrics: int = Field(
        10_000, ge=0, description="sweeps with more candidates log per-batch summaries, not one step per candidate")
    retry_seconds: float = Field(
        120.0, ge=0, description="how long one logging request is retried (with backoff) while the server is away")


class SinksSection(Section):
    parquet: ParquetSink = Field(default_factory=ParquetSink)
    mlflow: MlflowSink = Field(default_factory=MlflowSink)


def _study_union() -> Any:
    from .studies import STUDIES

    configs = tuple(study.Config for study in STUDIES.values())
    if len(configs) == 1:
        return configs[0]
    from typing import Annotated

    return Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]


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

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short hash of the resolved config, stored with the results."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


IMPORT_FIELDS = (("model", "factory"), ("data", "loader"), ("metrics", "function"))


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_imports: bool = True) -> SweepConfig:
    """Read, override (`key.path=value`, value parsed as YAML) and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path), check_imports=check_imports)


def parse_config(raw: Dict[str, Any], *, base_dir: Path, source: str = "config",
                 check_imports: bool = True) -> SweepConfig:
    try:
        config = SweepConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe_errors(e))) from None
    if check_imports:
        for section, field in IMPORT_FIELDS:
            spec = getattr(getattr(config, section), field)
            try:
                import_callable(spec)
            except Exception as e:  # an import error in the user's module is theirs to read
                raise ConfigError(f"{source}: {section}.{field}: {e}") from None
    return config


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one `--set key.path=value` to the raw config dict."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = parsed


def _describe_errors(error: ValidationError) -> List[str]:
    from .studies import STUDIES

    messages = []
    for err in error.errors():
        loc = list(err["loc"])
        if len(loc) > 1 and loc[0] == "study" and loc[1] in STUDIES:
            loc.pop(1)  # the discriminated union puts the kind in the path
        where = ".".join(str(part) for part in loc) or "config"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _fields_at(SweepConfig, loc[:-1], error_input=None)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            text = f"{where}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if known:
                text += f"; known keys: {', '.join(known)}"
        elif kind == "missing":
            text = f"{where}: required field is missing"
        elif kind == "union_tag_invalid":
            text = f"{where}.kind: unknown study kind {err['input'].get('kind')!r}; known kinds: {', '.join(STUDIES)}"
        elif kind == "union_tag_not_found":
            text = f"{where}.kind: required field is missing; known kinds: {', '.join(STUDIES)}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            text = f"{where}: {msg} (got {_short(err.get('input'))})"
        messages.append(text)
    return messages


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fields_at(model: Type[BaseModel], loc: Iterable[Any], error_input: Any) -> List[str]:
    """Field names of the section at `loc`, for 'did you mean' hints."""
    from .studies import STUDIES

    current: Any = model
    for part in loc:
        if current is None:
            return []
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        if part == "study":
            return sorted({f for s in STUDIES.values() for f in s.Config.model_fields})
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(getattr(current, "model_fields", {}))


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}: the config as MLflow params."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def dump_config(config: SweepConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__: Tuple[str, ...] = ("SweepConfig", "load_config", "parse_config", "apply_override", "flatten", "dump_config")
