"""The study protocol: a study yields batches of candidates with the columns that describe them."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, WeightsError
from ..lazy import torch
from ..model import build_module, read_weights_file
from ..recipes import AnchorSet, Rows, anchor_key
from ..results import LINEAGE, RECIPE, column


class CandidateSource(Protocol):
    """What a batch carries to a worker; it becomes candidates there.

    A source may also have `slice(start, stop)`, the source of candidates
    `start:stop` alone, so that a batch that keeps failing can be split (see
    `CandidateBatch.halves`). Without it, a source that is a dataclass of
    parallel per-candidate lists (names, contents, …) is split field by field.
    """

    def candidates(self) -> Sequence[Any]:
        """The batch's candidates: param dicts, or `Invalid` for those that could not be made."""
        ...


@dataclass
class RecipeBatch:
    """Rows of a recipe whose anchors the worker already holds (or fetches once) by `key`."""

    key: str
    rows: Rows


@dataclass
class CandidateBatch:
    """Candidates `ids`, the recipe columns that describe them, and how to make them."""

    ids: Sequence[int]  # a list or a 1-D int64 array
    columns: Dict[str, List[Any]]
    source: Union[CandidateSource, RecipeBatch]
    #: anything else the study attaches; a list (tuple, array) as long as the batch is one value per candidate
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> "CandidateBatch":
        """Candidates `start:stop` alone: their ids, columns, meta and source.

        Raises TypeError when the source cannot be sliced (`halves` says so first).
        """
        n = len(self)
        cut = _source_slicer(self.source, n)
        if cut is None:
            raise TypeError(f"a batch whose source is a {type(self.source).__name__} cannot be split: give the "
                            f"source a slice(start, stop) method, or make it a dataclass of per-candidate lists")
        start, stop, _ = slice(start, stop).indices(n)
        return CandidateBatch(
            ids=self.ids[start:stop],
            columns={name: values[start:stop] for name, values in self.columns.items()},
            source=cut(start, stop),
            meta={k: v[start:stop] if _per_candidate(v, n) else v for k, v in self.meta.items()},
        )

    def source_columns(self) -> Dict[str, Any]:
        """The columns the source itself describes its candidates with (a recipe's alphas, seeds, …)."""
        return self.source.rows.columns() if isinstance(self.source, RecipeBatch) else {}

    def take(self, positions: Sequence[int]) -> "CandidateBatch":
        """The candidates at `positions` (in that order) alone: their ids, columns, meta and source.

        Raises TypeError when the source cannot be cut (as `slice` does).
        """
        n = len(self)
        at = [int(i) for i in positions]
        cut = _source_taker(self.source, n)
        if cut is None:
            raise TypeError(f"a batch whose source is a {type(self.source).__name__} cannot be cut: give the "
                            f"source a take(positions) method, or make it a dataclass of per-candidate lists")
        return CandidateBatch(
            ids=self.ids[at] if isinstance(self.ids, np.ndarray) else [self.ids[i] for i in at],
            columns={name: _pick(values, at) for name, values in self.columns.items()},
            source=cut(at),
            meta={k: _pick(v, at) if _per_candidate(v, n) else v for k, v in self.meta.items()},
        )

    def halves(self) -> Optional[Tuple["CandidateBatch", "CandidateBatch"]]:
        """The batch in two parts (the first the larger), or None: one candidate, or a source that cannot be split."""
        n = len(self)
        if n < 2 or _source_slicer(self.source, n) is None:
            return None
        middle = (n + 1) // 2
        return self.slice(0, middle), self.slice(middle, n)


def _per_candidate(value: Any, n: int) -> bool:
    """Whether `value` holds one entry per candidate of a batch of `n` (a list, tuple or array of length n)."""
    if isinstance(value, np.ndarray):
        return value.ndim >= 1 and value.shape[0] == n
    return isinstance(value, (list, tuple)) and len(value) == n


def _source_slicer(source: Any, n: int) -> Optional[Callable[[int, int], Any]]:
    """How to cut `source` (of `n` candidates) to candidates start:stop, or None when there is no safe way.

    A recipe batch slices its rows; a source with `slice(start, stop)` slices
    itself; a plain list of candidates is sliced as a list; a dataclass
    slices each field that holds one entry per candidate and keeps the others
    (it must have at least one such field: a count kept as it is would lie).
    """
    if isinstance(source, RecipeBatch):
        return lambda start, stop: RecipeBatch(source.key, source.rows.slice(start, stop))
    if callable(getattr(source, "slice", None)):
        return source.slice
    if isinstance(source, (list, tuple)):
        return lambda start, stop: source[start:stop]
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        fields = [f.name for f in dataclasses.fields(source) if f.init]
        cut = [name for name in fields if _per_candidate(getattr(source, name), n)]
        if not cut:
            return None
        return lambda start, stop: dataclasses.replace(
            source, **{name: getattr(source, name)[start:stop] for name in cut})
    return None


