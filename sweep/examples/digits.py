"""The quickstart example: an MLP on scikit-learn's bundled digits set.

1,797 real 8×8 images ship inside scikit-learn, so nothing is downloaded.
The first 1,297 images train, the last 500 evaluate.

Make the quickstart checkpoints (deterministic, a few seconds on a laptop):

    python -m sweep.examples.digits --out sweep/examples/checkpoints

(and the weight-space studies' checkpoints into sweep/examples/studies).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

N_TRAIN = 1297
CHECKPOINTS = Path(__file__).with_name("checkpoints")
#: The weight-space studies' checkpoints (kept apart: the quickstart globs `checkpoints/`).
STUDY_CHECKPOINTS = Path(__file__).with_name("studies")

#: (file stem, seed, epochs, hidden width) of the committed checkpoints.
RECIPES = (
    ("seed0-epoch02", 0, 2, 64),
    ("seed0-epoch10", 0, 10, 64),
    ("seed0-epoch30", 0, 30, 64),
    ("seed1-epoch30", 1, 30, 64),
    ("seed2-epoch30", 2, 30, 64),
)
#: A checkpoint of another architecture: the quickstart shows it as an invalid row.
WRONG_WIDTH = ("bad-hidden32", 3, 5, 32)


def make_model(hidden: int = 64, depth: int = 1) -> torch.nn.Module:
    """An MLP 64 → hidden (→ hidden …) → 10 with ReLU."""
    layers: List[torch.nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 × 64 pixel values 0–16, and the labels).

    Read straight from the CSV that scikit-learn ships, as its `load_digits`
    does, without importing scikit-learn (a second of start-up in every
    worker); `load_digits` itself where the file is not where it used to be.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _arrays(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    data, target = _digits()
    x = torch.tensor(data, dtype=torch.float32) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    if split == "train":
        return x[:N_TRAIN], y[:N_TRAIN]
    if split == "test":
        return x[N_TRAIN:], y[N_TRAIN:]
    if split == "all":
        return x, y
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def eval_batches(batch_size: int = 500, split: str = "test") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The eval loader: a list of (images, labels) batches."""
    x, y = _arrays(split)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def train_batches(batch_size: int = 64, epochs: int = 50, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The training loader of the pbt/search examples: `epochs` shuffles of the training split in batches."""
    x, y = _arrays("train")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        out += [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(x), batch_size)]
    return out


def loss(output: torch.Tensor, y: torch.Tensor, label_smoothing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Cross-entropy, with label smoothing when given (a hyperparameter the pbt example may search)."""
    logp = F.log_softmax(output, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).mean()
    if isinstance(label_smoothing, float) and label_smoothing == 0.0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * logp.mean()


def metrics(output: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean cross-entropy loss (nats) and accuracy (fraction correct) of a batch.

    The loss is written as log-softmax and gather, the arithmetic of
    `F.cross_entropy`: under vmap, cross_entropy's batching rule goes through
    a decomposition whose first use imports sympy (a third of a second in
    every fresh worker).
    """
    return {
        "loss": -F.log_softmax(output, dim=-1).gather(-1, y.unsqueeze(-1)).mean(),
        "accuracy": (output.argmax(dim=1) == y).to(torch.float32).mean(),
    }


#: What each metric is: the report labels its axes with it ("loss (cross-entropy, nats)") when the config's
#: `metrics.describe` does not say.
metrics.describe = {"loss": "cross-entropy, nats", "accuracy": "fraction correct"}  # type: ignore[attr-defined]


def train(seed: int, epochs: int, hidden: int = 64, lr: float = 0.1, batch_size: int = 64,
          depth: int = 1) -> torch.nn.Module:
    """Plain SGD with momentum; deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_model(hidden, depth)
    x, y = _arrays("train")
    return _sgd(model, x, y, epochs, lr, batch_size, gen)


def _sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
         gen: torch.Generator) -> torch.nn.Module:
    """`epochs` shuffled passes of SGD with momentum 0.9 over (x, y); the model in eval mode after."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


#: Fine-tunes of one base for the merge example: (file stem, seed, classes emphasised).
#: Each sees every training image, with the images of its own classes repeated
#: four times, so each is better than the base and best on its own classes.
FINETUNE_BASE = "seed0-epoch02"
FINETUNES = (
    ("finetune-a", 10, (0, 1, 2)),
    ("finetune-b", 11, (3, 4, 5)),
    ("finetune-c", 12, (6, 7, 8, 9)),
)


def finetune(base: Dict[str, torch.Tensor], seed: int, classes: Tuple[int, ...], epochs: int = 4,
             lr: float = 0.05, batch_size: int = 64) -> torch.nn.Module:
    """Continue training `base` with its `classes` weighted up; deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    model = make_model()
    model.load_state_dict(base)
    x, y = _arrays("train")
    mine = torch.isin(y, torch.tensor(classes))
    x = torch.cat([x] + [x[mine]] * 3)
    y = torch.cat([y] + [y[mine]] * 3)
    return _sgd(model, x, y, epochs, lr, batch_size, gen)


#: Two MLPs 64 → 64 → 64 → 64 → 10 from different seeds, trained to near-zero training loss:
#: the straight path between them crosses a loss barrier that weight matching removes.
#: (file stem, seed, epochs); make_model(64, depth=3) builds their module.
DEEP = (("deep-seed0", 0, 60), ("deep-seed1", 1, 60))
DEEP_DEPTH = 3


def _save(model: torch.nn.Module, path: Path) -> Path:
    from ..model import write_weights_file

    return write_weights_file(model.state_dict(), path)


def write_study_checkpoints(out: Path, checkpoints: Path = CHECKPOINTS) -> List[Path]:
    """The merge example's fine-tunes of the base in `checkpoints`, and the deep pair for `align`, into `out`."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    base = load_file(str(checkpoints / f"{FINETUNE_BASE}.safetensors"))
    written = [_save(train(seed, epochs, depth=DEEP_DEPTH), out / f"{stem}.safetensors") for stem, seed, epochs in DEEP]
    written += [_save(finetune(base, seed, classes), out / f"{stem}.safetensors") for stem, seed, classes in FINETUNES]
    return written


def write_checkpoints(out: Path) -> List[Path]:
    """Train the quickstart checkpoints into `out`, plus the deliberately bad files."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(train(seed, epochs, hidden), out / f"{stem}.safetensors")
               for stem, seed, epochs, hidden in RECIPES + (WRONG_WIDTH,)]
    # A download that stopped half-way: the header promises more than the file holds.
    whole = (out / f"{RECIPES[-1][0]}.safetensors").read_bytes()
    truncated = out / "bad-truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    written.append(truncated)
    return written


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS, help="folder for the checkpoints")
    parser.add_argument("--studies-out", type=Path, default=STUDY_CHECKPOINTS,
                        help="folder for the merge fine-tunes and the align pair")
    parser.add_argument("--studies-only", action="store_true",
                        help="only the merge fine-tunes (of the base already in --out) and the align pair")
    args = parser.parse_args(argv)
    written = [] if args.studies_only else write_checkpoints(args.out)
    for path in written + write_study_checkpoints(args.studies_out, args.out):
        print(path)


if __name__ == "__main__":
    main()
