"""Density helpers shared by the cleanup gates and the population gates."""

from __future__ import annotations

import numpy as np


def valley_center(vals: np.ndarray, a: int, b: int) -> int:
    """Lowest point between peaks ``a`` and ``b``; the middle of the run when the bottom is
    flat (an empty gap between two well separated populations)."""
    seg = vals[a : b + 1]
    i = int(np.argmin(seg))
    floor = seg[i] + 1e-3 * (min(seg[0], seg[-1]) - seg[i])
    lo = hi = i
    while lo > 0 and seg[lo - 1] <= floor:
        lo -= 1
    while hi < len(seg) - 1 and seg[hi + 1] <= floor:
        hi += 1
    return a + (lo + hi) // 2
