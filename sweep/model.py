"""Import user factories, build modules and read weight files safely.

Weight files are untrusted input: safetensors are parsed natively (a local
file straight into its tensors once its header and offsets are checked, bytes
by the safetensors library), `.pt`, `.pth` and `.bin` only through
`torch.load(weights_only=True)`, and nothing else is read. No code from a
weights file ever runs, only regular files are read, each at most to the size
`stat` gave, and a file's own size bounds the memory its tensors may take.

A checkpoint is a weights file or a checkpoint folder as `save_pretrained`
writes one (`model.safetensors`, sharded safetensors with their index,
`pytorch_model.bin`, sharded `.bin` files with theirs), on a local path or
behind a `pyarrow.fs` URI (`s3://…`, `gs://…`, `file://…`).
"""

from __future__ import annotations

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

from .errors import WeightsError
from .files import FOLDER_FILES, describe_file, is_uri
from .lazy import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: safetensors refuses headers larger than this (its own limit, 100 MB).
MAX_SAFETENSORS_HEADER = 100_000_000
#: A torch zip file may unpack to at most this many times its own size, plus
#: MAX_UNCOMPRESSED_EXTRA bytes. torch.save stores its entries uncompressed (ratio 1);
#: a re-zipped file of zeros would otherwise unpack a 1 MB file into gigabytes.
MAX_UNCOMPRESSED_RATIO = 4
MAX_UNCOMPRESSED_EXTRA = 16 * 2**20


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
                 weights: Optional[Dict[str, torch.Tensor]] = None, seed: int = 0,
                 weights_name: str = "model.weights") -> torch.nn.Module:
    """Call the factory under a fixed seed (every worker builds the same module) and load weights strictly
    (`load_into`; `weights_name` names them in errors)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = import_callable(factory)(**dict(kwargs or {}))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_into(module, weights, weights_name)
    return module


def load_into(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], name: str) -> None:
    """Load `weights` into `module` as strictly as a candidate is checked: keys matched to the module's by
    `checkpoint_keys` (one prefix removed or added), every parameter given (one of a tied pair is enough: it
    fills both), buffers optional (the module keeps its own; a non-persistent one given is checked and left
    as the module has it), nothing unknown. `WeightsError` naming `name` and every key that differs."""
    from .checkpoint_keys import ModuleKeys, fit_keys

    keys = ModuleKeys.of(module)
    weights = fit_keys(dict(weights), keys, name)
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    tensors, error = keys.schema.check(weights, device, finite=False)
    if error is not None:
        raise WeightsError(f"{name} does not fit the module: {error}")
    saved = set(module.state_dict(keep_vars=True))  # what load_state_dict takes: no non-persistent buffer
    state = {alias: tensors[slot.name] for slot in keys.schema.slots if slot.name in tensors
             for alias in slot.aliases if alias in saved}
    module.load_state_dict(state, strict=False)  # every key is the module's, every parameter is given


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
    """The tensors of a weights file or checkpoint folder (a local path or a `pyarrow.fs` URI), their keys
    matched to the module's where `checkpoint_keys.reading_for` says which module reads them."""
    return read_checkpoint(os.fspath(path))


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at `path` (a symbolic link is followed), read only up to the
    size `stat` gave when it was opened.

    Raises `WeightsError` for anything else (a FIFO, a device, a socket, a folder), which is
    never read, and for a file whose size changed while it was read (one still being written).
    """
    path = os.fspath(path)
    fd = _open_regular(path)
    with open(fd, "rb") as f:
        try:
            size = _opened_size(path, fd)
            data = f.read(size)
            grew = len(f.read(1)) > 0
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        except MemoryError:
            raise WeightsError(f"{path}: its {size:,} bytes do not fit in memory") from None
    if len(data) < size or grew:
        raise _changed(path, size, None if grew else len(data))
    return data


def _open_regular(path: str) -> int:
    """A descriptor of the regular file at `path`, opened without blocking; `WeightsError` for anything else."""
    try:
        st_mode = os.stat(path).st_mode
        if not stat.S_ISREG(st_mode):
            raise WeightsError(f"{path}: {describe_file(path, st_mode)}, not a regular file")
        # O_NONBLOCK: should a FIFO take the file's place after the check, open returns at once
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL character, or text the file system cannot encode
        raise WeightsError(f"{path!r}: not a usable path ({e})") from None


def _opened_size(path: str, fd: int) -> int:
    """The size of the file open at `fd`, which must be a regular one (what was checked before it was opened)."""
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        raise WeightsError(f"{path}: {describe_file(path, opened.st_mode)}, not a regular file")
    return opened.st_size


def _changed(path: str, size: int, read: Optional[int]) -> WeightsError:
    return WeightsError(f"{path}: changed while it was read ({size:,} bytes when opened, "
                        f"{'more' if read is None else read} when read); read it again once it is written")


def read_safetensors_file(path: str, label: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensors of the local safetensors file at `path`, each read from the file straight into its own
    memory: the file's bytes are never held besides them (reading it whole and parsing the bytes would hold
    both, and safetensors' parser copies them once more).

    Checked as `load_weights` checks the bytes before safetensors parses them, and as safetensors then
    checks them: the header (length within the limit and the file, JSON, no name twice, each entry's dtype,
    shape and offsets agreeing) and the tensors lying end to end over the data after it, no gap, no overlap,
    nothing left over. Only a regular file is read, up to the size `stat` gave; `label` names it where its
    contents are at fault. `WeightsError` with the reason.
    """
    label = label or path
    if sys.byteorder != "little":  # safetensors stores little-endian values: its own parser swaps them
        return load_weights(read_file_bytes(path), label)
    fd = _open_regular(path)
    with open(fd, "rb", buffering=0) as f:
        try:
            size = _opened_size(path, fd)
            header_len = safetensors_header_length(f.read(8), size, label)
            header = parse_safetensors_header(f.read(header_len), label)
            entries = {key: safetensors_entry(label, key, entry) for key, entry in header.items()
                       if key != "__metadata__"}
            body = size - 8 - header_len
            ends = max((end for *_, end in entries.values()), default=0)
            if ends > body:
                raise WeightsError(f"{label}: truncated safetensors file: its tensors need {ends} bytes after the "
                                   f"header, the file holds {body}")
            at = 0
            for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
                if begin != at:
                    raise WeightsError(f"{label}: invalid safetensors file: key {key!r} begins at byte {begin} of "
                                       f"the data, where the tensor before it ends at {at}: tensors lie end to end")
                at = end
            if at != body:
                raise WeightsError(f"{label}: invalid safetensors file: its tensors take {at} bytes after the "
                                   f"header, the file holds {body}")
            tensors: Dict[str, torch.Tensor] = {}
            for key, (shape, dtype, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
                raw = torch.empty(end - begin, dtype=torch.uint8)
                if not _read_into(f, raw):
                    raise _changed(path, size, 8 + header_len + begin)
                tensors[key] = raw.view(getattr(torch, dtype)).reshape(shape)
            grew = len(f.read(1)) > 0
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        except MemoryError:
            raise WeightsError(f"{label}: out of memory while loading it: the tensor sizes it declares do not fit "
                               f"in this process ({size:,}-byte file)") from None
    if grew:
        raise _changed(path, size, None)
    return {key: tensors[key] for key in entries}  # in the header's order


def _read_into(f: Any, raw: torch.Tensor) -> bool:
    """Fill `raw` (a 1-D uint8 tensor) from `f`'s position; False when the file ends first."""
    view = memoryview(raw.numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            return False
        done += got
    return True


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


#: safetensors' dtype names → (torch's name for the dtype, bytes an element): every one torch >= 2.6 reads
SAFETENSORS_DTYPES: Dict[str, Tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2), "I16": ("int16", 2),
    "U32": ("uint32", 4), "I32": ("int32", 4), "U64": ("uint64", 8), "I64": ("int64", 8), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8), "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def dtype_name(dtype: Any) -> str:
    """torch's name for a dtype ('float32'), given the dtype or its name."""
    return str(dtype).removeprefix("torch.")


def safetensors_entry(name: str, key: str, entry: Any) -> Tuple[Tuple[int, ...], str, int, int]:
    """One tensor of a safetensors header as (shape, dtype name, begin, end) of its bytes after the header,
    checked as loading the file checks it; `WeightsError` naming `name` and `key` otherwise."""
    from .validate import describe

    def bad(why: str) -> WeightsError:
        return WeightsError(f"{name}: invalid safetensors file: key {key!r}: {why}")

    if not isinstance(entry, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {type(entry).__name__}")
    known = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if known is None:
        raise bad(f"dtype {entry.get('dtype')!r} is not one torch reads")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape should be a list of sizes, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"data_offsets should be [begin, end], got {offsets!r}")
    count = 1
    for d in shape:
        count *= d
    dtype, itemsize = known
    if count * itemsize != offsets[1] - offsets[0]:
        raise bad(f"{describe(tuple(shape), dtype)} takes {count * itemsize} bytes, its data_offsets give "
                  f"{offsets[1] - offsets[0]}")
    return tuple(shape), dtype, offsets[0], offsets[1]


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


def _json_with_repeats(text: Any) -> Tuple[Any, List[Optional[str]]]:
    """`json.loads(text)` and, per JSON object in parse order (innermost first, the outermost last), a key
    it holds twice or None: JSON itself keeps the last value of a repeated key without a word."""
    repeated: List[Optional[str]] = []

    def no_repeats(pairs: List[Any]) -> Dict[str, Any]:
        seen: set = set()
        repeated.append(next((key for key, _ in pairs if key in seen or seen.add(key)), None))
        return dict(pairs)

    return json.loads(text, object_pairs_hook=no_repeats), repeated


def parse_safetensors_header(text: bytes, name: str) -> Dict[str, Any]:
    """A safetensors header as a dict: JSON, one object, no name given twice (in it or in one entry)."""
    try:
        header, repeated = _json_with_repeats(text)
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


# --------------------------------------------------------------------------- checkpoints: files, folders, URIs

#: The files a checkpoint folder holds its weights in, in the order one is read when several are there
#: (transformers' own: safetensors first, one file before shards). Nothing else in the folder is read
#: (`config.json`, tokenizer files, …).
INDEX_SUFFIX = ".index.json"
#: An index larger than this is refused unread (a 70-billion-parameter model's is about 100 KB).
MAX_INDEX_BYTES = 16 * 2**20

#: A checkpoint as the driver saw it: (file name in its folder, "" for a file; size; modification time in ns)
#: of each file it is read from. A worker whose own look at the path gives the same reads the path itself.
Stamp = Tuple[Tuple[str, int, int], ...]


class _Local:
    """The local file system, read as `read_file_bytes` does: regular files only, each up to its size."""

    def kind(self, path: str) -> Optional[str]:
        """'file', 'folder', what else is there ('a FIFO (named pipe)', …), or None when nothing is."""
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            return "unreadable"  # reading it says why
        if stat.S_ISDIR(mode):
            return "folder"
        return "file" if stat.S_ISREG(mode) else describe_file(path, mode)

    def read(self, path: str, limit: Optional[int] = None) -> bytes:
        if limit is not None:
            try:
                size = os.stat(path).st_size
            except (OSError, ValueError):
                size = 0  # reading it says why
            if size > limit:
                raise WeightsError(f"{path}: {size:,} bytes, over the {limit:,}-byte limit of such a file")
        return read_file_bytes(path)

    def stamp(self, path: str) -> Tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    @staticmethod
    def join(folder: str, name: str) -> str:
        return os.path.join(folder, name)


class _Arrow:
    """Files behind `pyarrow.fs` URIs: regular files only, each read up to the size the store gave."""

    def _open(self, uri: str) -> Tuple[Any, str]:
        import pyarrow.fs as pafs

        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # an unknown scheme, a malformed URI, a store it cannot reach
            raise WeightsError(f"{uri}: cannot open: {e}") from None

    def _info(self, uri: str) -> Tuple[Any, str, Any]:
        fs, path = self._open(uri)
        try:
            return fs, path, fs.get_file_info(path)
        except Exception as e:
            raise WeightsError(f"{uri}: cannot read: {e}") from None

    def kind(self, uri: str) -> Optional[str]:
        import pyarrow.fs as pafs

        info = self._info(uri)[2]
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder",
                pafs.FileType.NotFound: None}.get(info.type, "not a regular file")

    def read(self, uri: str, limit: Optional[int] = None) -> bytes:
        import pyarrow.fs as pafs

        fs, path, info = self._info(uri)
        if info.type == pafs.FileType.NotFound:
            raise WeightsError(f"{uri}: cannot read: not found")
        if info.type != pafs.FileType.File:
            raise WeightsError(f"{uri}: {'a folder' if info.type == pafs.FileType.Directory else 'not a regular file'}"
                               f", not a regular file")
        size = info.size
        if limit is not None and size > limit:
            raise WeightsError(f"{uri}: {size:,} bytes, over the {limit:,}-byte limit of such a file")
        try:
            with fs.open_input_stream(path) as f:
                data = f.read(size)
                grew = len(f.read(1)) > 0
        except MemoryError:
            raise WeightsError(f"{uri}: its {size:,} bytes do not fit in memory") from None
        except Exception as e:
            raise WeightsError(f"{uri}: cannot read: {e}") from None
        if len(data) < size or grew:
            raise WeightsError(f"{uri}: changed while it was read ({size:,} bytes listed, "
                               f"{'more' if grew else len(data)} read); read it again once it is written")
        return data

    def stamp(self, uri: str) -> Tuple[int, int]:
        info = self._info(uri)[2]
        return int(info.size or 0), int(info.mtime_ns or 0)

    @staticmethod
    def join(folder: str, name: str) -> str:
        return folder.rstrip("/") + "/" + name


