"""Model bundles: versioned plain files, exact round trip, no pickles, clear errors."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from predictor.errors import BundleError
from predictor.model.bundle import load_bundle, resolve_bundle_path, save_bundle
from predictor.populations.gating import apply_gating

FILES = {
    "bundle.json", "model.json", "schema.json", "gating.json", "panel.csv", "experiment.json",
    "features_train.parquet", "oof.csv", "metrics.json",
}


def predict(booster: xgb.Booster, X: pd.DataFrame) -> np.ndarray:
    return booster.predict(xgb.DMatrix(X, missing=np.nan))


def test_versions_are_never_overwritten(tmp_path, model_parts) -> None:
    first = save_bundle(tmp_path, "il7", **model_parts)
    second = save_bundle(tmp_path, "il7", **{**model_parts, "info": {"threshold": 0.3}})
    assert first == tmp_path / "il7" / "v001" and second == tmp_path / "il7" / "v002"
    assert sorted(p.name for p in (tmp_path / "il7").iterdir()) == ["v001", "v002"]  # no temp
    assert json.loads((first / "bundle.json").read_text())["threshold"] == 0.5
    assert resolve_bundle_path(tmp_path / "il7") == second
    assert resolve_bundle_path(first) == first
    assert load_bundle(tmp_path / "il7").version == 2
    assert load_bundle(tmp_path / "il7").threshold == 0.3
    assert load_bundle(first).version == 1 and load_bundle(first).threshold == 0.5
    (tmp_path / "il7" / "v010").mkdir()  # versions sort as numbers, not text
    (tmp_path / "il7" / "v010" / "bundle.json").write_text("{}")
    assert resolve_bundle_path(tmp_path / "il7").name == "v010"
    assert save_bundle(tmp_path, "il7", **model_parts).name == "v011"


def test_round_trip_gives_identical_predictions(tmp_path, model_parts, make_pbmc) -> None:
    path = save_bundle(tmp_path, "il7", **model_parts)
    b = load_bundle(path)
    X = model_parts["features"]
    assert b.path == path and b.name == "il7"
    assert b.features == list(X.columns)
    assert b.booster.feature_names == list(X.columns)
    np.testing.assert_array_equal(predict(b.booster, X), predict(model_parts["booster"], X))
    shuffled = X.sample(frac=1.0, random_state=1)
    np.testing.assert_array_equal(
        predict(b.booster, shuffled), predict(model_parts["booster"], shuffled)
    )
    assert b.threshold == 0.5 and b.meta["calibration"] == {"method": "platt", "a": 1.0, "b": 0.0}
    assert b.feature_config == model_parts["feature_config"]
    assert b.feature_config.median_markers == ("functional", "CD3")
    assert b.seed == 3  # the training's seed: scoring cleans each file as training did
    on_dask = {**model_parts, "feature_config": replace(model_parts["feature_config"],
                                                        scheduler="tcp://10.0.0.5:8786")}
    assert load_bundle(save_bundle(tmp_path, "il7", **on_dask)).feature_config == b.feature_config
    pd.testing.assert_frame_equal(b.panel.table, model_parts["panel"].table)
    cells = make_pbmc(1000, seed=21)[0]
    pd.testing.assert_frame_equal(
        apply_gating(b.gating, cells), apply_gating(model_parts["gating"], cells)
    )
    pd.testing.assert_frame_equal(b.train_features(), X)
    assert b.metrics() == {"auroc": {"estimate": 0.8}}
    np.testing.assert_allclose(b.oof()["probability"], model_parts["oof"]["probability"], rtol=1e-6)


def test_schema_holds_training_ranges_and_metadata(tmp_path, model_parts) -> None:
    b = load_bundle(save_bundle(tmp_path, "il7", **model_parts))
    X, meta = model_parts["features"], model_parts["meta"]
    s = b.schema
    np.testing.assert_allclose(s["min"], X.min().to_numpy())
    np.testing.assert_allclose(s["max"], X.max().to_numpy())
    np.testing.assert_allclose(s["median"], X.median().to_numpy())
    nan_col = X.columns[3]
    assert s.at[nan_col, "missing_fraction"] == pytest.approx(X[nan_col].isna().mean())
    assert s.at[nan_col, "missing_fraction"] > 0 and s.at[X.columns[0], "missing_fraction"] == 0
    assert s.at[nan_col, "median"] == pytest.approx(np.nanmedian(X[nan_col]))
    for col in meta.columns:
        assert s[col].tolist() == meta[col].tolist()


def test_bundle_holds_no_pickle_and_loading_never_unpickles(tmp_path, model_parts, monkeypatch) -> None:
    path = save_bundle(tmp_path, "il7", **model_parts, tables={"qc": pd.DataFrame({"a": [1]})})
    assert {p.name for p in path.iterdir()} == FILES | {"qc.csv"}
    assert not [p for p in path.rglob("*") if p.suffix in (".pkl", ".pickle", ".joblib")]
    json.loads((path / "model.json").read_text())  # XGBoost's own JSON, not a binary blob

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pd, "read_pickle", refuse)
    b = load_bundle(path)
    b.train_features()
    b.oof()
    b.metrics()


@pytest.mark.parametrize("missing", ["bundle.json", "schema.json", "gating.json", "panel.csv", "model.json"])
def test_incomplete_bundle_names_the_missing_file(tmp_path, model_parts, missing) -> None:
    path = save_bundle(tmp_path, "il7", **model_parts)
    (path / missing).unlink()
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    if missing == "bundle.json":  # the folder no longer looks like a bundle at all
        assert "no model bundle here" in str(info.value)
    else:
        assert f"incomplete bundle, missing {missing}" in str(info.value)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bundle.json", "{not json"),
        ("schema.json", '{"rows": []}'),
        ("gating.json", '{"template": {}}'),
        ("gating.json", '[]'),
        ("bundle.json", '{"threshold": 0.5, "feature_config": {"colour": "red"}}'),
        ("model.json", '{"learner": 1'),
    ],
)
def test_corrupt_bundle(tmp_path, model_parts, name, text) -> None:
    path = save_bundle(tmp_path, "il7", **model_parts)
    (path / name).write_text(text)
    with pytest.raises(BundleError, match="corrupt bundle") as info:
        load_bundle(path)
    assert str(info.value).startswith(f"{path}: ")


def test_nothing_to_load(tmp_path) -> None:
    with pytest.raises(BundleError, match="no model bundle here.*predictor train"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no model bundle here"):
        resolve_bundle_path(tmp_path / "empty")


def test_mismatched_booster_is_not_saved(tmp_path, model_parts) -> None:
    X = model_parts["features"]
    with pytest.raises(BundleError, match="disagree; not saved"):
        save_bundle(tmp_path, "il7", **{**model_parts, "features": X[X.columns[::-1]]})
    assert list((tmp_path / "il7").iterdir()) == []  # no version, no temporary folder


@pytest.mark.parametrize(
    "specs",
    [
        [{"column": "arm", "kind": "ordinal", "levels": [], "features": ["clinical: arm"]}],
        [{"column": "arm", "kind": "categorical", "levels": ["a", "b"],
          "features": ["clinical: arm = a"]}],  # not one of the model's features
        [{"kind": "numeric", "features": ["clinical: age"]}],
    ],
)
def test_bundle_covariates_are_checked_on_load(tmp_path, model_parts, specs) -> None:
    assert load_bundle(save_bundle(tmp_path, "il7", **model_parts)).covariates is None  # none stored
    info = {**model_parts["info"], "covariates": specs}
    path = save_bundle(tmp_path, "il7", **{**model_parts, "info": info})
    with pytest.raises(BundleError, match="corrupt bundle"):
        load_bundle(path)
