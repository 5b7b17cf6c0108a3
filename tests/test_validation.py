"""Tests for pyro_mogflow._validation: one rule for numbers, numpy scalars included."""

import numpy as np
import pytest

from pyro_mogflow._validation import MAX_SEED, check_int, check_real, check_seed


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_integers_and_numpy_integers_are_ints(value):
    assert check_int("n", value, 1) == 3 and type(check_int("n", value)) is int


@pytest.mark.parametrize("value", [0.5, np.float64(0.5), np.float32(0.5), 1, np.int64(1)])
def test_reals_and_numpy_scalars_are_floats(value):
    assert type(check_real("x", value)) is float


@pytest.mark.parametrize("value", [True, np.bool_(True), np.False_])
def test_bools_are_refused_python_and_numpy_alike(value):
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", value)
    with pytest.raises(TypeError, match="x must be a finite float"):
        check_real("x", value)
    with pytest.raises(TypeError, match="seed must be an int"):
        check_seed("seed", value)


@pytest.mark.parametrize("value", [2.0, np.float64(2.0), "2", np.array([2])])
def test_non_integers_are_refused(value):
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", value)


def test_seed_range_is_numpys():
    assert check_seed("seed", np.uint32(MAX_SEED)) == MAX_SEED
    assert check_seed("seed", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 4294967295\]"):
        check_seed("seed", MAX_SEED + 1)
    with pytest.raises(ValueError, match=r"\[0, 4294967293\] \(it is used up to seed \+ 2\)"):
        check_seed("seed", MAX_SEED - 1, offset=2)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        check_seed("seed", -1)
