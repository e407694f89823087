"""Headline metrics with uncertainty: bootstrap confidence intervals over patients.

Binary outcomes: AUROC, AUPRC, balanced accuracy, Brier score. Survival outcomes: Harrell's
concordance index (C-index) of risk scores, vectorised over patient pairs, with a bootstrap
that reweights the pair matrix instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

__all__ = [
    "METRICS", "fast_auroc", "metric_table", "bootstrap_ci", "youden_threshold",
    "sensitivity_threshold", "expected_calibration", "comparable_pairs", "concordance_index",
    "univariate_cindex", "cindex_table", "binary_logloss",
]


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


def binary_logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean log-loss of probabilities ``p`` (clipped to [1e-6, 1 − 1e-6]) against 0/1 ``y``."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    y = np.asarray(y, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# ------------------------------------------------------------------------------ survival


def comparable_pairs(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Harrell's comparable pairs: ``A[i, j]`` is True when patient i is known to fail first.

    That is ``time[i] < time[j]`` with an event at ``time[i]``, or equal times with an event for
    i and censoring for j (the usual convention: censoring happens after a tied event). Two
    events at the same time, or a censored i, make no comparable pair.
    """
    t = np.asarray(time, dtype=float)
    e = np.asarray(event).astype(bool)
    earlier = t[:, None] < t[None, :]
    tied = (t[:, None] == t[None, :]) & ~e[None, :]
    return e[:, None] & (earlier | tied)


def _concordance_matrix(risk: np.ndarray) -> np.ndarray:
    """``S[i, j]`` = 1 if risk[i] > risk[j], ½ if equal, 0 otherwise."""
    r = np.asarray(risk, dtype=float)
    return (r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of risk scores (higher risk = earlier event); ties in risk count ½.

    The share of comparable pairs (:func:`comparable_pairs`) whose earlier-failing patient has
    the higher risk. NaN when no pair is comparable (no event).
    """
    a = comparable_pairs(time, event)
    n = a.sum()
    if n == 0:
        return float("nan")
    return float((a * _concordance_matrix(risk)).sum() / n)


def univariate_cindex(X: np.ndarray, time: np.ndarray, event: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """C-index of every column of ``X`` used as a risk score (missing values at the column median)."""
    X = np.asarray(X, dtype=float)
    miss = np.isnan(X)
    if miss.any():
        with np.errstate(all="ignore"):
            med = np.nanmedian(np.where(miss.all(axis=0), 0.0, X), axis=0)
        X = np.where(miss, med, X)
    i, j = np.nonzero(comparable_pairs(time, event))
    if i.size == 0:
        return np.full(X.shape[1], np.nan)
    total = np.zeros(X.shape[1])
    for s in range(0, i.size, chunk):
        a, b = X[i[s : s + chunk]], X[j[s : s + chunk]]
        total += (a > b).sum(axis=0) + 0.5 * (a == b).sum(axis=0)
    return total / i.size


def cindex_table(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    random_state: int = 0,
) -> dict[str, dict[str, float]]:
    """C-index with its percentile-bootstrap 95% CI over patients, as ``{"cindex": {...}}``.

    A bootstrap resample is a vector of patient counts ``c``; its C-index is
    ``cᵀ(A∘S)c / cᵀAc`` with ``A`` the comparable pairs and ``S`` the concordance of the full
    cohort (copies of one patient never form a comparable pair), so all resamples cost two
    matrix products instead of one pair matrix each.
    """
    a = comparable_pairs(time, event).astype(float)
    est = concordance_index(time, event, risk)
    lo = hi = float("nan")
    if n_boot > 0 and a.any():
        rng = np.random.default_rng(random_state)
        n = len(a)
        idx = rng.integers(0, n, size=(n_boot, n))
        counts = np.zeros((n_boot, n))
        np.add.at(counts, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1.0)
        num = ((counts @ (a * _concordance_matrix(risk))) * counts).sum(axis=1)
        den = ((counts @ a) * counts).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = num / den
        lo, hi = (float(v) for v in np.nanquantile(values, [alpha / 2, 1 - alpha / 2]))
    return {"cindex": {"estimate": est, "ci_low": lo, "ci_high": hi}}
