"""A checkpoint's keys matched to the module's: as they are, or with one leading prefix removed or added.

Checkpoints name their tensors as the model that saved them did: `module.`
in front of every key (a DistributedDataParallel wrapper), `transformer.` or
`model.` where the config builds the bare model, none where it builds the
model with its head. One rule, the same for every reader (candidate files and
folders, anchors, `model.weights`), applied after reading and before
validation:

1. Keys that fit the module as they are — each a name of the module (tied
   weights under any of their names, buffers, non-persistent ones included),
   every parameter given — are read as they are.
2. Else, when removing the one leading component every key shares (`module.`),
   or adding one the module's keys begin with (`transformer.`), makes them fit,
   and exactly one such prefix does, the keys are read so, and the log says so
   once. Keys the model's class says to ignore (transformers'
   `_keys_to_ignore_on_load_unexpected`, such as GPT-2's `attn.bias` masks in
   older checkpoints) are left out, and the log says that too.
3. Else the checkpoint is refused, with an error naming the prefix and the
   keys that keep it from fitting, and the fix, when one prefix makes all but
   a few keys fit, when only a task head (`lm_head`, `classifier`, `score`,
   `qa_outputs`, `cls`) is there on one side alone, or when two prefixes fit.
4. Else the keys are read as they are, and validation names every key that
   differs.

Never a guess: a prefix is removed or added for every key or for none.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import WeightsError
from .lazy import torch

log = logging.getLogger("sweep")

#: Top-level names of task heads, as transformers' model classes call them: a head present on one side
#: alone is named as one in errors.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls"})
#: Key lists matched and remembered per module (a sweep's checkpoints share a few).
MAX_REMEMBERED = 64
#: An error names at most this many groups of keys.
MAX_GROUPS_SHOWN = 3


@dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's keys become the module's: `strip` removed from every key, `add` put before every
    key, `drop` (keys the model's class ignores) left out. The identity when all are empty."""

    strip: str = ""
    add: str = ""
    drop: FrozenSet[str] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.strip or self.add or self.drop)

    def key(self, key: str) -> str:
        return self.add + (key[len(self.strip):] if self.strip and key.startswith(self.strip) else key)

    def apply(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return {self.key(k): v for k, v in state.items() if k not in self.drop}

    def how(self) -> str:
        """'read without the prefix 'module.'', 'read with the prefix 'bert.'', or '' (the prefix part alone)."""
        return (f"read without the prefix {self.strip!r}" if self.strip else
                f"read with the prefix {self.add!r}" if self.add else "")

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"keys read without the prefix {self.strip!r}")
        if self.add:
            parts.append(f"keys read with the prefix {self.add!r}")
        if self.drop:
            shown = ", ".join(sorted(self.drop)[:2]) + (", …" if len(self.drop) > 2 else "")
            parts.append(f"{len(self.drop)} key{'s' if len(self.drop) > 1 else ''} the model's class ignores left "
                         f"out ({shown})")
        return "; ".join(parts)


@dataclass
class _Try:
    """One way of reading a checkpoint's keys, and what it leaves over."""

    map: KeyMap
    unexpected: List[str]  # mapped keys the module lacks
    missing: List[str]  # parameters (by their first name) the mapped keys lack
    matched: int  # parameters the mapped keys give
    collides: bool = False  # two keys become one

    @property
    def fits(self) -> bool:
        return not self.collides and not self.unexpected and not self.missing

    @property
    def score(self) -> int:
        return 1 << 62 if self.collides else len(self.unexpected) + len(self.missing)


