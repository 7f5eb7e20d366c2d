"""Study kind `checkpoints`: one candidate per weights file or checkpoint folder.

A worker reads each checkpoint by its path itself (local disk, a shared
filesystem, a `pyarrow.fs` URI), one batch at a time, and the driver reads
none: it only looks at each local path (`stat`, a folder's index) as it makes
the batches, so a worker can tell whether it sees the same files. A worker
that does not (a path on the driver's disk alone) sends the candidates back,
and the driver reads those and sends their bytes (`FileContents.shipped`).
Batches hold at most MAX_BATCH_BYTES of checkpoints (and at least one), so
neither process holds more than a few large checkpoints at once. Only regular
files are read, each up to the size `stat` gave; anything else (a FIFO, a
device) and a checkpoint that cannot be read or parsed becomes an `invalid`
row with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from ..errors import ConfigError, WeightsError
from ..files import checks_files, glob_files, glob_matches_a_file, is_checkpoint_folder, path_kind, resolve_path
from ..model import (FOLDER_FILES, Stamp, checkpoint_bytes, checkpoint_stamp, is_uri, load_checkpoint,
                     read_checkpoint, stamp_bytes)
from ..settings import Section, Text
from ..types import Invalid
from .base import CandidateBatch, StudyBase, StudyContext

#: A batch holds checkpoints of at most this many bytes together (and at least one checkpoint, however large):
#: a worker reads a batch whole before evaluating it. A checkpoint whose size is not known here (a URI) is a
#: batch of its own.
MAX_BATCH_BYTES = 256 * 2**20

GLOB_CHARS = set("*?[")


class Config(Section):
    """Evaluate every weights file and checkpoint folder `paths` name or match."""

    kind: Literal["checkpoints"]
    paths: List[Text] = Field(min_length=1, description="weights files, checkpoint folders, globs (relative to "
                                                         "the config file) or URIs (s3://…)")

    @field_validator("paths")
    @classmethod
    def _paths(cls, values: List[str], info: ValidationInfo) -> List[str]:
        resolved: dict = {}  # path -> its entry
        for i, value in enumerate(values):
            if is_uri(value):
                if GLOB_CHARS & set(value):
                    raise ValueError(f"a URI is read as it is, not matched as a pattern: {value} (list each "
                                     f"checkpoint, or mount the store and write a glob over the mount)")
                path = value
            else:
                path = resolve_path(value, info)
            if not checks_files(info) or is_uri(path):
                pass
            elif GLOB_CHARS & set(path):
                if not glob_matches_a_file(path):
                    raise ValueError(f"pattern matched no files or checkpoint folders: {path}")
            else:
                kind = path_kind(path)
                if kind is None:
                    raise ValueError(f"file not found: {path}")
                if kind == "folder" and not is_checkpoint_folder(path):
                    raise ValueError(f"{path} is a folder without a checkpoint: it holds none of "
                                     f"{', '.join(FOLDER_FILES)} (to take the files in it, write "
                                     f"'{os.path.join(value, '*.safetensors')}')")
                if kind not in ("file", "folder"):
                    raise ValueError(f"{path} is {kind}, not a regular file (only regular files are read)")
            if path in resolved:
                raise ValueError(f"the same path is listed twice (entries {resolved[path]} and {i}): {path}")
            resolved[path] = i
        return list(resolved)


def expand(patterns: Sequence[str]) -> List[str]:
    """Checkpoints in pattern order, each pattern's matches sorted, each once.

    A glob's matches are its files and the folders among them that hold a checkpoint (other folders are
    left out); what is not a regular file stays in (it becomes an invalid row naming what it is); a
    pattern that looks through more than MAX_GLOB_ENTRIES folder entries is a ConfigError.
    """
    seen: dict = {}
    for pattern in patterns:
        globbed = not is_uri(pattern) and bool(GLOB_CHARS & set(pattern))
        try:
            matches = sorted(glob_files(pattern)) if globbed else [pattern]
            for path in matches:
                if not globbed or not os.path.isdir(path) or is_checkpoint_folder(path):
                    seen.setdefault(path, None)
        except ValueError as e:
            raise ConfigError(f"study.paths: {e}") from None
    return list(seen)


#: What the driver sent for a checkpoint: a file's bytes, a folder's files by name, or why it could not read it.
Contents = Union[bytes, Dict[str, bytes], str]


@dataclass
class FileContents:
    """Checkpoints (weights files or folders) by path, with what the driver knows of each.

    `contents[i]`: None to read `names[i]` where the candidates are made (a worker), else what the driver
    sent (`Contents`). `stamps[i]`: how the driver saw the path (`sweep.model.Stamp`), None when it did not
    look (a URI, or a path it could not read: its contents say why); a worker whose own look differs cannot
    reach the path (`unreached`). None for all when not given.
    """

    names: List[str]
    contents: List[Optional[Contents]]
    stamps: Optional[List[Optional[Stamp]]] = None

    def candidates(self) -> List[Any]:
        """Each checkpoint's tensors (read here where no contents were sent), or `Invalid` with the reason."""
        out: List[Any] = []
        for name, data in zip(self.names, self.contents):
            if isinstance(data, str):
                out.append(Invalid(data))
                continue
            try:
                if data is None:
                    out.append(read_checkpoint(name, Path(name).name))
                else:
                    out.append(load_checkpoint(data, name, Path(name).name))
            except WeightsError as e:
                out.append(Invalid(str(e)))
        return out

    def unreached(self) -> List[int]:
        """The positions of the checkpoints to read here that do not look here as they did to the driver:
        missing here, or other files at the same path (another size or modification time)."""
        away = []
        for i, (name, data) in enumerate(zip(self.names, self.contents)):
            seen = self.stamps[i] if self.stamps is not None else None
            if data is not None or seen is None:
                continue
            try:
                here = checkpoint_stamp(name)
            except WeightsError:
                here = None
            if here != seen:
                away.append(i)
        return away

    def shipped(self) -> "FileContents":
        """The same checkpoints with what the driver reads of them (`Contents`) for a worker that cannot reach
        them: read here, one batch at a time."""
        contents: List[Optional[Contents]] = []
        for name, data in zip(self.names, self.contents):
            if data is None:
                try:
                    data = checkpoint_bytes(name)
                except WeightsError as e:
                    data = str(e)
            contents.append(data)
        return FileContents(list(self.names), contents, None)