class _Sent:
    """A checkpoint folder's files as the driver read and sent them ({name: bytes}), at the folder's path."""

    def __init__(self, folder: str, files: Mapping[str, bytes]):
        self.folder = folder
        self.files = files

    def _name(self, path: str) -> Optional[str]:
        head, name = os.path.split(path)
        return name if head == self.folder else None

    def kind(self, path: str) -> Optional[str]:
        if path == self.folder:
            return "folder"
        return "file" if self._name(path) in self.files else None

    def read(self, path: str, limit: Optional[int] = None) -> bytes:
        name = self._name(path)
        if name not in self.files:
            raise WeightsError(f"{path}: cannot read: not among the files sent")
        return self.files[name]

    @staticmethod
    def join(folder: str, name: str) -> str:
        return os.path.join(folder, name)


_LOCAL = _Local()


def files_at(path: str) -> Any:
    """Where the files of `path` are read from: the local file system, or `pyarrow.fs` for a URI."""
    return _Arrow() if is_uri(path) else _LOCAL


class Layout:
    """Which files of a checkpoint folder hold its weights.

    `chosen` is the first of FOLDER_FILES the folder holds; `shards` the weights files read (the chosen
    file itself, or the shards its index lists, in name order); `weight_map` the index's key → shard (None
    without an index); `others` the other FOLDER_FILES present, left unread.
    """

    def __init__(self, folder: str, chosen: str, shards: Tuple[str, ...],
                 weight_map: Optional[Dict[str, str]], others: Tuple[str, ...]):
        self.folder = folder
        self.chosen = chosen
        self.shards = shards
        self.weight_map = weight_map
        self.others = others

    @property
    def files(self) -> Tuple[str, ...]:
        """Every file read, by name in the folder: the index (if any), then the shards."""
        return ((self.chosen,) if self.weight_map is not None else ()) + self.shards

    def path(self, name: str, files: Any) -> str:
        return files.join(self.folder, name)


