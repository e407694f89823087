"""Batch scoring with a frozen bundle, on real FCS files from the simulator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

import predictor.features.cohort as cohort
from predictor.config import CVConfig, DataConfig, ExperimentConfig, ModelConfig, TrackingConfig
from predictor.errors import BundleError, ClinicalError, ScoringError
from predictor.io.fcs import read_fcs, write_fcs
from predictor.model.bundle import load_bundle
from predictor.model.experiment import run_experiment
from predictor.score import score_samples
from predictor.simulate import simulate_cohort

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    c = simulate_cohort(root / "cohort", n_patients=20, seed=4, cells_per_sample=1500)
    cfg = ExperimentConfig(
        name="scoretest",
        data=DataConfig(samples=c.samples, clinical=c.clinical, panel=c.panel),
        cv=CVConfig(folds=3, repeats=1, permutations=5, bootstrap=50),
        tracking=TrackingConfig(store=root / "mlflow.db", artifacts=root / "mlruns",
                                models=root / "models", experiment="scoretest"),
    )
    res = run_experiment(cfg)
    return root, c, res


def _rewrite(c, dst: Path, transform) -> Path:
    """Copy a cohort's sample sheet with every FCS file rewritten by ``transform``."""
    sheet = pd.read_csv(c.samples)
    (dst / "fcs").mkdir(parents=True)
    for f in sheet["file"]:
        s = read_fcs(c.root / f, warn=False)
        events, pnn, pns = transform(s.events, list(s.pnn), list(s.pns))
        write_fcs(dst / "fcs" / Path(f).name, events, pnn, pns)
    sheet["file"] = "fcs/" + sheet["file"].map(lambda f: Path(f).name)
    sheet.to_csv(dst / "samples.csv", index=False)
    return dst / "samples.csv"


def test_scoring_training_patients_reproduces_final_model(trained):
    root, c, res = trained
    scores, fs = score_samples(res.bundle, c.samples, n_jobs=1)
    bundle = load_bundle(res.bundle)
    train = bundle.train_features()
    expected = bundle.booster.predict(xgb.DMatrix(train.to_numpy(np.float32), missing=np.nan,
                                                  feature_names=bundle.features))
    got = scores.set_index("patient_id").loc[train.index, "probability_uncalibrated"].to_numpy()
    np.testing.assert_array_equal(got.astype(np.float32), expected)
    pd.testing.assert_frame_equal(fs.X[bundle.features], train, check_dtype=False)


def test_channel_order_does_not_matter(trained, tmp_path):
    root, c, res = trained
    rng = np.random.default_rng(0)

    def shuffle(events, pnn, pns):
        order = rng.permutation(len(pnn))
        return events[:, order], [pnn[i] for i in order], [pns[i] for i in order]

    sheet = _rewrite(c, tmp_path / "shuffled", shuffle)
    a, _ = score_samples(res.bundle, c.samples, n_jobs=1)
    b, _ = score_samples(res.bundle, sheet, n_jobs=1)
    pd.testing.assert_frame_equal(a, b)


def test_missing_marker_is_named_with_affected_features(trained, tmp_path):
    root, c, res = trained

    def drop_cd8(events, pnn, pns):
        keep = [i for i, s in enumerate(pns) if not s.endswith("_CD8a")]
        return events[:, keep], [pnn[i] for i in keep], [pns[i] for i in keep]

    sheet = _rewrite(c, tmp_path / "nocd8", drop_cd8)
    with pytest.raises(ScoringError) as err:
        score_samples(res.bundle, sheet, tmp_path / "s.csv")
    msg = str(err.value)
    assert "CD8a" in msg and ".fcs" in msg and "features" in msg and "--allow-missing-markers" in msg
    assert not (tmp_path / "s.csv").exists()
    scores, fs = score_samples(res.bundle, sheet, allow_missing_markers=True, n_jobs=1)
    assert scores["warnings"].str.contains("CD8a").all()
    assert not any(col.startswith("CD8 T") for col in fs.X.columns)
    assert scores["probability"].between(0, 1).all()