class Checkpoints(StudyBase):
    columns = {"path": pa.string()}
    default_batch_size = 8

    def __init__(self, config: Config):
        self.paths = expand(config.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        """Batches of at most `batch_size` checkpoints and MAX_BATCH_BYTES (at least one checkpoint), each path
        looked at (not read) as its batch is made."""
        ids: List[int] = []
        stamps: List[Optional[Stamp]] = []
        contents: List[Optional[Contents]] = []
        held = 0
        for i in range(len(self.paths)):
            if i in skip:
                continue
            stamp, data = _look(self.paths[i])
            size = 0 if data is not None else stamp_bytes(stamp)
            size = MAX_BATCH_BYTES if size is None else size
            if ids and (len(ids) >= batch_size or held + size > MAX_BATCH_BYTES):
                yield self._batch(ids, stamps, contents)
                ids, stamps, contents, held = [], [], [], 0
            ids.append(i)
            stamps.append(stamp)
            contents.append(data)
            held += size
        if ids:
            yield self._batch(ids, stamps, contents)

    def _batch(self, ids: List[int], stamps: List[Optional[Stamp]],
               contents: List[Optional[Contents]]) -> CandidateBatch:
        names = [self.paths[i] for i in ids]
        return CandidateBatch(ids, {"path": names}, FileContents(names, contents, stamps))


def _look(path: str) -> Tuple[Optional[Stamp], Optional[Contents]]:
    """(how the driver sees `path`, None), or (None, why it cannot be read) — the row's reason."""
    try:
        return checkpoint_stamp(path), None
    except WeightsError as e:
        return None, str(e)


def plan(config: Config, context: Optional[StudyContext] = None) -> Checkpoints:
    return Checkpoints(config)


def example(bench: Any) -> Dict[str, Any]:
    """A glob over four of the bench's checkpoints (their names' common beginning, then `*`): more than one
    batch of the contract's three."""
    files = [bench.checkpoint(i) for i in range(4)]
    return {"kind": "checkpoints", "paths": [os.path.commonprefix(files) + "*" + Path(files[0]).suffix]}
