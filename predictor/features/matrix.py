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

__all__ = ["build_matrix", "feature_name", "META_COLUMNS", "STAT_LABELS", "FREQUENCY_STATISTICS"]

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
    blocks: dict[tuple[str, str, str, str, str], pd.Series] = {}

    def get(tp: str, cond: str) -> pd.DataFrame:
        try:
            return wide.xs((tp, cond), level=("timepoint", "condition"))
        except KeyError:
            return pd.DataFrame(index=pd.Index([], name="patient_id"), columns=wide.columns)

    def per_timepoint(tp: str) -> dict[tuple[str, str, str, str], pd.Series]:
        unstim, stim = get(tp, cfg.unstim), get(tp, cfg.stim)
        out: dict[tuple[str, str, str, str], pd.Series] = {}
        for col in wide.columns:
            pop, marker, stat = col
            if stat in FREQUENCY_STATISTICS:
                out[(pop, marker, stat, cfg.unstim)] = unstim[col]
            else:
                out[(pop, marker, stat, cfg.unstim)] = unstim[col]
                out[(pop, marker, stat, cfg.stim)] = stim[col]
                out[(pop, marker, stat, f"{cfg.stim}-{cfg.unstim}")] = stim[col] - unstim[col].reindex(stim.index)
        return out

    base = per_timepoint(cfg.baseline)
    for (pop, marker, stat, cond), s in base.items():
        blocks[(pop, marker, stat, cond, cfg.baseline)] = s
    if cfg.mode == "on-treatment":
        on = per_timepoint(cfg.on_treatment)
        delta = f"{cfg.on_treatment}-{cfg.baseline}"
        for k, s_on in on.items():
            s_base = base[k].reindex(s_on.index)
            stat = k[2]
            if stat in FREQUENCY_STATISTICS:
                eps = _PSEUDO[stat]
                d = np.log2((s_on + eps) / (s_base + eps))
            else:
                d = s_on - s_base
            blocks[(*k, delta)] = d
    meta_rows = []
    cols = {}
    for (pop, marker, stat, cond, tp), s in blocks.items():
        name = feature_name(pop, marker, stat, cond, tp, baseline=cfg.baseline)
        cols[name] = s.astype(float)
        meta_rows.append((name, pop, marker, stat, cond, tp))
    X = pd.DataFrame(cols)
    X.index.name = "patient_id"
    X = X.sort_index()
    meta = pd.DataFrame(meta_rows, columns=["feature", *META_COLUMNS]).set_index("feature")
    # Drop features that are missing for every patient (e.g. a population no sample has).
    keep = X.columns[X.notna().any(axis=0)]
    return X[keep], meta.loc[keep]
