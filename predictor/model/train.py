"""Honest evaluation and the final model: patient-grouped nested CV, uncertainty, baselines.

- Outer loop: repeated stratified k-fold grouped by patient (no patient on both sides).
  Out-of-fold (OOF) predictions averaged over repeats give the headline metrics, each with a
  patient-bootstrap 95% CI.
- Inner loop (only with a ``[model.search]`` grid): on each outer training fold an inner
  patient-grouped stratified k-fold scores every setting of the grid by its pooled inner OOF
  AUROC (or log-loss; C-index for survival); the outer test fold is predicted by a refit on
  the whole outer training fold with the best setting. The final model's setting is chosen by
  the same inner procedure on all patients. The outer test patients never inform a choice.
- Feature filtering (top-k univariate AUROC or C-index) happens inside every training set it
  serves: outer training folds, inner training folds, all patients for the final model.
- Clinical covariates (``covariates``, e.g. the treatment arm) are model inputs that the filter
  always keeps (top-k of the other columns plus every covariate), and the covariates are fitted
  first: every booster starts with ``COVARIATE_ROUNDS`` trees that may split on the covariates
  only, then grows ``n_estimators`` trees on all its inputs. This is boosting from a
  covariate-only model (an offset), the way a trial analysis adjusts for the arm: the
  cytometry features explain what the covariates do not. Without it the trees ignore the arm
  whenever on-treatment features separate the arms as well (every IL-7 target does) and carry
  more.
- Permutation test: the first repeat's CV rerun on permuted outcomes (folds re-stratified on
  each); p = (1 + #null ≥ observed) / (1 + permutations). Without a grid the statistic is the
  headline's repeat 0. With a grid, ``permutation_test = "fixed"`` (default) reruns the CV of
  the ``[model]`` settings without tuning on the real and the permuted outcomes — a valid test
  that the outcome is unrelated to the features, but not of the tuned procedure's own AUROC;
  ``"nested"`` reruns the whole nested procedure, inner tuning included, on every permutation.
  The payload's ``procedure`` and ``tests`` say which. With ``strata`` (the levels of the
  discrete covariates) the outcome is permuted within each stratum only: a conditional test
  of H0 "the outcome is independent of the features given the covariates", so that a covariate
  that predicts the outcome on its own (the arm) does not make the p-value small by itself.
- Baselines on the very same folds: elastic-net logistic regression (Citrus-style, binary only)
  and the best single feature chosen inside each training fold (covariates excluded); with
  covariates also ``covariates_only``: the covariates' own trees alone (the start of every
  booster), which shows what the features add to them.
- Out-of-fold SHAP: each test patient's SHAP values (margin scale: log-odds, or log hazard
  ratio) from its fold's booster on the full feature space (features not selected in that fold
  are 0), averaged over repeats; and per fold the mean |SHAP| ranking of the selected features.
- Binary outcome: Platt calibration fitted on OOF predictions; decision threshold by Youden's J
  (or a sensitivity target) on the calibrated OOF predictions.
- Survival outcome (``time``, ``event``): XGBoost ``survival:cox`` (label = time, negated for
  censored patients), Harrell's C-index of OOF risk scores (each fold's log hazard ratios
  centred on the median of its own training patients, so folds pool on one scale). The
  threshold is the median risk (hazard ratio) of the training patients under the final model:
  flagged = higher risk than the typical training patient.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from joblib import Parallel, delayed
from scipy.stats import rankdata
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from predictor.config import SEARCHABLE, CVConfig, ModelConfig
from predictor.errors import TrainingError
from predictor.model.metrics import (
    binary_logloss,
    cindex_table,
    concordance_index,
    expected_calibration,
    fast_auroc,
    metric_table,
    sensitivity_threshold,
    univariate_cindex,
    youden_threshold,
)

__all__ = [
    "Outcome",
    "TrainingResult",
    "train_model",
    "xgb_params",
    "calibrate",
    "check_outcome",
    "check_survival",
    "make_folds",
    "rank_features",
    "select_features",
    "univariate_auroc",
]

Fold = tuple[int, int, np.ndarray, np.ndarray]  # repeat, fold, train idx, test idx
KINDS = ("binary", "survival")
#: Trees fitted on the covariates alone before the others (learning rate COVARIATE_ETA, depth 2).
COVARIATE_ROUNDS = 20
COVARIATE_ETA = 0.5


# ------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    """The patients' outcome, in the row order of the feature matrix.

    ``y`` is the 0/1 response (binary) or the event indicator (survival, with ``time``).
    """

    kind: str
    y: np.ndarray
    time: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return "auroc" if self.kind == "binary" else "cindex"

    def take(self, idx: np.ndarray) -> Outcome:
        return Outcome(self.kind, self.y[idx], None if self.time is None else self.time[idx])

    def permuted(self, seed: int, strata: np.ndarray | None = None) -> Outcome:
        """Outcomes shuffled between patients (time and event move together).

        With ``strata`` (one label per patient) only within patients of the same label.
        """
        rng = np.random.default_rng(seed)
        if strata is None:
            return self.take(rng.permutation(len(self.y)))
        order = np.arange(len(self.y))
        for label in np.unique(strata):
            members = np.flatnonzero(strata == label)
            order[members] = members[rng.permutation(members.size)]
        return self.take(order)

    def label(self) -> np.ndarray:
        """XGBoost's label: 0/1, or survival time negated for censored patients."""
        if self.kind == "binary":
            return self.y.astype(np.float32)
        return np.where(self.y == 1, self.time, -self.time).astype(np.float32)

    def score(self, pred: np.ndarray) -> float:
        """AUROC of probabilities, or C-index of risk scores."""
        if self.kind == "binary":
            return fast_auroc(self.y, pred)
        return concordance_index(self.time, self.y, pred)

    def univariate(self, X: np.ndarray) -> np.ndarray:
        """Per column, distance of its univariate AUROC / C-index from 0.5 (chance)."""
        if self.kind == "binary":
            return np.abs(univariate_auroc(X, self.y) - 0.5)
        return np.abs(univariate_cindex(X, self.time, self.y) - 0.5)