def test_registry_uri_with_alias(trained):
    from mlflow import MlflowClient

    root, c, res = trained
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    MlflowClient().set_registered_model_alias("scoretest", "champion", res.model["registered_version"])
    by_alias, _ = score_samples("models:/scoretest@champion", c.samples, store=root / "mlflow.db", n_jobs=1)
    by_path, _ = score_samples(res.bundle, c.samples, n_jobs=1)
    pd.testing.assert_frame_equal(by_alias, by_path)
    with pytest.raises(BundleError, match="not found"):
        score_samples("models:/scoretest@nobody", c.samples, store=root / "mlflow.db")


def test_interrupted_batch_resumes(trained, tmp_path, monkeypatch):
    root, c, res = trained
    out = tmp_path / "scores.csv"
    import predictor.score as score_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(score_mod, "score_features", boom)
        with pytest.raises(KeyboardInterrupt):
            score_samples(res.bundle, c.samples, out, n_jobs=1)
    assert not out.exists()
    partial = tmp_path / ".scores.csv.partial"
    assert partial.is_dir()
    calls = []
    real = cohort.clean_sample
    monkeypatch.setattr(cohort, "clean_sample", lambda p, pn: calls.append(p) or real(p, pn))
    scores, _ = score_samples(res.bundle, c.samples, out, n_jobs=1)
    assert calls == []  # every sample came from the partial results
    assert out.is_file() and not partial.exists()
    assert len(pd.read_csv(out)) == len(scores) == 20


def test_missing_samples_are_reported(trained, tmp_path):
    root, c, res = trained
    sheet = pd.read_csv(c.samples)
    first = sheet["patient_id"].iloc[0]
    drop = (sheet["patient_id"] == first) & (sheet["timepoint"] == "week6") & (sheet["condition"] == "stim")
    sheet = sheet[~drop]
    sheet["file"] = [str(c.root / f) for f in sheet["file"]]
    path = tmp_path / "gappy.csv"
    sheet.to_csv(path, index=False)
    with pytest.warns(UserWarning, match="lack samples"):
        scores, _ = score_samples(res.bundle, path, n_jobs=1)
    row = scores.set_index("patient_id").loc[first]
    assert "missing samples: week6/stim" in row["warnings"]


def test_score_refuses_bundle_from_nowhere(tmp_path, trained):
    _, c, _ = trained
    with pytest.raises(BundleError):
        score_samples(tmp_path / "nothing", c.samples)


# ------------------------------------------------------------------------------ clinical covariates


@pytest.fixture(scope="module")
def trained_arm(trained):
    """The same cohort, adjusted for the arm ([model] covariates = ["arm"])."""
    root, c, _ = trained
    cfg = ExperimentConfig(
        name="scorearm",
        data=DataConfig(samples=c.samples, clinical=c.clinical, panel=c.panel),
        model=ModelConfig(covariates=("arm",)),
        cv=CVConfig(folds=3, repeats=1, permutations=5, bootstrap=50),
        tracking=TrackingConfig(store=root / "mlflow.db", artifacts=root / "mlruns",
                                models=root / "models", experiment="scoretest"),
    )
    return root, c, run_experiment(cfg)


