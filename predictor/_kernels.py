"""Compiled kernels (numba) for what numpy sorts slowly: order statistics and sorting of
float32 values. On CPUs where numpy's sort is not vectorised it costs 15–30 ns a value, and
sorting was most of a sample's feature time.

- :func:`order_statistics`: exact order statistics of a population's cells without sorting
  them. A population's median (and a quantile) per marker is two or four order statistics
  of its cells' values (a 200k-event sample has ~4M population × marker values). Radix
  selection finds one in a few passes: each value becomes an unsigned key that orders as the
  float does, a histogram of the keys' top bits finds the bucket that holds the wanted rank,
  and only that bucket's keys go on to the next bits. Zeros (most of a functional marker's
  values) are only counted. The pass that gathers the values also counts those above a
  positivity threshold.
- :func:`sort`: ``np.sort`` of float32 values by an LSD radix sort of the same keys (the
  densities that gates are fitted on).

Both give what sorting with numpy gives: NaN sorts last (and counts as above every
threshold). They are compiled when this module is imported, or loaded from numba's cache
beside it (~0.5 s): a process pool's forkserver imports it once, so its workers start with
them ready.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["order_statistics", "sort"]


@njit(cache=True, nogil=True, inline="always")
def _key(v):
    """A float32 → uint32 that orders as the float does (NaN last), without branches."""
    u = np.float32(v).view(np.uint32)
    flip = np.uint32(0) - (u >> np.uint32(31))  # all ones for negative values
    k = np.uint32(u ^ (flip | np.uint32(0x80000000)))
    return np.uint32(0xFFFFFFFF) if v != v else k


@njit(cache=True, nogil=True)
def _unkey(k):
    if k == np.uint32(0xFFFFFFFF):
        return np.float32(np.nan)
    if k & np.uint32(0x80000000):
        u = k & np.uint32(0x7FFFFFFF)
    else:
        u = ~k
    return np.uint32(u).view(np.float32)


@njit(cache=True, nogil=True)
def _select(keys, n, rank, buf, hist):
    """The key of rank ``rank`` (0-based) among ``keys[:n]``, 11, 11 and 10 bits at a time,
    and how many keys of higher rank equal it. ``buf`` (≥ n) and ``hist`` (2048) are
    scratch."""
    src = keys
    m = n
    prefix = np.uint32(0)
    for level in range(3):
        shift = (21, 10, 0)[level]
        width = (11, 11, 10)[level]
        mask = np.uint32((1 << width) - 1)
        hist[:] = 0
        for t in range(m):
            hist[(src[t] >> shift) & mask] += 1
        below = 0
        bucket = 0
        for b in range(1 << width):
            if below + hist[b] > rank:
                bucket = b
                break
            below += hist[b]
        rank -= below
        prefix |= np.uint32(bucket) << shift
        if level == 2:  # the bucket holds exactly the keys equal to the answer
            return prefix, hist[bucket] - rank - 1
        if hist[bucket] < m:  # keep only this bucket's keys for the next bits
            w = 0
            for t in range(m):
                if ((src[t] >> shift) & mask) == bucket:
                    buf[w] = src[t]
                    w += 1
            src = buf
            m = w
    return prefix, 0  # not reached


@njit("Tuple((float32[:, ::1], int64[::1]))(float32[:, ::1], int64[::1], int64[::1], float32[::1])",
      cache=True, nogil=True)
def _order_statistics(x, at, ranks, cuts):
    n_markers = x.shape[0]
    n = at.shape[0]
    values = np.empty((n_markers, ranks.shape[0]), dtype=np.float32)
    above = np.zeros(n_markers, dtype=np.int64)
    keys = np.empty(n, dtype=np.uint32)
    buf = np.empty(n, dtype=np.uint32)
    hist = np.empty(1 << 11, dtype=np.int64)
    for j in range(n_markers):
        cut = cuts[j]
        count = 0
        n_neg = 0
        m = 0
        row = x[j]
        # One pass gathers the keys of the non-zero values (zeros, most of a functional
        # marker's values, are only counted: they would make the histograms slow) and
        # counts the values above the cut.
        for t in range(n):  # branch-free: zeros are in random places
            v = row[at[t]]
            count += not v <= cut  # NaN counts as above, as it sorts last
            keys[m] = _key(v)
            nonzero = v != 0.0
            m += nonzero
            n_neg += v < 0.0
        above[j] = count if cut == cut else 0
        n_zero = n - m
        lo, hi, key = 1, 0, np.uint32(0)  # ranks lo..hi all have this key (none yet)
        for r in range(ranks.shape[0]):
            rank = ranks[r]
            if n_neg <= rank < n_neg + n_zero:
                values[j, r] = 0.0
                continue
            if rank >= n_neg:
                rank -= n_zero
            if not lo <= rank <= hi:  # a median's two middle values are often equal
                key, ties = _select(keys, m, rank, buf, hist)
                lo, hi = rank, rank + ties
            values[j, r] = _unkey(key)
    return values, above


def order_statistics(x: np.ndarray, at: np.ndarray, ranks: np.ndarray, cuts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Order statistics and counts above thresholds of the cells ``at``, marker by marker.

    Parameters
    ----------
    x : ndarray of float32, shape (markers, events)
        Channel-major values.
    at : ndarray of int
        The population's events (column indices into ``x``); must not be empty.
    ranks : ndarray of int
        0-based ranks among the population's values (``0 ≤ rank < len(at)``).
    cuts : ndarray of float32, shape (markers,)
        Per marker, count the values above this (NaN: count nothing).

    Returns
    -------
    values : ndarray of float32, shape (markers, len(ranks))
        ``np.sort(x[:, at], axis=1)[:, ranks]``.
    above : ndarray of int64, shape (markers,)
        Per marker, how many values are not ≤ its cut.
    """
    return _order_statistics(np.ascontiguousarray(x, dtype=np.float32),
                             np.ascontiguousarray(at, dtype=np.int64),
                             np.ascontiguousarray(ranks, dtype=np.int64),
                             np.ascontiguousarray(cuts, dtype=np.float32))