def _as_outcome(y: np.ndarray | Outcome) -> Outcome:
    return y if isinstance(y, Outcome) else Outcome("binary", np.asarray(y).astype(int))


def check_outcome(y: pd.Series, *, where: str = "the outcome", folds: int = 2) -> np.ndarray:
    """Binary 0/1 outcome with both classes, enough of each for ``folds`` folds."""
    values = pd.to_numeric(y, errors="coerce")
    if values.isna().any():
        bad = list(y.index[values.isna()][:5])
        raise TrainingError(f"{where}: missing or non-numeric outcome for patient(s) {bad}.")
    if not values.isin([0, 1]).all():
        bad = sorted(set(values[~values.isin([0, 1])].tolist()))[:5]
        raise TrainingError(f"{where}: a binary outcome must be 0/1. Got values {bad}.")
    arr = values.to_numpy().astype(int)
    classes, counts = np.unique(arr, return_counts=True)
    if len(classes) < 2:
        raise TrainingError(
            f"{where}: every patient has outcome {classes[0]}; a model needs both responders (1) "
            "and non-responders (0). Check the clinical table's outcome column."
        )
    if counts.min() < folds:
        raise TrainingError(
            f"{where}: only {counts.min()} patient(s) in the smaller class; the {folds}-fold "
            f"cross-validation needs at least {folds}. Lower [cv] folds or add patients."
        )
    return arr


def check_survival(
    y: pd.DataFrame, *, where: str = "the outcome", folds: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Survival outcome: columns ``time`` (> 0) and ``event`` (0/1), ≥ ``folds`` events."""
    if not isinstance(y, pd.DataFrame) or not {"time", "event"} <= set(y.columns):
        raise TrainingError(
            f"{where}: a survival outcome needs the columns 'time' and 'event'. Got "
            f"{list(y.columns) if isinstance(y, pd.DataFrame) else type(y).__name__}."
        )
    t = pd.to_numeric(y["time"], errors="coerce")
    e = pd.to_numeric(y["event"], errors="coerce")
    bad = list(y.index[t.isna() | e.isna()][:5])
    if bad:
        raise TrainingError(f"{where}: missing or non-numeric time/event for patient(s) {bad}.")
    if not (np.isfinite(t) & (t > 0)).all():
        bad = list(y.index[~(np.isfinite(t) & (t > 0))][:5])
        raise TrainingError(f"{where}: survival times must be finite and > 0; not for {bad}.")
    if not e.isin([0, 1]).all():
        raise TrainingError(f"{where}: 'event' must be 0 (censored) or 1 (event).")
    n_events = int(e.sum())
    if n_events < max(folds, 2):
        raise TrainingError(
            f"{where}: only {n_events} event(s); the {folds}-fold cross-validation needs at least "
            f"{max(folds, 2)}. Lower [cv] folds or add patients."
        )
    return t.to_numpy(dtype=float), e.to_numpy().astype(int)


# ------------------------------------------------------------------------------ pieces


def xgb_params(
    cfg: ModelConfig, seed: int, *, nthread: int = 1, kind: str = "binary"
) -> dict[str, Any]:
    objective, metric = ("binary:logistic", "logloss") if kind == "binary" else ("survival:cox", "cox-nloglik")
    return {
        "objective": objective,
        "eval_metric": metric,
        "tree_method": "hist",
        "max_bin": 32,
        "max_depth": cfg.max_depth,
        "eta": cfg.learning_rate,
        "subsample": cfg.subsample,
        "colsample_bytree": cfg.colsample_bytree,
        "min_child_weight": cfg.min_child_weight,
        "lambda": cfg.reg_lambda,
        "seed": seed,
        "nthread": nthread,
        "verbosity": 0,
    }


def _impute_median(X: np.ndarray) -> np.ndarray:
    """Missing values at their column's median (0 for an all-missing column)."""
    miss = np.isnan(X)
    cols = np.flatnonzero(miss.any(axis=0))
    if cols.size == 0:
        return X
    sub = X[:, cols]
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(miss[:, cols].all(axis=0), 0.0, sub), axis=0)
    out = X.copy()
    out[:, cols] = np.where(np.isnan(sub), med, sub)
    return out