def folder_layout(folder: str, files: Any = None) -> Layout:
    """The layout of the checkpoint folder `folder` (its index read and checked, its shards present).

    Raises `WeightsError` naming the folder for one without any of FOLDER_FILES, and naming the index for
    an index that is not one (not JSON, no `weight_map` of key → file name, a key listed twice, a shard
    outside the folder or of another format) or that lists a shard the folder lacks.
    """
    files = files if files is not None else files_at(folder)
    present = [name for name in FOLDER_FILES if files.kind(files.join(folder, name)) == "file"]
    if not present:
        raise WeightsError(f"{folder}: a folder without a checkpoint: it holds none of {', '.join(FOLDER_FILES)}")
    chosen, others = present[0], tuple(present[1:])
    if others:
        _say_once(("several", chosen, others),
                  f"sweep: {folder} holds {', '.join(others)} too; {chosen} is read (safetensors first, as "
                  f"transformers does; said once for every folder like it)")
    if not chosen.endswith(INDEX_SUFFIX):
        return Layout(folder, chosen, (chosen,), None, others)
    index = files.join(folder, chosen)
    weight_map = parse_index(files.read(index, MAX_INDEX_BYTES), index, chosen[: -len(INDEX_SUFFIX)])
    shards = tuple(sorted(set(weight_map.values())))
    for shard in shards:
        kind = files.kind(files.join(folder, shard))
        if kind != "file":
            what = "which is not in the folder" if kind is None else f"which is {kind}, not a regular file"
            raise WeightsError(f"{index}: lists the shard {shard!r}, {what}")
    return Layout(folder, chosen, shards, weight_map, others)


