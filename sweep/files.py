"""Paths a config names: resolved against the config's folder, checked to be regular files or checkpoint
folders; `pyarrow.fs` URIs (`s3://…`) are kept as they are and left to whoever reads them. And the folder
sweep keeps its caches in."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

if TYPE_CHECKING:  # annotations only: `sweep.evaluate` (which keeps its caches here) runs without pydantic
    from pydantic import ValidationInfo

#: The files a checkpoint folder is read from, in the order they are looked for.
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_uri(path: str) -> bool:
    """Whether `path` is a `pyarrow.fs` URI (`s3://…`, `gs://…`, `file://…`) rather than a local path."""
    return "://" in path


#: A glob stops after visiting this many folder entries: '/**/*.safetensors' would walk
#: the whole file system.
MAX_GLOB_ENTRIES = 100_000


def glob_files(pattern: str) -> Iterator[str]:
    """What `glob.iglob(pattern, recursive=True)` yields, visiting at most MAX_GLOB_ENTRIES folder entries.

    Raises ValueError naming the pattern once the walk would go further.
    """
    visited = 0

    def entries(folder: str, hidden: bool) -> List[Tuple[str, bool]]:  # (name, is a folder), as glob lists them
        nonlocal visited
        found = []
        try:
            with os.scandir(folder or os.curdir) as listing:
                for entry in listing:
                    visited += 1
                    if visited > MAX_GLOB_ENTRIES:
                        raise ValueError(
                            f"pattern {pattern} looks through more than {MAX_GLOB_ENTRIES:,} folder entries; "
                            f"narrow it to the folder that holds the weights files "
                            f"(e.g. 'checkpoints/**/*.safetensors', not '/**/*.safetensors')")
                    if hidden or not entry.name.startswith("."):
                        try:
                            found.append((entry.name, entry.is_dir()))
                        except OSError:
                            found.append((entry.name, False))
        except OSError:
            pass
        return found

    def below(folder: str, folders_only: bool) -> Iterator[str]:  # what '**' stands for: all under folder
        for name, is_folder in entries(folder, hidden=False):
            if is_folder or not folders_only:
                yield name
            if is_folder:
                yield from (os.path.join(name, rest) for rest in below(os.path.join(folder, name), folders_only))

    def matches(path: str, folders_only: bool) -> Iterator[str]:
        folder, last = os.path.split(path)
        if not glob_magic(path):
            if os.path.lexists(path) if last else os.path.isdir(folder):
                yield path
            return
        parents = matches(folder, True) if folder != path and glob_magic(folder) else [folder]
        for parent in parents:
            if last == "**":
                found = [""] + list(below(parent, folders_only))
            elif glob_magic(last):
                listed = entries(parent, hidden=last.startswith("."))
                found = fnmatch.filter([name for name, is_folder in listed if is_folder or not folders_only], last)
            else:
                found = [last] if os.path.lexists(os.path.join(parent, last)) else []
            for name in found:
                yield os.path.join(parent, name)

    yield from (path for path in matches(pattern, False) if path)  # a relative '**' matches '' first


def glob_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def describe_file(path: str, st_mode: int) -> str:
    """What is at `path` (`st_mode`: its stat after following links), for messages: 'a FIFO (named pipe)', …"""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((text for test, text in kinds if test(st_mode)), "not a regular file")
    if os.path.islink(path):
        return f"a symbolic link to {os.path.realpath(path)}, {kind}"
    return kind




def checks_files(info: ValidationInfo) -> bool:
    """False where a config is re-read away from its files (on a worker node)."""
    return (info.context or {}).get("check_files", True)


def resolve_path(value: str | Path, info: ValidationInfo) -> str:
    """Resolve `value` against the config file's folder (passed as context).

    Raises ValueError (which validation reports under the field) for a path that
    cannot name a file: empty, holding a NUL character, or '~user' of no user.
    """
    text = os.fspath(value)
    if not text.strip():
        raise ValueError("should be a path, got an empty string")
    if "\0" in text:
        raise ValueError(f"a path cannot hold a NUL character: {text!r}")
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise ValueError(f"cannot expand {text.split('/')[0]!r}: no such user or no home folder "
                         f"(write './{text}' for a file of that name)")
    base = (info.context or {}).get("base_dir")
    path = Path(expanded)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path)


def path_kind(path: str) -> Optional[str]:
    """'file' (a regular one), 'folder', or what else is at `path` ('a FIFO (named pipe)', 'a character
    device', …; a symbolic link is followed), None when nothing is there.

    Raises ValueError for a path the system cannot look at (too long, no permission, …).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:  # a NUL character, or text the file system cannot encode
        raise ValueError(f"not a usable path: {path!r} ({e})") from None
    except OSError as e:
        reason = "too many levels of symbolic links" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise ValueError(f"cannot look at {path}: {reason}") from None
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else describe_file(path, mode)


def check_file(path: str) -> None:
    """ValueError unless `path` is a regular file or a checkpoint folder (`is_checkpoint_folder`)."""
    kind = path_kind(path)
    if kind is None:
        raise ValueError(f"file not found: {path}")
    if kind == "folder":
        if not is_checkpoint_folder(path):
            raise ValueError(f"{path} is a folder without a checkpoint: it holds none of {', '.join(FOLDER_FILES)}")
        return
    if kind != "file":
        raise ValueError(f"{path} is {kind}, not a regular file (only regular files are read)")


def is_checkpoint_folder(path: str) -> bool:
    """Whether the folder at `path` holds one of the files a checkpoint folder is read from (FOLDER_FILES); what
    they hold is read with the checkpoint."""
    return any(path_kind(os.path.join(path, name)) == "file" for name in FOLDER_FILES)


def resolve_file(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    """An optional weights file or checkpoint folder: resolved against the config's folder and, where files are
    checked, present. A URI is kept as it is: it is read where it is used."""
    if value is None:
        return value
    if is_uri(value):
        if "\0" in value:
            raise ValueError(f"a URI cannot hold a NUL character: {value!r}")
        return value
    path = resolve_path(value, info)
    if checks_files(info):
        check_file(path)
    return path


def resolve_files(values: List[str], info: ValidationInfo) -> List[str]:
    """A list of weights files or checkpoint folders, each resolved (and checked) as `resolve_file` does."""
    return [resolve_file(v, info) for v in values]


def glob_matches_a_file(pattern: str) -> bool:
    """Whether `pattern` (recursive `**` allowed) matches at least one regular file or checkpoint folder.

    Raises ValueError for a pattern that also matches what is neither a folder nor a regular
    file (a FIFO, a device: never read), or that looks through more than MAX_GLOB_ENTRIES entries.
    """
    files, others = 0, []
    try:
        for match in glob_files(pattern):
            kind = path_kind(match)
            if kind == "file" or kind == "folder" and is_checkpoint_folder(match):
                files += 1
            elif kind not in (None, "folder"):
                others.append(f"{match} ({kind})")
    except OSError as e:
        raise ValueError(f"cannot search {pattern}: {e.strerror or e}") from None
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"pattern {pattern} matches what is not a regular file: {shown}; only regular files "
                         f"are read: remove them or narrow the pattern")
    return files > 0


#: The environment variable that moves sweep's on-disk caches (measured chunk sizes, kept checks), or turns
#: them off with `CACHE_OFF`.
CACHE_ENV = "SWEEP_CACHE_DIR"
CACHE_OFF = "off"


def cache_dir() -> Optional[Path]:
    """Where sweep keeps what it measured or checked (`SWEEP_CACHE_DIR`, else `$XDG_CACHE_HOME/sweep`, else
    `~/.cache/sweep`), or None when `SWEEP_CACHE_DIR=off`."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given.lower() == CACHE_OFF:
        return None
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative path is to be ignored
        return Path(xdg) / "sweep"
    return Path.home() / ".cache" / "sweep"


def write_atomically(path: str | Path, data: bytes) -> Path:
    """`data` written to a hidden temporary name beside `path`, then renamed: a reader never sees half a
    file. The folder is made if need be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
    return path
