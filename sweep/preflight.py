"""Checks before a run: the weights files a config names, held against the module it builds.

`sweep validate`, `sweep run` and `workers.driver.run` build the config's
module (on the meta device: no memory for its tensors) and compare every
weights file they can read cheaply with its `Schema` — keys, shapes, dtypes;
tied weights under any of their names; buffers optional — before Ray starts:

- a safetensors file by its header alone (8-byte length + JSON: dtype and
  shape per key), never its tensor data;
- a torch file (`.pt`, `.pth`, `.bin`) through `torch.load(mmap=True,
  weights_only=True)` when it lies on a local disk (its storages are mapped,
  not read); elsewhere, and in torch's legacy format, it is left unread;
- a checkpoint folder by the file it is read from, or by every shard its
  index lists (each as above), the index checked against the shards' keys;
- a URI (`s3://…`) not at all: the workers read it.

Keys are matched to the module's first as every reader matches them
(`sweep.checkpoint_keys`: one prefix removed or added, or refused naming it).

An anchor (an endpoint, a base, a model to merge, a centre, `model.weights`)
that does not fit the module would make every row invalid: that is a
`ConfigError` naming the field, the file and the first keys that differ.
Anchors are the files a study reads through `studies.base.read_weights`, so a
new kind of study is checked without code here. Candidate files (a study's
`paths`: one row per file) that do not fit become invalid rows, as the
quickstart's bad files are meant to: they are counted in warnings, one line
per distinct problem.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import check_cache
from .errors import ConfigError, WeightsError
from .lazy import torch
from .messages import first_line
from .checkpoint_keys import ModuleKeys, reading_for
from .model import (MAX_UNCOMPRESSED_EXTRA, MAX_UNCOMPRESSED_RATIO, SAFETENSORS_SUFFIXES,
                    TORCH_SUFFIXES, build_module, describe_file, dtype_name, folder_layout, import_callable, is_uri,
                    merge_shards, parse_safetensors_header, safetensors_entry, safetensors_header_length)
from .validate import Schema, describe

#: A misfit spells out at most this many keys; the rest are counted ("and 12 more keys").
MAX_KEYS_SHOWN = 3
#: A warning about candidate files names at most this many of the files that share one problem.
MAX_FILES_SHOWN = 3
#: The module's factory and kwargs are named in messages in at most this many characters.
MAX_MODULE_LABEL = 100
#: File systems whose files are not on a local disk: a torch file there is not opened before the run
#: (any FUSE file system counts as one too: object stores and ssh mounts are mounted through it).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre",
                                 "gpfs", "beegfs", "afs", "ncpfs", "davfs", "sshfs", "orangefs", "pvfs2"})

#: A tensor as a file declares it: its shape and dtype (by torch's name for it: 'float32').
TensorSpec = Tuple[Tuple[int, ...], str]


# --------------------------------------------------------------------------- reading files cheaply

def read_safetensors_header(path: str) -> Dict[str, TensorSpec]:
    """The keys of a safetensors file with the shape and dtype of each, from its header alone.

    Raises `WeightsError` (naming `path`) for what loading the file would refuse and the header
    shows: not a safetensors file, a header that is not JSON or lists a tensor wrongly, a tensor
    whose bytes do not match its shape, and a file too short for the data its header declares
    (truncated: the header alone would pass, the file would not load).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        size = os.fstat(fd).st_size
        header_len = safetensors_header_length(f.read(8), size, path)
        text = f.read(header_len)
    header = parse_safetensors_header(text, path)
    entries: Dict[str, TensorSpec] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        spec, stop = _header_entry(path, key, entry)
        entries[key] = spec
        end = max(end, stop)
    body = size - 8 - header_len
    if end > body:
        raise WeightsError(f"{path}: truncated safetensors file: its tensors need {end} bytes after the header, "
                           f"the file holds {body}")
    return entries


def _header_entry(path: str, key: str, entry: Any) -> Tuple[TensorSpec, int]:
    """One tensor of a safetensors header: its spec and where its bytes end."""
    shape, dtype, _, stop = safetensors_entry(path, key, entry)
    return (shape, dtype), stop


