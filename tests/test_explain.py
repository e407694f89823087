"""SHAP values from XGBoost's native contributions, their aggregation, and batch scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from predictor.explain import aggregate_shap, shap_values, top_drivers
from predictor.model.bundle import load_bundle, save_bundle
from predictor.model.train import calibrate
from predictor.score import score_features


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model_parts):
    info = {"threshold": 0.4, "calibration": {"method": "platt", "a": 1.5, "b": -0.2}}
    return load_bundle(save_bundle(tmp_path_factory.mktemp("models"), "il7",
                                   **{**model_parts, "info": info}))


def test_shap_values_equal_tree_explainer_and_add_up(model_parts) -> None:
    shap = pytest.importorskip("shap")
    booster, X = model_parts["booster"], model_parts["features"].copy()
    X.iloc[2, 0] = np.nan  # missing values follow the trees' default directions
    X.iloc[5, [1, 2]] = np.nan
    values, base = shap_values(booster, X)
    assert list(values.index) == list(X.index) and list(values.columns) == list(X.columns)
    explainer = shap.TreeExplainer(booster)
    np.testing.assert_allclose(values.to_numpy(), explainer.shap_values(X), atol=1e-5)
    assert base == pytest.approx(float(np.ravel(explainer.expected_value)[0]), abs=1e-5)
    margin = booster.predict(xgb.DMatrix(X, missing=np.nan), output_margin=True)
    np.testing.assert_allclose(values.sum(axis=1) + base, margin, atol=1e-5)


def test_shap_values_use_the_booster_column_order(model_parts) -> None:
    booster, X = model_parts["booster"], model_parts["features"]
    values, base = shap_values(booster, X)
    reordered, base2 = shap_values(booster, X[X.columns[::-1]].assign(extra=1.0))
    pd.testing.assert_frame_equal(reordered, values)
    assert base2 == base


def test_aggregate_shap_sums_per_group_exactly() -> None:
    values = pd.DataFrame(
        {"a": [0.5, -1.0], "b": [0.25, 2.0], "c": [-0.125, 0.5], "d": [1.0, 1.0]}, index=["P1", "P2"]
    )
    meta = pd.DataFrame(
        {"population": ["CD8 T", "CD8 T", "NK", "Monocytes"], "marker": ["", "IFNg", "IFNg", ""]},
        index=["d", "a", "b", "c"],  # metadata in another order than the values
    )
    by_pop = aggregate_shap(values, meta)
    assert sorted(by_pop.columns) == ["CD8 T", "Monocytes", "NK"]
    assert by_pop.loc["P1"].to_dict() == {"CD8 T": 1.5, "Monocytes": -0.125, "NK": 0.25}
    assert by_pop.loc["P2"].to_dict() == {"CD8 T": 0.0, "Monocytes": 0.5, "NK": 2.0}
    np.testing.assert_array_equal(by_pop.sum(axis=1), values.sum(axis=1))  # additivity
    by_marker = aggregate_shap(values, meta, by="marker")
    assert by_marker.loc["P1"].to_dict() == {"(frequency)": 0.875, "IFNg": 0.75}


def test_top_drivers_by_absolute_shap() -> None:
    values = pd.DataFrame(
        {"a": [0.1, 0.0], "b": [-0.9, 0.2], "c": [0.5, -0.2], "d": [0.0, 0.05]}, index=["P1", "P2"]
    )
    drivers = top_drivers(values, 2)
    assert drivers[0] == [("b", -0.9), ("c", 0.5)]
    assert drivers[1] == [("b", 0.2), ("c", -0.2)]  # ties keep column order
    assert [n for n, _ in top_drivers(values, 10)[0]] == ["b", "c", "a", "d"]


# ------------------------------------------------------------------------------ scoring


def test_score_features_probabilities_and_flags(bundle, model_parts) -> None:
    X = model_parts["features"]
    scores = score_features(bundle, X)
    assert list(scores["patient_id"]) == list(X.index)
    raw = bundle.booster.predict(xgb.DMatrix(X, missing=np.nan))
    np.testing.assert_allclose(scores["probability_uncalibrated"], raw, rtol=1e-6)
    np.testing.assert_allclose(scores["probability"], calibrate(raw, 1.5, -0.2), rtol=1e-6)
    assert (scores["flag"] == (scores["probability"] >= 0.4)).all()
    assert 0 < scores["flag"].sum() < len(X)
    assert scores["threshold"].eq(0.4).all()
    # drivers: names, values and SHAP of the patient's largest |SHAP| features
    values, _ = shap_values(bundle.booster, X)
    first = values.iloc[0].abs().sort_values(ascending=False, kind="stable").index[:3]
    assert [scores.at[0, f"driver_{k}"] for k in (1, 2, 3)] == list(first)
    assert scores.at[0, "driver_1_value"] == X.iloc[0][first[0]]
    assert scores.at[0, "driver_1_shap"] == pytest.approx(values.iloc[0][first[0]])
    # the training patients are inside the training ranges
    assert scores.loc[X.iloc[:, 3].notna().to_numpy(), "warnings"].eq("").all()


def test_score_features_flag_at_the_threshold(bundle, model_parts) -> None:
    X = model_parts["features"]
    probs = score_features(bundle, X)["probability"].to_numpy()
    bundle.meta["threshold"] = float(np.sort(probs)[-5])  # exactly the 5th highest
    try:
        flags = score_features(bundle, X)["flag"]
    finally:
        bundle.meta["threshold"] = 0.4
    assert flags.sum() == 5 and flags[probs == np.sort(probs)[-5]].all()


def test_score_features_warnings(bundle, model_parts) -> None:
    X = model_parts["features"].iloc[1:5].copy()  # rows without missing values
    assert X.notna().all().all()
    f0, f1 = X.columns[0], X.columns[1]
    X.iloc[0, 0] = X[f0].max() + 100  # far above the training range
    X.iloc[1, 1] = model_parts["features"][f1].min() - 1
    X.iloc[2, 3] = np.nan
    X.iloc[3, 3] = 0.0
    w = score_features(bundle, X)["warnings"].tolist()
    assert w[0] == f"1 feature(s) outside the training range: {f0}"
    assert w[1] == f"1 feature(s) outside the training range: {f1}"
    assert w[2] == "1 feature(s) missing"
    assert w[3] == ""
    missing = score_features(bundle, X.drop(columns=[f1]))
    assert missing["warnings"].str.startswith("1 model feature(s) not computable").all()
    assert missing["probability"].notna().all()


def test_score_features_matches_columns_by_name(bundle, model_parts) -> None:
    X = model_parts["features"]
    reference = score_features(bundle, X)
    shuffled = X[list(X.columns[::-1])].assign(**{"unrelated feature": 3.0})
    pd.testing.assert_frame_equal(score_features(bundle, shuffled), reference)
