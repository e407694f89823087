"""SHAP values from XGBoost's native contributions, their aggregation, and batch scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from predictor.explain import (
    LEVELS,
    aggregate_shap,
    describe_driver,
    explain_bundle,
    explain_model,
    feature_meta,
    fold_stability,
    group_labels,
    interaction_pairs,
    interaction_values,
    parse_feature_name,
    same_readouts,
    shap_values,
    top_drivers,
)
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


def test_covariates_stay_out_of_the_population_and_marker_sums() -> None:
    values = pd.DataFrame({"a": [0.5, -1.0], "b": [0.25, 2.0], "clinical: arm = IL-7": [1.0, -0.5],
                           "clinical: age": [0.1, 0.2]}, index=["P1", "P2"])
    meta = pd.DataFrame(
        {"population": ["CD8 T", "NK", "", ""], "marker": ["", "IFNg", "", ""],
         "covariate": ["", "", "arm", "age"]},
        index=["a", "b", "clinical: arm = IL-7", "clinical: age"],
    )
    by_pop = aggregate_shap(values, meta)
    assert sorted(by_pop.columns) == ["CD8 T", "NK"]  # no "-" or covariate group among populations
    np.testing.assert_allclose(by_pop.sum(axis=1), values[["a", "b"]].sum(axis=1))
    assert sorted(aggregate_shap(values, meta, by="marker").columns) == ["(frequency)", "IFNg"]
    by_cov = aggregate_shap(values, meta, by="covariate")
    assert by_cov.loc["P1"].to_dict() == {"age": 0.1, "arm": 1.0}
    # the flag, or the name alone (e.g. metadata parsed from names)
    parsed = feature_meta(list(values.columns))
    assert parsed["covariate"].tolist() == ["", "", "arm", "age"]
    assert parsed.loc["clinical: arm = IL-7", "population"] == ""
    assert list(group_labels(parsed, "covariate")) == ["arm", "age"]
    assert list(group_labels(parsed, "population").index) == ["a", "b"]
    fi = pd.DataFrame({"repeat": 0, "fold": [0, 0, 0, 1, 1, 1], "feature": ["a", "b", "clinical: arm = IL-7"] * 2,
                       "mean_abs_shap": [0.1, 0.2, 5.0, 0.3, 0.1, 5.0]})
    st = fold_stability(fi, meta, k=1)
    assert sorted(st.index) == ["CD8 T", "NK"] and st.loc["NK", "top_k_frequency"] == 0.5
    assert list(fold_stability(fi, meta, by="covariate", k=1).index) == ["arm"]


def test_explanations_rank_covariates_apart(model_parts) -> None:
    booster, X, meta = model_parts["booster"], model_parts["features"], model_parts["meta"]
    values, base = shap_values(booster, X)
    arm = pd.Series(np.tile([0.4, -0.4], len(X) // 2), index=X.index)  # a large covariate effect
    oof = values.assign(**{"clinical: arm = IL-7": arm})
    cov_meta = pd.concat([meta.assign(covariate=""), pd.DataFrame(
        {c: "" for c in meta.columns} | {"covariate": "arm"}, index=["clinical: arm = IL-7"])])
    ex = explain_model(booster, X, cov_meta, oof_shap=oof, interactions=False)
    assert ex.covariates == ["arm"]
    frame = ex.frame()
    assert set(frame["level"]) == {*LEVELS, "covariate"}
    pop = frame[frame["level"] == "population"]
    assert "arm" not in set(pop["group"]) and "-" not in set(pop["group"])
    assert pop["n_features"].sum() == X.shape[1]  # every cytometry feature, no covariate
    cov = frame[frame["level"] == "covariate"]
    assert cov["group"].tolist() == ["arm"] and cov["rank"].tolist() == [1]
    assert cov["mean_abs_shap"].iloc[0] == pytest.approx(0.4)
    np.testing.assert_allclose(ex.by("population").sum(axis=1) + ex.by("covariate").sum(axis=1),
                               oof.sum(axis=1), atol=1e-6)  # additivity over both kinds


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


# ------------------------------------------------------------------------------ interactions


def test_interaction_values_add_up_to_shap_values(model_parts) -> None:
    booster, X = model_parts["booster"], model_parts["features"]
    inter, names, base = interaction_values(booster, X)
    values, base_contrib = shap_values(booster, X)
    assert names == list(values.columns) and inter.shape == (len(X), len(names), len(names))
    np.testing.assert_allclose(inter.sum(axis=2), values.to_numpy(), atol=1e-5)
    np.testing.assert_allclose(inter, inter.transpose(0, 2, 1), atol=1e-6)  # symmetric
    assert base == pytest.approx(base_contrib, abs=1e-6)


def test_interaction_values_equal_tree_explainer(model_parts) -> None:
    shap = pytest.importorskip("shap")
    booster, X = model_parts["booster"], model_parts["features"].head(12)
    inter, _, _ = interaction_values(booster, X)
    ref = shap.TreeExplainer(booster).shap_interaction_values(X)
    np.testing.assert_allclose(inter, ref, atol=1e-5)


def test_interaction_pairs_find_a_planted_interaction() -> None:
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(300, 4)), columns=["a", "b", "c", "d"])
    y = ((X["a"] > 0) ^ (X["c"] > 0)).astype(int)  # pure interaction of a and c
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "eta": 0.3, "nthread": 1},
                        xgb.DMatrix(X, label=y), num_boost_round=30)
    inter, names, _ = interaction_values(booster, X)
    pairs = interaction_pairs(inter, names, top=3)
    assert {pairs.at[0, "feature_a"], pairs.at[0, "feature_b"]} == {"a", "c"}
    assert pairs["mean_abs_interaction"].is_monotonic_decreasing


# ------------------------------------------------------------------------------ metadata and groups


def test_parse_feature_name_inverts_feature_name() -> None:
    from predictor.features.matrix import feature_name

    for key in [("CD8 T", "IFNg", "frac_pos", "stim", "week6-baseline"),
                ("Treg", "", "pct_parent", "unstim", "baseline"),
                ("Monocytes", "CD14", "median", "stim-unstim", "week6-baseline")]:
        parsed = parse_feature_name(feature_name(*key), baseline="baseline")
        assert tuple(parsed.values()) == key
    assert parse_feature_name("CD8 T | % live | unstim | Δweek6")["timepoint"] == "Δweek6"


def test_feature_meta_prefers_the_schema_and_parses_the_rest(model_parts) -> None:
    meta = model_parts["meta"]
    names = [*meta.index[:2], "NK | TNFa | frac+ | stim | Δweek6"]
    out = feature_meta(names, meta, baseline="baseline")
    assert out.loc[names[0], list(meta.columns)].tolist() == meta.loc[names[0]].tolist()
    assert out.loc[names[2]].tolist() == ["NK", "TNFa", "frac_pos", "stim", "week6-baseline", ""]
    assert (out["covariate"] == "").all()  # no clinical covariate among them


def test_group_labels_per_contrast_and_unknown_level(model_parts) -> None:
    meta = model_parts["meta"]
    contrast = group_labels(meta, "contrast")
    assert contrast.iloc[0] == "unstim · Δweek6"
    assert contrast.iloc[2] == "stim − unstim · baseline"
    with pytest.raises(ValueError, match="'by' parameter must be one of"):
        group_labels(meta, "tissue")


def test_fold_stability_counts_top_k_and_ranks() -> None:
    fi = pd.DataFrame({
        "repeat": [0, 0, 0, 0, 0, 0, 1, 1],
        "fold": [0, 0, 0, 1, 1, 1, 0, 0],
        "feature": ["a1", "a2", "b1", "a1", "b1", "c1", "b1", "c1"],
        "mean_abs_shap": [0.3, 0.3, 0.5, 0.1, 0.4, 0.2, 0.9, 0.1],
    })
    meta = pd.DataFrame({"population": ["A", "A", "B", "C"], "marker": "", "statistic": "median",
                         "condition": "unstim", "timepoint": "baseline"},
                        index=["a1", "a2", "b1", "c1"])
    st = fold_stability(fi, meta, k=1, groups=["A", "B", "C", "D"])
    # fold 0/0: A 0.6 > B 0.5 > C = D = 0;  0/1: B 0.4 > C 0.2 > A 0.1 > D 0;  1/0: B > C > A = D
    assert st.loc["A", "top_k_frequency"] == pytest.approx(1 / 3)
    assert st.loc["B", "top_k_frequency"] == pytest.approx(2 / 3)
    assert st.loc["B", "mean_rank"] == pytest.approx((2 + 1 + 1) / 3)
    assert st.loc["A", "mean_rank"] == pytest.approx((1 + 3 + 3.5) / 3)
    assert st.loc["D", "mean_rank"] == pytest.approx((3.5 + 4 + 3.5) / 3)
    assert st.loc["D", "sd_rank"] == pytest.approx(np.std([3.5, 4, 3.5], ddof=1))
    assert (st["n_folds"] == 3).all()


# ------------------------------------------------------------------------------ same readouts


def _lineage_case(n: int = 30, seed: int = 0):
    """Parent P with children C (its near copy) and D (independent), grandchild G of C."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    cols = {
        "P live": base,
        "C live": base + rng.normal(scale=0.05, size=n),  # the same readout as P's
        "G live": -base + rng.normal(scale=0.05, size=n),  # mirrors P: |ρ| counts
        "D live": rng.normal(size=n),  # its own signal
        "P parent": base,  # % of parent: a share of a different parent in each gate
        "C parent": base,
        "C IFNg": base,  # P has no IFNg feature: nothing to match
        "clinical: arm = IL-7": base,
    }
    data = pd.DataFrame(cols, index=[f"P{i:02d}" for i in range(n)])
    stat = {"live": "pct_live", "parent": "pct_parent", "IFNg": "frac_pos"}
    rows = {}
    for name in cols:
        if name.startswith("clinical"):
            rows[name] = {"population": "", "marker": "", "statistic": "", "condition": "",
                          "timepoint": "", "covariate": "arm"}
            continue
        pop, what = name.split(" ")
        rows[name] = {"population": pop, "marker": "IFNg" if what == "IFNg" else "",
                      "statistic": stat[what], "condition": "unstim", "timepoint": "baseline",
                      "covariate": ""}
    meta = pd.DataFrame.from_dict(rows, orient="index")
    parents = {"P": "root", "C": "P", "G": "C", "D": "P"}
    return data, meta, parents