def univariate_auroc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``X`` against ``y`` (missing values at the column median)."""
    # float64: float32 ranks round the sums, and ties between equally strong features would
    # then be broken by rounding noise instead of by column order
    ranks = rankdata(np.asarray(_impute_median(X), dtype=np.float64), axis=0)
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def rank_features(X: np.ndarray, y: np.ndarray | Outcome, *, keep: np.ndarray | None = None) -> np.ndarray:
    """Column indices, strongest univariate association first (|AUROC − ½| or |C − ½|).

    ``keep`` (column indices, e.g. clinical covariates) come first of all, in column order.
    """
    order = np.argsort(-_as_outcome(y).univariate(X), kind="stable")
    if keep is None or not len(keep):
        return order
    keep = np.sort(np.asarray(keep, dtype=int))
    return np.concatenate([keep, order[~np.isin(order, keep)]])


def _top(order: np.ndarray, k: int, n_keep: int = 0) -> np.ndarray:
    """The first ``k`` ranked columns after the ``n_keep`` kept ones (sorted; all if k ≤ 0)."""
    if k <= 0 or k + n_keep >= order.size:
        return np.arange(order.size)
    return np.sort(order[: k + n_keep])


def select_features(X: np.ndarray, y: np.ndarray | Outcome, k: int, *,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` columns most associated with the outcome, plus every ``keep`` column.

    Sorted; all columns if k ≤ 0. Always called on training patients only: outer or inner
    training folds, or all patients for the final model.
    """
    n_keep = 0 if keep is None else len(keep)
    if k <= 0 or k + n_keep >= X.shape[1]:
        return np.arange(X.shape[1])
    return _top(rank_features(X, y, keep=keep), k, n_keep)


def _dmatrix(X: np.ndarray, label: np.ndarray | None = None) -> xgb.DMatrix:
    # ``nthread``: the default (all cores) oversubscribes the worker processes and costs ~20 ms
    # per small matrix on a busy machine, which dominates the permutation test.
    return xgb.DMatrix(X, label=label, missing=np.nan, nthread=1)


def _covariate_start(X: np.ndarray, out: Outcome, cfg: ModelConfig, seed: int,
                     pos: np.ndarray | None, nthread: int = 1) -> xgb.Booster | None:
    """The covariates' own trees: ``COVARIATE_ROUNDS`` rounds that see only the columns ``pos``.

    The other columns are hidden as missing values, so no tree can split on them; boosting
    then continues from this model on all columns. ``None`` without covariates. Its settings
    are fixed (depth 2, learning rate ``COVARIATE_ETA``, no subsampling, the ``[model]``
    regularisation), so a tuning grid does not change it.
    """
    if pos is None or not len(pos):
        return None
    masked = np.full_like(X, np.nan)
    masked[:, pos] = X[:, pos]
    params = {**xgb_params(cfg, seed, nthread=nthread, kind=out.kind), "eta": COVARIATE_ETA,
              "max_depth": 2, "subsample": 1.0, "colsample_bytree": 1.0}
    return xgb.train(params, _dmatrix(masked, out.label()), num_boost_round=COVARIATE_ROUNDS)


def _fit(X: np.ndarray, out: Outcome, cfg: ModelConfig, seed: int, nthread: int = 1,
         pos: np.ndarray | None = None) -> xgb.Booster:
    """XGBoost on (X, out); with covariate columns ``pos`` it starts from their own trees."""
    params = xgb_params(cfg, seed, nthread=nthread, kind=out.kind)
    start = _covariate_start(X, out, cfg, seed, pos, nthread)
    return xgb.train(params, _dmatrix(X, out.label()), num_boost_round=cfg.n_estimators,
                     xgb_model=start)


def _positions(cols: np.ndarray, keep: np.ndarray | None) -> np.ndarray | None:
    """Where the ``keep`` columns sit among the selected ``cols``."""
    return None if keep is None else np.flatnonzero(np.isin(cols, keep))


def calibrate(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt scaling of probabilities: sigmoid(a · logit(p) + b)."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(a * np.log(p / (1 - p)) + b)))


def make_folds(y: np.ndarray, groups: np.ndarray, cv: CVConfig, seed: int) -> list[Fold]:
    """Repeated stratified k-fold grouped by patient; repeat r shuffles with ``seed + r``.

    Stratified on ``y`` (response, or event for survival) unless a class has fewer members
    than folds, then only grouped.
    """
    _, counts = np.unique(y, return_counts=True)
    strata = y if counts.min() >= cv.folds else np.zeros_like(y)
    folds: list[Fold] = []
    for r in range(cv.repeats):
        splitter = StratifiedGroupKFold(n_splits=cv.folds, shuffle=True, random_state=seed + r)
        for k, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), strata, groups)):
            folds.append((r, k, tr, te))
    return folds


def _settings(cfg: ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SEARCHABLE}


# ------------------------------------------------------------------------------ inner loop


