"""`sweep.analysis.lineage`: a member's ancestry through `parent`, on tables written out by hand.

Four members × four generations of a pbt run (candidate_id = generation · 4 + member):

    gen 0: every member its own start         lr: m0 .1, m1 .01, m2 .001, m3 .5
    gen 1: m3 copies m0 (lr .1 → .12)
    gen 2: m2 copies m3 (lr .12 → .144)
    gen 3: m1 copies m2 (lr .144 → .1728)

so m0 is never exploited (its own rows), m2's chain at generation 3 switches twice
(m2 ← m3 ← m0) and m1's three times (m1 ← m2 ← m3 ← m0).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pytest

from sweep.analysis import lineage

POPULATION = 4
#: (generation, member, parent, lr) of every row.
ROWS: List[Tuple[int, int, int, float]] = [
    (0, 0, 0, 0.1), (0, 1, 1, 0.01), (0, 2, 2, 0.001), (0, 3, 3, 0.5),
    (1, 0, 0, 0.1), (1, 1, 1, 0.01), (1, 2, 2, 0.001), (1, 3, 0, 0.12),
    (2, 0, 0, 0.1), (2, 1, 1, 0.01), (2, 2, 3, 0.144), (2, 3, 3, 0.12),
    (3, 0, 0, 0.1), (3, 1, 2, 0.1728), (3, 2, 2, 0.144), (3, 3, 3, 0.12),
]


def pbt_table(rows: Sequence[Tuple[int, int, Optional[int], float]] = ROWS,
              status: Optional[Sequence[str]] = None, ids: Optional[Sequence[int]] = None) -> pa.Table:
    n = len(rows)
    return pa.table({
        "candidate_id": pa.array(list(ids) if ids is not None else [g * POPULATION + m for g, m, _, _ in rows],
                                 pa.int64()),
        "status": pa.array(list(status) if status is not None else ["ok"] * n, pa.string()),
        "error": pa.array([None] * n, pa.string()),
        "member": pa.array([m for _, m, _, _ in rows], pa.int64()),
        "generation": pa.array([g for g, _, _, _ in rows], pa.int64()),
        "parent": pa.array([p for _, _, p, _ in rows], pa.int64()),
        "step": pa.array([(g + 1) * 50 for g, _, _, _ in rows], pa.int64()),
        "lr": pa.array([lr for _, _, _, lr in rows], pa.float64()),
        "accuracy": pa.array([0.5 + 0.1 * g + 0.01 * m for g, m, _, _ in rows], pa.float64()),
    })


def pairs(chain) -> List[Tuple[int, int]]:
    return [(row["generation"], row["member"]) for row in chain]


def lrs(chain) -> List[float]:
    return [row["lr"] for row in chain]


def test_a_member_never_exploited_is_its_own_rows():
    chain = lineage(pbt_table(), 0)
    assert pairs(chain) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert lrs(chain) == [0.1, 0.1, 0.1, 0.1]
    assert [row["candidate_id"] for row in chain] == [0, 4, 8, 12]


def test_a_chain_that_switches_twice():
    chain = lineage(pbt_table(), 2)
    assert pairs(chain) == [(0, 0), (1, 3), (2, 2), (3, 2)]
    assert lrs(chain) == [0.1, 0.12, 0.144, 0.144]
    # every row is the whole results row
    assert set(chain[0]) == set(pbt_table().column_names)
    assert [row["step"] for row in chain] == [50, 100, 150, 200]


def test_a_chain_that_switches_three_times():
    chain = lineage(pbt_table(), 1)
    assert pairs(chain) == [(0, 0), (1, 3), (2, 2), (3, 1)]
    assert lrs(chain) == [0.1, 0.12, 0.144, 0.1728]


def test_an_earlier_generation_ends_the_chain_there():
    assert pairs(lineage(pbt_table(), 1, 2)) == [(0, 1), (1, 1), (2, 1)]
    assert pairs(lineage(pbt_table(), 3, 1)) == [(0, 0), (1, 3)]
    assert pairs(lineage(pbt_table(), 3, 0)) == [(0, 3)]
    assert pairs(lineage(pbt_table(), 3, np.int64(3))) == [(0, 0), (1, 3), (2, 3), (3, 3)]


def test_row_order_does_not_matter():
    shuffled = [ROWS[i] for i in np.random.default_rng(0).permutation(len(ROWS))]
    assert pairs(lineage(pbt_table(shuffled), 1)) == [(0, 0), (1, 3), (2, 2), (3, 1)]
    assert lrs(lineage(pbt_table(shuffled), 2)) == [0.1, 0.12, 0.144, 0.144]


def test_the_default_is_the_members_last_generation():
    rows = [r for r in ROWS if not (r[0] == 3 and r[1] == 2)]  # member 2 stopped after generation 2
    assert pairs(lineage(pbt_table(rows), 2)) == [(0, 0), (1, 3), (2, 2)]


def test_an_ok_row_is_taken_before_a_failed_one_of_the_same_pair():
    rows = ROWS + [(1, 3, 1, 99.0)]  # a failed retry of (member 3, generation 1) naming another parent
    status = ["ok"] * len(ROWS) + ["failed"]
    ids = [g * POPULATION + m for g, m, _, _ in ROWS] + [-1]  # even with a lower candidate_id
    chain = lineage(pbt_table(rows, status, ids), 2)
    assert pairs(chain) == [(0, 0), (1, 3), (2, 2), (3, 2)]
    assert lrs(chain) == [0.1, 0.12, 0.144, 0.144]


def test_a_missing_row_of_the_chain_is_named():
    rows = [r for r in ROWS if not (r[0] == 1 and r[1] == 3)]
    with pytest.raises(ValueError, match=r"member 2 at generation 2 continued from member 3, "
                                         r"which has no row at generation 1"):
        lineage(pbt_table(rows), 1)
    # members whose chain avoids the hole are fine
    assert pairs(lineage(pbt_table(rows), 0)) == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_missing_members_generations_columns_and_parents_are_named():
    with pytest.raises(ValueError, match="member 7 has no row"):
        lineage(pbt_table(), 7)
    with pytest.raises(ValueError, match=r"no row for member 1 at generation 5 \(its rows span generations 0…3\)"):
        lineage(pbt_table(), 1, 5)
    with pytest.raises(ValueError, match="no parent column"):
        lineage(pbt_table().drop_columns(["parent"]), 1)
    with pytest.raises(ValueError, match="no member, generation columns"):
        lineage(pbt_table().drop_columns(["member", "generation"]), 1)
    rows = [(g, m, None if (g, m) == (2, 2) else p, lr) for g, m, p, lr in ROWS]
    with pytest.raises(ValueError, match="member 2 at generation 2 has no parent"):
        lineage(pbt_table(rows), 1)
    for bad in (1.0, True, "1"):
        with pytest.raises(ValueError, match="member must be a whole number"):
            lineage(pbt_table(), bad)
    with pytest.raises(ValueError, match="generation must be 0 or more"):
        lineage(pbt_table(), 1, -1)


def test_a_search_table_is_every_member_on_its_own():
    rows = [(g, m, m, 10.0 ** -m) for g in range(3) for m in range(3)]
    for m in range(3):
        chain = lineage(pbt_table(rows), m)
        assert pairs(chain) == [(0, m), (1, m), (2, m)]
        assert lrs(chain) == [10.0 ** -m] * 3


def test_a_row_without_member_or_generation_is_never_part_of_a_chain():
    table = pbt_table()
    extra = pa.table({name: pa.array([None], table.schema.field(name).type) for name in table.column_names})
    chain = lineage(pa.concat_tables([extra, table]), 2)
    assert pairs(chain) == [(0, 0), (1, 3), (2, 2), (3, 2)]
