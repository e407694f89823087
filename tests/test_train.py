"""Metrics, outcome checks, patient-grouped folds, in-fold filtering and the training loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from predictor.config import CVConfig, ModelConfig
from predictor.errors import TrainingError
from predictor.model import train as train_mod
from predictor.model.metrics import (
    bootstrap_ci,
    fast_auroc,
    metric_table,
    sensitivity_threshold,
    youden_threshold,
)
from predictor.model.train import (
    calibrate,
    check_outcome,
    make_folds,
    select_features,
    train_model,
)

FAST = ModelConfig(n_estimators=20, learning_rate=0.3, max_features=10)


def planted(seed: int, shift: float, n: int = 40, p: int = 60) -> tuple[pd.DataFrame, pd.Series]:
    """n patients × p noise features; f03 up and f41 (or the last) down in responders."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.r_[np.zeros(n // 2), np.ones(n - n // 2)]).astype(int)
    x = rng.normal(size=(n, p))
    x[:, 3] += shift * y
    x[:, min(41, p - 1)] -= shift * y
    ids = pd.Index([f"P{i:02d}" for i in rng.permutation(n)], name="patient_id")  # unsorted
    X = pd.DataFrame(x, columns=[f"f{j:02d}" for j in range(p)], index=ids)
    return X, pd.Series(y, index=ids, name="response")


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_auroc_equals_sklearn_with_ties(seed) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    p = rng.integers(0, 5, 50) / 4  # many ties
    assert fast_auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert fast_auroc(y, rng.random(50)) != pytest.approx(fast_auroc(y, p))
    assert fast_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert fast_auroc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5
    assert np.isnan(fast_auroc(np.ones(5), rng.random(5)))


def test_bootstrap_ci_contains_the_estimate_and_keeps_both_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(20)].astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 50), 0, 1)
    est = fast_auroc(y, p)
    lo, hi = bootstrap_ci(y, p, fast_auroc, n_boot=300, random_state=1)
    assert lo < est < hi and 0.0 <= lo and hi <= 1.0
    assert hi - lo > 0.05
    assert bootstrap_ci(y, p, fast_auroc, n_boot=300, random_state=1) == (lo, hi)
    seen = []
    bootstrap_ci(y, p, lambda yy, pp: seen.append((yy.sum(), len(yy))) or 0.0, n_boot=20)
    assert seen == [(20, 50)] * 20  # class sizes preserved in every resample
    assert all(np.isnan(bootstrap_ci(y, p, fast_auroc, n_boot=0)))


def test_metric_table_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.6, 0.4, 0.9])
    t = metric_table(y, p, n_boot=50)
    assert set(t) == {"auroc", "auprc", "balanced_accuracy", "brier"}
    assert t["auroc"]["estimate"] == 0.75
    assert t["brier"]["estimate"] == pytest.approx((0.04 + 0.36 + 0.36 + 0.01) / 4)
    assert t["balanced_accuracy"]["estimate"] == 0.5  # 0.6 ≥ 0.5 is a false positive, 0.4 a miss
    for v in t.values():
        assert v["ci_low"] <= v["ci_high"]


def test_youden_and_sensitivity_thresholds_by_hand() -> None:
    assert youden_threshold(np.array([0, 0, 0, 1, 1, 1]), np.array([.1, .2, .3, .6, .7, .8])) == 0.6
    y = np.array([0, 0, 1, 0, 1, 1, 1])
    p = np.array([.1, .2, .3, .4, .5, .6, .7])
    # J: 0.75 at 0.5 (tpr 3/4, fpr 0), 0.67 at 0.3 (tpr 1, fpr 1/3), 0.5 at 0.6
    assert youden_threshold(y, p) == 0.5
    assert sensitivity_threshold(y, p, 0.9) == 0.3
    assert sensitivity_threshold(y, p, 0.75) == 0.5
    assert sensitivity_threshold(y, p, 0.5) == 0.6  # tpr at ≥ 0.6 is 2/4
    assert sensitivity_threshold(y, p, 0.25) == 0.7


# ------------------------------------------------------------------------------ outcome


def test_check_outcome_accepts_binary() -> None:
    out = check_outcome(pd.Series([1, 0, 1, 0, 1]), folds=2)
    assert out.tolist() == [1, 0, 1, 0, 1] and out.dtype.kind == "i"
    assert check_outcome(pd.Series([True, False, "1", "0"], dtype=object)).tolist() == [1, 0, 1, 0]
    assert check_outcome(pd.Series([1.0, 0.0, 0.0, 1.0])).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    ("values", "folds", "message"),
    [
        ([1, 1, 1, 1], 2, "every patient has outcome 1; a model needs both responders"),
        ([0, 0, 0], 2, "every patient has outcome 0; a model needs both"),
        ([0, 1, 2, 1, 0], 2, r"must be 0/1. Got values \[2\]"),
        ([0, 1, 0.5, 1, 0], 2, r"must be 0/1. Got values \[0.5\]"),
        ([0, 1, -1, 1, 0], 2, r"must be 0/1. Got values \[-1\]"),
        ([0, 0, 0, 0, 1, 1], 3, "only 2 patient\\(s\\) in the smaller class; the 3-fold"),
        ([0, 1, None, 1], 2, r"missing or non-numeric outcome for patient\(s\) \['c'\]"),
        (["yes", "no", "yes", "no"], 2, "missing or non-numeric"),
    ],
)
def test_check_outcome_errors(values, folds, message) -> None:
    y = pd.Series(values, index=list("abcdef")[: len(values)])
    with pytest.raises(TrainingError, match=message):
        check_outcome(y, where="clinical.csv, column 'response'", folds=folds)