def _tune(X: np.ndarray, out: Outcome, cfg: ModelConfig, seed: int,
          keep: np.ndarray | None = None) -> tuple[dict[str, Any], float, pd.DataFrame]:
    """Pick the setting of ``cfg.search`` with the best pooled inner-CV score on (X, out).

    Every setting sharing all but ``n_estimators`` is one fit with the most trees, read at each
    ``n_estimators`` by ``iteration_range`` (the first trees do not depend on later ones).
    Features are ranked once per inner training fold and cut at each ``max_features`` (the
    ``keep`` columns always stay, and their own trees come first, as in :func:`_fit`).
    Returns the chosen setting, its inner score and the table of all settings' scores.
    """
    s = cfg.search
    assert s is not None
    grid = s.grid
    keys = list(SEARCHABLE)
    values = [grid.get(k, (getattr(cfg, k),)) for k in keys]
    settings = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    groups: dict[tuple, list[int]] = {}
    for i, st in enumerate(settings):
        groups.setdefault(tuple((k, v) for k, v in st.items() if k != "n_estimators"), []).append(i)
    n = len(out.y)
    margin = out.kind == "survival"
    preds = np.full((len(settings), n), np.nan)
    inner = make_folds(out.y, np.arange(n), CVConfig(folds=s.inner_folds, repeats=1), seed)
    for _, _, itr, ite in inner:
        sub = out.take(itr)
        order = rank_features(X[itr], sub, keep=keep)
        mats: dict[int, tuple[xgb.DMatrix, xgb.DMatrix, xgb.Booster | None]] = {}
        for fit_key, idxs in groups.items():
            st = dict(fit_key)
            k = st["max_features"]
            if k not in mats:
                cols = _top(order, k, 0 if keep is None else len(keep))
                start = _covariate_start(X[itr][:, cols], sub, cfg, seed, _positions(cols, keep))
                mats[k] = (_dmatrix(X[itr][:, cols], sub.label()), _dmatrix(X[ite][:, cols]), start)
            dtr, dte, start = mats[k]
            first = 0 if start is None else start.num_boosted_rounds()
            rounds = max(settings[i]["n_estimators"] for i in idxs)
            params = xgb_params(replace(cfg, **st), seed, kind=out.kind)
            booster = xgb.train(params, dtr, num_boost_round=rounds, xgb_model=start)
            for i in idxs:
                it = (0, first + settings[i]["n_estimators"])
                p = booster.predict(dte, iteration_range=it, output_margin=margin)
                if margin:
                    p = p - np.median(booster.predict(dtr, iteration_range=it, output_margin=True))
                preds[i, ite] = p
    metric = out.metric if s.metric == "auto" else s.metric
    table = pd.DataFrame(settings)[list(grid)]
    if out.kind == "binary":
        auroc = np.array([fast_auroc(out.y, p) for p in preds])
        logloss = np.array([binary_logloss(out.y, p) for p in preds])
        table["inner_auroc"], table["inner_logloss"] = auroc, logloss
        # ties broken by the other metric, then by grid order
        key = (auroc, -logloss) if metric == "auroc" else (-logloss, auroc)
        chosen_score = auroc if metric == "auroc" else logloss
    else:
        cidx = np.array([concordance_index(out.time, out.y, p) for p in preds])
        table["inner_cindex"] = cidx
        key = (cidx, np.zeros_like(cidx))
        chosen_score = cidx
    best = max(range(len(settings)), key=lambda i: (key[0][i], key[1][i], -i))
    table["chosen"] = np.arange(len(settings)) == best
    return {k: settings[best][k] for k in grid}, float(chosen_score[best]), table


# ------------------------------------------------------------------------------ outer loop


@dataclass
class _FoldFit:
    pred: np.ndarray  # test patients: probability, or centred log hazard ratio
    cols: np.ndarray  # selected feature indices
    contribs: np.ndarray | None  # test SHAP values (+ bias column), margin scale
    chosen: dict[str, Any]  # tuned settings (empty without a grid)
    inner_score: float


def _fit_fold(
    X: np.ndarray, out: Outcome, tr: np.ndarray, te: np.ndarray, cfg: ModelConfig, seed: int,
    *, tune: bool, shap: bool, keep: np.ndarray | None = None,
) -> _FoldFit:
    sub = out.take(tr)
    chosen: dict[str, Any] = {}
    inner = float("nan")
    fold_cfg = cfg
    if tune:
        chosen, inner, _ = _tune(X[tr], sub, cfg, seed, keep)
        fold_cfg = replace(cfg, **chosen)
    cols = select_features(X[tr], sub, fold_cfg.max_features, keep=keep)
    booster = _fit(X[tr][:, cols], sub, fold_cfg, seed, pos=_positions(cols, keep))
    dte = _dmatrix(X[te][:, cols])
    if out.kind == "binary":
        pred = booster.predict(dte)
    else:
        centre = np.median(booster.predict(_dmatrix(X[tr][:, cols]), output_margin=True))
        pred = booster.predict(dte, output_margin=True) - centre
    contribs = booster.predict(dte, pred_contribs=True) if shap else None
    return _FoldFit(pred, cols, contribs, chosen, inner)


def _cv_predict(
    X: np.ndarray, out: Outcome, folds: list[Fold], cfg: ModelConfig, seed: int,
    *, tune: bool, shap: bool = False, n_jobs: int = 1, keep: np.ndarray | None = None,
) -> list[_FoldFit]:
    """One fit per outer fold (tuned in the inner loop when ``tune``), seed + 1000·r + k."""
    args = [(X, out, tr, te, cfg, seed + 1000 * r + k) for r, k, tr, te in folds]
    if tune and n_jobs > 1 and len(folds) > 1:
        return list(Parallel(n_jobs=min(n_jobs, len(folds)))(
            delayed(_fit_fold)(*a, tune=tune, shap=shap, keep=keep) for a in args
        ))
    return [_fit_fold(*a, tune=tune, shap=shap, keep=keep) for a in args]


def _oof(fits: list[_FoldFit], folds: list[Fold], n: int) -> np.ndarray:
    """OOF predictions, one column per repeat."""
    repeats = max(f[0] for f in folds) + 1
    out = np.full((n, repeats), np.nan)
    for (r, _k, _tr, te), fit in zip(folds, fits, strict=True):
        out[te, r] = fit.pred
    return out


