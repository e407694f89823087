"""Per-sample statistics of gated populations: the rows of the tidy long feature table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["sample_statistics"]


def sample_statistics(
    cells: pd.DataFrame,
    membership: pd.DataFrame,
    populations: pd.DataFrame,
    *,
    markers: Sequence[str],
    statistics: Sequence[str],
    frac_pos_threshold: float | dict[str, float],
    min_cells: int,
) -> pd.DataFrame:
    """Statistics of one sample, one row per (population, marker, statistic).

    Parameters
    ----------
    cells
        Transformed (arcsinh) events of the sample, columns = markers.
    membership
        Boolean cell × population membership (:func:`~predictor.populations.apply_gating`).
    populations
        The sample's population table (count, pct_parent, pct_live per population).
    markers
        Markers whose median and fraction positive are computed.
    statistics
        Any of ``count``, ``pct_parent``, ``pct_live``, ``median``, ``frac_pos``.
    frac_pos_threshold
        Positivity threshold (arcsinh units), one for all markers or per marker (markers
        without a threshold get NaN fractions).
    min_cells
        Populations with fewer cells give NaN medians and fractions, never numbers from a
        handful of cells (frequencies and counts are still reported).
    """
    rows: list[tuple[str, str, str, float]] = []
    pop = populations.set_index("population")
    for stat in ("count", "pct_parent", "pct_live"):
        if stat in statistics:
            rows += [(p, "", stat, float(pop.at[p, stat])) for p in pop.index]
    want_median = "median" in statistics
    want_frac = "frac_pos" in statistics
    if want_median or want_frac:
        x = cells[list(markers)].to_numpy()
        if isinstance(frac_pos_threshold, dict):
            thr = np.array([frac_pos_threshold.get(m, np.nan) for m in markers])
        else:
            thr = np.full(len(markers), float(frac_pos_threshold))
        for p in membership.columns:
            mask = membership[p].to_numpy()
            n = int(mask.sum())
            if n >= min_cells:
                sub = x[mask]
                med = np.median(sub, axis=0)
                frac = np.where(np.isnan(thr), np.nan, (sub > thr).mean(axis=0))
            else:
                med = frac = np.full(len(markers), np.nan)
            if want_median:
                rows += [(p, m, "median", float(v)) for m, v in zip(markers, med, strict=True)]
            if want_frac:
                rows += [(p, m, "frac_pos", float(v)) for m, v in zip(markers, frac, strict=True)]
    return pd.DataFrame(rows, columns=["population", "marker", "statistic", "value"])
