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


# scipy.ndimage.gaussian_filter1d and scipy.signal.find_peaks, for the small densities gates are
# cut on, in numpy: importing those scipy modules costs ~0.6 s in every process that gates
# (the CLI and each worker pool's server), more than all the densities of a cohort take.
# Both give scipy's numbers bit for bit (tests/test_density.py compares them).


def smooth_counts(counts: np.ndarray, sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """Gaussian smoothing with zeros beyond the ends: ``gaussian_filter1d(counts, sigma,
    mode="constant")``, summed in the same order (the centre, then the pairs from the widest
    in)."""
    x = np.asarray(counts, dtype=np.float64)
    radius = int(truncate * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * k**2)
    w = w / w.sum()
    n = len(x)
    padded = np.concatenate([np.zeros(radius), x, np.zeros(radius)])
    out = x * w[radius]
    for j in range(radius, 0, -1):
        out += (padded[radius - j : radius - j + n] + padded[radius + j : radius + j + n]) * w[radius + j]
    return out


def find_peaks(x: np.ndarray, prominence: float) -> np.ndarray:
    """Indices of the local maxima of ``x`` with at least this topographic prominence, as
    ``scipy.signal.find_peaks(x, prominence=prominence)[0]``: a flat top counts once, at its
    middle (rounded down); the ends are never peaks."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 3:
        return np.zeros(0, dtype=np.intp)
    change = np.flatnonzero(x[1:] != x[:-1]) + 1
    starts, ends = np.r_[0, change], np.r_[change - 1, n - 1]  # runs of equal values
    inner = (starts >= 1) & (ends <= n - 2)
    s, e = starts[inner], ends[inner]
    top = (x[s - 1] < x[s]) & (x[e + 1] < x[s])
    peaks = ((s[top] + e[top]) // 2).astype(np.intp)
    keep = np.zeros(len(peaks), dtype=bool)
    for i, p in enumerate(peaks):
        higher_left = np.flatnonzero(x[:p] > x[p])
        higher_right = np.flatnonzero(x[p + 1 :] > x[p])
        lo = higher_left[-1] + 1 if len(higher_left) else 0
        hi = p + 1 + higher_right[0] if len(higher_right) else n
        base = max(x[lo : p + 1].min(), x[p:hi].min())
        keep[i] = prominence <= x[p] - base
    return peaks[keep]