def _pick(values: Any, at: List[int]) -> Any:
    """`values` (a list, tuple or array with one entry per candidate) at positions `at`."""
    if isinstance(values, np.ndarray):
        return values[at]
    picked = [values[i] for i in at]
    return tuple(picked) if isinstance(values, tuple) else picked


def _source_taker(source: Any, n: int) -> Optional[Callable[[List[int]], Any]]:
    """How to cut `source` (of `n` candidates) to the candidates at some positions, or None (see `_source_slicer`)."""
    if isinstance(source, RecipeBatch):
        return None
    if callable(getattr(source, "take", None)):
        return source.take
    if isinstance(source, (list, tuple)):
        return lambda at: _pick(source, at)
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        fields = [f.name for f in dataclasses.fields(source) if f.init]
        cut = [name for name in fields if _per_candidate(getattr(source, name), n)]
        if not cut:
            return None
        return lambda at: dataclasses.replace(source, **{name: _pick(getattr(source, name), at) for name in cut})
    return None


@dataclass
class Unreached:
    """What a worker returns for a batch of checkpoints some of which it cannot reach by their paths (files
    on the driver's disk alone): the rows of the others (`table`, None when there are none), and the
    positions in the batch of those it could not reach. The driver sends those again with their bytes
    (their source's `shipped()`)."""

    table: Optional[pa.Table]
    positions: List[int]


class Wait:
    """Yielded by an adaptive study between rounds: every row so far must reach `observe` first."""

    def __repr__(self) -> str:
        return "WAIT"


WAIT = Wait()


@dataclass
class StudyContext:
    """What planning a study may need beyond its own section.

    `module()` builds the sweep's module with its weights (the centre of a
    landscape whose config names none); `artifacts` is the run folder, where
    a study writes what it makes (aligned checkpoints), or None when nothing
    is to be written (`sweep validate`); `name` is the sweep's name (the
    default name of what a study keeps elsewhere: an Optuna study).
    """

    module: Callable[[], torch.nn.Module]
    artifacts: Optional[Path] = None
    seed: int = 0
    name: str = "sweep"

    @classmethod
    def from_config(cls, config: Any, artifacts: Optional[Path] = None) -> "StudyContext":
        cache: Dict[str, torch.nn.Module] = {}

        def module() -> torch.nn.Module:
            if "module" not in cache:
                weights = read_weights_file(config.model.weights) if config.model.weights else None
                cache["module"] = build_module(config.model.factory, config.model.kwargs, weights,
                                               seed=config.model.seed)
            return cache["module"]

        return cls(module=module, artifacts=artifacts, name=config.name)


class StudyBase:
    """Defaults for the optional parts of the protocol: a study that needs no results."""

    objective: Optional[str] = None
    mode: str = "min"
    metric_names: Sequence[str] = ()
    #: the study's columns (name → Arrow type) in the order they are written, set by every study; each
    #: is a recipe column unless `lineage` names it
    columns: Dict[str, pa.DataType]
    #: the columns among `columns` that say who a row descends from and when (member, generation, parent, step)
    lineage: Tuple[str, ...] = ()
    #: False for a study whose state lives only on its workers; `not_resumable` then says why
    resumable: bool = True
    not_resumable: str = ""
    #: the members a study keeps on the workers between rounds (see `sweep.population.PopulationPlan`), or None
    population: Optional[Any] = None
    #: weights files evaluated one per row (a study of files): `validate` says which will be invalid rows
    paths: Sequence[str] = ()
    #: a recipe study's anchors and their content key (None for studies of explicit candidates)
    key: Optional[str] = None
    _anchors: Optional[AnchorSet] = None

    def use_anchors(self, anchors: AnchorSet) -> None:
        """The one anchor set every batch of this study refers to (by its content key)."""
        self._anchors = anchors
        self.key = anchor_key(anchors)

    def anchors(self) -> Dict[str, AnchorSet]:
        return {self.key: self._anchors} if self._anchors is not None else {}

    def bind(self, objective: Optional[str], mode: str, metric_names: Sequence[str] = ()) -> None:
        """The metric that ranks rows and all metric names, known once the workers have reported them."""
        self.objective = objective
        self.mode = mode
        self.metric_names = tuple(metric_names)

    def settle(self, table: pa.Table) -> pa.Table:
        """The rows of a round as they are written: a study that decides something from a round's own rows (a
        rung's ranking) adds it to them here, before any sink sees them. A population study's rows come
        here a whole round at a time; other studies' a batch at a time."""
        return table

    def observe(self, table: pa.Table) -> None:
        """Rows as they land (and, on resume, the rows already in the results)."""

    def summarise(self) -> Dict[str, float]:
        """Numbers that need all rows (a path's barrier), for the summary and MLflow."""
        return {}

    def fields(self) -> List[pa.Field]:
        """The study's results columns with their roles (written into the Parquet field metadata)."""
        return [column(name, type, LINEAGE if name in self.lineage else RECIPE) for name, type in self.columns.items()]

    def saved_members(self) -> Dict[str, int]:
        """Weights files to write into the run folder at the end: file name → member (a population study's best)."""
        return {}