def _perm_stats(X, out, groups, cv, cfg, seed, perm_seeds, tune, keep=None, strata=None,
                shap=True) -> list[tuple[float, np.ndarray | None]]:
    """Null statistics: the first repeat's CV rerun on permuted outcomes, one per seed.

    The folds are drawn again for each permutation, stratified on the permuted outcome as the
    observed CV is on the real one: the real folds leave the permuted classes unbalanced
    between folds, which biases the null AUROC low and the p-value with it. With ``strata``
    the outcome moves only between patients of the same stratum. Each comes with the
    features' null importance (:func:`_fold_mean_importance` of the permuted CV's fits), or
    None without ``shap``.
    """
    first = replace(cv, repeats=1)
    stats = []
    for ps in perm_seeds:
        op = out.permuted(ps, strata)
        folds = make_folds(op.y, groups, first, seed)
        fits = _cv_predict(X, op, folds, cfg, seed, tune=tune, shap=shap, keep=keep)
        stats.append((op.score(_oof(fits, folds, len(op.y))[:, 0]),
                      _fold_mean_importance(fits, X.shape[1]) if shap else None))
    return stats


def _fold_mean_importance(fits: list[_FoldFit], p: int) -> np.ndarray:
    """Each feature's mean |SHAP| on its fold's test patients, averaged over the folds (0 in
    a fold that did not select it): the importance the permutation null is drawn for."""
    total = np.zeros(p)
    for fit in fits:
        total[fit.cols] += np.abs(fit.contribs[:, :-1]).mean(axis=0)
    return total / len(fits)


def _null_importance_table(null: np.ndarray, columns: pd.Index) -> pd.DataFrame | None:
    """Long table ``permutation, feature, mean_abs_shap`` of the non-zero null importances."""
    if null.size == 0:
        return None
    perm, col = np.nonzero(null)
    return pd.DataFrame({"permutation": perm, "feature": np.asarray(columns, dtype=object)[col],
                         "mean_abs_shap": null[perm, col]})


def _elastic_net(seed: int):
    return make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(
            solver="saga", l1_ratio=0.5, C=0.1, tol=1e-3, max_iter=2000, random_state=seed
        ),
    )


def _oof_baselines(X, out: Outcome, folds, seed, k_max, cfg: ModelConfig | None = None,
                   keep: np.ndarray | None = None) -> dict[str, Any]:
    """Elastic net (binary), best single feature and, with ``keep`` columns (covariates),
    their own trees alone (:func:`_covariate_start`); on the same folds, selection in-fold."""
    repeats = max(f[0] for f in folds) + 1
    enet = np.full((len(out.y), repeats), np.nan)
    single = np.full((len(out.y), repeats), np.nan)
    cov = np.full((len(out.y), repeats), np.nan)
    has_keep = keep is not None and len(keep) > 0
    free = np.setdiff1d(np.arange(X.shape[1]), keep) if has_keep else np.arange(X.shape[1])
    chosen: list[int] = []
    for r, k, tr, te in folds:
        sub = out.take(tr)
        if out.kind == "binary":
            cols = select_features(X[tr], sub, k_max, keep=keep)
            model = _elastic_net(seed).fit(X[tr][:, cols], sub.y)
            enet[te, r] = model.predict_proba(X[te][:, cols])[:, 1]
        if has_keep:  # the covariates' own trees (the start of every booster) alone
            start = _covariate_start(X[tr][:, keep], sub, cfg or ModelConfig(), seed + 1000 * r + k,
                                     np.arange(len(keep)))
            assert start is not None
            dte = _dmatrix(X[te][:, keep])
            if out.kind == "binary":
                cov[te, r] = start.predict(dte)
            else:
                centre = np.median(start.predict(_dmatrix(X[tr][:, keep]), output_margin=True))
                cov[te, r] = start.predict(dte, output_margin=True) - centre
        j = int(free[select_features(X[tr][:, free], sub, 1)[0]])
        chosen.append(j)
        if out.kind == "binary":
            one = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                                StandardScaler(), LogisticRegression())
            one.fit(X[tr][:, [j]], sub.y)
            single[te, r] = one.predict_proba(X[te][:, [j]])[:, 1]
        else:  # the feature itself as the risk score, oriented and scaled on the training fold
            x = X[:, j].astype(float)
            med = np.nanmedian(x[tr]) if np.isfinite(x[tr]).any() else 0.0
            x = np.where(np.isnan(x), med, x)
            sign = 1.0 if univariate_cindex(x[tr, None], sub.time, sub.y)[0] >= 0.5 else -1.0
            sd = x[tr].std() or 1.0
            single[te, r] = sign * (x[te] - x[tr].mean()) / sd
    base = {"best_single_feature": single.mean(axis=1), "_chosen": np.array(chosen)}
    if out.kind == "binary":
        base["elastic_net"] = enet.mean(axis=1)
    if has_keep:
        base["covariates_only"] = cov.mean(axis=1)
    return base


# ------------------------------------------------------------------------------ result


