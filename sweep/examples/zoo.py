"""Data, metrics and tiny configs for sweeping `transformers` models (see `sweep.zoo`).

The metrics read a model's output object as transformers returns it (`output.logits`; a plain tensor or a
tuple whose first item is the logits works too), so a config can name them beside a `model.transformers`
model:

```yaml
model:
  transformers: checkpoints/gpt2-tiny          # a folder with config.json, or the config.json itself
data:
  loader: sweep.examples.zoo:token_batches
  kwargs: {vocab: 64, length: 16}
metrics:
  function: sweep.examples.zoo:causal_lm
```

The data are seeded synthetic batches (token ids, images, labels): nothing is downloaded. `TINY` holds
configs small enough for tests (hidden size 32, 2 layers) of the four families sweep is tested on: GPT-2
(tied `lm_head` / `wte`), BERT (non-persistent `position_ids` / `token_type_ids` buffers), ViT, and a
ResNet-18-shaped ResNet (BatchNorm), and `write_config` saves one as a `config.json`. `gpt2_small` and
`resnet18` are the `sweep bench` rows: the full-sized models with random weights from their configs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..zoo import build_transformers, import_transformers

Batches = List[Tuple[torch.Tensor, torch.Tensor]]

#: Tiny configs of each family (the settings of its transformers config class), with the class that builds
#: its model as `architectures`; `write_config` saves one as config.json.
TINY: Dict[str, Dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_positions": 32,
             "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0},
    "bert": {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "vocab_size": 64,
             "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 32, "num_labels": 3, "pad_token_id": 0},
    "vit": {"model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 16,
            "patch_size": 4, "num_labels": 3},
    # ResNet-18's layout (basic blocks, 2-2-2-2), narrow.
    "resnet": {"model_type": "resnet", "architectures": ["ResNetForImageClassification"], "layer_type": "basic",
               "depths": [2, 2, 2, 2], "hidden_sizes": [8, 16, 32, 64], "embedding_size": 8, "num_labels": 3},
}


def write_config(kind: str, folder: str | os.PathLike, **overrides: Any) -> Path:
    """Save `TINY[kind]` (with `overrides`) as `folder/config.json`, as `save_pretrained` would; returns the
    file. `kind` is one of TINY's keys."""
    if kind not in TINY:
        raise ValueError(f"kind should be one of {', '.join(TINY)}, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "config.json"
    file.write_text(json.dumps({**TINY[kind], **overrides}, indent=2), encoding="utf-8")
    return file


def tiny(kind: str, **overrides: Any) -> torch.nn.Module:
    """The tiny model of `kind` (a key of TINY), built from its config as `sweep.zoo.transformers_model`
    builds one, under the caller's torch seed."""
    if kind not in TINY:
        raise ValueError(f"kind should be one of {', '.join(TINY)}, got {kind!r}")
    settings = {**TINY[kind], **overrides}
    return _build(settings.pop("model_type"), settings.pop("architectures")[0], **settings)


def gpt2_small() -> torch.nn.Module:
    """GPT-2 small as transformers' GPT2Config defaults make it (12 layers, 768 wide, vocabulary 50,257,
    124M parameters), random weights."""
    return _build("gpt2", "GPT2LMHeadModel")


def resnet18(classes: int = 10) -> torch.nn.Module:
    """ResNet-18's layout (basic blocks, 2-2-2-2, widths 64-512) as transformers' ResNet, `classes` outputs,
    random weights (torchvision's own resnet18 is `model.torchvision: resnet18`)."""
    return _build("resnet", "ResNetForImageClassification", layer_type="basic", depths=[2, 2, 2, 2],
                  hidden_sizes=[64, 128, 256, 512], embedding_size=64, num_labels=classes)


def _build(model_type: str, class_name: str, **settings: Any) -> torch.nn.Module:
    import_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**settings)
    return build_transformers(config, class_name, source=f"a {model_type} config")


# -- data ---------------------------------------------------------------------------
def token_batches(vocab: int = 64, length: int = 16, batch: int = 4, batches: int = 2, seed: int = 0) -> Batches:
    """Causal language modelling: x is `length` token ids, y the same sequence one token on."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        seq = torch.randint(0, vocab, (batch, length + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def label_batches(vocab: int = 64, length: int = 16, classes: int = 3, batch: int = 4, batches: int = 2,
                  seed: int = 0) -> Batches:
    """Sequence classification: x is `length` token ids (none of them 0, the padding id), y a class."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, vocab, (batch, length), generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


def image_batches(size: int = 16, classes: int = 3, batch: int = 4, batches: int = 2, channels: int = 3,
                  seed: int = 0) -> Batches:
    """Image classification: x is `batch` images `channels`×`size`×`size`, y a class each."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


# -- metrics --------------------------------------------------------------------------
def logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: `output.logits` (transformers' output objects), the first item of a
    tuple (`return_dict=False`), or the output itself (a tensor)."""
    found = getattr(output, "logits", None)
    if found is not None:
        return found
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def causal_lm(output: Any, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Next-token cross-entropy (nats per token) and the fraction of tokens predicted right."""
    z = logits(output)
    flat = z.reshape(-1, z.shape[-1])
    return {"loss": F.cross_entropy(flat, y.reshape(-1)), "accuracy": (flat.argmax(-1) == y.reshape(-1)).float().mean()}


def classification(output: Any, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Cross-entropy (nats) and the fraction classified right."""
    z = logits(output)
    return {"loss": F.cross_entropy(z, y), "accuracy": (z.argmax(-1) == y).float().mean()}


causal_lm.describe = {"loss": "next-token cross-entropy, nats", "accuracy": "fraction of tokens right"}  # type: ignore[attr-defined]
classification.describe = {"loss": "cross-entropy, nats", "accuracy": "fraction correct"}  # type: ignore[attr-defined]
