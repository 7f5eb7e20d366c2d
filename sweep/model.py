"""Import user factories, build modules and read weight files safely.

Weight files are untrusted input: safetensors are parsed natively, `.pt`,
`.pth` and `.bin` only through `torch.load(weights_only=True)`, and nothing
else is read. No code from a weights file ever runs.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from .errors import WeightsError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
#: safetensors refuses headers larger than this (its own limit, 100 MB).
MAX_SAFETENSORS_HEADER = 100_000_000


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
    safetensors file or a `weights_only` torch file holding a flat dict of tensors.
    """
    suffix = Path(name).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(data, name)
    if suffix in TORCH_SUFFIXES:
        return _load_torch(data, name)
    raise WeightsError(
        f"{name}: unsupported weights format '{suffix or '(no suffix)'}'; "
        f"use safetensors ({', '.join(SAFETENSORS_SUFFIXES)}) or a torch file ({', '.join(TORCH_SUFFIXES)})"
    )


def read_weights_file(path: str | Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from e
    return load_weights(data, str(path))


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


def _load_safetensors(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    if len(data) < 8:
        raise WeightsError(f"{name}: not a safetensors file: {len(data)} bytes, shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_SAFETENSORS_HEADER:
        raise WeightsError(f"{name}: safetensors header claims {header_len} bytes, over the {MAX_SAFETENSORS_HEADER}-byte limit")
    if 8 + header_len > len(data):
        raise WeightsError(
            f"{name}: truncated safetensors file: header claims {header_len} bytes, file has {len(data)} bytes"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{name}: not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{name}: not a safetensors file: its header is not a JSON object")
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
    except Exception as e:  # safetensors raises its own SafetensorError for every malformed file
        raise WeightsError(f"{name}: invalid safetensors file: {e}") from None
    return dict(tensors)


def _load_torch(data: bytes, name: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise WeightsError(
            f"{name}: refused by torch.load(weights_only=True): {first} "
            f"(the file holds more than tensors; re-save it as safetensors)"
        ) from None
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