class ModuleKeys:
    """The names a module takes (from its `sweep.validate.Schema`) and the keys its class says to ignore;
    `match` applies the rule above to a checkpoint's keys."""

    def __init__(self, schema: Any, ignore: Iterable[str] = (), label: str = "the module"):
        self.schema = schema
        self.names: FrozenSet[str] = frozenset(schema.by_alias)
        self.required: Tuple[Tuple[str, ...], ...] = tuple(s.aliases for s in schema.slots if not s.is_buffer)
        self.ignore = tuple(re.compile(p) for p in ignore)
        self.label = label
        self.tops = sorted({n.split(".", 1)[0] for n in self.names if "." in n})
        self._memo: Dict[Tuple[str, ...], Tuple[KeyMap, Optional[str]]] = {}

    @classmethod
    def of(cls, module: torch.nn.Module) -> "ModuleKeys":
        from .validate import Schema

        ignore = getattr(type(module), "_keys_to_ignore_on_load_unexpected", None) or ()
        return cls(Schema(module), [p for p in ignore if isinstance(p, str)], type(module).__name__)

    def match(self, keys: Iterable[str]) -> Tuple[KeyMap, Optional[str]]:
        """(how to read the keys, None), or (the identity, why they are refused) — see the module's rule."""
        keys = tuple(keys)
        found = self._memo.get(keys)
        if found is None:
            found = self._match(keys)
            if len(self._memo) >= MAX_REMEMBERED:
                del self._memo[next(iter(self._memo))]
            self._memo[keys] = found
        return found

    def _match(self, keys: Tuple[str, ...]) -> Tuple[KeyMap, Optional[str]]:
        plain = self._try(keys, "", "")
        if plain.fits:
            return plain.map, None
        tops = Counter(k.split(".", 1)[0] + "." for k in keys if "." in k)
        shared = next((p for p, n in tops.items() if n == len(keys)), None)
        options = [self._try(keys, shared, "")] if shared else []
        options += [self._try(keys, "", top + ".") for top in self.tops]
        fitting = [o for o in options if o.fits]
        if len(fitting) == 1:
            return fitting[0].map, None
        if len(fitting) > 1:
            ways = " or ".join(o.map.how() for o in fitting)
            return KeyMap(), (f"its keys fit {self.label} {ways}: which is meant cannot be told; save the "
                              f"checkpoint with the module's own keys")
        # Nothing fits: a prefix most keys carry (not all) may still explain the rest.
        if tops and not shared:
            common, n = tops.most_common(1)[0]
            if 2 * n >= len(keys):
                options.append(self._try(keys, common, ""))
        best = min(options, key=lambda o: o.score, default=None)
        if best is not None and best.score < plain.score and 2 * best.matched >= len(self.required):
            return KeyMap(), self._refusal(best)
        if plain.score and self._heads_only(plain):
            return KeyMap(), self._refusal(plain)
        return KeyMap(), None  # validation names what differs

    def _try(self, keys: Tuple[str, ...], strip: str, add: str) -> _Try:
        draft = KeyMap(strip, add)
        mapped = [draft.key(k) for k in keys]
        drop = frozenset(k for k, m in zip(keys, mapped) if m not in self.names and self._ignored(m))
        kept = [m for k, m in zip(keys, mapped) if k not in drop]
        given = set(kept)
        missing = [aliases[0] for aliases in self.required if not any(a in given for a in aliases)]
        return _Try(KeyMap(strip, add, drop), [m for m in kept if m not in self.names], missing,
                    len(self.required) - len(missing), collides=len(given) < len(kept))

    def _ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore)

    @staticmethod
    def _heads_only(t: _Try) -> bool:
        return all(k.split(".", 1)[0] in HEAD_NAMES for k in t.unexpected + t.missing)

    def _refusal(self, t: _Try) -> str:
        parts = []
        if t.unexpected:
            parts.append(f"the file's {_groups(t.unexpected)}, which the module lacks")
        if t.missing:
            parts.append(f"the module's {_groups(t.missing)}, which the file lacks")
        but = " and ".join(parts)
        how = t.map.how()
        text = (f"its keys would fit {self.label} {how} but for {but}" if how
                else f"its keys fit {self.label} but for {but}")
        if t.unexpected and self._heads_only(_Try(t.map, t.unexpected, [], 0)) and not t.missing:
            fix = ("the checkpoint holds a task head the module lacks: build the model class it was saved from "
                   "(transformers: the one under `architectures` in its config.json) in model.factory, or "
                   "leave the head out of the file")
        elif t.missing and self._heads_only(_Try(t.map, [], t.missing, 0)) and not t.unexpected:
            fix = ("the module has a task head the checkpoint lacks (it holds the base model alone): build the "
                   "base model in model.factory, or give a checkpoint that holds the head")
        elif self._heads_only(t):
            fix = ("the checkpoint's task head is not the module's: build the model class it was saved from "
                   "(transformers: the one under `architectures` in its config.json) in model.factory")
        else:
            fix = ("build the model the checkpoint was saved from in model.factory (and model.kwargs), or save "
                   "the checkpoint with the module's own keys")
        return f"{text}: {fix}"


def _groups(keys: Sequence[str]) -> str:
    """Keys by their first component: 'lm_head.weight', 'cls.* (5 keys)'; at most MAX_GROUPS_SHOWN groups."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    shown = [g[0] if len(g) == 1 else f"{top}.* ({len(g)} keys)" for top, g in groups.items()]
    text = ", ".join(shown[:MAX_GROUPS_SHOWN])
    if len(shown) > MAX_GROUPS_SHOWN:
        text += f" and {sum(len(g) for g in list(groups.values())[MAX_GROUPS_SHOWN:])} more keys"
    return text


def fit_keys(state: Dict[str, Any], keys: ModuleKeys, label: str) -> Dict[str, Any]:
    """`state` with its keys read as `keys.match` says (the log says so once), or `WeightsError` naming
    `label` when the rule refuses them."""
    mapping, error = keys.match(state)
    if error is not None:
        raise WeightsError(f"{label}: {error}")
    if not mapping:
        return state
    said = mapping.describe()
    if said not in _said:
        _said.add(said)
        log.warning("sweep: %s: %s (the same for every checkpoint like it; said once)", label, said)
    return mapping.apply(state)


_said: set = set()

#: The module whose keys the checkpoints read within `reading_for` are matched to (None: read as they are).
_reading_for: ContextVar[Optional[ModuleKeys]] = ContextVar("reading_for", default=None)


@contextmanager
def reading_for(keys: Optional[ModuleKeys]) -> Iterator[None]:
    """Within it, every checkpoint read (`sweep.model.read_checkpoint`) has its keys matched to `keys`'
    module. A worker reads its candidate files within it; the checks before a run read the anchors so."""
    token = _reading_for.set(keys)
    try:
        yield
    finally:
        _reading_for.reset(token)


def fit_read(state: Dict[str, Any], label: str) -> Dict[str, Any]:
    """`state` as read for the module of the enclosing `reading_for` (as it is outside one)."""
    keys = _reading_for.get()
    return state if keys is None else fit_keys(state, keys, label)