def test_same_readouts_credit_a_child_gate_to_its_matching_ancestor() -> None:
    data, meta, parents = _lineage_case()
    same = same_readouts(meta, data, parents).set_index("feature")
    assert sorted(same.index) == ["C live", "G live"]  # not D, not % parent, not covariates
    assert same.loc["C live", "credited_to"] == "P" and same.loc["C live", "rho"] > 0.99
    # the highest matching ancestor, through C; a mirrored readout matches too
    assert same.loc["G live", "credited_to"] == "P" and same.loc["G live", "rho"] < -0.99
    assert same_readouts(meta, data, parents, rho=1.0).empty  # nothing is exactly the same
    few = same_readouts(meta, data.iloc[:9], parents)  # too few patients for a correlation
    assert few.empty and list(few.columns) == ["feature", "population", "credited_to", "rho"]
    holes = data.copy()
    holes.loc[holes.index[:25], "C live"] = np.nan  # 5 patients with both values left
    assert "C live" not in set(same_readouts(meta, holes, parents)["feature"])


def test_explanations_count_same_readouts_for_the_parent() -> None:
    data, meta, parents = _lineage_case()
    rng = np.random.default_rng(1)
    values = pd.DataFrame(rng.normal(scale=0.2, size=data.shape), index=data.index,
                          columns=data.columns)
    same = same_readouts(meta, data, parents)
    from predictor.explain import Explanations

    fi = pd.DataFrame({"repeat": 0, "fold": np.repeat([0, 1], len(values.columns)),
                       "feature": list(values.columns) * 2,
                       "mean_abs_shap": np.tile(values.abs().mean().to_numpy(), 2)})
    ex = Explanations(values, 0.0, data, meta, "out-of-fold", fold_importance=fi,
                      same_readouts=same)
    plain = Explanations(values, 0.0, data, meta, "out-of-fold", fold_importance=fi)
    by_pop = ex.by("population")
    assert sorted(by_pop.columns) == ["C", "D", "P"]  # G's only feature counts for P
    np.testing.assert_allclose(by_pop["P"], values[["P live", "P parent", "C live", "G live"]].sum(axis=1))
    np.testing.assert_allclose(by_pop["C"], values[["C parent", "C IFNg"]].sum(axis=1))
    np.testing.assert_allclose(by_pop.sum(axis=1), plain.by("population").sum(axis=1))  # additivity
    frame = ex.frame("population").set_index("group")
    assert frame.loc["P", "n_features"] == 4 and frame["n_features"].sum() == 7
    assert frame.loc["P", "mean_abs_shap"] == pytest.approx(by_pop["P"].abs().mean())
    assert sorted(ex.stability("population").index) == ["C", "D", "P"]  # folds grouped alike
    assert ex.by("marker").equals(plain.by("marker"))  # other levels are untouched
    assert ex.meta.loc["C live", "population"] == "C"  # features keep their own metadata


