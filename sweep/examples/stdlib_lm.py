"""The language-model merge example: a byte-level GPT on the source of Python's standard library.

Every machine that runs sweep has the standard library's `.py` files, so the
text is real and nothing is downloaded. A small `transformers` GPT-2
(bytes as tokens, about 264,000 parameters) is pre-trained on one part of the
library (`PRETRAIN`: argparse, ast, collections, …) and fine-tuned from that
base, separately, on each of three packages the base never saw (`PACKAGES`:
email, asyncio, json). Each part's files are split by name: in sorted order,
every fourth file from the second on (indices 1, 5, 9, …) is held out, the
rest train. The merge study (`configs/lm-merge.yaml`) measures every
candidate's loss on each part's held-out files.

Remake the committed checkpoints (deterministic: training runs on one thread
and gives the same bytes on every run on one machine; about three minutes of
one core, 4 to 7 minutes of wall time on this 2-core machine when shared):

    python -m sweep.examples.stdlib_lm            # writes sweep/examples/lm/*.safetensors

The checkpoints hold GPT-2's state dict without `lm_head.weight`, which is
tied to (is the same tensor as) `transformer.wte.weight`: as
`save_pretrained` writes it, and as a merge needs it (a DARE mask drawn for
each name would otherwise make the two differ).

`transformers` is an optional extra (`pip install 'sweep[transformers]'`);
this module imports it only when a model is built.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: Where the committed checkpoints live (base.safetensors and one per package).
CHECKPOINTS = Path(__file__).with_name("lm")
#: The packages the base is fine-tuned on, one checkpoint each.
PACKAGES = ("email", "asyncio", "json")
#: The part of the library the base is pre-trained on: modules (`name.py`) or packages (`name/`), whichever
#: the installed Python has (a name it has neither of is left out). None of PACKAGES.
PRETRAIN = ("argparse", "ast", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
            "datetime", "difflib", "enum", "fractions", "functools", "inspect", "logging", "optparse", "pathlib",
            "pickle", "pprint", "random", "shutil", "statistics", "string", "tarfile", "textwrap", "threading",
            "typing", "zipfile")
#: The name of the pre-training part among the parts (its metric is `loss_pretrain`).
PRETRAIN_PART = "pretrain"
#: Every part, in the order of the metrics and of `y`'s part index.
PARTS = (PRETRAIN_PART,) + PACKAGES
#: In each part's files sorted by path, file i is held out when i % HELD_OUT_EVERY == HELD_OUT_AT.
HELD_OUT_EVERY, HELD_OUT_AT = 4, 1
#: Folders inside a package that are not its source (never read).
SKIPPED_FOLDERS = ("test", "tests", "idle_test", "__pycache__")
#: Bytes between two files in a part's stream.
FILE_SEPARATOR = b"\n\n"

#: The GPT: bytes in, bytes out.
VOCAB = 256
#: Positions the model has, and the bytes each sequence predicts.
CONTEXT = 128
EMBED, LAYERS, HEADS = 80, 3, 4

#: Pre-training (steps, peak learning rate, seed) and each fine-tune (steps, peak learning rate; its seed in
#: FINETUNE_SEEDS), in batches of TRAIN_BATCH windows of CONTEXT + 1 bytes drawn at random from the train files.
PRETRAIN_RUN = (600, 3e-3, 0)
FINETUNE_RUN = (120, 1e-3)
FINETUNE_SEEDS = {"email": 1, "asyncio": 2, "json": 3}
TRAIN_BATCH = 32
WARMUP_STEPS = 30
#: Held-out sequences per part that the eval loader takes by default, evenly spread over the part's held-out
#: files (json holds out one file of about 97 windows; much fewer than this and its sample stops being typical).
EVAL_SEQUENCES = 32

#: The columns of `y` after the CONTEXT targets: the part's index, its number of sequences, all sequences.
PART_COLUMN, COUNT_COLUMN, TOTAL_COLUMN = 0, 1, 2


# --------------------------------------------------------------------------- the model


def _transformers() -> Any:
    """The transformers package, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the stdlib_lm example builds a transformers GPT-2: pip install 'sweep[transformers]' "
                          f"({type(e).__name__}: {e})") from None
    return transformers


