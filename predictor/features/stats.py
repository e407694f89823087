"""Per-sample statistics of gated populations: the rows of the tidy long feature table.

Medians, quantiles and fractions positive come from a compiled radix selection over each
population's cells (:mod:`predictor._kernels`), exact as a sort. Order statistics and
thresholds commute with the (monotone) arcsinh transform, so the cells may also be given raw,
with their cofactors: nothing but the few order statistics that become features is ever
transformed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from predictor._kernels import order_statistics
from predictor.populations.gating import Membership, membership_masks

__all__ = ["sample_statistics", "positivity_thresholds", "reference_statistics"]

# Statistics summarised from each population's sorted values (the others come from the
# population table).
_SORTED_STATS = ("median", "frac_pos")

# A threshold per marker for all populations, or per (population, marker).
Thresholds = float | Mapping[str, float] | Mapping[tuple[str, str], float]


@dataclass(frozen=True)
class _Summary:
    """Per population × marker (arcsinh scale): medians, fractions positive, a quantile."""

    populations: list[str]
    median: np.ndarray
    frac_pos: np.ndarray
    quantile: np.ndarray


def _threshold_matrix(thr: Thresholds, populations: Sequence[str], markers: Sequence[str]
                      ) -> np.ndarray:
    if isinstance(thr, Mapping):
        by_pair = any(isinstance(k, tuple) for k in thr)
        return np.array([[thr.get((p, m) if by_pair else m, np.nan) for m in markers]
                         for p in populations], dtype=np.float64).reshape(len(populations),
                                                                          len(markers))
    return np.full((len(populations), len(markers)), float(thr))


def _float32_below(t: np.ndarray) -> np.ndarray:
    """The largest float32 ≤ t: for float32 values, ``x > t`` ⇔ ``x > _float32_below(t)``,
    and comparing in float32 spares casting every value to float64."""
    t32 = np.asarray(t, dtype=np.float64).astype(np.float32)
    with np.errstate(invalid="ignore"):
        over = t32.astype(np.float64) > t
    return np.where(over, np.nextafter(t32, np.float32(-np.inf)), t32)


def _summarise(
    cells: pd.DataFrame,
    membership: Membership,
    markers: Sequence[str],
    *,
    min_cells: int,
    frac_pos_threshold: Thresholds | None = np.nan,
    quantile: float | None = None,
    cofactors: Mapping[str, float] | None = None,
) -> _Summary:
    """Medians, fractions positive and a quantile per population × marker.

    ``frac_pos_threshold=None`` with a ``quantile`` cuts each population at its own quantile
    (an unstimulated sample gated by itself), from the same selection.
    """
    masks = membership_masks(membership)
    pops = list(masks)
    shape = (len(pops), len(markers))
    median, frac, qv = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    if not markers:
        return _Summary(pops, median, frac, qv)
    # Channel-major copy: one contiguous row per marker, so gathering a population is cheap.
    x = np.stack([np.asarray(cells[m].to_numpy(), dtype=np.float32) for m in markers])
    cof = np.array([cofactors[m] for m in markers]) if cofactors is not None else None

    def scale(v: np.ndarray) -> np.ndarray:  # raw order statistics → arcsinh scale (float64)
        v = v.astype(np.float64)
        return np.arcsinh(v / cof) if cof is not None else v

    own = frac_pos_threshold is None
    if own and quantile is None:
        raise ValueError("frac_pos_threshold=None needs a quantile to cut at")

    def raw_cut(thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # same cut, raw scale
        raw = cof * np.sinh(thr) if cof is not None else thr
        return raw, _float32_below(raw)

    raw_thr, cut32 = raw_cut(_threshold_matrix(np.nan if own else frac_pos_threshold, pops,
                                               markers))
    for i, p in enumerate(pops):
        at = np.flatnonzero(masks[p])
        n = len(at)
        if n < max(min_cells, 1):
            continue
        ranks = [(n - 1) // 2, n // 2]
        if quantile is not None:
            pos = quantile * (n - 1)  # linear interpolation, as np.quantile
            a = int(np.floor(pos))
            ranks += [a, min(a + 1, n - 1)]
        s, above = order_statistics(x, at, np.array(ranks), cut32[i])
        median[i] = (scale(s[:, 0]) + scale(s[:, 1])) / 2
        if quantile is not None:
            va, vb = scale(s[:, 2]), scale(s[:, 3])
            qv[i] = va + (pos - a) * (vb - va)
            if own:  # cut at its own quantile: count again, above it
                raw_thr[i], cut32[i] = raw_cut(qv[i])
                _, above = order_statistics(x, at, np.array([], dtype=np.int64), cut32[i])
        has = ~np.isnan(raw_thr[i])
        frac[i, has] = above[has] / n
    return _Summary(pops, median, frac, qv)


def sample_statistics(
    cells: pd.DataFrame,
    membership: Membership,
    populations: pd.DataFrame,
    *,
    markers: Sequence[str],
    statistics: Sequence[str],
    frac_pos_threshold: Thresholds,
    min_cells: int,
    cofactors: Mapping[str, float] | None = None,
    median_markers: Sequence[str] | None = None,
    frac_pos_markers: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Statistics of one sample, one row per (population, marker, statistic).

    Parameters
    ----------
    cells
        Events of the sample, columns = markers: arcsinh-transformed, or raw when
        ``cofactors`` is given.
    membership
        Boolean cell × population membership (:func:`~predictor.populations.apply_gating`),
        or population → boolean mask (:func:`~predictor.populations.gating.gate_masks`).
    populations
        The sample's population table (count, pct_parent, pct_live per population).
    markers
        Markers whose median and fraction positive are computed.
    statistics
        Any of ``count``, ``pct_parent``, ``pct_live``, ``median``, ``frac_pos``.
    frac_pos_threshold
        Positivity threshold (arcsinh units): one for all, one per marker, or one per
        ``(population, marker)`` pair (e.g. from :func:`positivity_thresholds` of the same
        patient's unstimulated sample). Pairs without a threshold get NaN fractions.
    min_cells
        Populations with fewer cells give NaN medians and fractions, never numbers from a
        handful of cells (frequencies and counts are still reported).
    cofactors
        Marker → arcsinh cofactor when ``cells`` are raw; medians and thresholds are still on
        the arcsinh scale (the same numbers, without transforming every event).
    median_markers, frac_pos_markers
        The markers (of ``markers``) that get a median, and a fraction positive; by default
        all of them.
    """
    summary = None
    if any(s in statistics for s in _SORTED_STATS):
        summary = _summarise(cells, membership, markers, min_cells=min_cells,
                             frac_pos_threshold=frac_pos_threshold, cofactors=cofactors)
    return _statistics_frame(populations, summary, markers, statistics,
                             _subsets(markers, median_markers, frac_pos_markers))