@dataclass
class TrainingResult:
    """Evaluation and final model of one experiment.

    ``frame()`` gives the metric table; ``oof`` the out-of-fold predictions per patient;
    ``oof_shap`` their SHAP values (patients × all features, + ``base_value``);
    ``fold_importance`` the per-fold mean |SHAP| ranking; ``stability()`` its summary;
    ``null_importance`` each feature's importance in every permuted-outcome CV of the
    permutation test (mean over the first repeat's folds of the fold's mean |SHAP|; features
    no fold selected left out), for the null of the importance per population; None without
    permutations, or when they refit fixed settings while the CV was tuned.
    """

    features: list[str]  # the final model's features (selected on all patients), in order
    oof: pd.DataFrame
    metrics: dict[str, dict[str, float]]
    permutation: dict[str, Any]
    baselines: dict[str, dict[str, dict[str, float]]]
    fold_metrics: pd.DataFrame
    calibration: dict[str, Any]
    threshold: float
    threshold_rule: str
    booster: xgb.Booster
    timings: dict[str, float] = field(default_factory=dict)
    single_feature_choices: list[str] = field(default_factory=list)
    kind: str = "binary"
    oof_shap: pd.DataFrame | None = None
    fold_importance: pd.DataFrame | None = None
    null_importance: pd.DataFrame | None = None  # permutation, feature, mean_abs_shap
    settings: dict[str, Any] = field(default_factory=dict)  # the final model's settings
    tuning: dict[str, Any] | None = None  # grid, metric, final choice and its score table
    covariates: list[str] = field(default_factory=list)  # columns of X always kept as inputs

    @property
    def metric(self) -> str:
        """The headline metric: ``auroc`` (binary) or ``cindex`` (survival)."""
        return "auroc" if self.kind == "binary" else "cindex"

    def frame(self) -> pd.DataFrame:
        """Metric table: model and baselines, estimate and 95% CI."""
        rows = []
        for model, table in {"xgboost": self.metrics, **self.baselines}.items():
            for metric, v in table.items():
                rows.append({"model": model, "metric": metric, **v})
        return pd.DataFrame(rows)

    def stability(self, top: int = 10) -> pd.DataFrame:
        """How often each feature ranks in its fold's ``top`` by mean |SHAP| (most often first)."""
        fi = self.fold_importance
        if fi is None or fi.empty:
            return pd.DataFrame(columns=["feature", "n_folds_selected", f"n_folds_top{top}",
                                         f"share_top{top}", "mean_rank"])
        n_folds = len(fi[["repeat", "fold"]].drop_duplicates())
        g = fi.groupby("feature")
        out = pd.DataFrame({
            "n_folds_selected": g.size(),
            f"n_folds_top{top}": g["rank"].apply(lambda r: int((r <= top).sum())),
            "mean_rank": g["rank"].mean(),
        })
        out[f"share_top{top}"] = out[f"n_folds_top{top}"] / n_folds
        out = out.sort_values([f"n_folds_top{top}", "mean_rank"], ascending=[False, True])
        return out.reset_index()[["feature", "n_folds_selected", f"n_folds_top{top}",
                                  f"share_top{top}", "mean_rank"]]