def test_explain_model_finds_same_readouts_from_the_lineage(model_parts) -> None:
    booster, X, meta = model_parts["booster"], model_parts["features"], model_parts["meta"]
    pops = [p for p in meta["population"].unique() if p]
    parents = {p: "root" for p in pops}
    parents[pops[1]] = pops[0]  # pretend the second population is gated inside the first
    ex = explain_model(booster, X, meta, interactions=False, parents=parents)
    want = same_readouts(ex.meta, ex.data, parents)
    pd.testing.assert_frame_equal(ex.same_readouts, want)
    off = explain_model(booster, X, meta, interactions=False, parents=parents,
                        same_readout_rho=None)
    assert off.same_readouts is None and off.group_meta is off.meta


def test_null_test_per_population_by_hand() -> None:
    from predictor.explain import Explanations

    data, meta, parents = _lineage_case()
    values = pd.DataFrame(0.1, index=data.index, columns=data.columns)
    # first repeat: 2 folds; repeat 1 must be ignored
    fi = pd.DataFrame({"repeat": [0, 0, 0, 0, 1], "fold": [0, 0, 1, 1, 0],
                       "feature": ["P live", "D live", "P live", "clinical: arm = IL-7", "D live"],
                       "mean_abs_shap": [0.4, 0.2, 0.2, 9.0, 5.0]})
    null = pd.DataFrame({"permutation": [0, 0, 1, 2, 3], "feature": ["P live", "D live", "D live",
                                                                    "C live", "P parent"],
                         "mean_abs_shap": [0.5, 0.05, 0.2, 0.1, 0.2]})
    ex = Explanations(values, 0.0, data, meta, "out-of-fold", fold_importance=fi,
                      null_importance=null)
    nt = ex.null_test("population")
    # observed: P (0.4 + 0.2) / 2 = 0.3, D 0.2 / 2 = 0.1, C 0; the covariate is no population
    assert nt.loc["P", "null_score"] == pytest.approx(0.3) and nt.loc["D", "null_score"] == pytest.approx(0.1)
    assert "arm" not in nt.index and (nt["n_permutations"] == 4).all()
    # P's null per permutation: 0.5, 0, 0, 0.2 → one ≥ 0.3; D's: 0.05, 0.2, 0, 0 → one ≥ 0.1
    assert nt.loc["P", "null_p"] == pytest.approx(2 / 5) and nt.loc["D", "null_p"] == pytest.approx(2 / 5)
    assert nt.loc["P", "null_mean"] == pytest.approx(0.7 / 4)
    assert nt.loc["C", "null_p"] == pytest.approx(5 / 5)  # 0 observed: every null ties it
    frame = ex.frame("population").set_index("group")
    assert frame.loc["P", "null_p"] == pytest.approx(2 / 5)
    # with C's readout counted for P, C's null importance counts for P too
    merged = Explanations(values, 0.0, data, meta, "out-of-fold", fold_importance=fi,
                          null_importance=null, same_readouts=same_readouts(meta, data, parents))
    assert merged.null_test().loc["P", "null_mean"] == pytest.approx(0.8 / 4)
    assert Explanations(values, 0.0, data, meta, "out-of-fold").null_test() is None
    assert ex.frame("covariate")["null_p"].isna().all()  # covariates: no null per group


