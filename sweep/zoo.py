"""Modules from the model zoos people sweep: `transformers` models built from a local config, torchvision
models by name.

Both are model factories a config can name (`model.factory: sweep.zoo:transformers_model`), or reach through
the config's shorter forms `model.transformers: <config.json or folder>` and `model.torchvision: <name>`.
Neither ever downloads anything, and neither loads weights: the module is built from its config with
random weights drawn under the caller's seed (`model.seed`; every worker builds the same module), and the
weights a sweep evaluates come from `model.weights` or from the study's files, checked like any others.

Both packages are optional extras (`pip install 'sweep[transformers]'`, `pip install 'sweep[torchvision]'`),
imported only when a factory here is called: `import sweep` and every other path work without them.

transformers models are built with `attn_implementation="eager"` unless told otherwise: its attention is
plain matmuls and a softmax, which `torch.vmap` batches with its own rules. transformers' default `sdpa`
also runs under vmap, but on the CPU through vmap's fallback for `scaled_dot_product_attention` (one call
per candidate, with a "performance drop" warning): a vmapped forward of 32 candidates of the 2-layer test
configs (GPT-2, BERT, ViT; batch 8) took 1.6 to 2.2 times as long with sdpa as with eager.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .lazy import torch
from .messages import first_line, short

TRANSFORMERS_EXTRA = "pip install 'sweep[transformers]'"
TORCHVISION_EXTRA = "pip install 'sweep[torchvision]'"
#: The file a transformers config lives in, alone or in a checkpoint folder beside the weights.
CONFIG_FILE = "config.json"
#: A config.json larger than this is not one (the largest real ones are tens of kilobytes).
MAX_CONFIG_BYTES = 16 * 2**20
#: The attention implementation transformers models are built with unless `attn_implementation` says
#: otherwise: eager attention runs under torch.vmap with native batching rules (see the module's docstring).
DEFAULT_ATTENTION = "eager"
#: Heads named in messages as examples of `auto_class`.
AUTO_CLASS_EXAMPLES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification",
                       "AutoModelForImageClassification", "AutoModelForMaskedLM", "AutoModel")
#: dtypes a `dtype` setting may name.
#: The floating dtypes a zoo model may be cast to, by name (each an attribute of torch).
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: What a Hugging Face Hub id looks like ('gpt2', 'openai-community/gpt2'): named in the error when no local
#: file of that name is there, since sweep never looks one up.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# --------------------------------------------------------------------------- transformers

def transformers_model(path: Union[str, os.PathLike], auto_class: Optional[str] = None,
                       dtype: Union[None, str, torch.dtype] = None, **overrides: Any) -> torch.nn.Module:
    """A `transformers` model built offline from a local `config.json`, in eval mode, with random weights.

    `path`: a `config.json` file, or a checkpoint folder holding one (as `save_pretrained` writes it; the
    weights beside it are not loaded here: give them to the sweep as `model.weights` or the study's files).
    Nothing is looked up on the Hugging Face Hub, even for a name that looks like a Hub id: a path with no
    file there is a `FileNotFoundError` naming it.

    `auto_class` names the class that builds it: an Auto class (`AutoModelForCausalLM`,
    `AutoModelForSequenceClassification`, `AutoModelForImageClassification`, `AutoModel`, …) or a model
    class of transformers (`GPT2LMHeadModel`). Default: the config's `architectures[0]` when transformers
    has a class of that name, else `AutoModel` (the model without a head). The module has the dtype the
    config names (`dtype`, or `torch_dtype` in older files), as transformers builds it, float32 when it names
    none; `dtype` ('float32', 'bfloat16', 'float16', 'float64' or a torch.dtype) casts its floating
    parameters and buffers once built. Candidates must have the module's dtypes (a bfloat16 checkpoint
    against a float32 module is an invalid row saying so).

    `overrides` change settings of the config before the model is built (`num_labels=10`,
    `num_hidden_layers=2`); a name the config does not have is a `TypeError` with the closest one.
    `attn_implementation` (default 'eager', see the module's docstring) is passed to transformers;
    `use_cache` is off unless given (a sweep evaluates whole sequences; a cache in the output costs memory).
    """
    file = config_file(path)
    transformers = import_transformers()
    attention = overrides.pop("attn_implementation", DEFAULT_ATTENTION)
    use_cache = overrides.pop("use_cache", False)
    config = load_transformers_config(file, overrides, transformers)
    return build_transformers(config, auto_class, dtype=dtype, attn_implementation=attention, use_cache=use_cache,
                              source=str(file))


def build_transformers(config: Any, auto_class: Optional[str] = None, *,
                       dtype: Union[None, str, torch.dtype] = None,
                       attn_implementation: Optional[str] = DEFAULT_ATTENTION, use_cache: bool = False,
                       source: str = "the config") -> torch.nn.Module:
    """A `transformers` model built from a config object (a `PretrainedConfig`), in eval mode: what
    `transformers_model` does once it has read the config file. `use_cache` is set on a config that has
    that setting; `source` names the config in messages."""
    transformers = import_transformers()
    cast = _dtype(dtype) if dtype is not None else None
    if hasattr(config, "use_cache"):
        config.use_cache = use_cache
    name, cls = _model_class(transformers, config, auto_class, source)
    options: Dict[str, Any] = {}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    auto = hasattr(cls, "from_config")
    expected = getattr(cls, "config_class", None)
    if not auto and isinstance(expected, type) and not isinstance(config, expected):
        raise ValueError(f"{name} takes a {expected.__name__}, and {source} is a {type(config).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})")
    try:
        module = cls.from_config(config, **options) if auto else cls._from_config(config, **options)
    except ValueError as e:
        # transformers lists every model type an Auto class knows in the next lines: the first says it.
        raise ValueError(f"{name} cannot build the model of {source}: {first_line(e, 300)}") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{name} built a {type(module).__name__} from {source}, not a torch.nn.Module")
    if cast is not None:
        module = module.to(dtype=cast)
    return module.eval()


def config_file(path: Union[str, os.PathLike]) -> Path:
    """The local `config.json` that `path` names: the file itself, or the one in the folder it names.

    Raises `FileNotFoundError` naming the path when there is none (a Hub id is named as one, never looked up).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise TypeError(f"a transformers model is built from the path of a config.json or of a checkpoint "
                        f"folder, got {short(path)}")
    given = Path(os.path.expanduser(os.fspath(path)))
    if given.is_dir():
        file = given / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{given} holds no {CONFIG_FILE}: a transformers model is built from its "
                                    f"config.json (a checkpoint folder as save_pretrained writes it has one beside "
                                    f"its weights)")
        return file
    if given.is_file():
        return given
    if given.exists():
        raise ValueError(f"{given} is neither a regular file nor a folder: a transformers model is built from a "
                         f"local config.json or a checkpoint folder holding one")
    raise FileNotFoundError(f"{given}: no such file or folder; a transformers model is built from a local "
                            f"config.json or a checkpoint folder holding one{hub_id_hint(os.fspath(path))}")