def _shap_tables(fits, folds, n, columns: pd.Index, index: pd.Index) -> tuple[pd.DataFrame, pd.DataFrame]:
    repeats = max(f[0] for f in folds) + 1
    p = len(columns)
    total = np.zeros((n, p))
    base = np.zeros(n)
    names = np.asarray(columns, dtype=object)
    rows = []
    for (r, k, _tr, te), fit in zip(folds, fits, strict=True):
        c = fit.contribs
        block = np.zeros((len(te), p))
        block[:, fit.cols] = c[:, :-1]
        total[te] += block
        base[te] += c[:, -1]
        imp = np.abs(c[:, :-1]).mean(axis=0)
        order = np.argsort(-imp, kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(1, len(order) + 1)
        rows.append(pd.DataFrame({"repeat": r, "fold": k, "feature": names[fit.cols],
                                  "mean_abs_shap": imp, "rank": rank}))
    shap = pd.DataFrame(total / repeats, index=index, columns=columns)
    shap["base_value"] = base / repeats
    fi = pd.concat(rows, ignore_index=True).sort_values(["repeat", "fold", "rank"], ignore_index=True)
    return shap, fi


def _check_inner(folds: list[Fold], out: Outcome, inner_folds: int) -> None:
    for _r, _k, tr, _te in folds:
        _, counts = np.unique(out.y[tr], return_counts=True)
        if len(counts) < 2 or counts.min() < inner_folds:
            what = "responders or non-responders" if out.kind == "binary" else "events or censored patients"
            raise TrainingError(
                f"An outer training fold has only {counts.min() if len(counts) == 2 else 0} {what}; "
                f"the {inner_folds}-fold inner CV of [model.search] needs at least {inner_folds}. "
                "Lower [model.search] inner_folds or [cv] folds, or add patients."
            )


def train_model(
    X: pd.DataFrame,
    y: pd.Series | pd.DataFrame,
    *,
    model: ModelConfig | None = None,
    cv: CVConfig | None = None,
    outcome: str = "binary",
    random_state: int = 0,
    n_jobs: int = 2,
    where: str = "the outcome",
    covariates: Sequence[str] = (),
    strata: pd.Series | None = None,
) -> TrainingResult:
    """Evaluate XGBoost with grouped (nested, when tuning) repeated CV and fit the final model.

    Parameters
    ----------
    X
        Patients × features (index patient_id).
    y
        Binary outcome (0/1) indexed by patient_id; for survival a DataFrame with ``time``
        and ``event``. Aligned to ``X``.
    model, cv
        Model parameters (with an optional ``search`` grid for the inner loop) and the
        evaluation scheme.
    outcome
        ``"binary"`` or ``"survival"``.
    random_state
        Seed of folds, models, permutations and bootstraps.
    n_jobs
        Processes for the permutation test (and the outer folds when tuning).
    where
        Where the outcome comes from (file and column), for error messages.
    covariates
        Columns of ``X`` that are clinical covariates (e.g. the encoded treatment arm): model
        inputs that the in-fold feature filter always keeps (``max_features`` counts the other
        columns only) and that every booster fits first, with ``COVARIATE_ROUNDS`` trees of
        their own before its ``n_estimators`` trees. They get a ``covariates_only`` baseline
        and are left out of the best single feature.
    strata
        Per patient (index patient_id), a label within which the permutation test permutes
        the outcome (e.g. the arm); None permutes across all patients.
    """
    model = model or ModelConfig()
    cv = cv or CVConfig()
    if outcome not in KINDS:
        raise ValueError(f"The 'outcome' parameter of train_model must be one of {KINDS}. Got {outcome!r} instead.")
    timings: dict[str, float] = {}
    y = y.reindex(X.index)
    if outcome == "binary":
        if isinstance(y, pd.DataFrame):
            raise TrainingError("A binary outcome is one column of 0/1; got a table. Pass outcome='survival' for time/event.")
        out = Outcome("binary", check_outcome(y, where=where, folds=cv.folds))
    else:
        t, e = check_survival(y, where=where, folds=cv.folds)
        out = Outcome("survival", e, t)
    tune = model.search is not None
    unknown = [c for c in covariates if c not in X.columns]
    if unknown:
        raise ValueError(f"The 'covariates' parameter of train_model must name columns of X. "
                         f"Got {unknown!r} instead.")
    keep = np.sort(X.columns.get_indexer(list(covariates))) if len(covariates) else None
    if strata is not None:
        labels = strata.reindex(X.index)
        if labels.isna().any():
            raise ValueError("The 'strata' parameter of train_model must label every patient of X. "
                             f"Got none for {list(X.index[labels.isna()][:5])}.")
        strata_arr = labels.astype(str).to_numpy()
    else:
        strata_arr = None
    Xa = X.to_numpy(dtype=np.float32, copy=True)
    n = len(out.y)
    groups = X.index.to_numpy()
    folds = make_folds(out.y, groups, cv, random_state)
    for _r, _k, tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
    if tune:
        _check_inner(folds, out, model.search.inner_folds)

    t0 = time.perf_counter()
    fits = _cv_predict(Xa, out, folds, model, random_state, tune=tune, shap=True, n_jobs=n_jobs,
                       keep=keep)
    oof_r = _oof(fits, folds, n)
    pred = oof_r.mean(axis=1)
    timings["cv"] = time.perf_counter() - t0
    oof_shap, fold_importance = _shap_tables(fits, folds, n, X.columns, X.index)

    fold_rows = []
    for (r, k, _tr, te), fit in zip(folds, fits, strict=True):
        sub = out.take(te)
        row: dict[str, Any] = {"repeat": r, "fold": k, "n_test": len(te)}
        row["n_pos" if out.kind == "binary" else "n_events"] = int(sub.y.sum())
        ok = len(np.unique(sub.y)) == 2 if out.kind == "binary" else sub.y.any()
        row[out.metric] = sub.score(oof_r[te, r]) if ok else float("nan")
        row["n_features"] = len(fit.cols)
        if tune:
            row.update(fit.chosen)
            row[f"inner_{_tuning_metric(model, out)}"] = fit.inner_score
        fold_rows.append(row)

    t0 = time.perf_counter()
    if out.kind == "binary":
        metrics = metric_table(out.y, pred, n_boot=cv.bootstrap, random_state=random_state)
    else:
        metrics = cindex_table(out.time, out.y, pred, n_boot=cv.bootstrap, random_state=random_state)
    timings["bootstrap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    permutation, null_imp = _permutation_test(Xa, out, groups, cv, model, random_state, oof_r,
                                              n_jobs, keep=keep, strata=strata_arr)
    null_importance = _null_importance_table(null_imp, X.columns)
    timings["permutation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = _oof_baselines(Xa, out, folds, random_state, model.max_features, model, keep)
    names = ("elastic_net", "best_single_feature") if out.kind == "binary" else ("best_single_feature",)
    if keep is not None:
        names = (*names, "covariates_only")
    if out.kind == "binary":
        baselines = {b: metric_table(out.y, base[b], n_boot=cv.bootstrap, random_state=random_state) for b in names}
    else:
        baselines = {b: cindex_table(out.time, out.y, base[b], n_boot=cv.bootstrap, random_state=random_state)
                     for b in names}
    timings["baselines"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    final_cfg = replace(model, search=None)
    tuning = None
    if tune:
        chosen, score, table = _tune(Xa, out, model, random_state, keep)
        final_cfg = replace(final_cfg, **chosen)
        tuning = {
            "grid": {k: list(v) for k, v in model.search.grid.items()},
            "n_settings": model.search.size,
            "inner_folds": model.search.inner_folds,
            "metric": _tuning_metric(model, out),
            "final": chosen,
            "final_inner_score": score,
            "table": table,
        }
    selected = select_features(Xa, out, final_cfg.max_features, keep=keep)
    features = [str(X.columns[j]) for j in selected]
    booster = _fit(Xa[:, selected], out, final_cfg, random_state, nthread=1,
                   pos=_positions(selected, keep))
    booster.feature_names = features
    timings["final_fit"] = time.perf_counter() - t0

    if out.kind == "binary":
        lp = np.log(np.clip(pred, 1e-6, 1 - 1e-6) / (1 - np.clip(pred, 1e-6, 1 - 1e-6)))
        platt = LogisticRegression(C=1e6).fit(lp[:, None], out.y)
        a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        p_cal = calibrate(pred, a, b)
        if cv.threshold_rule == "youden":
            threshold = youden_threshold(out.y, p_cal)
        else:
            threshold = sensitivity_threshold(out.y, p_cal, float(cv.threshold_rule.split(":")[1]))
        threshold_rule = cv.threshold_rule
        calibration = {
            "method": "platt", "a": a, "b": b,
            "curve_raw": expected_calibration(out.y, pred),
            "curve_calibrated": expected_calibration(out.y, p_cal),
        }
        oof = pd.DataFrame({"y": out.y, "probability": pred, "calibrated": p_cal}, index=X.index)
        for r in range(oof_r.shape[1]):
            oof[f"probability_r{r}"] = oof_r[:, r]
        oof["elastic_net"] = base["elastic_net"]
    else:
        dm = xgb.DMatrix(Xa[:, selected], missing=np.nan, nthread=1, feature_names=features)
        threshold = float(np.median(booster.predict(dm)))
        threshold_rule = "median-risk"
        calibration = {}
        oof = pd.DataFrame({"time": out.time, "event": out.y, "risk": pred}, index=X.index)
        for r in range(oof_r.shape[1]):
            oof[f"risk_r{r}"] = oof_r[:, r]
    oof["best_single_feature"] = base["best_single_feature"]
    if keep is not None:
        oof["covariates_only"] = base["covariates_only"]
    return TrainingResult(
        features=features,
        oof=oof,
        metrics=metrics,
        permutation=permutation,
        baselines=baselines,
        fold_metrics=pd.DataFrame(fold_rows),
        calibration=calibration,
        threshold=threshold,
        threshold_rule=threshold_rule,
        booster=booster,
        timings=timings,
        single_feature_choices=[X.columns[j] for j in base["_chosen"]],
        kind=out.kind,
        oof_shap=oof_shap,
        fold_importance=fold_importance,
        null_importance=null_importance,
        settings=_settings(final_cfg),
        tuning=tuning,
        covariates=[str(c) for c in covariates],
    )


def _tuning_metric(model: ModelConfig, out: Outcome) -> str:
    s = model.search
    return out.metric if s is None or s.metric == "auto" else s.metric


def _permutation_test(Xa, out, groups, cv, model, seed, oof_r, n_jobs, *, keep=None,
                      strata=None) -> tuple[dict[str, Any], np.ndarray]:
    tune = model.search is not None
    nested = tune and model.search.permutation_test == "nested"
    fixed = replace(model, search=None)
    if tune and not nested:
        # the statistic: the fixed-parameter CV of the first repeat on the real outcome
        first = make_folds(out.y, groups, replace(cv, repeats=1), seed)
        observed = out.score(_oof(_cv_predict(Xa, out, first, fixed, seed, tune=False, keep=keep),
                                  first, len(out.y))[:, 0])
    else:
        observed = out.score(oof_r[:, 0])
    perm_model = model if nested else fixed
    # A fixed-settings null would not match the tuned fits the importances come from.
    importances = not tune or nested
    seeds = [seed + 7919 * (i + 1) for i in range(cv.permutations)]
    chunks = [c for c in np.array_split(np.array(seeds, dtype=np.int64), max(n_jobs, 1)) if c.size]
    parts = Parallel(n_jobs=min(n_jobs, len(chunks)) or 1)(
        delayed(_perm_stats)(Xa, out, groups, cv, perm_model, seed, c.tolist(), nested, keep, strata,
                             shap=importances)
        for c in chunks
    )
    null = np.array([v for part in parts for v, _ in part])
    null_importance = (np.array([imp for part in parts for _, imp in part])
                       if null.size and importances else np.zeros((0, Xa.shape[1])))
    p_value = float((1 + (null >= observed).sum()) / (1 + null.size)) if null.size else float("nan")
    name = "AUROC" if out.kind == "binary" else "C-index"
    if not tune:
        procedure = "cv"
        tests = (f"H0: the outcome is independent of the features. Statistic: the out-of-fold {name} "
                 "of the first CV repeat, the same procedure as the headline (in-fold feature "
                 "filtering and fit), rerun on each permuted outcome.")
    elif nested:
        procedure = "nested"
        tests = (f"H0: the outcome is independent of the features. Statistic: the out-of-fold {name} "
                 "of the first CV repeat of the full nested procedure (inner tuning over "
                 f"{model.search.size} settings included), rerun on each permuted outcome.")
    else:
        procedure = "fixed"
        tests = (f"H0: the outcome is independent of the features. Statistic: the out-of-fold {name} "
                 "of the first CV repeat with the fixed [model] settings (no tuning), on the real "
                 "and on each permuted outcome; the tuned headline is not the statistic "
                 "(set [model.search] permutation_test = 'nested' for that).")
    if strata is not None:
        h0 = "H0: the outcome is independent of the features given the covariates' strata."
        tests = tests.replace("H0: the outcome is independent of the features.", h0)
        tests += (f" The outcome is permuted within the {len(np.unique(strata))} strata of the "
                  "discrete covariates only, so their own association with it is kept.")
    elif keep is not None:
        tests = tests.replace("independent of the features.", "independent of the features and covariates.")
    payload = {
        "p_value": p_value,
        "n_permutations": int(null.size),
        "statistic": out.metric,
        "observed": float(observed),
        f"observed_{out.metric}_repeat0": float(observed),
        "null_mean": float(null.mean()) if null.size else float("nan"),
        "null_q95": float(np.quantile(null, 0.95)) if null.size else float("nan"),
        "procedure": procedure,
        "tests": tests,
        "within_strata": strata is not None,
    }
    return payload, null_importance
