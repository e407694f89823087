"""Metrics, outcome checks, patient-grouped folds, in-fold filtering, tuning, survival, SHAP."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from predictor.config import CVConfig, ModelConfig, SearchConfig
from predictor.errors import TrainingError
from predictor.model import train as train_mod
from predictor.model.metrics import (
    bootstrap_ci,
    cindex_table,
    comparable_pairs,
    concordance_index,
    fast_auroc,
    metric_table,
    sensitivity_threshold,
    univariate_cindex,
    youden_threshold,
)
from predictor.model.train import (
    Outcome,
    calibrate,
    check_outcome,
    check_survival,
    make_folds,
    select_features,
    train_model,
    xgb_params,
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

    def spy(Xa, ya, k, **kw):
        seen.append(frozenset(Xa[:, 0].astype(int).tolist()))
        return original(Xa, ya, k, **kw)

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
    original = train_mod._cv_predict

    def spy(Xa, out, folds, cfg, seed, **kw):
        calls.append((out.y.copy(), folds))
        return original(Xa, out, folds, cfg, seed, **kw)

    monkeypatch.setattr(train_mod, "_cv_predict", spy)
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


def test_null_importance_puts_the_planted_features_above_their_null(signal_result) -> None:
    X, y, r = signal_result
    null = r.null_importance
    assert list(null.columns) == ["permutation", "feature", "mean_abs_shap"]
    assert sorted(null["permutation"].unique()) == list(range(30))  # one CV per permutation
    assert set(null["feature"]) <= set(X.columns) and (null["mean_abs_shap"] > 0).all()
    # the observed counterpart: the first repeat's fold importances, averaged over its folds
    first = r.fold_importance[r.fold_importance["repeat"] == 0]
    observed = first.groupby("feature")["mean_abs_shap"].sum() / first["fold"].nunique()
    wide = null.pivot_table(index="permutation", columns="feature", values="mean_abs_shap",
                            fill_value=0.0).reindex(columns=X.columns, fill_value=0.0)
    p_value = (1 + (wide >= observed.reindex(X.columns, fill_value=0.0)).sum()) / 31
    assert p_value["f03"] < 0.05 and p_value["f41"] < 0.05  # the planted signal
    assert (p_value.drop(["f03", "f41"]) < 0.05).mean() < 0.2  # noise mostly at its null
    none = train_model(X, y, model=FAST, cv=CVConfig(folds=4, repeats=1, permutations=0,
                                                      bootstrap=0), random_state=0, n_jobs=1)
    assert none.null_importance is None


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


# ------------------------------------------------------------------------------ C-index


def brute_cindex(time, event, risk) -> float:
    """Harrell's C by the definition, pair by pair."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if i == j or not event[i]:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den if den else float("nan")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_concordance_index_equals_brute_force(seed) -> None:
    rng = np.random.default_rng(seed)
    n = 45
    time = rng.integers(1, 15, n).astype(float)  # many tied times
    event = rng.integers(0, 2, n)
    risk = rng.integers(0, 6, n).astype(float)  # many tied risks
    assert concordance_index(time, event, risk) == pytest.approx(brute_cindex(time, event, risk), abs=1e-12)
    cont = rng.normal(size=n)
    assert concordance_index(time, event, cont) == pytest.approx(brute_cindex(time, event, cont), abs=1e-12)


