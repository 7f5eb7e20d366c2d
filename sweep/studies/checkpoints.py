"""Study kind `checkpoints`: one candidate per weights file.

The driver reads each file's bytes (so workers on other nodes need no shared
filesystem); the worker parses them with the safe loaders in `sweep.model`.
Only regular files are read, each up to the size `stat` gave; anything else (a FIFO, a
device) and a file that cannot be read or parsed becomes an `invalid` row with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Union

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..files import checks_files, glob_matches_a_file, path_kind, resolve_path
from ..errors import ConfigError, WeightsError
from ..model import glob_files, load_weights, read_file_bytes
from ..settings import Section, Text
from ..types import Invalid
from .base import CandidateBatch, StudyBase, StudyContext

GLOB_CHARS = set("*?[")


class Config(Section):
    """Evaluate every weights file matched by `paths`."""

    kind: Literal["checkpoints"]
    paths: List[Text] = Field(min_length=1, description="files or globs, relative to the config file")

    @field_validator("paths")
    @classmethod
    def _paths(cls, values: List[str], info: ValidationInfo) -> List[str]:
        resolved: dict = {}  # path -> its entry
        for i, value in enumerate(values):
            path = resolve_path(value, info)
            if not checks_files(info):
                pass
            elif GLOB_CHARS & set(path):
                if not glob_matches_a_file(path):
                    raise ValueError(f"pattern matched no files: {path}")
            else:
                kind = path_kind(path)
                if kind is None:
                    raise ValueError(f"file not found: {path}")
                if kind == "folder":
                    raise ValueError(f"{path} is a folder, not a file (to take the files in it, "
                                     f"write '{os.path.join(value, '*.safetensors')}')")
                if kind != "file":
                    raise ValueError(f"{path} is {kind}, not a regular file (only regular files are read)")
            if path in resolved:
                raise ValueError(f"the same path is listed twice (entries {resolved[path]} and {i}): {path}")
            resolved[path] = i
        return list(resolved)


def expand(patterns: Sequence[str]) -> List[str]:
    """Files in pattern order, each pattern's matches sorted, each file once.

    What is not a regular file stays in (it becomes an invalid row naming what it is); a pattern
    that looks through more than MAX_GLOB_ENTRIES folder entries is a ConfigError.
    """
    seen: dict = {}
    for pattern in patterns:
        try:
            matches = sorted(glob_files(pattern)) if GLOB_CHARS & set(pattern) else [pattern]
        except ValueError as e:
            raise ConfigError(f"study.paths: {e}") from None
        for path in matches:
            if not Path(path).is_dir():
                seen.setdefault(path, None)
    return list(seen)


@dataclass
class FileContents:
    """Weights files as bytes (or the reason they could not be read)."""

    names: List[str]
    contents: List[Union[bytes, str]]

    def candidates(self) -> List[Any]:
        out: List[Any] = []
        for name, data in zip(self.names, self.contents):
            if isinstance(data, str):
                out.append(Invalid(data))
                continue
            try:
                out.append(load_weights(data, Path(name).name))
            except WeightsError as e:
                out.append(Invalid(str(e)))
        return out


class Checkpoints(StudyBase):
    columns = {"path": pa.string()}
    default_batch_size = 8

    def __init__(self, config: Config):
        self.paths = expand(config.paths)

    def __len__(self) -> int:
        return len(self.paths)


    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        todo = [i for i in range(len(self.paths)) if i not in skip]
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            names = [self.paths[i] for i in ids]
            yield CandidateBatch(ids, {"path": names}, FileContents(names, [_read(p) for p in names]))


def _read(path: str) -> Union[bytes, str]:
    try:
        return read_file_bytes(path)
    except WeightsError as e:
        return str(e)


def plan(config: Config, context: Optional[StudyContext] = None) -> Checkpoints:
    return Checkpoints(config)


def example(bench: Any) -> Dict[str, Any]:
    """A glob over four of the bench's checkpoints (their names' common beginning, then `*`): more than one
    batch of the contract's three."""
    files = [bench.checkpoint(i) for i in range(4)]
    return {"kind": "checkpoints", "paths": [os.path.commonprefix(files) + "*" + Path(files[0]).suffix]}