# ------------------------------------------------------------------------------ the result object


def test_explanations_frame_is_tidy_and_exact(model_parts) -> None:
    booster, X, meta = model_parts["booster"], model_parts["features"], model_parts["meta"]
    ex = explain_model(booster, X, meta)
    assert ex.source == "in-sample"
    frame = ex.frame()
    assert set(frame["level"]) == set(LEVELS)
    assert {"group", "rank", "n_features", "mean_abs_shap", "mean_shap", "top_k_frequency"} <= set(frame.columns)
    values, _ = shap_values(booster, X)
    for level in LEVELS:
        sums = ex.by(level)
        np.testing.assert_allclose(sums.sum(axis=1), values.sum(axis=1), atol=1e-5)  # additivity
        part = frame[frame["level"] == level]
        assert part["n_features"].sum() == X.shape[1]
        assert list(part["rank"]) == list(range(1, len(part) + 1))
        assert part["mean_abs_shap"].is_monotonic_decreasing
        np.testing.assert_allclose(part.set_index("group")["mean_abs_shap"],
                                   sums.abs().mean().reindex(part["group"]), rtol=1e-12)
    assert frame["top_k_frequency"].isna().all()  # no fold importances given
    long = ex.patient_frame("marker")
    assert list(long.columns) == ["patient_id", "level", "group", "shap"]
    assert len(long) == len(X) * ex.by("marker").shape[1]


