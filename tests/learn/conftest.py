"""Shared checks of the distributed-training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_same_nextuse(one: Path, many: Path) -> None:
    """Two saved next-use models are equal up to the order of floating-point sums: the same
    arrays, counts and ids exactly, float arrays within rtol 1e-8."""
    with np.load(one) as a, np.load(many) as b:
        assert a.files == b.files
        for k in a.files:
            if a[k].dtype.kind == "f":
                np.testing.assert_allclose(a[k], b[k], rtol=1e-8, atol=1e-10, err_msg=k)
            else:
                assert np.array_equal(a[k], b[k]), k
