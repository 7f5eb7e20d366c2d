"""What the checks before a run found, kept for the next run while the code they ran is unchanged.

`sweep validate` and `sweep run` import the config's functions (its factory,
loader and metrics) and build its module to hold the weights files against
it (`sweep.preflight`): that imports torch and the user's code, a second and
more before anything else happens. What came of it — those functions import,
and the module's schema (keys, shapes, dtypes, tied names, buffers) — is kept
here, under the config's factory, kwargs, seed and import paths, together
with the stamp (modification time and size) of every source file those
imports loaded, the files the factory's kwargs name, and the Python that ran
them. The next check with the same config whose stamps all still hold takes
the schema from here and imports nothing; any change to those files makes it
do the work again.

A record is read only by a process that has not imported the config's
functions yet (a `sweep` command; in a notebook the check imports them anew),
and it only ever lets a check pass sooner: a file that does not fit a kept
schema is checked again against a module built anew before it is reported as
a config error (that a candidate file will be an invalid row is warned of from
the record alone), and the workers check every candidate against the module
they build, whatever was kept. A factory whose module depends on something no
stamp covers (an environment variable, a file it finds by itself)
may give a stale schema: delete the `checks/` folder, or turn sweep's caches
off with `SWEEP_CACHE_DIR=off`.

Records live in `checks/` of sweep's cache folder (`SWEEP_CACHE_DIR`, else
`$XDG_CACHE_HOME/sweep`, else `~/.cache/sweep`), one small JSON file per
config, written atomically; a record that cannot be read is one that is not
there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .files import cache_dir
from .settings import IMPORT_FIELDS
from .validate import Slot

#: Bumped when what a record holds changes: older records are then not read.
VERSION = 1
#: The folder of records in sweep's cache folder (`sweep.files.cache_dir`).
CHECKS_FOLDER = "checks"
#: A folder named in the factory's kwargs has at most this many of its files stamped (a model folder's
#: config.json and tokenizer files; its weights are checked anyway).
MAX_FOLDER_FILES = 64


class KeptSchema:
    """A module's schema as a record keeps it: what `sweep.preflight` and `sweep.checkpoint_keys` read of a
    `sweep.validate.Schema` (its slots, by canonical name and by every alias), each slot's dtype by its name."""

    def __init__(self, slots: Sequence[Slot]):
        self.slots: Tuple[Slot, ...] = tuple(slots)
        self.by_alias: Dict[str, Slot] = {alias: s for s in self.slots for alias in s.aliases}

    @classmethod
    def of(cls, schema: Any) -> "KeptSchema":
        return cls([Slot(s.name, tuple(s.aliases), tuple(s.shape), str(s.dtype).removeprefix("torch."),
                         bool(s.is_buffer)) for s in schema.slots])

    def to_json(self) -> List[Any]:
        return [[s.name, list(s.aliases), list(s.shape), s.dtype, s.is_buffer] for s in self.slots]

    @classmethod
    def from_json(cls, data: Any) -> "KeptSchema":
        return cls([Slot(str(name), tuple(map(str, aliases)), tuple(int(d) for d in shape), str(dtype),
                         bool(is_buffer)) for name, aliases, shape, dtype, is_buffer in data])


@dataclass(frozen=True)
class Kept:
    """A record: the module's schema, the keys its class ignores, its class name, and what the study's
    checks found besides (`fact`)."""

    schema: KeptSchema
    ignore: Tuple[str, ...]
    label: str
    facts: Dict[str, Any] = field(default_factory=dict)


#: The facts of the check in progress (see `fact`): those of the record it runs from, and those found since.
_facts: ContextVar[Optional[Dict[str, Any]]] = ContextVar("sweep_check_facts", default=None)


def fact(name: str, find: Callable[[], Any]) -> Any:
    """What a study's check finds beyond the module's schema (the keywords its loss takes, the module's
    batch-norm layers), as JSON data: within `gathering` taken from the record the check runs from when it
    holds `name`, else `find()`, which the record written at the end of the check keeps. `find` may raise
    (a `ConfigError`): nothing is kept then. A fact's name says what it depends on beyond the record's key
    (the loss's import path, say)."""
    facts = _facts.get()
    if facts is None:
        return find()
    if name not in facts:
        facts[name] = find()
    return facts[name]


