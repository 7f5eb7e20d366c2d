"""Range values ({start, stop, num}) are the floats of their decimals, so `alpha = 0.5` finds its rows."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sweep.studies._path import RANGE_DIGITS, AlphaRange, alpha_values, range_values


def exact(start: float, stop: float, num: int) -> list:
    """The same range in exact rational arithmetic, each value rounded half-even to RANGE_DIGITS significant
    digits at the scale of the larger end, then read as a float (Python's own correctly rounded parse)."""
    a, b = Fraction(start), Fraction(stop)
    scale = max(abs(start), abs(stop))
    exponent = Decimal(scale).adjusted() - (RANGE_DIGITS - 1)
    out = []
    for i in range(num):
        value = a + (b - a) * Fraction(i, num - 1) if num > 1 else a
        count = round(value / Fraction(10) ** exponent)
        out.append(float(Decimal(count).scaleb(exponent)))
    return out


def test_the_values_a_user_queries_are_exact():
    assert range_values(0.0, 1.0, 21).tolist() == [i / 20 for i in range(21)]
    values = range_values(-1.0, 1.0, 37)
    assert 0.0 in values.tolist() and -0.5 in values.tolist() and 0.5 in values.tolist()
    assert not np.signbit(values[values == 0.0]).any()  # 0, never -0.0
    assert range_values(0.1, 0.3, 3).tolist() == [0.1, 0.2, 0.3]
    assert np.linspace(-0.2, 1.2, 15)[2] == -2.7755575615628914e-17  # what the rounding is for
    assert range_values(-0.2, 1.2, 15).tolist() == [round(-0.2 + 0.1 * i, 1) for i in range(15)]
    assert range_values(0.0, 1.0, 11).tolist() == [i / 10 for i in range(11)]
    assert alpha_values(AlphaRange(start=-0.5, stop=1.5, num=9)).tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75,
                                                                               1.0, 1.25, 1.5]
    assert alpha_values([0.1 + 0.2, 1.0]).tolist() == [0.1 + 0.2, 1.0]  # a list stays as written


@pytest.mark.parametrize("start,stop,num", [(0, 1e-30, 3), (0, 3e25, 4), (-1e300, 1e300, 3), (-2.5, 7.25, 40),
                                            (1e-5, 3e-5, 7), (5.0, 5.0, 1), (1, 0, 11)])
def test_far_from_one(start, stop, num):
    assert range_values(start, stop, num).tolist() == exact(start, stop, num)


decimals = st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False).map(float)


@given(decimals, decimals, st.integers(1, 200))
def test_every_value_is_the_float_of_its_rounded_decimal(start, stop, num):
    got = range_values(start, stop, num)
    assert got.tolist() == exact(start, stop, num)
    assert np.all(np.abs(got - np.linspace(start, stop, num)) <= 1e-11 * max(abs(start), abs(stop), 1e-300))
