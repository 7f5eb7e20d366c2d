"""The study protocol: a study yields batches of candidates with the columns that describe them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Protocol, Sequence

import pyarrow as pa


class CandidateSource(Protocol):
    """What a batch carries to a worker; it becomes candidates there."""

    def candidates(self) -> Sequence[Any]:
        """The batch's candidates: param dicts, or `Invalid` for those that could not be made."""
        ...


@dataclass
class CandidateBatch:
    """Candidates `ids`, the recipe columns that describe them, and how to make them."""

    ids: List[int]
    columns: Dict[str, List[Any]]
    source: CandidateSource
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


class Study(Protocol):
    """A planned study: a fixed number of candidates with stable ids."""

    #: the recipe columns this study adds to each row, with their Arrow types
    columns: Dict[str, pa.DataType]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, skip: frozenset = frozenset()) -> Iterator[CandidateBatch]:
        """Batches of at most `batch_size` candidates in id order, leaving out ids in `skip`."""
        ...
