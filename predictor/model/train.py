"""Honest evaluation and the final model: patient-grouped repeated CV, uncertainty, baselines.

- Outer loop: repeated stratified k-fold grouped by patient (no patient on both sides).
- Out-of-fold (OOF) probabilities averaged over repeats give the headline metrics, each with
  a patient-bootstrap 95% CI.
- Permutation test: the whole first-repeat CV is rerun with permuted outcomes; the p-value is
  (1 + #null AUROC ≥ observed) / (1 + permutations).
- Baselines on the very same folds: elastic-net logistic regression (Citrus-style) and the best
  single feature chosen inside each training fold.
- Feature filtering (top-k univariate AUROC) happens inside each training fold only.
- Final model: refit on all patients (filtering on all of them); Platt calibration fitted on OOF predictions; decision
  threshold by Youden's J (or a sensitivity target) on calibrated OOF predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from joblib import Parallel, delayed
from scipy.stats import rankdata
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from predictor.config import CVConfig, ModelConfig
from predictor.errors import TrainingError
from predictor.model.metrics import (
    expected_calibration,
    metric_table,
    sensitivity_threshold,
    youden_threshold,
)

__all__ = ["TrainingResult", "train_model", "xgb_params", "calibrate", "check_outcome"]

Fold = tuple[int, int, np.ndarray, np.ndarray]  # repeat, fold, train idx, test idx


def xgb_params(cfg: ModelConfig, seed: int, *, nthread: int = 1) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
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


def univariate_auroc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``X`` against ``y`` (missing values at the column median)."""
    med = np.nanmedian(np.where(np.isnan(X).all(axis=0), 0.0, X), axis=0) if X.size else X
    Xi = np.where(np.isnan(X), med, X)
    ranks = rankdata(Xi, axis=0)
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def select_features(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest univariate |AUROC − 0.5| (stable order).

    Always called on training patients only, inside each fold.
    """
    if k <= 0 or k >= X.shape[1]:
        return np.arange(X.shape[1])
    score = np.abs(univariate_auroc(X, y) - 0.5)
    return np.sort(np.argsort(-score, kind="stable")[:k])


def _fit(X: np.ndarray, y: np.ndarray, cfg: ModelConfig, seed: int, nthread: int = 1) -> xgb.Booster:
    # DMatrix too gets ``nthread``: its default (all cores) oversubscribes the worker processes
    # and costs ~20 ms per small matrix on a busy machine, which dominates the permutation test.
    dtrain = xgb.DMatrix(X, label=y, missing=np.nan, nthread=nthread)
    return xgb.train(xgb_params(cfg, seed, nthread=nthread), dtrain, num_boost_round=cfg.n_estimators)


def _predict(booster: xgb.Booster, X: np.ndarray) -> np.ndarray:
    return booster.predict(xgb.DMatrix(X, missing=np.nan, nthread=1))


def calibrate(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt scaling of probabilities: sigmoid(a · logit(p) + b)."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(a * np.log(p / (1 - p)) + b)))


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


def make_folds(y: np.ndarray, groups: np.ndarray, cv: CVConfig, seed: int) -> list[Fold]:
    folds: list[Fold] = []
    for r in range(cv.repeats):
        splitter = StratifiedGroupKFold(n_splits=cv.folds, shuffle=True, random_state=seed + r)
        for k, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            folds.append((r, k, tr, te))
    return folds


def _oof_xgb(X, y, folds, cfg, seed) -> np.ndarray:
    """OOF probabilities, one column per repeat."""
    repeats = max(f[0] for f in folds) + 1
    out = np.full((len(y), repeats), np.nan)
    for r, k, tr, te in folds:
        cols = select_features(X[tr], y[tr], cfg.max_features)
        booster = _fit(X[tr][:, cols], y[tr], cfg, seed + 1000 * r + k)
        out[te, r] = _predict(booster, X[te][:, cols])
    return out


def _perm_aurocs(X, y, groups, cv, cfg, seed, perm_seeds) -> list[float]:
    """Null AUROCs: the first repeat's CV rerun on permuted outcomes, one per seed.

    The folds are drawn again for each permutation, stratified on the permuted outcome as the
    observed CV is on the real one: the real folds leave the permuted classes unbalanced
    between folds, which biases the null AUROC low and the p-value with it.
    """
    first = replace(cv, repeats=1)
    out = []
    for ps in perm_seeds:
        yp = np.random.default_rng(ps).permutation(y)
        folds = make_folds(yp, groups, first, seed)
        out.append(float(roc_auc_score(yp, _oof_xgb(X, yp, folds, cfg, seed)[:, 0])))
    return out


def _elastic_net(seed: int):
    return make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(
            solver="saga", l1_ratio=0.5, C=0.1, tol=1e-3, max_iter=2000, random_state=seed
        ),
    )


def _oof_baselines(X, y, folds, seed, k_max) -> dict[str, np.ndarray]:
    repeats = max(f[0] for f in folds) + 1
    enet = np.full((len(y), repeats), np.nan)
    single = np.full((len(y), repeats), np.nan)
    chosen: list[int] = []
    for r, _k, tr, te in folds:
        cols = select_features(X[tr], y[tr], k_max)
        model = _elastic_net(seed).fit(X[tr][:, cols], y[tr])
        enet[te, r] = model.predict_proba(X[te][:, cols])[:, 1]
        j = int(select_features(X[tr], y[tr], 1)[0])
        chosen.append(j)
        one = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), LogisticRegression())
        one.fit(X[tr][:, [j]], y[tr])
        single[te, r] = one.predict_proba(X[te][:, [j]])[:, 1]
    return {"elastic_net": enet.mean(axis=1), "best_single_feature": single.mean(axis=1), "_chosen": np.array(chosen)}


@dataclass
class TrainingResult:
    """Evaluation and final model of one experiment.

    ``frame()`` gives the metric table; ``oof`` the out-of-fold predictions per patient.
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

    def frame(self) -> pd.DataFrame:
        """Metric table: model and baselines, estimate and 95% CI."""
        rows = []
        for model, table in {"xgboost": self.metrics, **self.baselines}.items():
            for metric, v in table.items():
                rows.append({"model": model, "metric": metric, **v})
        return pd.DataFrame(rows)


def train_model(
    X: pd.DataFrame,
    y: pd.Series,
    *,
    model: ModelConfig | None = None,
    cv: CVConfig | None = None,
    random_state: int = 0,
    n_jobs: int = 2,
) -> TrainingResult:
    """Evaluate XGBoost with grouped repeated CV and fit the final model.

    Parameters
    ----------
    X
        Patients × features (index patient_id).
    y
        Binary outcome (0/1) indexed by patient_id; aligned to ``X``.
    model, cv
        Model parameters and evaluation scheme.
    random_state
        Seed of folds, models, permutations and bootstraps.
    n_jobs
        Processes for the permutation test.
    """
    model = model or ModelConfig()
    cv = cv or CVConfig()
    timings: dict[str, float] = {}
    y = y.reindex(X.index)
    arr_y = check_outcome(y, folds=cv.folds)
    Xa = X.to_numpy(dtype=np.float32, copy=True)
    groups = X.index.to_numpy()
    folds = make_folds(arr_y, groups, cv, random_state)
    for _r, _k, tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])

    t0 = time.perf_counter()
    oof_r = _oof_xgb(Xa, arr_y, folds, model, random_state)
    p_oof = oof_r.mean(axis=1)
    timings["cv"] = time.perf_counter() - t0

    fold_rows = []
    for r, k, _tr, te in folds:
        yt, pt = arr_y[te], oof_r[te, r]
        auc = float(roc_auc_score(yt, pt)) if len(np.unique(yt)) == 2 else float("nan")
        fold_rows.append({"repeat": r, "fold": k, "n_test": len(te), "n_pos": int(yt.sum()), "auroc": auc})

    t0 = time.perf_counter()
    metrics = metric_table(arr_y, p_oof, n_boot=cv.bootstrap, random_state=random_state)
    timings["bootstrap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    observed = float(roc_auc_score(arr_y, oof_r[:, 0]))
    seeds = [random_state + 7919 * (i + 1) for i in range(cv.permutations)]
    chunks = [c for c in np.array_split(np.array(seeds, dtype=np.int64), max(n_jobs, 1)) if c.size]
    parts = Parallel(n_jobs=min(n_jobs, len(chunks)) or 1)(
        delayed(_perm_aurocs)(Xa, arr_y, groups, cv, model, random_state, c.tolist())
        for c in chunks
    )
    null = np.array([v for part in parts for v in part])
    p_value = float((1 + (null >= observed).sum()) / (1 + null.size)) if null.size else float("nan")
    timings["permutation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = _oof_baselines(Xa, arr_y, folds, random_state, model.max_features)
    baselines = {
        name: metric_table(arr_y, base[name], n_boot=cv.bootstrap, random_state=random_state)
        for name in ("elastic_net", "best_single_feature")
    }
    timings["baselines"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selected = select_features(Xa, arr_y, model.max_features)
    features = [str(X.columns[j]) for j in selected]
    booster = _fit(Xa[:, selected], arr_y, model, random_state, nthread=1)
    booster.feature_names = features
    timings["final_fit"] = time.perf_counter() - t0

    platt = LogisticRegression(C=1e6).fit(
        np.log(np.clip(p_oof, 1e-6, 1 - 1e-6) / (1 - np.clip(p_oof, 1e-6, 1 - 1e-6)))[:, None], arr_y
    )
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    p_cal = calibrate(p_oof, a, b)
    if cv.threshold_rule == "youden":
        threshold = youden_threshold(arr_y, p_cal)
    else:
        threshold = sensitivity_threshold(arr_y, p_cal, float(cv.threshold_rule.split(":")[1]))

    oof = pd.DataFrame({"y": arr_y, "probability": p_oof, "calibrated": p_cal}, index=X.index)
    for r in range(oof_r.shape[1]):
        oof[f"probability_r{r}"] = oof_r[:, r]
    oof["elastic_net"] = base["elastic_net"]
    oof["best_single_feature"] = base["best_single_feature"]
    return TrainingResult(
        features=features,
        oof=oof,
        metrics=metrics,
        permutation={
            "p_value": p_value,
            "n_permutations": int(null.size),
            "observed_auroc_repeat0": observed,
            "null_mean": float(null.mean()) if null.size else float("nan"),
            "null_q95": float(np.quantile(null, 0.95)) if null.size else float("nan"),
        },
        baselines=baselines,
        fold_metrics=pd.DataFrame(fold_rows),
        calibration={
            "method": "platt",
            "a": a,
            "b": b,
            "curve_raw": expected_calibration(arr_y, p_oof),
            "curve_calibrated": expected_calibration(arr_y, p_cal),
        },
        threshold=threshold,
        threshold_rule=cv.threshold_rule,
        booster=booster,
        timings=timings,
        single_feature_choices=[X.columns[j] for j in base["_chosen"]],
    )