def config(embed: int = EMBED, layers: int = LAYERS, heads: int = HEADS, context: int = CONTEXT) -> Any:
    """GPT-2's config for the byte model: no dropout, no cache, the exact GELU (one operation where GPT-2's
    tanh approximation takes six: a third faster to evaluate on a CPU)."""
    return _transformers().GPT2Config(
        vocab_size=VOCAB, n_positions=context, n_embd=embed, n_layer=layers, n_head=heads,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)


def make_model(embed: int = EMBED, layers: int = LAYERS, heads: int = HEADS, context: int = CONTEXT) -> torch.nn.Module:
    """The byte-level GPT-2 (`transformers.GPT2LMHeadModel`, `lm_head` tied to `transformer.wte`), in eval
    mode, built from its config alone (random weights: the checkpoints give the trained ones).

    Attention is the eager implementation: SDPA has no vmap batching rule on the CPU and would run one
    candidate at a time."""
    built = config(embed, layers, heads, context)
    model = _transformers().AutoModelForCausalLM.from_config(built, attn_implementation="eager")
    return model.eval()


def checkpoint_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict as the checkpoints hold it: every tensor once (the tied `lm_head.weight` left out,
    as `save_pretrained` does), each a copy."""
    seen: Dict[Tuple[int, int], str] = {}
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        at = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if at in seen:
            continue
        seen[at] = name
        out[name] = tensor.detach().clone().contiguous()
    return out


# --------------------------------------------------------------------------- the text


def stdlib() -> Path:
    """The standard library's source folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(root: Path, name: str) -> List[Path]:
    """The `.py` files of module or package `name` under `root`, sorted by path (none when it is absent)."""
    if (root / f"{name}.py").is_file():
        return [root / f"{name}.py"]
    folder = root / name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.py")
                  if p.is_file() and not set(p.relative_to(folder).parts[:-1]) & set(SKIPPED_FOLDERS))