def hub_id_hint(text: str) -> str:
    """'; … looks like a Hugging Face Hub id …' for a path written like one ('gpt2', 'openai-community/gpt2'),
    else ''."""
    if not isinstance(text, str) or not _HUB_ID.fullmatch(text) or text.endswith(".json"):
        return ""
    return (f"; {text!r} looks like a Hugging Face Hub id, and sweep never downloads: fetch the model once "
            f"(`hf download {text} --local-dir DIR`) and give that folder")


def extra_missing(package: str) -> Optional[str]:
    """Why a model of `package` ('transformers', 'torchvision') cannot be built here when the package is not
    installed (the extra to install), else None. Looked up without importing it: a package that is there but
    fails to import is found out when the model is built."""
    if importlib.util.find_spec(package) is not None:
        return None
    return (f"needs the optional package {package}, which is not installed: "
            f"{TRANSFORMERS_EXTRA if package == 'transformers' else TORCHVISION_EXTRA}")


def read_config_dict(file: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The settings a `config.json` holds, as a mapping with a `model_type` string.

    Raises ValueError naming the file for one that is too large, not JSON, not a mapping, or without
    `model_type` (the key transformers tells its model families apart by).
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{file}: {size:,} bytes is not a config.json (at most {MAX_CONFIG_BYTES:,})")
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{file}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: a transformers config is a JSON object of settings, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{file}: no 'model_type' (e.g. \"gpt2\", \"bert\", \"vit\", \"resnet\"): a "
                         f"config.json as save_pretrained writes it names its model type")
    return raw


def load_transformers_config(file: Union[str, os.PathLike], overrides: Optional[Dict[str, Any]] = None,
                             transformers: Any = None) -> Any:
    """The `PretrainedConfig` of a local `config.json`, with `overrides` applied before it is made (so the
    settings it derives from them follow). Only model types transformers itself knows are built: a config
    whose model's code would come from elsewhere (`auto_map`, remote code) is refused."""
    transformers = transformers or import_transformers()
    raw = read_config_dict(file)
    overrides = dict(overrides or {})
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw["model_type"]
    if model_type not in CONFIG_MAPPING:
        known = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        raise ValueError(f"{file}: model_type {model_type!r} is not one transformers {transformers.__version__} "
                         f"knows" + (f" (did you mean {known[0]!r}?)" if known else "")
                         + "; sweep builds only transformers' own models, never code from a model folder or the Hub")
    config_class = CONFIG_MAPPING[model_type]
    if overrides:
        try:
            defaults = config_class()
        except Exception:  # noqa: BLE001 - a config that needs its sub-configs: the names are not checked
            defaults = None
        if defaults is not None:
            for key in overrides:
                if key not in raw and not hasattr(defaults, key):
                    names = sorted(set(raw) | set(defaults.to_dict()))
                    hint = difflib.get_close_matches(key, names, n=1)
                    raise TypeError(f"{key!r} is not a setting of {config_class.__name__} ({file})"
                                    + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return config_class.from_dict({**raw, **overrides})


def _model_class(transformers: Any, config: Any, auto_class: Optional[str], source: str):
    """(name, class) of the transformers class that builds `config`'s model."""
    if auto_class is None:
        architectures = getattr(config, "architectures", None) or []
        first = architectures[0] if architectures and isinstance(architectures[0], str) else None
        name = first if first is not None and _has(transformers, first) else "AutoModel"
    else:
        name = auto_class
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"auto_class should name a transformers class ({', '.join(AUTO_CLASS_EXAMPLES)}), "
                         f"got {short(name)}")
    try:
        cls = getattr(transformers, name)
    except AttributeError:
        cls = None
    except Exception as e:  # noqa: BLE001 - transformers imports the model's module lazily, here
        raise ImportError(f"transformers cannot import {name}: {first_line(e, 300)}") from e
    if not (isinstance(cls, type) and (hasattr(cls, "from_config") or hasattr(cls, "_from_config"))):
        known = [n for n in dir(transformers) if n.startswith("Auto") and n != "AutoConfig"]
        hint = difflib.get_close_matches(name, known, n=1)
        raise ValueError(f"auto_class {name!r} is not a model class of transformers "
                         f"{transformers.__version__}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; e.g. {', '.join(AUTO_CLASS_EXAMPLES)}")
    return name, cls


def _has(transformers: Any, name: str) -> bool:
    try:
        return isinstance(getattr(transformers, name), type)
    except Exception:  # noqa: BLE001 - an unknown name, or one whose module does not import
        return False


def _dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return getattr(torch, value.removeprefix("torch."))
    raise ValueError(f"dtype should be one of {', '.join(DTYPES)}, got {short(value)}")


def import_transformers() -> Any:
    """The `transformers` package; an ImportError naming the extra when it is missing or fails to import."""
    return _import_extra("transformers", TRANSFORMERS_EXTRA)


# --------------------------------------------------------------------------- torchvision

def torchvision_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """`torchvision.models.get_model(name, weights=None, **kwargs)` in eval mode: random weights, never
    downloaded (nor a backbone's: `weights_backbone=None` where the model takes one). The weights a sweep
    evaluates come from `model.weights` or the study's files."""
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise ValueError(f"torchvision_model builds {name!r} with {key}=None: sweep never downloads "
                             f"weights; give the weights as model.weights or as the study's files")
        kwargs.pop(key, None)
    torchvision = _import_extra("torchvision", TORCHVISION_EXTRA)
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = torchvision.models.list_models()
        hint = difflib.get_close_matches(name, known, n=1)
        raise ValueError(f"torchvision {torchvision.__version__} has no model {name!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; its models: {', '.join(known[:12])}{', …' if len(known) > 12 else ''}") from None
    try:
        takes_backbone = "weights_backbone" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        takes_backbone = False
    if takes_backbone:
        kwargs["weights_backbone"] = None
    module = torchvision.models.get_model(name, weights=None, **kwargs)
    return module.eval()


def _import_extra(package: str, extra: str) -> Any:
    """`package` imported; when it is not installed, or installed but failing to import, an ImportError that
    names the extra and the import error's first line."""
    try:
        return importlib.import_module(package)
    except Exception as e:  # noqa: BLE001 - a package that fails on import (a build for another torch) too
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == package
        state = "is not installed" if missing else "is installed but fails to import"
        raise ImportError(f"this model needs the optional package {package}, which {state} "
                          f"({type(e).__name__}: {first_line(e, 300)}): {extra}") from e


__all__ = ("transformers_model", "torchvision_model", "build_transformers", "config_file", "read_config_dict",
           "load_transformers_config", "import_transformers", "extra_missing", "hub_id_hint", "TRANSFORMERS_EXTRA",
           "TORCHVISION_EXTRA")
