"""`results.arrow_array` builds the same Arrow arrays as `pa.array`, without importing pandas."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweep.results import arrow_array

def same(a, b):
    """Equal values, nulls in the same rows, NaN equal to NaN (Arrow's `equals` holds NaN unequal)."""
    key = lambda v: "nan" if isinstance(v, float) and v != v else v  # noqa: E731
    return [key(v) for v in a.to_pylist()] == [key(v) for v in b.to_pylist()]


NUMERIC = [np.float64, np.float32, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("with_mask", [False, True])
def test_numpy_columns_equal_pa_array(dtype, with_mask):
    rng = np.random.default_rng(0)
    values = (rng.normal(size=37) * 50).astype(dtype)
    if np.dtype(dtype).kind == "f":
        values[3] = np.nan  # NaN stays a value
    mask = rng.random(37) < 0.3 if with_mask else None
    got = arrow_array(values, mask=mask)
    want = pa.array(values, mask=mask)
    assert got.type == want.type and same(got, want)
    assert got.null_count == want.null_count
    got.validate(full=True)


@pytest.mark.parametrize("type", [pa.float64(), pa.float32(), pa.int64()])
def test_a_given_type_is_kept(type):
    values = np.arange(10, dtype=np.int64)
    got = arrow_array(values, type)
    assert got.type == type and got.equals(pa.array(values, type))


def test_what_it_does_not_build_itself_goes_to_pa_array_with_its_errors():
    with pytest.raises(pa.ArrowInvalid):
        arrow_array(np.array([1.5, 2.0]), pa.int64())  # floats that are not integers into int64
    with pytest.raises(pa.ArrowInvalid):
        arrow_array(np.array([300], np.int64), pa.int8())  # out of range
    assert arrow_array([None, None]).type == pa.null()
    assert arrow_array([[1, 2], [3]]).equals(pa.array([[1, 2], [3]]))
    assert arrow_array(np.zeros((2, 2))[:, 0]).equals(pa.array(np.zeros(2)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text()), max_size=30), st.booleans())
def test_string_columns_equal_pa_array(values, as_numpy):
    data = np.array(values, dtype=object) if as_numpy else values
    got = arrow_array(data, pa.string())
    want = pa.array(values, pa.string())
    assert got.equals(want) and got.null_count == want.null_count
    got.validate(full=True)
    if any(v is not None for v in values):
        assert arrow_array(data).equals(want)


def test_a_string_mask_nulls_rows():
    got = arrow_array(["a", "b", None], pa.string(), mask=np.array([False, True, False]))
    assert got.to_pylist() == ["a", None, None]


def test_a_one_shot_evaluate_does_not_import_pandas():
    code = (
        "import sys, torch, sweep\n"
        "from sweep.examples import models as M\n"
        "m = M.mlp((4, 3, 1)).eval()\n"
        "a = {k: v.detach().clone() for k, v in m.named_parameters()}\n"
        "b = {k: v + 1 for k, v in a.items()}\n"
        "t = sweep.evaluate(m, sweep.Affine(a, [{k: b[k] - a[k] for k in a}], torch.linspace(0, 1, 9)[:, None]),\n"
        "                   M.regression_batches(4, 8), M.mse)\n"
        "bad = sweep.evaluate(m, [a, {'nope': torch.zeros(1)}], M.regression_batches(4, 8), M.mse)\n"
        "assert t.num_rows == 9 and bad.column('status').to_pylist() == ['ok', 'invalid'], bad\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "SWEEP_CACHE_DIR": "off"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