@contextmanager
def gathering(facts: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Within it, `fact` reads and adds to `facts`."""
    token = _facts.set(facts)
    try:
        yield facts
    finally:
        _facts.reset(token)


def folder() -> Optional[Path]:
    """Where records are kept: `checks/` in sweep's cache folder; None when the caches are off."""
    base = cache_dir()
    return base / CHECKS_FOLDER if base is not None else None


def imports(config: Any) -> List[str]:
    """The import paths a config's checks import: its factory, loader and metrics."""
    return [getattr(getattr(config, section), name) for section, name in IMPORT_FIELDS]


def key(config: Any) -> Optional[str]:
    """Which record a config's checks are kept under: the same for configs that build the same module from
    the same functions, found in the same files, under the same Python; None when a function's module is not
    found (importing it says why)."""
    try:
        files = [_origin(spec) for spec in imports(config)]
    except (Exception, SystemExit):  # a package's own import may raise anything: importing it says so
        return None
    what = {"version": VERSION, "python": [os.path.realpath(sys.executable), sys.prefix, sys.version],
            "imports": imports(config),
            "files": files, "kwargs": config.model.kwargs or {}, "seed": config.model.seed}
    text = json.dumps(what, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _origin(spec: str) -> Optional[str]:
    """The file the module of 'package.module:name' is loaded from, found without running it (its parent
    packages are imported)."""
    module = spec.partition(":")[0]
    if module in sys.modules:
        return getattr(sys.modules[module], "__file__", None)
    found = importlib.util.find_spec(module)
    if found is None:
        raise ModuleNotFoundError(module)
    return found.origin


def lookup(config: Any) -> Optional[Kept]:
    """The record of an earlier check of a config like this one, when every file it stamped is unchanged.

    None in a process that has imported one of the config's functions already: there the check costs
    little, and the module may differ from its file (a function redefined in a notebook, or patched).
    """
    where = folder()
    if where is None or any(spec.partition(":")[0] in sys.modules for spec in imports(config)):
        return None
    name = key(config)
    if name is None:
        return None
    try:
        record = json.loads((where / f"{name}.json").read_text())
        if record.get("version") != VERSION or not _unchanged(record["stamps"]):
            return None
        return Kept(KeptSchema.from_json(record["schema"]), tuple(record["ignore"]), str(record["label"]),
                    dict(record.get("facts") or {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(config: Any, schema: Any, ignore: Sequence[str], label: str,
             facts: Optional[Mapping[str, Any]] = None) -> None:
    """Keep what a check that imported the config's functions and built its module found (`schema`: a
    `sweep.validate.Schema` or a kept one; `facts`: see `fact`). Nothing is kept when the cache is off or
    its folder cannot be written."""
    where = folder()
    name = key(config) if where is not None else None
    if where is None or name is None:
        return
    record = {"version": VERSION, "stamps": stamps(config.model.kwargs or {}), "schema": KeptSchema.of(schema).to_json(),
              "ignore": list(ignore), "label": label, "facts": dict(facts or {})}
    target = where / f"{name}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(temporary, target)
    except OSError:
        return


# --------------------------------------------------------------------------- stamps

def stamps(kwargs: Mapping[str, Any]) -> Dict[str, List[int]]:
    """path → [mtime_ns, size] of every source file the loaded modules come from (a package installed in
    site-packages by its `__init__`, which its every install rewrites; the standard library not at all:
    the Python is in the key) and of the files `kwargs` name."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[name]) for name in ("stdlib", "platstdlib")}
    site = {os.path.realpath(p) for p in _site_folders()}
    out: Dict[str, List[int]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path):
            continue  # a module made in memory
        real = os.path.realpath(path)
        if _below(real, site):
            top = sys.modules.get(name.partition(".")[0])
            top_file = getattr(top, "__file__", None)
            if isinstance(top_file, str):
                _stamp(out, top_file)
            continue
        if _below(real, stdlib):
            continue
        _stamp(out, path)
    for path in _named_files(kwargs):
        _stamp(out, path)
    return out


def _site_folders() -> List[str]:
    import site

    folders = [sysconfig.get_paths()[name] for name in ("purelib", "platlib")]
    try:
        folders += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # a virtualenv's old site module
        pass
    return folders


def _below(path: str, folders: Any) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _stamp(out: Dict[str, List[int]], path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        out[path] = [-1, -1]  # gone: stays so while it is
        return
    out[path] = [st.st_mtime_ns, st.st_size]


def _unchanged(recorded: Mapping[str, Sequence[int]]) -> bool:
    for path, (mtime, size) in recorded.items():
        try:
            st = os.stat(path)
        except OSError:
            if mtime != -1:
                return False
            continue
        if st.st_mtime_ns != mtime or st.st_size != size:
            return False
    return True


def _named_files(value: Any) -> Iterator[str]:
    """The files a kwargs value names: strings that are paths to a file, or to a folder (its files)."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _named_files(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _named_files(item)
    elif isinstance(value, str) and value and len(value) < 4096:
        try:
            if os.path.isfile(value):
                yield os.path.abspath(value)
            elif os.path.isdir(value):
                names = sorted(os.listdir(value))[:MAX_FOLDER_FILES]
                yield from (os.path.join(os.path.abspath(value), n) for n in names
                            if os.path.isfile(os.path.join(value, n)))
        except OSError:
            return
