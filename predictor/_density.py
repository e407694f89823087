"""Density helpers shared by the cleanup gates and the population gates."""

from __future__ import annotations

import math

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


def main_mode(d) -> tuple[float, float, float]:
    """Location of the highest mode of a smoothed density ``d`` (``values``, ``centers``,
    ``step``) and its left/right half-widths expressed as Gaussian SDs."""
    i = int(np.argmax(d.values))
    half = d.values[i] / 2
    left = i
    while left > 0 and d.values[left] > half:
        left -= 1
    right = i
    while right < len(d.values) - 1 and d.values[right] > half:
        right += 1
    fwhm_to_sd = 1 / math.sqrt(2 * math.log(2))
    sd_left = max(i - left, 1) * d.step * fwhm_to_sd
    sd_right = max(right - i, 1) * d.step * fwhm_to_sd
    return float(d.centers[i]), sd_left, sd_right