def part_files(part: str, root: Path | None = None) -> List[Path]:
    """Every source file of `part` (a package of PACKAGES, or PRETRAIN_PART), sorted by path below `root`."""
    root = stdlib() if root is None else root
    names = PRETRAIN if part == PRETRAIN_PART else (part,)
    if part != PRETRAIN_PART and part not in PACKAGES:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    files = sorted((p for name in names for p in _sources(root, name)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no .py files of {part!r} ({', '.join(names[:3])}{'…' if len(names) > 3 else ''}) "
                                f"under {root}: the example reads the standard library's source, which this "
                                f"Python does not ship")
    return files


def split_files(files: Sequence[Path]) -> Tuple[List[Path], List[Path]]:
    """(train, held out): in the given (sorted) order, file i is held out when i % HELD_OUT_EVERY == HELD_OUT_AT."""
    held = [p for i, p in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_AT]
    train = [p for i, p in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_AT]
    return train, held


@lru_cache(maxsize=None)
def _stream(part: str, split: str, root: str) -> bytes:
    train, held = split_files(part_files(part, Path(root)))
    files = {"train": train, "heldout": held}[split]
    return FILE_SEPARATOR.join(p.read_bytes() for p in files)


def stream(part: str, split: str, root: Path | None = None) -> torch.Tensor:
    """The bytes of `part`'s `split` ('train' or 'heldout') files, joined by FILE_SEPARATOR, as int64."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    data = _stream(part, split, str(stdlib() if root is None else root))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def windows(data: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` + 1 bytes (`length` inputs and the next byte of each), cut from `data`
    without overlap and evenly spread over it (every window when it has fewer); [count, length + 1]."""
    available = (len(data)) // (length + 1)
    if available < 1:
        raise ValueError(f"{len(data)} bytes hold no window of {length + 1}")
    starts = np.unique(np.linspace(0, available - 1, min(count, available)).round().astype(np.int64)) * (length + 1)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def eval_batches(sequences: int = EVAL_SEQUENCES, length: int = CONTEXT,
                 root: str | None = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The eval loader: one batch per part (in PARTS order) of up to `sequences` held-out windows of each.

    x is [n, length] bytes; y is [n, length + 3] int64: the `length` next bytes, then the part's index in
    PARTS, the part's number of sequences, and the number of sequences over all batches. With those,
    `metrics` makes each `loss_<part>` the mean over that part's sequences alone once the engine has
    averaged the batches weighted by their sizes (see `metrics`)."""
    where = None if root is None else Path(root)
    cut = [windows(stream(p, "heldout", where), length, sequences) for p in PARTS]
    total = sum(len(w) for w in cut)
    batches = []
    for j, w in enumerate(cut):
        extra = torch.tensor([j, len(w), total], dtype=torch.int64).expand(len(w), 3)
        batches.append((w[:, :-1].contiguous(), torch.cat([w[:, 1:], extra], dim=1)))
    return batches


# --------------------------------------------------------------------------- the metrics


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n]: each sequence's mean cross-entropy per byte (nats), as log-softmax and gather (the arithmetic
    of `F.cross_entropy`, without its vmap decomposition's sympy import in every worker)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(dim=-1)


def metrics(output: object, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """`loss_<part>` for each part, and `loss`, the mean of the fine-tune packages' losses.

    The engine averages a metric over the batches weighted by their sizes: Σ_b n_b·m_b / N. Each
    sequence's loss is weighted here by N / N_p (its part's count N_p, all sequences N, both carried in
    `y`), and a part's metric in a batch is the sum of its sequences' weighted losses over n_b; the
    engine's average then comes to Σ_{i in p} loss_i / N_p, the part's own mean, whatever the batches
    hold (`eval_batches` always holds every part).
    """
    logits = getattr(output, "logits", output)
    length = logits.shape[-2]
    losses = sequence_losses(logits, y[:, :length])
    part, count, total = (y[:, length + c] for c in (PART_COLUMN, COUNT_COLUMN, TOTAL_COLUMN))
    weighted = losses * (total.to(losses.dtype) / count.to(losses.dtype)) / losses.shape[0]
    out = {}
    for j, name in enumerate(PARTS):
        out[f"loss_{name}"] = torch.where(part == j, weighted, torch.zeros_like(weighted)).sum()
    out["loss"] = sum(out[f"loss_{name}"] for name in PACKAGES) / len(PACKAGES)
    return out


#: What each metric is, for the report's labels: cross-entropy on the part's held-out files.
metrics.describe = {  # type: ignore[attr-defined]
    "loss": "packages' mean, nats per byte",
    **{f"loss_{p}": "held-out, nats per byte" for p in PARTS},
}


# --------------------------------------------------------------------------- training


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the same float sums, in the same order, on every run on one machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over WARMUP_STEPS, then a cosine down to a tenth of `peak`."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int,
          batch: int = TRAIN_BATCH, length: int = CONTEXT) -> torch.nn.Module:
    """`steps` steps of Adam on windows of `data` drawn at random from `seed`; deterministic; eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    with _one_thread():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
            seq = torch.stack([data[s : s + length + 1] for s in starts.tolist()])
            logits = model(seq[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def pretrain(steps: int = PRETRAIN_RUN[0], lr: float = PRETRAIN_RUN[1], seed: int = PRETRAIN_RUN[2],
             root: Path | None = None) -> torch.nn.Module:
    """The base: a fresh model (weights from `seed`) trained on the pre-training part's train files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    return train(model, stream(PRETRAIN_PART, "train", root), steps, lr, seed)


def finetune(base: Dict[str, torch.Tensor], package: str, steps: int = FINETUNE_RUN[0], lr: float = FINETUNE_RUN[1],
             root: Path | None = None) -> torch.nn.Module:
    """`base` trained further on `package`'s train files alone."""
    model = make_model()
    model.load_state_dict(base, strict=False)  # lm_head.weight is wte's: left out of the checkpoints
    return train(model, stream(package, "train", root), steps, lr, FINETUNE_SEEDS[package])


def write_checkpoints(out: Path = CHECKPOINTS, pretrain_steps: int = PRETRAIN_RUN[0],
                      finetune_steps: int = FINETUNE_RUN[0], log: bool = False) -> List[Path]:
    """Pre-train the base, fine-tune it on each package, write `base.safetensors` and `<package>.safetensors`."""
    from ..model import write_weights_file

    started = time.perf_counter()
    base = checkpoint_state(pretrain(pretrain_steps))
    written = [write_weights_file(base, out / "base.safetensors")]
    if log:
        print(f"{written[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    for package in PACKAGES:
        model = finetune(base, package, finetune_steps)
        written.append(write_weights_file(checkpoint_state(model), out / f"{package}.safetensors"))
        if log:
            print(f"{written[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    return written


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS, help="folder for the checkpoints")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_RUN[0])
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_RUN[0])
    args = parser.parse_args(argv)
    write_checkpoints(args.out, args.pretrain_steps, args.finetune_steps, log=True)


if __name__ == "__main__":
    main()