def test_train_model_refuses_a_single_class() -> None:
    X, _ = planted(0, 0.0, n=12, p=5)
    with pytest.raises(TrainingError, match="needs both responders \\(1\\) and non-responders"):
        train_model(X, pd.Series(1, index=X.index), model=FAST, cv=CVConfig(folds=3), n_jobs=1)
    y = pd.Series(0, index=X.index)
    y.iloc[0] = 1
    with pytest.raises(TrainingError, match="only 1 patient"):
        train_model(X, y, model=FAST, cv=CVConfig(folds=3), n_jobs=1)


# ------------------------------------------------------------------------------ folds


def test_make_folds_group_patients_and_test_each_once() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 2)  # two rows per patient
    y = np.repeat(rng.permutation(np.r_[np.zeros(15), np.ones(15)]).astype(int), 2)
    folds = make_folds(y, groups, CVConfig(folds=5, repeats=3), seed=4)
    assert [(r, k) for r, k, _, _ in folds] == [(r, k) for r in range(3) for k in range(5)]
    for r in range(3):
        tested = np.concatenate([te for rr, _, _, te in folds if rr == r])
        assert sorted(tested) == list(range(60))  # every row (so patient) tested once
    for _, _, tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == 60
        assert 2 <= y[te].sum() // 2 <= 4  # stratified: ~3 responders of 6 patients
    first = [te.tolist() for r, _, _, te in folds if r == 0]
    second = [te.tolist() for r, _, _, te in folds if r == 1]
    assert first != second  # repeats reshuffle
    again = make_folds(y, groups, CVConfig(folds=5, repeats=3), seed=4)
    assert all((a[3] == b[3]).all() for a, b in zip(folds, again, strict=True))


def test_select_features_picks_planted_columns_from_the_rows_given() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 30))
    y = np.tile([0, 1], 20)
    X[:20, 7] += 3 * y[:20]  # informative in the first half only
    X[20:, 12] -= 3 * y[20:]  # informative (negatively) in the second half only
    assert select_features(X, y, 2).tolist() == [7, 12]
    assert select_features(X[:20], y[:20], 1).tolist() == [7]
    assert select_features(X[20:], y[20:], 1).tolist() == [12]
    assert select_features(X, y, 0).tolist() == list(range(30))
    assert select_features(X, y, 30).tolist() == list(range(30))
    X[::3, 7] = np.nan  # missing values do not break the ranking
    assert 7 in select_features(X[:20], y[:20], 1)


def test_feature_filter_sees_training_patients_only(monkeypatch) -> None:
    X, y = planted(2, 1.5, n=30, p=12)
    X["f00"] = np.arange(30, dtype=float)  # patient number, to see which rows each call gets
    seen: list[frozenset] = []
    original = train_mod.select_features

    def spy(Xa, ya, k):
        seen.append(frozenset(Xa[:, 0].astype(int).tolist()))
        return original(Xa, ya, k)

    monkeypatch.setattr(train_mod, "select_features", spy)
    cv = CVConfig(folds=3, repeats=2, permutations=0, bootstrap=0)
    train_model(X, y, model=FAST, cv=cv, random_state=5, n_jobs=1)
    arr_y = check_outcome(y.reindex(X.index))
    folds = make_folds(arr_y, X.index.to_numpy(), cv, 5)
    train_sets = {frozenset(X["f00"].to_numpy()[tr].astype(int).tolist()) for _, _, tr, _ in folds}
    everyone = frozenset(range(30))
    assert seen.count(everyone) == 1  # the final model only
    assert {s for s in seen if s != everyone} == train_sets
    assert len(seen) == 1 + 3 * len(folds)  # xgboost + two baselines per fold, final fit


