"""Import user factories, build modules and read weight files safely.

Weight files are untrusted input: safetensors are parsed natively, `.pt`,
`.pth` and `.bin` only through `torch.load(weights_only=True)`, and nothing
else is read. No code from a weights file ever runs, only regular files are
read, each at most to the size `stat` gave, and a file's own size bounds the
memory its tensors may take.
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import json
import os
import pickle
import stat
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .errors import WeightsError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: safetensors refuses headers larger than this (its own limit, 100 MB).
MAX_SAFETENSORS_HEADER = 100_000_000
#: A torch zip file may unpack to at most this many times its own size, plus
#: MAX_UNCOMPRESSED_EXTRA bytes. torch.save stores its entries uncompressed (ratio 1);
#: a re-zipped file of zeros would otherwise unpack a 1 MB file into gigabytes.
MAX_UNCOMPRESSED_RATIO = 4
MAX_UNCOMPRESSED_EXTRA = 16 * 2**20
#: A glob stops after visiting this many folder entries: '/**/*.safetensors' would walk
#: the whole file system.
MAX_GLOB_ENTRIES = 100_000


def import_object(spec: str) -> Any:
    """Import `package.module:attribute` (attribute may be dotted)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ImportError(f"{spec!r} is not of the form 'package.module:function'")
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ImportError(f"{spec!r} is not of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module '{module_name}' (from {spec!r}): {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module '{module_name}' has no attribute '{attr}' (from {spec!r})") from None
    return obj


def missing_module_hint(error: BaseException, spec: str, config_dir: Optional[Path] = None) -> str:
    """Where Python looked for the module of `spec` when that module itself is not found (not a package it
    imports), and how to put a folder on the path; "" for any other import error. A folder that holds the
    module (the config's own, or the working directory, which the `sweep` command does not put on the path)
    is named with the PYTHONPATH that finds it."""
    cause = error.__cause__ if isinstance(error.__cause__, ModuleNotFoundError) else error
    module_name = spec.partition(":")[0]
    top = module_name.split(".")[0]
    if not isinstance(cause, ModuleNotFoundError) or cause.name not in (top, module_name):
        return ""
    cwd = os.getcwd()
    own = list(dict.fromkeys(cwd if entry in ("", ".") else os.path.abspath(entry) for entry in sys.path
                             if os.path.isdir(entry or ".") and not _installed(entry)))
    hint = (f"Python looked in {', '.join(own)}, its own library and the installed packages" if own else
            "Python looked only in its own library and the installed packages (the `sweep` command does not "
            "put the working directory on the path)")
    for name, folder in (("the config's folder", config_dir), ("the working directory", cwd)):
        if folder is None:
            continue
        folder = Path(folder).resolve()
        holds = (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()
        if holds and str(folder) not in own:
            return (f"{hint}; {name} {folder} holds '{top}' but is not on the path: run with "
                    f"PYTHONPATH={folder} (e.g. `PYTHONPATH={folder} sweep run …`), or install it as a package")
    return f"{hint}; put the folder that holds '{top}' on PYTHONPATH, or install it as a package"


def _installed(entry: str) -> bool:
    """Whether a sys.path entry is Python's own (its library, its installed packages, the environment's
    scripts), not a folder of the user's."""
    if not entry or entry == ".":
        return False
    path = os.path.abspath(entry)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return ("site-packages" in path or "dist-packages" in path
            or any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes if p not in ("/", "/usr")))


def import_callable(spec: str) -> Callable[..., Any]:
    obj = import_object(spec)
    if not callable(obj):
        raise ImportError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_module(factory: str, kwargs: Optional[Mapping[str, Any]] = None,
                 weights: Optional[Dict[str, torch.Tensor]] = None, seed: int = 0) -> torch.nn.Module:
    """Call the factory under a fixed seed (every worker builds the same module) and load weights strictly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = import_callable(factory)(**dict(kwargs or {}))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        module.load_state_dict(weights, strict=True)
    return module


def load_weights(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    """Parse the bytes of a weights file named `name` into name → tensor.

    Raises `WeightsError` with the reason for anything that is not a readable
    safetensors file or a `weights_only` torch file holding a flat dict of tensors,
    and for any other exception while parsing: one file never fails more than its own row.
    """
    suffix = Path(name).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        parse = _load_safetensors
    elif suffix in TORCH_SUFFIXES:
        parse = _load_torch
    else:
        raise WeightsError(
            f"{name}: unsupported weights format '{suffix or '(no suffix)'}'; "
            f"use safetensors ({', '.join(SAFETENSORS_SUFFIXES)}) or a torch file ({', '.join(TORCH_SUFFIXES)})"
        )
    try:
        return parse(data, name)
    except WeightsError:
        raise
    except MemoryError:
        raise WeightsError(f"{name}: out of memory while loading it: the tensor sizes it declares "
                           f"do not fit in this process ({len(data):,}-byte file)") from None
    except RecursionError:
        raise WeightsError(f"{name}: nested too deeply to parse") from None
    except Exception as e:
        raise WeightsError(f"{name}: unreadable weights file: {type(e).__name__}: {e}") from None


def read_weights_file(path: str | Path) -> Dict[str, torch.Tensor]:
    return load_weights(read_file_bytes(path), str(path))


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at `path` (a symbolic link is followed), read only up to the
    size `stat` gave when it was opened.

    Raises `WeightsError` for anything else (a FIFO, a device, a socket, a folder), which is
    never read, and for a file whose size changed while it was read (one still being written).
    """
    path = os.fspath(path)
    try:
        st_mode = os.stat(path).st_mode
        if not stat.S_ISREG(st_mode):
            raise WeightsError(f"{path}: {describe_file(path, st_mode)}, not a regular file")
        # O_NONBLOCK: should a FIFO take the file's place after the check, open returns at once
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL character, or text the file system cannot encode
        raise WeightsError(f"{path!r}: not a usable path ({e})") from None
    with open(fd, "rb") as f:
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise WeightsError(f"{path}: {describe_file(path, opened.st_mode)}, not a regular file")
            size = opened.st_size
            data = f.read(size)
            grew = len(f.read(1)) > 0
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        except MemoryError:
            raise WeightsError(f"{path}: its {size:,} bytes do not fit in memory") from None
    if len(data) < size or grew:
        raise WeightsError(f"{path}: changed while it was read ({size:,} bytes when opened, "
                           f"{'more' if grew else len(data)} when read); read it again once it is written")
    return data