def test_scoring_with_covariates_reproduces_final_model(trained_arm, tmp_path):
    from predictor.explain import explain_bundle

    root, c, res = trained_arm
    bundle = load_bundle(res.bundle)
    name = "clinical: arm = IL-7"
    assert bundle.covariates.features == [name] and bundle.covariates.columns == ("arm",)
    assert bundle.meta["covariates"] == [{"column": "arm", "kind": "categorical",
                                          "levels": ["IL-7", "observation"], "features": [name]}]
    assert name in bundle.features and bundle.schema.loc[name, "covariate"] == "arm"
    assert (bundle.schema.drop(index=name)["covariate"] == "").all()
    scores, fs = score_samples(res.bundle, c.samples, clinical=c.clinical, n_jobs=1)
    train = bundle.train_features()
    expected = bundle.booster.predict(xgb.DMatrix(train.to_numpy(np.float32), missing=np.nan,
                                                  feature_names=bundle.features))
    got = scores.set_index("patient_id").loc[train.index, "probability_uncalibrated"].to_numpy()
    np.testing.assert_array_equal(got.astype(np.float32), expected)
    arm = pd.read_csv(c.clinical, dtype={"patient_id": str}).set_index("patient_id")["arm"]
    assert fs.X[name].tolist() == (arm.reindex(fs.X.index) == "IL-7").astype(float).tolist()
    assert fs.meta.loc[name, "covariate"] == "arm"
    # new patients need no outcome: patient_id and the covariate are enough
    only = tmp_path / "arm.csv"
    pd.read_csv(c.clinical)[["patient_id", "arm"]].to_csv(only, index=False)
    again, _ = score_samples(res.bundle, c.samples, clinical=only, n_jobs=1)
    pd.testing.assert_frame_equal(again, scores)
    # the arm is explained apart from the cell populations
    ex = explain_bundle(bundle, interactions=False)
    assert ex.covariates == ["arm"]
    pops = ex.frame("population")["group"]
    assert "arm" not in set(pops) and "-" not in set(pops) and "clinical covariates" not in set(pops)
    assert ex.frame("covariate")["group"].tolist() == ["arm"]
    m = bundle.metrics()
    assert m["covariates"] == [name] and "covariates_only" in m["baselines"]


def test_missing_or_unknown_covariates_are_named(trained_arm, tmp_path, capsys):
    from predictor.cli import main

    root, c, res = trained_arm
    out = tmp_path / "s.csv"
    with pytest.raises(ScoringError, match=r"clinical covariate\(s\) arm as inputs; pass .*--clinical FILE"):
        score_samples(res.bundle, c.samples, out)
    capsys.readouterr()
    assert main(["score", "--model", str(res.bundle), "--samples", str(c.samples), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clinical" in err and "arm" in err
    clinical = pd.read_csv(c.clinical)
    first = clinical["patient_id"].iloc[0]
    cases = {
        "absent.csv": (clinical.iloc[1:], rf"absent.csv: no row for patient\(s\) {first}"),
        "unknown.csv": (clinical.assign(arm=clinical["arm"].where(clinical.index != 0, "placebo")),
                        rf"unknown.csv, column 'arm': 'placebo' \(patient {first}\) is not a level"),
        "blank.csv": (clinical.assign(arm=clinical["arm"].where(clinical.index != 0, "")),
                      rf"blank.csv, column 'arm': no value for patient\(s\) {first}"),
        "noarm.csv": (clinical.drop(columns="arm"), r"noarm.csv: .*'arm'"),
    }
    for fname, (table, message) in cases.items():
        table.to_csv(tmp_path / fname, index=False)
        with pytest.raises(ClinicalError, match=message):
            score_samples(res.bundle, c.samples, out, clinical=tmp_path / fname)
        assert main(["score", "--model", str(res.bundle), "--samples", str(c.samples), "--out", str(out),
                     "--clinical", str(tmp_path / fname)]) == 2
    assert not out.exists()
    # a matrix without the covariate's column cannot be scored silently
    from predictor.score import score_features

    bundle = load_bundle(res.bundle)
    with pytest.raises(ScoringError, match="lacks clinical: arm = IL-7"):
        score_features(bundle, bundle.train_features().drop(columns="clinical: arm = IL-7"))
    # a model without covariates ignores --clinical
    plain, _ = score_samples(trained_arm[2].bundle.parent.parent / "scoretest", c.samples,
                             clinical=tmp_path / "noarm.csv", n_jobs=1)
    assert len(plain) == 20
