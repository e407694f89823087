"""The compiled radix selection behind medians, quantiles and fractions positive: it must give
exactly what sorting gives, on every kind of float32 value CyTOF files hold."""

from __future__ import annotations

import numpy as np
import pytest

from predictor._kernels import order_statistics, sort

SPECIAL = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 3.5, -2.0, 3.5000002],
                   dtype=np.float32)


def _by_sorting(x, at, ranks, cuts):
    s = np.sort(x[:, at], axis=1)
    above = np.array([len(at) - np.searchsorted(s[j], c, side="right") if c == c else 0
                      for j, c in enumerate(cuts)])
    return s[:, ranks], above


def _values(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "integers":  # many ties
        return rng.integers(-3, 4, shape).astype(np.float32)
    if kind == "cytof":  # mostly zeros, the rest log-normal counts
        return (rng.lognormal(2, 2, shape) * (rng.random(shape) < 0.4)).astype(np.float32)
    if kind == "special":
        return rng.choice(SPECIAL, shape)
    return (rng.standard_normal(shape) * 1e30).astype(np.float32)  # huge exponents


@pytest.mark.parametrize("kind", ["normal", "integers", "cytof", "special", "huge"])
def test_order_statistics_equal_sorting(kind):
    rng = np.random.default_rng(len(kind))
    for _ in range(300):
        n_markers, n_events = int(rng.integers(1, 4)), int(rng.integers(1, 400))
        x = _values(kind, rng, (n_markers, n_events))
        at = np.sort(rng.choice(n_events, int(rng.integers(1, n_events + 1)), replace=False))
        ranks = rng.integers(0, len(at), int(rng.integers(1, 6)))
        cuts = rng.choice(np.array([0.0, np.nan, 1.0, -1.0, 3.5], dtype=np.float32), n_markers)
        values, above = order_statistics(x, at, ranks, cuts)
        want_values, want_above = _by_sorting(x, at, ranks, cuts)
        np.testing.assert_array_equal(values, want_values)  # NaN == NaN, -0.0 == 0.0 here
        np.testing.assert_array_equal(above, want_above)


def test_order_statistics_by_hand():
    x = np.array([[0.0, 5.0, -1.0, 0.0, np.nan, 2.0, 2.0]], dtype=np.float32)
    at = np.array([0, 1, 2, 3, 4, 5, 6])
    values, above = order_statistics(x, at, np.arange(7), np.array([1.0], dtype=np.float32))
    np.testing.assert_array_equal(values[0], [-1.0, 0.0, 0.0, 2.0, 2.0, 5.0, np.nan])
    assert above[0] == 4  # 2, 2, 5 and NaN (NaN sorts last, so it counts as above)
    # a subset, ranks out of order and repeated, no cut
    values, above = order_statistics(x, np.array([1, 5, 6]), np.array([2, 0, 1, 1]),
                                     np.array([np.nan], dtype=np.float32))
    np.testing.assert_array_equal(values[0], [5.0, 2.0, 2.0, 2.0])
    assert above[0] == 0


def test_order_statistics_on_a_large_tied_population():
    """Long runs of equal values across the radix buckets (the median of mostly zeros, and
    of a value repeated around it) and the two middle ranks of an even count."""
    rng = np.random.default_rng(7)
    x = np.zeros((3, 100_000), dtype=np.float32)
    x[1, rng.random(100_000) < 0.7] = 12.5
    x[2] = rng.lognormal(4, 1, 100_000).astype(np.float32)
    x[2, ::3] = 0.0
    at = np.flatnonzero(rng.random(100_000) < 0.5)
    n = len(at)
    ranks = np.array([(n - 1) // 2, n // 2, int(0.99 * (n - 1)), n - 1, 0])
    cuts = np.array([0.0, 12.5, 50.0], dtype=np.float32)
    values, above = order_statistics(x, at, ranks, cuts)
    want_values, want_above = _by_sorting(x, at, ranks, cuts)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(above, want_above)


@pytest.mark.parametrize("kind", ["normal", "integers", "cytof", "special", "huge"])
def test_sort_equals_numpy(kind):
    rng = np.random.default_rng(len(kind) + 10)
    for n in (1, 2, 7, 300, 5000, 70_000):
        v = _values(kind, rng, (1, n))[0]
        np.testing.assert_array_equal(sort(v), np.sort(v))
    strided = _values(kind, rng, (2, 1000))[:, 3]  # not contiguous
    np.testing.assert_array_equal(sort(strided), np.sort(strided))


def test_sort_other_dtypes_and_empty_are_numpy_sorts():
    v = np.array([3.0, np.nan, -1.0, 2.0])
    assert sort(v).dtype == np.float64
    np.testing.assert_array_equal(sort(v), np.sort(v))
    assert sort(np.array([], dtype=np.float32)).size == 0
    np.testing.assert_array_equal(sort(np.array([[2, 1], [0, 5]], dtype=np.float32)),
                                  [[1, 2], [0, 5]])