def parse_index(data: bytes, name: str, weights_name: str) -> Dict[str, str]:
    """The `weight_map` (key → shard file name) of an index file; `weights_name` ('model.safetensors',
    'pytorch_model.bin') says which format its shards must be in."""
    try:
        index, repeats = _json_with_repeats(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{name}: not an index of shards: not JSON ({e})") from None
    except RecursionError:
        raise WeightsError(f"{name}: not an index of shards: nested too deeply") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{name}: not an index of shards: expected a JSON object with a non-empty "
                           f"'weight_map' of key → shard file name")
    repeated = [key for key in repeats if key is not None]
    if repeated:
        raise WeightsError(f"{name}: lists {repeated[0]!r} twice: each key lies in one shard")
    suffixes = SAFETENSORS_SUFFIXES if weights_name.endswith(SAFETENSORS_SUFFIXES) else TORCH_SUFFIXES
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise WeightsError(f"{name}: the shard of {key!r} should be a file name, got {shard!r}")
        if (not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                or shard.startswith("~")):
            raise WeightsError(f"{name}: the shard of {key!r} is {shard!r}, not a file name in the index's "
                               f"folder (shards lie beside their index)")
        if not shard.lower().endswith(suffixes):
            raise WeightsError(f"{name}: the shard of {key!r} is {shard!r}, not a {weights_name} shard "
                               f"({', '.join(suffixes)})")
    return weight_map


