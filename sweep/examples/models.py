"""Small models of the kinds people sweep, for `sweep bench` and the tests.

Each factory takes plain keyword arguments, so a config can name it
(`sweep.examples.models:mlp`). Data makers return seeded synthetic batches.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def mlp(widths: Sequence[int] = (32, 16, 1)) -> nn.Module:
    """Linear layers of the given widths with ReLU between them."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm, global pooling, a linear head."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(-2, -1)))


def cnn(channels: int = 16, classes: int = 10) -> nn.Module:
    return SmallCNN(channels, classes)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A causal transformer language model: token and position embeddings, blocks, a tied head."""

    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[-1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt(vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 64) -> nn.Module:
    return TinyGPT(vocab, dim, layers, heads, context)


# -- data and metrics ----------------------------------------------------------
def regression_batches(features: int = 32, batch: int = 64, batches: int = 1, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(batches)]


def classification_batches(features: int = 784, classes: int = 10, batch: int = 1024, batches: int = 1,
                           seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


def image_batches(batch: int = 64, size: int = 32, classes: int = 10, batches: int = 1,
                  seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


def token_batches(vocab: int = 256, context: int = 64, batch: int = 8, batches: int = 1,
                  seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        seq = torch.randint(0, vocab, (batch, context + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def mse(output: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"mse": ((output - y) ** 2).mean()}


def classification(output: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"loss": F.cross_entropy(output, y), "accuracy": (output.argmax(-1) == y).float().mean()}


def language_model(output: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"loss": F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))}
