"""The comparison helper must itself catch errors just above its tolerance."""
import numpy as np
import pytest

from util import assert_close, tolerance


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assert_close_accepts_within_and_rejects_beyond(dtype):
    expected = np.linspace(-2, 2, 101)
    tol = tolerance(dtype)
    mag = 2.0
    inside = expected + 0.9 * (tol["atol"] * mag)
    assert_close(inside.astype(dtype), expected)
    outside = expected.copy()
    outside[7] += 3 * (tol["atol"] * mag + tol["rtol"] * abs(expected[7]))
    with pytest.raises(AssertionError):
        assert_close(outside.astype(dtype), expected, dtype=dtype)


def test_assert_close_checks_special_values():
    e = np.array([1.0, -np.inf, np.nan])
    assert_close(e.copy(), e)
    with pytest.raises(AssertionError):
        assert_close(np.array([1.0, -np.inf, 0.0]), e)
    with pytest.raises(AssertionError):
        assert_close(np.array([1.0, 0.0, np.nan]), e)
    with pytest.raises(AssertionError):
        assert_close(np.array([np.inf, -np.inf, np.nan]), e)