def read_torch_entries(path: str) -> Optional[Dict[str, TensorSpec]]:
    """The keys of a torch file with each tensor's shape and dtype, or None when it cannot be had cheaply.

    Read through `torch.load(mmap=True, weights_only=True)`: its storages are mapped, not read. None
    for a file not on a local disk, in torch's legacy (non-zip) format (which cannot be mapped), that
    unpacks to more than loading it allows, or that does not load: the run's own reading says why.
    """
    if not on_local_disk(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # its directory only
            unpacked = sum(entry.file_size for entry in archive.infolist())
        if unpacked > MAX_UNCOMPRESSED_RATIO * os.path.getsize(path) + MAX_UNCOMPRESSED_EXTRA:
            return None
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        return None
    return {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in obj.items()}


def read_entries(path: str) -> Optional[Dict[str, TensorSpec]]:
    """What a weights file or checkpoint folder holds (key → shape and dtype), read cheaply; None when that
    cannot be done.

    Raises `WeightsError` for a checkpoint that will not load and says so cheaply: not a regular file or
    folder, a suffix that is not a weights format, a safetensors header that is wrong or a file cut short, a
    folder without a checkpoint, a broken index or shards that disagree with it.
    """
    if is_uri(path):
        return None  # a URI: nothing here reads it before the run
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # reading it later says why
    if stat.S_ISDIR(mode):
        return read_folder_entries(path)
    if not stat.S_ISREG(mode):
        raise WeightsError(f"{path}: {describe_file(path, mode)}, not a regular file")
    return _read_file_entries(path)


def read_folder_entries(folder: str) -> Optional[Dict[str, TensorSpec]]:
    """What a checkpoint folder holds, from the headers of the file it is read from or of every shard its index
    lists (no tensor data), the shards' keys checked against the index; None when a shard cannot be read
    cheaply (a torch file elsewhere than on a local disk)."""
    layout = folder_layout(folder)
    parts = []
    for shard in layout.shards:
        entries = _read_file_entries(os.path.join(folder, shard))
        if entries is None:
            return None
        parts.append((shard, entries))
    return merge_shards(layout, iter(parts), folder)


def _read_file_entries(path: str) -> Optional[Dict[str, TensorSpec]]:
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors_header(path)
    if suffix in TORCH_SUFFIXES:
        return read_torch_entries(path)
    raise WeightsError(f"{path}: unsupported weights format '{suffix or '(no suffix)'}'; use safetensors "
                       f"({', '.join(SAFETENSORS_SUFFIXES)}) or a torch file ({', '.join(TORCH_SUFFIXES)})")


def on_local_disk(path: str) -> bool:
    """Whether `path` lies on a local file system (not NFS, SMB, a FUSE mount, …), by /proc/self/mountinfo.

    True where the mounts cannot be read (not Linux): the file is then read as any other.
    """
    mounts = _mounts()
    if not mounts:
        return True
    real = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return not (kind in NETWORK_FILESYSTEMS or kind.split(".")[0] == "fuse")


@lru_cache(maxsize=1)
def _mounts() -> Tuple[Tuple[str, str], ...]:
    """(mount point, file system type) of each mount of this process; () where they cannot be read."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    out = []
    for line in lines:
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        after = fields[fields.index("-") + 1:]
        if after:
            out.append((re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]), after[0]))
    return tuple(out)


# --------------------------------------------------------------------------- comparing with the module

def misfits(schema: Schema, entries: Mapping[str, TensorSpec]) -> List[str]:
    """Each way the tensors a file declares differ from what the module takes, one per key, in the
    module's order, then the keys the module lacks; [] when the file fits.

    Tied weights may be given under any of their names; buffers may be left out. Values (finite,
    tied copies equal) are not looked at: only the file's header was read.
    """
    problems: List[str] = []
    missing: List[str] = []
    for slot in schema.slots:
        given = [alias for alias in slot.aliases if alias in entries]
        if not given:
            if not slot.is_buffer:
                missing.append(slot.name)
                problems.append(f"{slot.name}: module has {describe(slot.shape, slot.dtype)}, the file lacks it")
            continue
        for alias in given:
            shape, dtype = entries[alias]
            if shape != slot.shape or dtype_name(dtype) != dtype_name(slot.dtype):
                problems.append(f"{alias}: module has {describe(slot.shape, slot.dtype)}, "
                                f"file has {describe(shape, dtype)}")
    for key, (shape, dtype) in entries.items():
        if key in schema.by_alias:
            continue
        hint = difflib.get_close_matches(key, missing or list(schema.by_alias), n=1, cutoff=0.6)
        problems.append(f"{key}: file has {describe(shape, dtype)}, the module has no such key"
                        + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return problems


def join_misfits(problems: Sequence[str], limit: int = MAX_KEYS_SHOWN) -> str:
    """The first `limit` problems, then how many more: 'a; b; c; and 12 more keys'."""
    text = "; ".join(problems[:limit])
    rest = len(problems) - limit
    if rest > 0:
        text += f"; and {rest} more key{'s' if rest > 1 else ''}"
    return text


def module_label(config: Any) -> str:
    """'package.module:factory {kwarg: value, …}': the module a config builds, as messages name it."""
    import yaml

    kwargs = dict(config.model.kwargs or {})
    if not kwargs:
        return config.model.factory
    try:
        text = yaml.safe_dump(kwargs, default_flow_style=True, width=2**31, sort_keys=False).strip()
    except yaml.YAMLError:
        text = str(kwargs)
    if len(text) > MAX_MODULE_LABEL:
        text = text[: MAX_MODULE_LABEL - 2] + "…}"
    return f"{config.model.factory} {text}"


def shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as it is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if not relative.startswith("..") else path


@dataclass
class ModuleFit:
    """The schema of the module a config builds, and the files held against it (`keys`: how their keys are
    matched to the module's; by default from the schema alone)."""

    schema: Schema
    label: str
    keys: Optional[ModuleKeys] = None

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = ModuleKeys(self.schema)

    @classmethod
    def of(cls, config: Any) -> Tuple[Optional["ModuleFit"], Optional[str]]:
        """The config's module as its workers build it (factory and kwargs, under its seed), made on the meta
        device (no memory for its tensors) or, where the factory cannot build there, on the CPU.

        `(None, why)` when it cannot be built here (a factory that needs a GPU this machine lacks):
        nothing is checked then, and the workers say what they find.
        """
        try:
            # Imported first, outside the meta device: tensors its module makes when imported stay real ones.
            import_callable(config.model.factory)
        except Exception as e:
            return None, f"{type(e).__name__}: {first_line(e, 300)}"
        why = ""
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    module = build_module(config.model.factory, config.model.kwargs, seed=config.model.seed)
                    keys = ModuleKeys.of(module)
            except Exception as e:  # the user's factory: anything may come
                why = f"{type(e).__name__}: {first_line(e, 300)}"
                continue
            return cls(keys.schema, module_label(config), keys), None
        return None, why

    @classmethod
    def kept(cls, config: Any, kept: "check_cache.Kept") -> "ModuleFit":
        """The config's module as an earlier check built it (`sweep.check_cache`): nothing is imported."""
        return cls(kept.schema, module_label(config), ModuleKeys(kept.schema, kept.ignore, kept.label))

    def problem(self, path: str) -> Optional[str]:
        """Why the file at `path` does not fit the module (said without its path), or None when it fits or
        cannot be read cheaply. Raises `WeightsError` for a file the run could not read at all."""
        entries = read_entries(path)
        if entries is None:
            return None
        mapping, refused = self.keys.match(entries)  # type: ignore[union-attr]
        if refused is not None:
            return f"does not fit the module built by {self.label}: {refused}"
        problems = misfits(self.schema, mapping.apply(entries))
        if not problems:
            return None
        return f"does not fit the module built by {self.label}: {join_misfits(problems)}"

    def check_anchor(self, path: str, field: str) -> None:
        """ConfigError naming `field` and the file when `path` does not fit the module, or when what was read
        of it already shows that it will not load (as the study's own reading of it would say)."""
        try:
            problem = self.problem(path)
        except WeightsError as e:
            raise ConfigError(f"{field}: {e}") from None
        if problem is not None:
            raise ConfigError(f"{field} {shown_path(path)} {problem}")

    def candidate_warnings(self, paths: Sequence[str]) -> List[str]:
        """Lines saying how many of the candidate files `paths` will be invalid rows, one per distinct problem."""
        if not paths:
            return []
        folder = _common_folder(paths)
        by_problem: Dict[str, List[str]] = {}
        for path in paths:
            try:
                problem = self.problem(path)
            except WeightsError as e:
                problem = str(e).removeprefix(f"{path}: ")
            if problem is not None:
                name = os.path.relpath(path, folder) if folder else path
                by_problem.setdefault(problem, []).append(name)
        if not by_problem:
            return []
        bad = sum(len(names) for names in by_problem.values())
        where = f" (in {shown_path(folder)})" if folder else ""
        lines = [f"{bad} of {len(paths)} candidate files{where} will be invalid rows:"]
        for problem, names in by_problem.items():
            shown = ", ".join(names[:MAX_FILES_SHOWN]) + (", …" if len(names) > MAX_FILES_SHOWN else "")
            lines.append(f"  {shown}: {problem}" if len(names) == 1 else f"  {len(names)} files ({shown}): {problem}")
        return lines


def _keep(config: Any, schema: Any, ignore: Sequence[str], label: str, facts: Dict[str, Any]) -> None:
    """Keep what a check found for the next check of this config (`sweep.check_cache`), once every function
    the config names has imported: a record vouches for those imports too."""
    try:
        for spec in check_cache.imports(config):
            import_callable(spec)
    except Exception:  # the config's own check names it
        return
    check_cache.remember(config, schema, ignore, label, facts)


def _common_folder(paths: Sequence[str]) -> str:
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths mixed
        return ""


# --------------------------------------------------------------------------- the check before a run

@dataclass
class Preflight:
    """A config's planned study, checked against its module; `warnings`: what will not stop the run."""

    study: Any
    warnings: List[str] = field(default_factory=list)


def candidate_files(study: Any) -> Sequence[str]:
    """The weights files a study evaluates one per row (its `paths`; () for a study of recipes)."""
    paths = getattr(study, "paths", ())  # a study not built on StudyBase may leave it out
    return [str(p) for p in paths] if isinstance(paths, (list, tuple)) else []


def plan_checked(config: Any, artifacts: Optional[Path] = None) -> Preflight:
    """Plan the config's study (as `studies.plan` does) once its weights files are checked against its module.

    Raises ConfigError, before the study reads any anchor whole, when `model.weights` or an anchor does
    not fit the module. Candidate files that do not fit, and a module that cannot be built here, are
    warnings. `artifacts`: the run folder the study may write into (None: nothing is written).

    The module's schema comes from an earlier check of the same config when the code that built it is
    unchanged (`sweep.check_cache`): then nothing is imported, unless the study needs its module or an
    anchor whole, or a file does not fit (that is checked again against the module built anew).
    """
    kept = check_cache.lookup(config)
    if kept is not None:
        facts = dict(kept.facts)
        try:
            with check_cache.gathering(facts):
                checked = _plan_checked(config, artifacts, ModuleFit.kept(config, kept))
        except ConfigError:
            pass  # what a kept schema or fact refuses is refused only by the module and code imported anew
        else:
            if facts != kept.facts:  # a study found something the record did not hold yet
                _keep(config, kept.schema, kept.ignore, kept.label, facts)
            return checked
    fit, why = ModuleFit.of(config)
    facts = {}
    with check_cache.gathering(facts):
        checked = _plan_checked(config, artifacts, fit, why)
    if fit is not None:
        _keep(config, fit.schema, [p.pattern for p in fit.keys.ignore], fit.keys.label, facts)  # type: ignore[union-attr]
    return checked


def _plan_checked(config: Any, artifacts: Optional[Path], fit: Optional[ModuleFit], why: str = "") -> Preflight:
    from .studies import plan
    from .studies.base import StudyContext, checking_anchors

    warnings: List[str] = []
    if fit is None:
        warnings.append(f"the module could not be built here to check the weights files against it "
                        f"({why}); the workers build it where they run")
    elif config.model.weights:
        fit.check_anchor(config.model.weights, "model.weights")
    with checking_anchors(fit.check_anchor if fit is not None else None), \
            reading_for(fit.keys if fit is not None else None):
        study = plan(config.study, StudyContext.from_config(config, artifacts))
    if fit is not None:
        warnings.extend(fit.candidate_warnings(candidate_files(study)))
    return Preflight(study, warnings)
