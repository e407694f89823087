"""The numpy density helpers against the scipy functions they stand in for, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks as scipy_find_peaks

from predictor._density import find_peaks, smooth_counts


def _densities(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        size = int(rng.integers(1, 300))
        kind = rng.integers(4)
        if kind == 0:  # counts of a histogram: ties and plateaus of zeros
            yield rng.poisson(rng.uniform(0, 5), size).astype(float)
        elif kind == 1:  # a few distinct levels: long plateaus, flat peaks
            yield rng.integers(0, 4, size).astype(float)
        elif kind == 2:  # smooth mixtures
            t = np.linspace(-3, 6, size)
            yield (np.exp(-((t - rng.uniform(-2, 0)) ** 2)) + rng.uniform(0, 1)
                   * np.exp(-((t - rng.uniform(1, 5)) ** 2) / 0.3))
        else:
            yield rng.normal(size=size)


@pytest.mark.parametrize("seed", range(3))
def test_smooth_counts_is_gaussian_filter1d_bit_for_bit(seed) -> None:
    rng = np.random.default_rng(seed + 100)
    for x in _densities(seed):
        for sigma in (0.3, 1.0, rng.uniform(0.5, 12.0)):
            np.testing.assert_array_equal(smooth_counts(x, sigma),
                                          gaussian_filter1d(x, sigma, mode="constant"))


@pytest.mark.parametrize("seed", range(3))
def test_find_peaks_is_scipy_find_peaks(seed) -> None:
    for x in _densities(seed):
        root = np.sqrt(np.abs(x))
        for frac in (0.0, 0.05, 0.2):
            got = find_peaks(root, prominence=frac * root.max() if len(root) else 0.0)
            want = scipy_find_peaks(root, prominence=frac * root.max() if len(root) else 0.0)[0]
            np.testing.assert_array_equal(got, want)


def test_find_peaks_by_hand() -> None:
    x = np.array([0, 2, 2, 2, 1, 5, 5, 0, 3, 3])  # flat tops; a plateau at the end is no peak
    assert find_peaks(x, 0.0).tolist() == [2, 5]
    assert find_peaks(x, 1.0).tolist() == [2, 5]  # the 2s over the 1 before the higher 5s
    assert find_peaks(x, 1.5).tolist() == [5]
    assert find_peaks(x, 5.0).tolist() == [5]  # down to 0 on both sides
    assert find_peaks(x, 5.5).tolist() == []
    assert find_peaks(np.array([1.0, 2.0]), 0.0).tolist() == []