def test_concordance_index_by_hand() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 1, 0, 1])
    assert concordance_index(t, e, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0  # risk falls with time
    assert concordance_index(t, e, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert concordance_index(t, e, np.zeros(4)) == 0.5
    # pairs: (0,1) (0,2) (0,3) (1,2) (1,3); the censored patient 2 never fails first
    assert comparable_pairs(t, e).sum() == 5
    tied = comparable_pairs(np.array([2.0, 2.0, 2.0]), np.array([1, 1, 0]))
    assert tied.tolist() == [[False, False, True], [False, False, True], [False, False, False]]
    assert np.isnan(concordance_index(t, np.zeros(4), np.arange(4.0)))


def test_univariate_cindex_is_the_cindex_of_each_column() -> None:
    rng = np.random.default_rng(5)
    time = rng.exponential(10, 40).round(0) + 1
    event = rng.integers(0, 2, 40)
    X = rng.normal(size=(40, 7))
    X[:, 2] = np.round(X[:, 2])  # ties
    X[::5, 4] = np.nan  # missing at the median
    got = univariate_cindex(X, time, event, chunk=17)  # chunking does not matter
    x4 = np.where(np.isnan(X[:, 4]), np.nanmedian(X[:, 4]), X[:, 4])
    want = [brute_cindex(time, event, X[:, j] if j != 4 else x4) for j in range(7)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_cindex_bootstrap_reweighting_equals_resampling() -> None:
    rng = np.random.default_rng(2)
    n = 30
    time = rng.integers(1, 12, n).astype(float)
    event = rng.integers(0, 2, n)
    risk = -time + rng.normal(0, 4, n)
    tab = cindex_table(time, event, risk, n_boot=200, random_state=9)["cindex"]
    draws = np.random.default_rng(9).integers(0, n, size=(200, n))  # the same resamples
    values = [concordance_index(time[d], event[d], risk[d]) for d in draws]
    lo, hi = np.nanquantile(values, [0.025, 0.975])
    assert tab["ci_low"] == pytest.approx(lo, abs=1e-12) and tab["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert tab["estimate"] == pytest.approx(brute_cindex(time, event, risk))
    assert tab["ci_low"] < tab["estimate"] < tab["ci_high"]
    assert np.isnan(cindex_table(time, event, risk, n_boot=0)["cindex"]["ci_low"])


def test_univariate_auroc_ties_are_exact() -> None:
    # equally strong features must tie exactly, so that column order (not rounding) breaks ties
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 12)
    base = rng.normal(size=24).astype(np.float32)
    X = np.stack([base, base * 3 + 1000, base[::-1].copy()], axis=1).astype(np.float32)
    auc = train_mod.univariate_auroc(X, y)
    assert auc[0] == auc[1] and auc.dtype == np.float64
    assert auc[0] == pytest.approx(roc_auc_score(y, base), abs=1e-12)
    assert select_features(X[:, [1, 0]], y, 1).tolist() == [0]


# ------------------------------------------------------------------------------ survival


def planted_survival(seed: int, beta: float, n: int = 60, p: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cox-like data: hazard ∝ exp(beta·(f05 − f17)), uniform censoring (~30%)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    lp = beta * (x[:, 5] - x[:, 17])
    t_event = rng.exponential(1.0, n) * np.exp(-lp) * 10
    t_cens = rng.uniform(5, 40, n)
    ids = pd.Index([f"S{i:02d}" for i in range(n)], name="patient_id")
    X = pd.DataFrame(x, columns=[f"f{j:02d}" for j in range(p)], index=ids)
    y = pd.DataFrame({"time": np.minimum(t_event, t_cens).round(2) + 0.01,
                      "event": (t_event <= t_cens).astype(int)}, index=ids)
    return X, y


def test_check_survival_errors() -> None:
    y = pd.DataFrame({"time": [1.0, 2.0, 3.0, 4.0], "event": [1, 0, 1, 1]}, index=list("abcd"))
    t, e = check_survival(y, folds=2)
    assert t.tolist() == [1, 2, 3, 4] and e.tolist() == [1, 0, 1, 1]
    with pytest.raises(TrainingError, match="needs the columns 'time' and 'event'"):
        check_survival(y[["time"]])
    with pytest.raises(TrainingError, match="finite and > 0; not for \\['b'\\]"):
        check_survival(y.assign(time=[1.0, 0.0, 3.0, 4.0]))
    with pytest.raises(TrainingError, match="0 \\(censored\\) or 1"):
        check_survival(y.assign(event=[1, 2, 1, 1]))
    with pytest.raises(TrainingError, match="only 3 event\\(s\\); the 5-fold"):
        check_survival(y, folds=5)
    with pytest.raises(TrainingError, match="missing or non-numeric time/event for patient\\(s\\) \\['c'\\]"):
        check_survival(y.assign(time=[1.0, 2.0, None, 4.0]))


def test_cox_label_sign_marks_censoring() -> None:
    out = Outcome("survival", np.array([1, 0, 1]), np.array([2.0, 5.0, 7.5]))
    assert out.label().tolist() == [2.0, -5.0, 7.5]
    assert xgb_params(ModelConfig(), 0, kind="survival")["objective"] == "survival:cox"
    perm = out.permuted(3)
    # time and event move together
    pairs = {(t, e) for t, e in zip(out.time, out.y, strict=True)}
    assert {(t, e) for t, e in zip(perm.time, perm.y, strict=True)} == pairs


@pytest.fixture(scope="module")
def survival_result():
    X, y = planted_survival(0, 2.0)  # oracle C-index 0.86
    cv = CVConfig(folds=4, repeats=2, permutations=19, bootstrap=200)
    return X, y, train_model(X, y, outcome="survival", model=FAST, cv=cv, random_state=0, n_jobs=1)


def test_survival_model_finds_planted_signal(survival_result) -> None:
    X, y, r = survival_result
    assert r.kind == "survival" and r.metric == "cindex"
    c = r.metrics["cindex"]
    assert c["estimate"] > 0.72 and c["ci_low"] < c["estimate"] < c["ci_high"]
    assert c["estimate"] == pytest.approx(concordance_index(y["time"], y["event"], r.oof["risk"]))
    assert r.permutation["p_value"] == pytest.approx(0.05)  # 1 / (1 + 19): nothing beats it
    assert r.permutation["statistic"] == "cindex" and r.permutation["procedure"] == "cv"
    assert 0.35 < r.permutation["null_mean"] < 0.65
    assert set(r.baselines) == {"best_single_feature"}
    assert r.baselines["best_single_feature"]["cindex"]["estimate"] > 0.65
    assert set(r.single_feature_choices) <= {"f05", "f17"}
    assert {"f05", "f17"} <= set(r.features)
    assert list(r.oof.columns) == ["time", "event", "risk", "risk_r0", "risk_r1", "best_single_feature"]
    assert r.calibration == {} and r.threshold_rule == "median-risk"
    # the threshold splits the training patients in half under the final model (hazard ratios)
    risk = r.booster.predict(xgb.DMatrix(X[r.features].to_numpy(np.float32), feature_names=r.features))
    assert r.threshold == pytest.approx(np.median(risk)) and (risk > 0).all()
    assert set(r.fold_metrics.columns) >= {"n_events", "cindex"}


def test_survival_null_outcome_is_near_chance() -> None:
    X, y = planted_survival(1, 0.0)
    cv = CVConfig(folds=4, repeats=1, permutations=10, bootstrap=50)
    r = train_model(X, y, outcome="survival", model=FAST, cv=cv, random_state=0, n_jobs=1)
    assert 0.35 < r.metrics["cindex"]["estimate"] < 0.65
    assert r.permutation["p_value"] > 0.05


def test_train_model_outcome_argument_is_checked() -> None:
    X, y = planted(0, 1.0, n=20, p=5)
    with pytest.raises(ValueError, match="'outcome' parameter of train_model"):
        train_model(X, y, outcome="ordinal")
    with pytest.raises(TrainingError, match="outcome='survival'"):
        train_model(X, pd.DataFrame({"time": 1.0, "event": y}), n_jobs=1)


# ------------------------------------------------------------------------------ OOF SHAP


def test_oof_shap_adds_up_and_ranks_per_fold(signal_result) -> None:
    X, y, r = signal_result
    shap = r.oof_shap
    assert list(shap.index) == list(X.index)
    assert list(shap.columns) == [*X.columns, "base_value"]
    # rows + base value = the mean over repeats of each patient's out-of-fold log-odds
    p = r.oof[["probability_r0", "probability_r1"]].to_numpy()
    np.testing.assert_allclose(shap.sum(axis=1), np.log(p / (1 - p)).mean(axis=1), atol=1e-4)
    fi = r.fold_importance
    assert list(fi.columns) == ["repeat", "fold", "feature", "mean_abs_shap", "rank"]
    assert len(fi) == 8 * 10  # 4 folds × 2 repeats × 10 selected features
    for (_rep, _fold), g in fi.groupby(["repeat", "fold"]):
        assert g["rank"].tolist() == list(range(1, 11))
        assert g["mean_abs_shap"].is_monotonic_decreasing
    never = set(X.columns) - set(fi["feature"])
    assert never and (shap[sorted(never)] == 0).all().all()  # never selected → 0
    stab = r.stability(2)
    assert set(stab.loc[stab["n_folds_top2"] == 8, "feature"]) == {"f03", "f41"}
    assert stab.iloc[0]["share_top2"] == 1.0


# ------------------------------------------------------------------------------ tuning


SEARCH = SearchConfig(max_depth=(1, 2), n_estimators=(10, 30), max_features=(2, 20), inner_folds=3)


def test_iteration_range_reads_a_shorter_model() -> None:
    # the inner loop reads every n_estimators from one fit; the first trees must not depend on
    # the later ones (same seed, row and column subsampling included)
    X, y = planted(4, 1.0, n=40, p=20)
    dm = xgb.DMatrix(X.to_numpy(np.float32), label=y.loc[X.index].to_numpy())
    params = xgb_params(ModelConfig(subsample=0.7, colsample_bytree=0.5), 3)
    long = xgb.train(params, dm, 40)
    short = xgb.train(params, dm, 15)
    np.testing.assert_array_equal(long.predict(dm, iteration_range=(0, 15)), short.predict(dm))


def test_tuning_chooses_within_the_grid_and_records_choices() -> None:
    X, y = planted(5, 1.5, n=48, p=30)
    cv = CVConfig(folds=4, repeats=2, permutations=0, bootstrap=0)
    r = train_model(X, y, model=replace(FAST, search=SEARCH), cv=cv, random_state=1, n_jobs=2)
    fm = r.fold_metrics
    assert {"max_depth", "n_estimators", "max_features", "inner_auroc"} <= set(fm.columns)
    for key, values in SEARCH.grid.items():
        assert set(fm[key]) <= set(values)
        assert r.settings[key] in values
    assert (fm["n_features"] == fm["max_features"]).all()
    t = r.tuning
    assert t["n_settings"] == 8 and t["metric"] == "auroc" and t["inner_folds"] == 3
    table = t["table"]
    assert len(table) == 8 and table["chosen"].sum() == 1
    best = table[table["chosen"]].iloc[0]
    assert best["inner_auroc"] == table["inner_auroc"].max()
    assert {k: best[k] for k in SEARCH.grid} == t["final"]
    assert t["final_inner_score"] == best["inner_auroc"]
    assert len(r.features) == r.settings["max_features"]
    assert r.booster.num_boosted_rounds() == r.settings["n_estimators"]
    assert r.metrics["auroc"]["estimate"] > 0.75
    # parallel outer folds give the serial result
    again = train_model(X, y, model=replace(FAST, search=SEARCH), cv=cv, random_state=1, n_jobs=1)
    pd.testing.assert_frame_equal(r.fold_metrics, again.fold_metrics)
    pd.testing.assert_frame_equal(r.oof, again.oof)


def test_tuning_by_logloss() -> None:
    X, y = planted(6, 1.5, n=40, p=20)
    search = replace(SEARCH, metric="logloss", max_features=())
    cv = CVConfig(folds=4, repeats=1, permutations=0, bootstrap=0)
    r = train_model(X, y, model=replace(FAST, search=search), cv=cv, random_state=0, n_jobs=1)
    table = r.tuning["table"]
    assert r.tuning["metric"] == "logloss" and "inner_logloss" in r.fold_metrics
    assert table.loc[table["chosen"], "inner_logloss"].iloc[0] == table["inner_logloss"].min()


def test_inner_loop_sees_outer_training_patients_only(monkeypatch) -> None:
    X, y = planted(7, 1.5, n=36, p=12)
    X["f00"] = np.arange(36, dtype=float)  # patient number
    seen: list[frozenset] = []
    original = train_mod.rank_features

    def spy(Xa, out, **kw):
        seen.append(frozenset(Xa[:, 0].astype(int).tolist()))
        return original(Xa, out, **kw)

    monkeypatch.setattr(train_mod, "rank_features", spy)
    cv = CVConfig(folds=3, repeats=1, permutations=0, bootstrap=0)
    search = SearchConfig(max_depth=(1, 2), inner_folds=3)
    train_model(X, y, model=replace(FAST, search=search), cv=cv, random_state=2, n_jobs=1)
    folds = make_folds(check_outcome(y.reindex(X.index)), X.index.to_numpy(), cv, 2)
    for f, (_, _, tr, te) in enumerate(folds):
        calls = seen[4 * f : 4 * f + 4]  # three inner training folds, then the outer refit
        train_set = frozenset(tr.tolist())
        assert calls[3] == train_set
        for inner in calls[:3]:
            assert inner < train_set and not inner & frozenset(te.tolist())
            assert len(inner) == pytest.approx(len(tr) * 2 / 3, abs=1)
    everyone = frozenset(range(36))
    final = seen[-4:]  # the final model: inner tuning on all patients, then the refit
    assert final[3] == everyone and all(s < everyone for s in final[:3])


def test_permutation_procedure_with_tuning(monkeypatch) -> None:
    X, y = planted(8, 1.0, n=32, p=10)
    calls: list[bool] = []
    original = train_mod._cv_predict

    def spy(Xa, out, folds, cfg, seed, *, tune, **kw):
        calls.append(tune)
        return original(Xa, out, folds, cfg, seed, tune=tune, **kw)

    monkeypatch.setattr(train_mod, "_cv_predict", spy)
    cv = CVConfig(folds=3, repeats=1, permutations=3, bootstrap=0)
    search = SearchConfig(max_depth=(1, 2))
    fixed = train_model(X, y, model=replace(FAST, search=search), cv=cv, n_jobs=1)
    # headline (tuned), the observed fixed-parameter statistic, 3 fixed-parameter permutations
    assert calls == [True, False, False, False, False]
    assert fixed.permutation["procedure"] == "fixed" and "not the statistic" in fixed.permutation["tests"]
    assert fixed.null_importance is None  # a fixed-settings null is no null for tuned importances
    calls.clear()
    nested = train_model(X, y, model=replace(FAST, search=replace(search, permutation_test="nested")),
                         cv=cv, n_jobs=1)
    assert calls == [True, True, True, True]
    assert nested.permutation["procedure"] == "nested"
    assert sorted(nested.null_importance["permutation"].unique()) == [0, 1, 2]
    assert nested.permutation["observed"] == pytest.approx(fast_auroc(nested.oof["y"], nested.oof["probability_r0"]))


def test_inner_folds_need_enough_patients() -> None:
    X, y = planted(9, 1.0, n=16, p=6)
    cv = CVConfig(folds=4, repeats=1, permutations=0, bootstrap=0)
    with pytest.raises(TrainingError, match="the 7-fold inner CV of \\[model.search\\] needs at least 7"):
        train_model(X, y, model=replace(FAST, search=SearchConfig(max_depth=(1, 2), inner_folds=7)),
                    cv=cv, n_jobs=1)


def test_survival_tuning_uses_the_cindex() -> None:
    X, y = planted_survival(3, 1.0, n=48, p=20)
    cv = CVConfig(folds=3, repeats=1, permutations=0, bootstrap=0)
    r = train_model(X, y, outcome="survival", model=replace(FAST, search=SearchConfig(max_depth=(1, 3))),
                    cv=cv, n_jobs=1)
    assert r.tuning["metric"] == "cindex" and "inner_cindex" in r.fold_metrics
    assert set(r.fold_metrics["max_depth"]) <= {1, 3}
    assert r.metrics["cindex"]["estimate"] > 0.6


# ------------------------------------------------------------------------------ covariates


def _with_arm(seed: int, n: int = 48, p: int = 40) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """An arm that shifts the response, a perfect (noisier) proxy of the arm among the features,
    and f05, which predicts the response within the arms."""
    rng = np.random.default_rng(seed)
    arm = rng.permutation(np.r_[np.zeros(n // 2), np.ones(n - n // 2)])
    x = rng.normal(size=(n, p))
    x[:, 1] = 3.0 * arm + rng.normal(0, 0.3, n)  # separates the arms, like an IL-7 target
    lp = 2.0 * (arm - 0.5) + 1.5 * x[:, 5]
    y = (lp + rng.logistic(size=n) * 0.5 > 0).astype(int)
    ids = pd.Index([f"P{i:02d}" for i in range(n)], name="patient_id")
    X = pd.DataFrame(x, columns=[f"f{j:02d}" for j in range(p)], index=ids)
    X["clinical: arm = IL-7"] = arm
    strata = pd.Series(arm.astype(int).astype(str), index=ids)
    return X, pd.Series(y, index=ids), strata


def test_select_features_always_keeps_the_covariates() -> None:
    X, y = planted(1, 2.0, n=40, p=30)
    Xa = X.to_numpy()
    keep = np.array([20, 7])
    assert select_features(Xa, y.to_numpy(), 2, keep=keep).tolist() == sorted({3, 29, 7, 20})
    assert select_features(Xa, y.to_numpy(), 0, keep=keep).tolist() == list(range(30))
    assert select_features(Xa, y.to_numpy(), 28, keep=keep).tolist() == list(range(30))
    order = train_mod.rank_features(Xa, y.to_numpy(), keep=keep)
    assert order[:2].tolist() == [7, 20] and sorted(order.tolist()) == list(range(30))


def test_permutation_within_strata_keeps_each_stratum_s_outcomes() -> None:
    y = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0])
    strata = np.array(["a"] * 4 + ["b"] * 6)
    out = Outcome("binary", y)
    for seed in range(5):
        py = out.permuted(seed, strata).y
        assert sorted(py[:4]) == sorted(y[:4]) and sorted(py[4:]) == sorted(y[4:])
    assert any(not np.array_equal(out.permuted(s, strata).y, y) for s in range(5))


def test_train_model_with_a_covariate() -> None:
    X, y, strata = _with_arm(0)
    cov = ["clinical: arm = IL-7"]
    cv = CVConfig(folds=4, repeats=1, permutations=6, bootstrap=50)
    r = train_model(X, y, model=replace(FAST, max_features=3), cv=cv, random_state=0, n_jobs=1,
                    covariates=cov, strata=strata)
    assert r.covariates == cov
    assert cov[0] in r.features and len(r.features) == 4  # top 3 + the covariate
    fi = r.fold_importance
    assert fi.groupby(["repeat", "fold"])["feature"].apply(lambda f: cov[0] in set(f)).all()
    # fitted first: the arm's own trees start every booster, so the arm gets the arm effect
    # (without them the trees would split on the proxy f01 instead)
    assert r.booster.num_boosted_rounds() == FAST.n_estimators + train_mod.COVARIATE_ROUNDS
    shap = r.oof_shap.drop(columns="base_value").abs().mean()
    assert shap[cov[0]] > shap["f01"]
    assert "covariates_only" in r.baselines and "covariates_only" in r.oof
    assert set(r.frame()["model"]) == {"xgboost", "elastic_net", "best_single_feature", "covariates_only"}
    assert cov[0] not in r.single_feature_choices  # the best single feature is a feature
    perm = r.permutation
    assert perm["within_strata"] and "given the covariates" in perm["tests"]
    plain = train_model(X, y, model=replace(FAST, max_features=3), cv=cv, random_state=0, n_jobs=1)
    assert plain.permutation["within_strata"] is False and not plain.covariates
    assert plain.booster.num_boosted_rounds() == FAST.n_estimators
    with pytest.raises(ValueError, match="'covariates' parameter of train_model"):
        train_model(X, y, model=FAST, cv=cv, covariates=["nope"], n_jobs=1)


def test_covariates_with_tuning_and_survival() -> None:
    X, y, strata = _with_arm(1, n=45)
    cov = ["clinical: arm = IL-7"]
    cv = CVConfig(folds=3, repeats=1, permutations=0, bootstrap=0)
    tuned = train_model(X, y, model=replace(FAST, search=SearchConfig(max_features=(2, 5), inner_folds=3)),
                        cv=cv, n_jobs=1, covariates=cov)
    assert cov[0] in tuned.features and len(tuned.features) in (3, 6)
    Xs, ys = planted_survival(2, 1.0, n=45, p=20)
    Xs["clinical: arm = IL-7"] = X["clinical: arm = IL-7"].to_numpy()
    surv = train_model(Xs, ys, outcome="survival", model=FAST, cv=cv, n_jobs=1, covariates=cov)
    assert cov[0] in surv.features and "covariates_only" in surv.baselines