def describe_file(path: str, st_mode: int) -> str:
    """What is at `path` (`st_mode`: its stat after following links), for messages: 'a FIFO (named pipe)', …"""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((text for test, text in kinds if test(st_mode)), "not a regular file")
    if os.path.islink(path):
        return f"a symbolic link to {os.path.realpath(path)}, {kind}"
    return kind


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


def write_weights_file(state: Mapping[str, torch.Tensor], path: str | Path,
                       metadata: Optional[Dict[str, str]] = None) -> Path:
    """`state` as a safetensors file, written to a hidden temporary name and renamed: a reader
    never sees half a file. The folder is made if need be."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def safetensors_header_length(first: bytes, size: int, name: str) -> int:
    """The header length a safetensors file's first 8 bytes give, checked against the limit and the file's
    `size`; `WeightsError` naming `name` when the file cannot hold it."""
    if len(first) < 8:
        raise WeightsError(f"{name}: not a safetensors file: {len(first)} bytes, shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", first[:8])
    if header_len > MAX_SAFETENSORS_HEADER:
        raise WeightsError(f"{name}: safetensors header claims {header_len} bytes, over the {MAX_SAFETENSORS_HEADER}-byte limit")
    if 8 + header_len > size:
        raise WeightsError(
            f"{name}: truncated safetensors file: header claims {header_len} bytes, file has {size} bytes"
        )
    return header_len


def parse_safetensors_header(text: bytes, name: str) -> Dict[str, Any]:
    """A safetensors header as a dict: JSON, one object, no name given twice (in it or in one entry)."""
    repeated: List[Optional[str]] = []  # per JSON object, in parse order: a key it holds twice, or None

    def no_repeats(pairs: List[Any]) -> Dict[str, Any]:
        seen: set = set()
        repeated.append(next((key for key, _ in pairs if key in seen or seen.add(key)), None))
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{name}: not a safetensors file: its header is not JSON ({e})") from None
    except RecursionError:
        raise WeightsError(f"{name}: not a safetensors file: its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{name}: not a safetensors file: its header is not a JSON object")
    if repeated[-1] is not None:  # the header object is the last one parsed
        raise WeightsError(f"{name}: invalid safetensors file: duplicate tensor name {repeated[-1]!r}")
    if any(repeated):
        raise WeightsError(f"{name}: invalid safetensors file: its header lists "
                           f"{next(key for key in repeated if key)!r} twice in one entry")
    return header


def _load_safetensors(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    header_len = safetensors_header_length(data[:8], len(data), name)
    header = parse_safetensors_header(data[8 : 8 + header_len], name)
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)
    ]
    body = len(data) - 8 - header_len
    if ends and max(ends) > body:
        raise WeightsError(
            f"{name}: truncated safetensors file: its tensors need {max(ends)} bytes after the header, "
            f"the file holds {body}"
        )
    try:
        tensors = load(data)
    except SafetensorError as e:  # its error for every malformed file; anything else is load_weights'
        raise WeightsError(f"{name}: invalid safetensors file: {e}") from None
    return dict(tensors)


def _load_torch(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    _check_unpacked_size(data, name)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise WeightsError(
            f"{name}: refused by torch.load(weights_only=True): {first} "
            f"(the file holds more than tensors; re-save it as safetensors)"
        ) from None
    except (MemoryError, RecursionError):
        raise  # load_weights says what they mean
    except Exception as e:
        raise WeightsError(f"{name}: unreadable torch file: {type(e).__name__}: {e}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{name}: holds a {type(obj).__name__}, expected a dict of name → tensor")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise WeightsError(f"{name}: expected a flat dict of name → tensor, but these entries are not tensors: {shown}")
    return dict(obj)


def _check_unpacked_size(data: bytes, name: str) -> None:
    """Refuse a torch zip file whose entries unpack to more than its size allows, before torch reads any.

    torch.load checks each storage against its entry's size, so the entries' sizes bound the
    memory it takes. A legacy (non-zip) torch file is not compressed: torch reads each storage
    from the file itself and refuses one whose length there differs from what its pickle
    claims (the memory it sets aside first is never written), so its size bounds its storages.
    """
    if not data.startswith(b"PK\x03\x04"):  # how torch.load tells a zip file from a legacy one
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
        raise WeightsError(f"{name}: unreadable torch file: its zip directory is damaged ({e})") from None
    limit = MAX_UNCOMPRESSED_RATIO * len(data) + MAX_UNCOMPRESSED_EXTRA
    if unpacked > limit:
        raise WeightsError(
            f"{name}: a compressed torch file that unpacks to {unpacked:,} bytes, over the limit of {limit:,} "
            f"({MAX_UNCOMPRESSED_RATIO} × its {len(data):,} bytes + {MAX_UNCOMPRESSED_EXTRA:,}); "
            f"save it with torch.save as it is (uncompressed) or as safetensors"
        )