def _write_oof_tables(path, booster, X) -> None:
    values, base = shap_values(booster, X)
    oof = (values * 0.5).assign(base_value=base - 0.1)
    oof.index.name = "patient_id"
    oof.to_csv(path / "oof_shap.csv")
    rows = [{"repeat": 0, "fold": f, "feature": c, "mean_abs_shap": float(abs(values[c]).mean()) * (1 + f),
             "rank": i + 1} for f in range(3) for i, c in enumerate(values.columns)]
    pd.DataFrame(rows).to_csv(path / "fold_importance.csv", index=False)


def test_explain_bundle_uses_out_of_fold_tables_when_present(bundle, tmp_path) -> None:
    import shutil

    from predictor.model.bundle import load_bundle

    ex = explain_bundle(bundle)
    assert ex.source == "in-sample" and ex.fold_importance is None
    assert ex.stability() is None and ex.interactions is not None
    copy = tmp_path / "v001"
    shutil.copytree(bundle.path, copy)
    X = bundle.train_features()
    _write_oof_tables(copy, bundle.booster, X)
    ex2 = explain_bundle(load_bundle(copy))
    assert ex2.source == "out-of-fold"
    assert "base_value" not in ex2.values.columns
    np.testing.assert_allclose(ex2.values.to_numpy(), 0.5 * ex.values.to_numpy(), atol=1e-6)
    assert ex2.base_value == pytest.approx(ex.base_value - 0.1, abs=1e-6)
    pop = ex2.frame("population")
    assert pop["n_folds"].eq(3).all() and pop["top_k_frequency"].between(0, 1).all()