def merge_shards(layout: Layout, parts: Iterator[Tuple[str, Mapping[str, Any]]], label: str) -> Dict[str, Any]:
    """The shards' entries (tensors, or what their headers declare) as one dict, each key checked against
    the index: held by one shard only, the one the index names; every key the index lists found.

    `parts` yields (shard name, its entries) one shard at a time; `label` names the folder in errors.
    """
    merged: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    index = os.path.join(label, layout.chosen)
    for shard, entries in parts:
        shown = os.path.join(label, shard)
        for key, value in entries.items():
            if key in where:
                raise WeightsError(f"{label}: {key!r} is in two shards: {where[key]} and {shard}")
            if layout.weight_map is not None:
                listed = layout.weight_map.get(key)
                if listed is None:
                    raise WeightsError(f"{shown}: holds {key!r}, which {index} does not list (its weight_map names "
                                       f"the shard of every key)")
                if listed != shard:
                    raise WeightsError(f"{shown}: holds {key!r}, which {index} places in {listed}")
            where[key] = shard
            merged[key] = value
    if layout.weight_map is not None:
        lost = [(k, s) for k, s in layout.weight_map.items() if k not in where]
        if lost:
            more = f" (and {len(lost) - 1} more keys)" if len(lost) > 1 else ""
            raise WeightsError(f"{index}: lists {lost[0][0]!r} in {lost[0][1]}, which does not hold it{more}")
    return merged


