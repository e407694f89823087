"""From the tidy long table to the wide patient × feature matrix, with contrasts.

Each feature carries metadata (population, marker, statistic, condition, timepoint) so that
explanations can be summed per population or per marker. Contrasts:

- condition: ``stim-unstim`` = stimulated minus unstimulated (medians and fractions);
  frequencies and counts are taken from the unstimulated sample;
- timepoint: ``<on>-<baseline>`` = on-treatment minus baseline: a difference on the arcsinh
  scale for medians, of fractions for ``frac_pos``, and a log2 ratio for frequencies and counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from predictor.config import FeatureConfig

__all__ = ["build_matrix", "feature_name", "timepoint_change", "META_COLUMNS", "STAT_LABELS",
           "FREQUENCY_STATISTICS"]

META_COLUMNS = ["population", "marker", "statistic", "condition", "timepoint"]
#: Statistic code → its label in feature names.
STAT_LABELS = {
    "count": "count",
    "pct_parent": "% parent",
    "pct_live": "% live",
    "median": "median",
    "frac_pos": "frac+",
}
#: Statistics of population size (log2 ratios across timepoints, taken from unstim).
FREQUENCY_STATISTICS = ("count", "pct_parent", "pct_live")
_PSEUDO = {"count": 1.0, "pct_parent": 0.1, "pct_live": 0.01}


def timepoint_change(on, before, statistics):
    """On-treatment minus baseline, per statistic: a log2 ratio (with a small pseudo-count)
    for frequencies and counts, a difference for medians (arcsinh scale) and fractions.

    ``on`` and ``before`` are arrays (or scalars) of equal shape; ``statistics`` holds the
    statistic code of each column (or one code for all). Missing values stay missing.
    """
    on, before = np.asarray(on, dtype=float), np.asarray(before, dtype=float)
    stats = np.asarray(statistics, dtype=object)
    eps = np.vectorize(lambda code: _PSEUDO.get(code, 0.0), otypes=[float])(stats)
    is_freq = np.isin(stats, FREQUENCY_STATISTICS)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2((on + eps) / (before + eps))
    return np.where(is_freq, ratio, on - before)


def feature_name(
    population: str,
    marker: str,
    statistic: str,
    condition: str,
    timepoint: str,
    *,
    baseline: str | None = None,
) -> str:
    """Readable feature name, e.g. ``CD8 T | IFNg | frac+ | stim | Δweek6``.

    A timepoint contrast ``<on>-<baseline>`` is shown as ``Δ<on>``. Pass ``baseline`` when
    the labels may contain ``-`` themselves (``day-0``), so that the contrast is recognised by
    its baseline suffix rather than by the first ``-``.
    """
    parts = [population] + ([marker] if marker else []) + [STAT_LABELS.get(statistic, statistic)]
    parts.append(condition)
    if baseline is not None:
        suffix = f"-{baseline}"
        is_delta = timepoint.endswith(suffix) and len(timepoint) > len(suffix)
        parts.append("Δ" + timepoint[: -len(suffix)] if is_delta else timepoint)
    else:
        parts.append(timepoint if "-" not in timepoint else "Δ" + timepoint.split("-")[0])
    return " | ".join(parts)


def build_matrix(long: pd.DataFrame, cfg: FeatureConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide patient × feature matrix and its feature metadata.

    Parameters
    ----------
    long
        Tidy table with columns patient_id, timepoint, condition, population, marker,
        statistic, value.
    cfg
        Which timepoints and conditions are baseline / on-treatment / unstim / stim, and the
        mode (``baseline`` uses the baseline samples only).

    Returns
    -------
    X : DataFrame
        Index patient_id (sorted), one column per feature.
    meta : DataFrame
        Index = feature names (X's columns), columns ``META_COLUMNS``.
    """
    key = ["population", "marker", "statistic"]
    wide = long.pivot_table(
        index=["patient_id", "timepoint", "condition"], columns=key, values="value",
        aggfunc="first", dropna=False,
    )
    wide = wide.astype(float)
    freq = wide.columns.get_level_values("statistic").isin(FREQUENCY_STATISTICS)
    contrast = f"{cfg.stim}-{cfg.unstim}"

    def get(tp: str, cond: str) -> pd.DataFrame:
        try:
            return wide.xs((tp, cond), level=("timepoint", "condition"))
        except KeyError:
            return pd.DataFrame(index=pd.Index([], name="patient_id"), columns=wide.columns,
                                dtype=float)

    def per_timepoint(tp: str) -> pd.DataFrame:
        """Columns (population, marker, statistic, condition): unstim, stim and stim − unstim
        (the last two for marker statistics only), in the order of ``wide``'s columns."""
        unstim, stim = get(tp, cfg.unstim), get(tp, cfg.stim)
        marker_stats = wide.columns[~freq]
        parts = {
            cfg.unstim: unstim,
            cfg.stim: stim[marker_stats],
            contrast: stim[marker_stats] - unstim[marker_stats].reindex(stim.index),
        }
        out = pd.concat(parts, axis=1, names=["condition"])
        out.columns = out.columns.reorder_levels([1, 2, 3, 0])
        order = [(*col, c) for col, is_freq in zip(wide.columns, freq, strict=True)
                 for c in ((cfg.unstim,) if is_freq else (cfg.unstim, cfg.stim, contrast))]
        return out[pd.MultiIndex.from_tuples(order)]

    base = per_timepoint(cfg.baseline)
    blocks = {cfg.baseline: base}
    if cfg.mode == "on-treatment":
        on = per_timepoint(cfg.on_treatment)
        before = base.reindex(index=on.index, columns=on.columns)
        delta = timepoint_change(on.to_numpy(), before.to_numpy(), on.columns.get_level_values(2))
        blocks[f"{cfg.on_treatment}-{cfg.baseline}"] = pd.DataFrame(delta, index=on.index,
                                                                    columns=on.columns)
    meta_rows = []
    frames = []
    for tp, frame in blocks.items():
        names = [feature_name(pop, marker, stat, cond, tp, baseline=cfg.baseline)
                 for pop, marker, stat, cond in frame.columns]
        meta_rows += [(name, *col, tp) for name, col in zip(names, frame.columns, strict=True)]
        frames.append(frame.set_axis(names, axis=1))
    X = pd.concat(frames, axis=1)
    X.index.name = "patient_id"
    X = X.sort_index()
    meta = pd.DataFrame(meta_rows, columns=["feature", *META_COLUMNS]).set_index("feature")
    # Drop features that are missing for every patient (e.g. a population no sample has).
    keep = X.columns[X.notna().any(axis=0)]
    return X[keep], meta.loc[keep]