# ------------------------------------------------------------------------------ words


def test_describe_driver_in_plain_words() -> None:
    ref = np.linspace(-1, 1, 41)
    expanded = describe_driver("x", 0.8, 0.42, reference=ref, meta={
        "population": "CD8 T", "marker": "", "statistic": "pct_live", "condition": "unstim",
        "timepoint": "week6-baseline"})
    assert expanded.startswith("CD8 T cells expanded from baseline to week6 more than in most training patients")
    assert "×1.74" in expanded and "raised the predicted chance of benefit (SHAP +0.42)" in expanded
    low = describe_driver("x", 2.0, -0.3, reference=np.linspace(2, 10, 30), meta={
        "population": "Treg", "marker": "", "statistic": "pct_parent", "condition": "unstim",
        "timepoint": "baseline"})
    assert low.startswith("The Treg share of its parent population at baseline was lower than in most")
    assert "lowered" in low
    cyto = describe_driver("x", 0.05, 0.2, reference=np.zeros(10), meta={
        "population": "CD4 T", "marker": "IL-2", "statistic": "frac_pos", "condition": "stim",
        "timepoint": "week6-baseline"})
    assert "share of CD4 T cells positive for IL-2 after stimulation rose" in cyto
    assert "+5.0 percentage points" in cyto
    missing = describe_driver("x", float("nan"), 0.2, meta={
        "population": "NK", "marker": "TNFa", "statistic": "frac_pos", "condition": "stim",
        "timepoint": "baseline"})
    assert "could not be measured" in missing
    assert describe_driver("feat", 1.0, -0.5) == "feat = 1 lowered the predicted chance of benefit (SHAP -0.50)"
    arm = describe_driver("clinical: arm = IL-7", 1.0, 0.4, meta={"covariate": "arm", "population": ""})
    assert arm == "Clinical covariate: arm is IL-7, which raised the predicted chance of benefit (SHAP +0.40)."
    assert "arm is not IL-7" in describe_driver("clinical: arm = IL-7", 0.0, -0.4)
    age = describe_driver("clinical: age", 80.0, 0.1, reference=np.arange(50, 90), meta={"covariate": "age"})
    assert age.startswith("Clinical covariate: age = 80 (76th percentile of training patients), which raised")


def test_explanations_plot_is_a_png(model_parts) -> None:
    ex = explain_model(model_parts["booster"], model_parts["features"], model_parts["meta"], interactions=False)
    png = ex.plot("marker")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_patient_ids_with_leading_zeros_survive_the_bundle_tables(model_parts, tmp_path) -> None:
    """Ids such as '007' are strings: reading the bundle's CSV tables back must not turn them
    into numbers (7), which would misalign the out-of-fold SHAP values, the fold models'
    features and the out-of-fold predictions with the training matrix."""
    X = model_parts["features"].copy()
    X.index = pd.Index([f"{i:03d}" for i in range(len(X))], name="patient_id")
    oof = model_parts["oof"].set_axis(X.index)
    saved = save_bundle(tmp_path, "il7", **{**model_parts, "features": X, "oof": oof})
    _write_oof_tables(saved, model_parts["booster"], X)
    from predictor.features.matrix import feature_name

    fold_only = feature_name("NK", "", "pct_live", "unstim", "baseline")  # not in X
    X.iloc[:, :1].set_axis([fold_only], axis=1).to_csv(saved / "features_oof.csv")
    oof_shap = pd.read_csv(saved / "oof_shap.csv", index_col=0, dtype={"patient_id": str})
    oof_shap.assign(**{fold_only: 0.01}).to_csv(saved / "oof_shap.csv")
    bundle = load_bundle(saved)
    assert list(bundle.oof().index[:3]) == ["000", "001", "002"]
    ex = explain_bundle(bundle)
    assert ex.source == "out-of-fold" and list(ex.values.index[:3]) == ["000", "001", "002"]
    assert ex.data[fold_only].notna().all()  # joined on the ids, not on 0, 1, 2
