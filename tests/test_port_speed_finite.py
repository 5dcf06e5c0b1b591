"""all_finite's fast reductions (torch's sum; numpy's where torch cannot view the array) agree
with the exact elementwise test on every dtype and layout the port hands them."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from weight_port.tensors import all_finite

FLOATS = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]


def _layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    # contiguous, a transpose view, a negative-stride view (np.flip: torch cannot view it)
    return {"contiguous": a, "transposed": a.T, "flipped": a[::-1]}


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("planted", [None, np.nan, np.inf, -np.inf, "max"])
def test_all_finite_matches_elementwise(dtype, planted):
    a = np.ones((30, 7), dtype)
    if planted == "max":  # finite values whose float32 sum overflows: still finite
        a[:] = (ml_dtypes.finfo if dtype is ml_dtypes.bfloat16 else np.finfo)(dtype).max
    elif planted is not None:
        a[5, 3] = planted
    for name, view in _layouts(a).items():
        expected = bool(np.isfinite(view.astype(np.float64)).all())
        assert all_finite(view) == expected, f"{np.dtype(dtype).name} {name} planted={planted}"


def test_all_finite_integers():
    # Integers hold no NaN/Inf; the largest values must not overflow into a "not finite" sum.
    a = np.full((30, 7), np.iinfo(np.int32).max, np.int32)
    for name, view in _layouts(a).items():
        assert all_finite(view), name


def test_all_finite_empty():
    assert all_finite(np.zeros((0, 3), np.float32))
