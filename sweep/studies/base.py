"""The study protocol: a study yields batches of candidates with the columns that describe them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Protocol, Sequence, Union

import pyarrow as pa

from ..recipes import AnchorSet, Rows


class CandidateSource(Protocol):
    """What a batch carries to a worker; it becomes candidates there."""

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
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


class Study(Protocol):
    """A planned study: a fixed number of candidates with stable ids."""

    #: the recipe columns this study adds to each row, with their Arrow types
    columns: Dict[str, pa.DataType]
    #: candidates per batch sent to a worker when the config says 'auto'
    default_batch_size: int

    def anchors(self) -> Dict[str, AnchorSet]:
        """Anchor sets by key, shipped to each worker once (empty for explicit studies)."""
        ...

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        """Batches of at most `batch_size` candidates in id order, leaving out ids in `skip`."""
        ...
