"""Headline metrics with uncertainty: bootstrap confidence intervals over patients."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

__all__ = ["METRICS", "fast_auroc", "metric_table", "bootstrap_ci", "youden_threshold", "expected_calibration"]


def _bacc(y: np.ndarray, p: np.ndarray) -> float:
    pred = p >= 0.5
    pos = y == 1
    return float((pred[pos].mean() + (~pred[~pos]).mean()) / 2)


def fast_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC by the Mann–Whitney rank formula (ties count half); equals roc_auc_score."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": fast_auroc,
    "auprc": lambda y, p: float(average_precision_score(y, p)),
    "balanced_accuracy": _bacc,
    "brier": lambda y, p: float(np.mean((p - y) ** 2)),
}


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    fn: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    random_state: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(y, p)``, resampling patients (both classes kept)."""
    if n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(random_state)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        values[b] = fn(y[idx], p[idx])
    lo, hi = np.nanquantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def metric_table(
    y: np.ndarray, p: np.ndarray, *, n_boot: int = 1000, random_state: int = 0
) -> dict[str, dict[str, float]]:
    """Every metric of :data:`METRICS` with its 95% bootstrap CI."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    out = {}
    for name, fn in METRICS.items():
        lo, hi = bootstrap_ci(y, p, fn, n_boot=n_boot, random_state=random_state)
        out[name] = {"estimate": fn(y, p), "ci_low": lo, "ci_high": hi}
    return out


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity − 1 (Youden's J) on ``p``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    k = int(np.argmax(tpr - fpr))
    return float(min(max(thr[k], 0.0), 1.0))


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity on ``p`` is at least ``target``."""
    from sklearn.metrics import roc_curve

    # every threshold: dropping "intermediate" points could skip the highest one that qualifies
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target)
    return float(min(max(thr[ok[0]], 0.0), 1.0))


def expected_calibration(y: np.ndarray, p: np.ndarray, *, bins: int = 5) -> dict[str, list[float]]:
    """Reliability curve: mean predicted vs observed rate per quantile bin of ``p``."""
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    pred, obs, n = [], [], []
    for b in np.unique(which):
        m = which == b
        pred.append(float(p[m].mean()))
        obs.append(float(y[m].mean()))
        n.append(int(m.sum()))
    return {"predicted": pred, "observed": obs, "n": n}