@njit("float32[::1](float32[::1])", cache=True, nogil=True)
def _radix_sort(v):
    n = v.shape[0]
    src = np.empty(n, dtype=np.uint32)
    dst = np.empty(n, dtype=np.uint32)
    hist = np.zeros((3, 2048), dtype=np.int64)  # one pass counts all three digits
    for i in range(n):
        k = _key(v[i])
        src[i] = k
        hist[0, k & np.uint32(0x7FF)] += 1
        hist[1, (k >> np.uint32(11)) & np.uint32(0x7FF)] += 1
        hist[2, k >> np.uint32(22)] += 1
    pos = np.empty(2048, dtype=np.int64)
    for d in range(3):  # least significant digit first: 11, 11, then 10 bits
        shift = np.uint32(11 * d)
        h = hist[d]
        if h[(src[0] >> shift) & np.uint32(0x7FF)] == n:  # one digit value: order unchanged
            continue
        total = 0
        for b in range(2048):
            pos[b] = total
            total += h[b]
        for i in range(n):
            k = src[i]
            b = (k >> shift) & np.uint32(0x7FF)
            dst[pos[b]] = k
            pos[b] += 1
        src, dst = dst, src
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        out[i] = _unkey(src[i])
    return out


def sort(v: np.ndarray) -> np.ndarray:
    """``np.sort`` of a 1-D array; float32 values by an LSD radix sort (three passes over
    11-bit digits of the keys), several times faster than numpy's sort on CPUs where that is
    not vectorised. NaN sorts last."""
    v = np.asarray(v)
    if v.dtype != np.float32 or v.ndim != 1 or v.size == 0:
        return np.sort(v)
    return _radix_sort(np.ascontiguousarray(v))