def read_checkpoint(path: str, label: Optional[str] = None, files: Any = None) -> Dict[str, torch.Tensor]:
    """The tensors of the weights file or checkpoint folder at `path`, one file read at a time, their keys
    matched to the module's where `checkpoint_keys.reading_for` says which module reads them.

    `label` names the checkpoint where its contents are at fault (default `path`; a missing file, a FIFO, a
    folder without a checkpoint are always named by `path`); `files` reads them (default: the local file
    system, or `pyarrow.fs` for a URI). Raises `WeightsError` with the reason.
    """
    from .checkpoint_keys import fit_read

    files = files if files is not None else files_at(path)
    label = label or path
    if files.kind(path) == "folder":
        layout = folder_layout(path, files)
        state = merge_shards(layout, ((shard, _read_file(layout.path(shard, files), os.path.join(label, shard),
                                                         files))
                                      for shard in layout.shards), label)
    else:
        state = _read_file(path, label, files)
    return fit_read(state, label)


def _read_file(path: str, label: str, files: Any) -> Dict[str, torch.Tensor]:
    """One weights file's tensors: a local safetensors file straight into them, anything else through its bytes."""
    if files is _LOCAL and Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors_file(path, label)
    return load_weights(files.read(path), label)


def checkpoint_stamp(path: str) -> Optional[Stamp]:
    """How the checkpoint at `path` looks from here (see `Stamp`); None for a URI (the driver does not look).

    Raises `WeightsError`, in the words reading it would use, for what cannot be read here: nothing there,
    not a regular file or folder, a folder without a checkpoint or with a broken index.
    """
    if is_uri(path):
        return None
    kind = _LOCAL.kind(path)
    try:
        if kind == "file":
            return (("",) + _LOCAL.stamp(path),)
        if kind == "folder":
            layout = folder_layout(path, _LOCAL)
            return tuple((name,) + _LOCAL.stamp(layout.path(name, _LOCAL)) for name in layout.files)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    read_file_bytes(path)  # raises, saying why
    raise WeightsError(f"{path}: cannot read")  # pragma: no cover - a regular file appeared meanwhile


def stamp_bytes(stamp: Optional[Stamp]) -> Optional[int]:
    """The bytes a stamped checkpoint's files take (None when unknown)."""
    return None if stamp is None else sum(size for _, size, _ in stamp)


def checkpoint_bytes(path: str) -> Any:
    """The checkpoint at `path` as bytes to send to a worker that cannot reach it: a file's bytes, or a
    folder's files by name (the index and its shards). Raises `WeightsError` with the reason."""
    files = files_at(path)
    if files.kind(path) != "folder":
        return files.read(path)
    layout = folder_layout(path, files)
    return {name: files.read(layout.path(name, files)) for name in layout.files}


def load_checkpoint(data: Any, path: str, label: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint the driver sent as `checkpoint_bytes` gave them (the checkpoint at `path`)."""
    from .checkpoint_keys import fit_read

    if isinstance(data, Mapping):
        return read_checkpoint(path, label, files=_Sent(path, data))
    return fit_read(load_weights(data, label or path), label or path)


_said: set = set()


def _say_once(key: Any, message: str) -> None:
    """Log `message` once per process for `key` (a fact true of many checkpoints, said for the first)."""
    if key not in _said:
        _said.add(key)
        import logging

        logging.getLogger("sweep").warning(message)
