"""SHAP explanations from XGBoost's native contributions, as tables, summed per group.

``booster.predict(..., pred_contribs=True)`` gives exactly the TreeSHAP values of
``shap.TreeExplainer`` (log-odds scale) and is the fast path; :func:`to_explanation` wraps
them in a ``shap.Explanation`` for shap's plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xgboost as xgb

__all__ = ["shap_values", "aggregate_shap", "top_drivers", "to_explanation", "describe_driver"]


def shap_values(booster: xgb.Booster, X: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """SHAP values (patients × features, log-odds) and the base value.

    ``X`` must hold the booster's features (columns in its order).
    """
    names = list(booster.feature_names or X.columns)
    dm = xgb.DMatrix(X[names].to_numpy(dtype=np.float32), missing=np.nan, feature_names=names)
    contrib = booster.predict(dm, pred_contribs=True)
    values = pd.DataFrame(contrib[:, :-1], index=X.index, columns=names)
    return values, float(contrib[0, -1]) if len(contrib) else float("nan")


def aggregate_shap(values: pd.DataFrame, meta: pd.DataFrame, *, by: str = "population") -> pd.DataFrame:
    """Sum SHAP values per group of features (per patient), e.g. per population or marker.

    Sums of signed SHAP values are exact (additivity), so a population's value is its total push
    on the patient's log-odds.
    """
    groups = meta.loc[values.columns, by].fillna("").replace("", "(frequency)" if by == "marker" else "-")
    return values.T.groupby(groups.to_numpy()).sum().T


def importance(values: pd.DataFrame) -> pd.Series:
    """Global importance: mean |SHAP| per column, largest first."""
    return values.abs().mean(axis=0).sort_values(ascending=False)


def top_drivers(values: pd.DataFrame, k: int = 3) -> list[list[tuple[str, float]]]:
    """Per patient, the ``k`` features with the largest |SHAP|, with their signed values."""
    out = []
    arr = values.to_numpy()
    names = np.array(values.columns)
    for row in arr:
        idx = np.argsort(-np.abs(row), kind="stable")[:k]
        out.append([(str(names[i]), float(row[i])) for i in idx])
    return out


def describe_driver(feature: str, value: float, shap: float) -> str:
    """Plain words: 'CD8 T | % live | unstim | Δweek6 = 1.2 raised the chance of benefit'."""
    verb = "raised" if shap > 0 else "lowered"
    shown = "missing" if value != value else f"{value:.3g}"
    return f"{feature} = {shown} {verb} the predicted chance of benefit (SHAP {shap:+.2f})"


def to_explanation(values: pd.DataFrame, base_value: float, X: pd.DataFrame, *, features: Sequence[str] | None = None):
    """A ``shap.Explanation`` for shap's plotting functions."""
    import shap

    cols = list(features or values.columns)
    return shap.Explanation(
        values=values[cols].to_numpy(),
        base_values=np.full(len(values), base_value),
        data=X[cols].to_numpy(dtype=float),
        feature_names=cols,
    )