def test_permutation_folds_are_stratified_on_the_permuted_outcome(monkeypatch) -> None:
    # Reusing the real folds for permuted labels unbalances them between folds, which biases
    # the null AUROC low (≈0.46 instead of 0.5 at 40 patients) and the p-value with it.
    X, y = planted(3, 0.0, n=40, p=8)
    calls: list[tuple[np.ndarray, list]] = []
    original = train_mod._oof_xgb

    def spy(Xa, ya, folds, cfg, seed):
        calls.append((ya.copy(), folds))
        return original(Xa, ya, folds, cfg, seed)

    monkeypatch.setattr(train_mod, "_oof_xgb", spy)
    cv = CVConfig(folds=4, repeats=2, permutations=8, bootstrap=0)
    train_model(X, y, model=FAST, cv=cv, random_state=0, n_jobs=1)
    assert len(calls) == 1 + 8
    assert [len(f) for _, f in calls] == [8] + [4] * 8  # permutations rerun the first repeat
    assert sum(not np.array_equal(ya, calls[0][0]) for ya, _ in calls[1:]) == 8
    for ya, folds in calls:
        for _, _, tr, te in folds:
            assert abs(ya[te].sum() - len(te) * ya.mean()) <= 1, "fold not stratified"
            assert abs(ya[tr].sum() - len(tr) * ya.mean()) <= 1


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def signal_result():
    X, y = planted(0, 2.0)
    y_shuffled = y.sample(frac=1.0, random_state=3)  # y's order must not matter
    cv = CVConfig(folds=4, repeats=2, permutations=30, bootstrap=300)
    return X, y, train_model(X, y_shuffled, model=FAST, cv=cv, random_state=0, n_jobs=1)


def test_train_model_finds_planted_signal(signal_result) -> None:
    X, y, r = signal_result
    auc = r.metrics["auroc"]
    assert auc["estimate"] > 0.8
    assert auc["ci_low"] < auc["estimate"] < auc["ci_high"]
    assert auc["estimate"] == pytest.approx(roc_auc_score(y, r.oof["probability"]))
    assert r.permutation["n_permutations"] == 30
    assert r.permutation["p_value"] < 0.1
    assert 0.35 < r.permutation["null_mean"] < 0.65
    assert {"f03", "f41"} <= set(r.features) and len(r.features) == 10
    assert r.booster.feature_names == r.features
    assert r.single_feature_choices and set(r.single_feature_choices) <= {"f03", "f41"}
    assert r.baselines["elastic_net"]["auroc"]["estimate"] > 0.7


def test_train_model_outputs_are_aligned(signal_result) -> None:
    X, y, r = signal_result
    assert list(r.oof.index) == list(X.index)
    assert r.oof["y"].tolist() == y.loc[X.index].tolist()
    np.testing.assert_allclose(
        r.oof["probability"], r.oof[["probability_r0", "probability_r1"]].mean(axis=1)
    )
    assert r.oof["probability"].between(0, 1).all() and r.oof["calibrated"].between(0, 1).all()
    assert len(r.fold_metrics) == 8
    assert r.fold_metrics.groupby("repeat")["n_test"].sum().tolist() == [40, 40]
    assert set(r.frame()["model"]) == {"xgboost", "elastic_net", "best_single_feature"}
    assert len(r.frame()) == 3 * 4
    # Platt calibration is increasing here, and the threshold lies in the calibrated range
    assert r.calibration["a"] > 0
    assert r.oof["calibrated"].min() <= r.threshold <= r.oof["calibrated"].max()
    order = np.argsort(r.oof["probability"].to_numpy())
    assert np.all(np.diff(r.oof["calibrated"].to_numpy()[order]) >= 0)


def test_train_model_null_outcome() -> None:
    X, y = planted(0, 0.0)
    cv = CVConfig(folds=4, repeats=1, permutations=20, bootstrap=100)
    r = train_model(X, y, model=FAST, cv=cv, random_state=0, n_jobs=1)
    assert 0.3 < r.metrics["auroc"]["estimate"] < 0.7
    assert r.permutation["p_value"] > 0.05
    assert 0.35 < r.permutation["null_mean"] < 0.65


def test_train_model_is_deterministic() -> None:
    X, y = planted(1, 1.0, n=24, p=15)
    cv = CVConfig(folds=3, repeats=1, permutations=4, bootstrap=50)
    a = train_model(X, y, model=FAST, cv=cv, random_state=3, n_jobs=1)
    b = train_model(X, y, model=FAST, cv=cv, random_state=3, n_jobs=2)  # parallel = serial
    c = train_model(X, y, model=FAST, cv=cv, random_state=4, n_jobs=1)
    pd.testing.assert_frame_equal(a.oof, b.oof)
    assert a.permutation == b.permutation
    assert a.metrics == b.metrics and a.threshold == b.threshold
    assert not np.allclose(a.oof["probability"], c.oof["probability"])


def test_calibrate() -> None:
    p = np.linspace(0.001, 0.999, 101)
    np.testing.assert_allclose(calibrate(p, 1.0, 0.0), p, rtol=1e-9)
    up = calibrate(p, 2.0, -0.5)
    assert np.all(np.diff(up) > 0) and np.all((up > 0) & (up < 1))
    assert calibrate(np.array([0.5]), 2.0, -0.5)[0] == pytest.approx(1 / (1 + np.exp(0.5)))
    assert np.all(np.diff(calibrate(p, -1.0, 0.0)) < 0)
    assert np.isfinite(calibrate(np.array([0.0, 1.0]), 1.0, 0.0)).all()  # clipped, not inf
