"""Splitting a candidate batch: every kind of source cut in halves, ids, columns and meta kept in step.

The pool splits a batch that keeps failing down to single candidates; these
checks are on the batches alone (no Ray): the halves hold exactly the
candidates of the whole, in order, each with its own columns and source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from sweep.recipes import AffineRows, MergeRows, NoiseRows
from sweep.studies.base import CandidateBatch, RecipeBatch
from sweep.studies.checkpoints import FileContents
from sweep.types import Invalid


def leaves(batch: CandidateBatch) -> List[CandidateBatch]:
    """`batch` halved again and again down to single candidates, in order."""
    halves = batch.halves()
    if halves is None:
        return [batch]
    first, second = halves
    assert len(first) >= len(second) >= 1 and len(first) + len(second) == len(batch)
    return leaves(first) + leaves(second)


def depth(batch: CandidateBatch) -> int:
    halves = batch.halves()
    return 0 if halves is None else 1 + max(depth(h) for h in halves)


def weights(value: float) -> bytes:
    return save({"w": torch.full((2, 2), value)})


def test_file_contents_split_into_their_own_files():
    names = [f"m{i}.safetensors" for i in range(5)]
    contents = [weights(float(i)) for i in range(4)] + ["m4.safetensors: cannot read: No such file"]
    batch = CandidateBatch([10, 11, 12, 13, 14], {"path": list(names)}, FileContents(names, contents))
    first, second = batch.halves()
    assert list(first.ids) == [10, 11, 12] and list(second.ids) == [13, 14]
    assert first.columns == {"path": names[:3]} and second.columns == {"path": names[3:]}
    assert isinstance(first.source, FileContents) and first.source.names == names[:3]
    made = first.source.candidates() + second.source.candidates()
    assert [float(c["w"][0, 0]) for c in made[:4]] == [0.0, 1.0, 2.0, 3.0]
    assert isinstance(made[4], Invalid) and "m4.safetensors" in made[4].reason
    # The whole batch is left as it was.
    assert batch.source.names == names and len(batch) == 5


@pytest.mark.parametrize("rows", [
    AffineRows(np.arange(14, dtype=np.float64).reshape(7, 2), ["a", "b"]),
    AffineRows(np.ones((7, 1)), ["alpha"], extra={"alpha": np.linspace(0, 1, 7), "path": np.array(["p"] * 7)}),
    NoiseRows(np.arange(100, 107, dtype=np.int64), 0.5),
    MergeRows("dare", np.linspace(0.1, 0.7, 7), np.full(7, 0.5), np.arange(7, dtype=np.int64)),
], ids=["affine", "affine-extra", "noise", "merge"])
def test_recipe_rows_split_with_their_ids(rows):
    ids = np.arange(20, 27, dtype=np.int64)
    batch = CandidateBatch(ids, {}, RecipeBatch("key", rows))
    parts = leaves(batch)
    assert [list(p.ids) for p in parts] == [[i] for i in range(20, 27)]
    assert all(p.source.key == "key" and len(p.source.rows) == 1 for p in parts)
    whole = pa.table(rows.columns())
    rejoined = pa.concat_tables(pa.table(p.source.rows.columns()) for p in parts)
    assert rejoined.equals(whole), "each part carries its own rows' recipe columns, in order"


def test_plain_list_of_dicts_and_columns_and_meta():
    candidates = [{"w": torch.full((1,), float(i))} for i in range(4)]
    batch = CandidateBatch([0, 1, 2, 3], {"method": ["a", "b", "c", "d"], "soup": [None] * 4}, candidates,
                           meta={"round": 3, "parents": [7, 8, 9, 10], "pair": (1, 2)})
    first, second = batch.halves()
    assert [float(c["w"]) for c in second.source] == [2.0, 3.0]
    assert second.columns == {"method": ["c", "d"], "soup": [None, None]}
    assert first.meta == {"round": 3, "parents": [7, 8], "pair": (1, 2)}, "per-candidate meta cut, the rest kept"
    assert second.meta == {"round": 3, "parents": [9, 10], "pair": (1, 2)}


def test_a_source_that_slices_itself_is_asked_to():
    @dataclass
    class Counted:
        start: int
        stop: int

        def slice(self, start: int, stop: int) -> "Counted":
            return Counted(self.start + start, self.start + stop)

        def candidates(self):
            return [{"w": torch.full((1,), float(i))} for i in range(self.start, self.stop)]

    batch = CandidateBatch([5, 6, 7], {}, Counted(5, 8))
    assert [p.source for p in leaves(batch)] == [Counted(5, 6), Counted(6, 7), Counted(7, 8)]


def test_sources_that_cannot_be_cut_safely_are_not_split():
    @dataclass
    class Repeated:
        reason: str  # a string of as many characters as candidates is not one entry per candidate
        count: int  # cutting the list fields would keep this count, and lie

        def candidates(self):
            return [Invalid(self.reason)] * self.count

    class Opaque:
        def candidates(self):
            return []

    for source in (Repeated("xy", 2), Opaque()):
        batch = CandidateBatch([0, 1], {"path": ["a", "b"]}, source)
        assert batch.halves() is None
        with pytest.raises(TypeError, match=type(source).__name__ + r".*slice\(start, stop\)"):
            batch.slice(0, 1)
    one = CandidateBatch([3], {}, FileContents(["a"], [b""]))
    assert one.halves() is None, "one candidate is as small as a batch gets"


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 300))
def test_halving_reaches_every_candidate_once_in_log_steps(n):
    names = [f"f{i}" for i in range(n)]
    batch = CandidateBatch(list(range(n)), {"path": names}, FileContents(names, [b""] * n))
    parts = leaves(batch)
    assert [p.ids[0] for p in parts] == list(range(n)) and all(len(p) == 1 for p in parts)
    assert all(p.columns["path"] == p.source.names for p in parts)
    # One bad candidate among n is found within ceil(log2 n) splits: the pool's bound.
    assert depth(batch) == math.ceil(math.log2(n)) if n > 1 else depth(batch) == 0