class Study(Protocol):
    """A planned study: a fixed number of candidates with stable ids (`StudyBase` gives the defaults)."""

    #: the columns this study adds to each row, with their Arrow types (`fields()` gives their roles)
    columns: Dict[str, pa.DataType]
    #: candidates per batch sent to a worker when the config says 'auto'
    default_batch_size: int
    objective: Optional[str]
    mode: str
    metric_names: Sequence[str]
    #: False when the study cannot be resumed; `not_resumable` then says why
    resumable: bool
    not_resumable: str
    #: the members the study keeps on the workers between rounds, or None
    population: Optional[Any]
    #: weights files evaluated one per row, or ()
    paths: Sequence[str]

    def fields(self) -> List[pa.Field]:
        """The study's results columns with their roles."""
        ...

    def anchors(self) -> Dict[str, AnchorSet]:
        """Anchor sets by key, shipped to each worker once (empty for explicit studies)."""
        ...

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[Union[CandidateBatch, Wait]]:
        """Batches of at most `batch_size` candidates in id order, leaving out ids in `skip`.

        An adaptive study yields `WAIT` when its next candidates depend on the
        rows so far: the driver then lets every batch in flight land (and
        reach `observe`) before asking for more.
        """
        ...

    def bind(self, objective: Optional[str], mode: str, metric_names: Sequence[str] = ()) -> None: ...

    def settle(self, table: pa.Table) -> pa.Table: ...

    def observe(self, table: pa.Table) -> None: ...

    def summarise(self) -> Dict[str, Any]: ...

    def saved_members(self) -> Dict[str, int]: ...


#: What `read_weights` calls before it reads a file, within `checking_anchors` (else None).
_anchor_check: ContextVar[Optional[Callable[[str, str], None]]] = ContextVar("anchor_check", default=None)


@contextmanager
def checking_anchors(check: Optional[Callable[[str, str], None]]) -> Iterator[None]:
    """Within it, every file a study reads through `read_weights` goes first to `check(path, field)`.

    `sweep.preflight` checks there that the file fits the module (from its header alone) before the
    study reads it whole: every study that loads its anchors through `read_weights` gets the check.
    """
    token = _anchor_check.set(check)
    try:
        yield
    finally:
        _anchor_check.reset(token)


def read_weights(path: str, field: str) -> Dict[str, torch.Tensor]:
    """A weights file or checkpoint folder the config names (an anchor: an endpoint, a base, a model to merge,
    a centre, a direction's end); one that cannot be read is a config error naming `field`.

    Studies read every such file through here, so that the checks before a run (`checking_anchors`) see it;
    within `sweep.checkpoint_keys.reading_for` (the checks before a run) its keys are matched to the module's.
    """
    check = _anchor_check.get()
    if check is not None:
        check(path, field)
    try:
        return read_weights_file(path)
    except WeightsError as e:
        raise ConfigError(f"{field}: {e}") from None


def difference(other: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], field: str,
               base_name: str) -> Dict[str, torch.Tensor]:
    """other − base over the base's floating tensors (a task vector, a direction to a model).

    Keys and shapes must match; the error names `field` and what `base_name` has.
    """
    if set(other) != set(base):
        diff = sorted(set(other).symmetric_difference(base))
        raise ConfigError(f"{field}: its keys differ from {base_name}'s: {diff[:5]}")
    out = {}
    for k, v in base.items():
        if other[k].shape != v.shape:
            raise ConfigError(f"{field}: key '{k}' has shape {tuple(other[k].shape)}, {base_name} has {tuple(v.shape)}")
        if v.is_floating_point():
            out[k] = other[k].to(torch.float32) - v.to(torch.float32)
    return out
