"""The building blocks of every config section: `Section` and the field types it is written with.

A study or a sink writes its own config section with these; `sweep.config`
puts the sections together into the sweep's config.
"""

from __future__ import annotations

import datetime
import math
from typing import Annotated, Any, Dict, Iterator, List, Optional, Tuple

from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .messages import kind_of, short

#: The fields (section, name) naming a function that reading a config imports, to say at once when it cannot.
IMPORT_FIELDS = (("model", "factory"), ("data", "loader"), ("metrics", "function"))
#: Largest integer a config may hold anywhere: what JSON readers, Parquet metadata and MLflow keep exactly.
MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
#: Bounds of the worker settings.
MAX_WORKERS = 100_000
MAX_WORKER_RESOURCE = 1_000_000.0  # CPUs or GPUs reserved per worker
MAX_BATCH_SIZE = 1_000_000  # candidates per task, and per vmapped chunk
MAX_IN_FLIGHT = 64
#: Bounds of the sink settings.
MAX_ROWS_PER_FILE = 1_000_000_000
MAX_SECONDS = 366 * 24 * 3600.0  # flush_seconds, retry_seconds: a year at most
#: Factory and loader kwargs: plain data, nested at most this deep, at most this many values in all.
MAX_NESTING = 64
MAX_VALUES = 100_000


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen, and a true/false
    setting takes only true or false (pydantic alone would also take 'yes', 'on', 'off', 1 and '0')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and field.annotation is bool and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "should be true or false")
        return value


def leaves(mapping: Dict[str, Any], prefix: str = "",
           at: Tuple[Any, ...] = ()) -> Iterator[Tuple[str, Tuple[Any, ...], Any]]:
    """(dotted key, path of keys, value) for every leaf of a config mapping; an empty mapping is a leaf.

    What `sweep.config.flatten` is made of, and so the keys of the MLflow params.
    """
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, name + ".", at + (key,))
        else:
            yield name, at + (key,), value


# --------------------------------------------------------------------------- field types


def _finite_number(value: Any) -> Any:
    """Before float parsing: true/false, strings and NaN/±inf are refused.

    YAML reads every number written in decimal (`1e-3` included) as a number, so a string here was
    quoted or written another way (`1_000`, `0x10`): Python would read some of those as numbers.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "should be a number, not true/false")
    if isinstance(value, str):
        raise PydanticCustomError("string_not_number", "should be a number written in decimal, not a string")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "should be a finite number")
    return value


def _valid_text(value: Any) -> Any:
    """Before str parsing: a string must be writable as UTF-8 (config.yaml, MLflow, Parquet metadata)."""
    if isinstance(value, str) and not _encodable(value):
        raise PydanticCustomError("text_surrogate", "is not valid Unicode text (it holds a lone surrogate)")
    return value


#: An integer: true/false, fractions and quoted numbers are refused (lax mode would read true as 1).
Int = Annotated[int, Strict()]
#: A finite number: integers are taken; true/false and strings (quoted numbers, `1_000`, `0x10`) are refused.
Float = Annotated[float, BeforeValidator(_finite_number), AllowInfNan(False)]
#: A string that can be written out.
Text = Annotated[str, BeforeValidator(_valid_text)]


def _import_path(value: str) -> str:
    module, sep, attr = value.partition(":")
    if not (sep and _dotted(module) and _dotted(attr)):
        raise ValueError("should be an import path 'package.module:function' (dotted names, one ':')")
    return value


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


#: 'package.module:function'; whether it imports is checked by `parse_config`.
ImportPath = Annotated[Text, AfterValidator(_import_path)]


def _plain_kwargs(value: Dict[str, Any]) -> Dict[str, Any]:
    found = _plain_problem(value, (), (), [0])
    if found is not None:
        at, reason = found
        raise PydanticCustomError("sweep_at", "{reason}", {"at": at, "reason": reason})
    return value


#: Keyword arguments for a factory or loader: plain data (what YAML, JSON and MLflow params can hold).
Kwargs = Annotated[Dict[str, Any], AfterValidator(_plain_kwargs)]


def _plain_problem(value: Any, at: Tuple[Any, ...], ancestors: Tuple[int, ...],
                   count: List[int]) -> Optional[Tuple[Tuple[Any, ...], str]]:
    """(where below the root, why) for the first value that is not plain data, or None."""
    count[0] += 1
    if count[0] > MAX_VALUES:
        return (), f"holds more than {MAX_VALUES:,} values (YAML aliases can repeat one value many times)"
    if value is None or isinstance(value, (bool, float)):
        return None
    if isinstance(value, int):
        if not MIN_INT64 <= value <= MAX_INT64:
            return at, f"the integer {short(value)} is outside the 64-bit range"
        return None
    if isinstance(value, str):
        return None if _encodable(value) else (at, "is not valid Unicode text (it holds a lone surrogate)")
    if isinstance(value, (dict, list, tuple)):
        if id(value) in ancestors:
            return at, "contains itself (a YAML alias inside its own anchor)"
        if len(ancestors) >= MAX_NESTING:
            return at, f"is nested more than {MAX_NESTING} levels deep"
        inner = ancestors + (id(value),)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict):
                if not isinstance(key, str):
                    return at, f"the key {short(key)} is {kind_of(key)}; keys should be strings"
                if not _encodable(key):
                    return at, f"the key {key!r} is not valid Unicode text (it holds a lone surrogate)"
            found = _plain_problem(item, at + (key,), inner, count)
            if found is not None:
                return found
        return None
    hint = "; quote it to pass a string" if isinstance(value, (datetime.date, datetime.time)) else ""
    return at, (f"should be plain data (null, true/false, a number, a string, a list or a mapping), "
                f"got a value of type {type(value).__name__}{hint}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
