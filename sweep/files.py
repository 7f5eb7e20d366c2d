"""Paths a config names: resolved against the config's folder, checked to be regular files or checkpoint
folders; `pyarrow.fs` URIs (`s3://…`) are kept as they are and left to whoever reads them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import List, Optional

from pydantic import ValidationInfo

from .model import FOLDER_FILES, describe_file, glob_files, is_uri


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