def reference_statistics(
    cells: pd.DataFrame,
    membership: Membership,
    populations: pd.DataFrame,
    *,
    markers: Sequence[str],
    statistics: Sequence[str],
    quantile: float,
    min_cells: int,
    cofactors: Mapping[str, float] | None = None,
    median_markers: Sequence[str] | None = None,
    frac_pos_markers: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, str], float]]:
    """Statistics of an unstimulated sample gated by its own quantiles, and those gates
    (of the ``frac_pos_markers``).

    The same as :func:`positivity_thresholds` followed by :func:`sample_statistics` with
    them, from one sort of each population's values instead of two.
    """
    summary = _summarise(cells, membership, markers, min_cells=min_cells,
                         frac_pos_threshold=None, quantile=quantile, cofactors=cofactors)
    keep = _subsets(markers, median_markers, frac_pos_markers)
    return (_statistics_frame(populations, summary, markers, statistics, keep),
            _thresholds(summary, markers, keep["frac_pos"]))


def _subsets(markers: Sequence[str], median: Sequence[str] | None,
             frac_pos: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Statistic → indices (into ``markers``) of the markers that get it."""
    def idx(chosen: Sequence[str] | None) -> np.ndarray:
        wanted = set(markers if chosen is None else chosen)
        return np.array([j for j, m in enumerate(markers) if m in wanted], dtype=np.intp)

    return {"median": idx(median), "frac_pos": idx(frac_pos)}


def _statistics_frame(populations: pd.DataFrame, summary: _Summary | None,
                      markers: Sequence[str], statistics: Sequence[str],
                      keep: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The long rows: counts and frequencies (one block per statistic, populations in table
    order), then per population its medians and its fractions positive, marker by marker
    (the markers ``keep`` gives per statistic; all by default)."""
    keep = keep or _subsets(markers, None, None)
    pop = populations.set_index("population")
    names, marks, stats, values = [], [], [], []
    for stat in ("count", "pct_parent", "pct_live"):
        if stat in statistics:
            names.append(pop.index.to_numpy(dtype=object))
            marks.append(np.full(len(pop), "", dtype=object))
            stats.append(np.full(len(pop), stat, dtype=object))
            values.append(pop[stat].to_numpy(dtype=np.float64))
    wanted = [s for s in _SORTED_STATS if s in statistics and len(keep[s])]
    if wanted:
        at = {p: i for i, p in enumerate(pop.index)}  # table order; others after, as given
        order = sorted(range(len(summary.populations)),
                       key=lambda i: at.get(summary.populations[i], len(at)))
        n_p = len(order)
        # One population's rows: each statistic in turn, over its markers.
        row_markers = np.concatenate([np.asarray(markers, dtype=object)[keep[s]] for s in wanted])
        row_stats = np.concatenate([np.full(len(keep[s]), s, dtype=object) for s in wanted])
        names.append(np.repeat(np.asarray(summary.populations, dtype=object)[order],
                               len(row_markers)))
        marks.append(np.tile(row_markers, n_p))
        stats.append(np.tile(row_stats, n_p))
        per_stat = [getattr(summary, s)[order][:, keep[s]] for s in wanted]  # n_p × its markers
        values.append(np.concatenate(per_stat, axis=1).reshape(-1).astype(np.float64))
    if not names:
        return pd.DataFrame(columns=["population", "marker", "statistic", "value"])
    return pd.DataFrame({"population": np.concatenate(names), "marker": np.concatenate(marks),
                         "statistic": np.concatenate(stats), "value": np.concatenate(values)})


def positivity_thresholds(
    cells: pd.DataFrame,
    membership: Membership,
    *,
    markers: Sequence[str],
    quantile: float,
    min_cells: int,
    cofactors: Mapping[str, float] | None = None,
) -> dict[tuple[str, str], float]:
    """Per (population, marker), the ``quantile`` of the cells' values (arcsinh scale).

    Taken on an unstimulated sample, these are the positivity gates for the same patient's
    stimulated sample at that timepoint. Populations under ``min_cells`` give no threshold.
    """
    summary = _summarise(cells, membership, markers, min_cells=min_cells, quantile=quantile,
                         cofactors=cofactors)
    return _thresholds(summary, markers)


def _thresholds(summary: _Summary, markers: Sequence[str], keep: np.ndarray | None = None
                ) -> dict[tuple[str, str], float]:
    cols = range(len(markers)) if keep is None else keep
    return {
        (p, markers[j]): float(summary.quantile[i, j])
        for i, p in enumerate(summary.populations)
        for j in cols
        if not np.isnan(summary.quantile[i, j])
    }
