"""Experiments end to end: config validation, generalisation, null cohort, survival, MLflow.

The slow tests simulate real FCS cohorts (1,500 cells per file) and run the whole experiment
(features, nested grouped CV, MLflow run, bundle, report); together they stay under ~3 min on
two cores.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from predictor.config import (
    CVConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OutcomeConfig,
    SearchConfig,
    TrackingConfig,
    load_experiment,
)
from predictor.errors import ConfigError
from predictor.model.metrics import concordance_index, fast_auroc

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_search_table_is_read(tmp_path) -> None:
    cfg = load_experiment(_write(tmp_path, """
[model]
max_depth = 2
[model.search]
max_depth = [1, 2, 3]
learning_rate = [0.05, 1]
max_features = [50, 0]
inner_folds = 4
metric = "logloss"
permutation_test = "nested"
"""))
    s = cfg.model.search
    assert s.max_depth == (1, 2, 3) and s.learning_rate == (0.05, 1.0) and s.max_features == (50, 0)
    assert s.inner_folds == 4 and s.metric == "logloss" and s.permutation_test == "nested"
    assert s.grid == {"max_depth": (1, 2, 3), "learning_rate": (0.05, 1.0), "max_features": (50, 0)}
    assert s.size == 12
    assert load_experiment(_write(tmp_path, "[model]\nmax_depth = 3\n")).model.search is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("max_depth = 3", r"'max_depth' parameter of \[model.search\] of .* must be a non-empty list of ints >= 1. Got 3 instead"),
        ("max_depth = []", r"'max_depth' parameter .* must be a non-empty list of ints >= 1. Got \[\] instead"),
        ("max_depth = [0, 2]", r"'max_depth' parameter of \[model.search\] must be a non-empty list of ints >= 1. Got \[0, 2\] instead"),
        ("max_depth = [1.5]", r"'max_depth' parameter .* list of ints >= 1. Got \[1.5\]"),
        ("max_depth = [2, 2]", r"'max_depth' parameter .* must be a list without repeated values. Got \[2, 2\]"),
        ("learning_rate = [0.1, 2.0]", r"'learning_rate' parameter .* floats in \(0, 1\]. Got \[0.1, 2.0\]"),
        ("learning_rate = ['fast']", r"'learning_rate' parameter .* floats in \(0, 1\]. Got \['fast'\]"),
        ("colsample_bytree = [0]", r"'colsample_bytree' parameter .* floats in \(0, 1\]"),
        ("max_features = [-1]", r"'max_features' parameter .* ints >= 0 \(0 keeps all features\)"),
        ("n_estimators = [true]", r"'n_estimators' parameter .* ints >= 1. Got \[True\]"),
        ("depth = [1, 2]", r"unknown key\(s\) depth in \[model.search\]; known keys: max_depth, learning_rate"),
        ("inner_folds = 3", r"'search' parameter of \[model.search\] must be a table listing values for at least one of max_depth"),
        ("max_depth = [1, 2]\ninner_folds = 1", r"'inner_folds' parameter of \[model.search\] must be an int >= 2. Got 1"),
        ("max_depth = [1, 2]\nmetric = 'cindex'", r"'metric' parameter of \[model.search\] must be one of auto, auroc, logloss for a binary outcome. Got 'cindex'"),
        ("max_depth = [1, 2]\npermutation_test = 'all'", r"'permutation_test' parameter .* one of fixed, nested. Got 'all'"),
        ("max_depth = [1,2,3,4,5,6,7]\nn_estimators = [1,2,3,4,5,6]\nmax_features = [1,2,3,4,5,6,7]",
         r"must be a grid of at most 256 settings .* Got '294 settings'"),
    ],
)
def test_bad_search_spaces_are_refused(tmp_path, body, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, f"[model.search]\n{body}\n"))


def test_search_must_be_a_table_and_metric_must_fit_the_outcome(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"'search' parameter of \[model\] of .* must be a table"):
        load_experiment(_write(tmp_path, "[model]\nsearch = [1, 2]\n"))
    with pytest.raises(ConfigError, match="one of auto, cindex for a survival outcome. Got 'auroc'"):
        load_experiment(_write(tmp_path, "[outcome]\nkind = 'survival'\n[model.search]\nmax_depth = [1, 2]\nmetric = 'auroc'\n"))
    with pytest.raises(ConfigError, match=r"'max_depth' parameter of \[model.search\] must be"):
        ExperimentConfig(model=ModelConfig(search=SearchConfig(max_depth=(0,))))  # built in code
    ok = load_experiment(_write(tmp_path, "[outcome]\nkind = 'survival'\n[model.search]\nmax_depth = [1, 2]\n"))
    assert ok.outcome.kind == "survival" and ok.model.search.metric == "auto"


def test_config_round_trips_through_toml(tmp_path) -> None:
    cfg = load_experiment(ROOT / "experiments" / "il7_tuned.toml")
    assert cfg.model.search is not None and cfg.model.search.size > 1
    again = load_experiment(_write(tmp_path, cfg.to_toml()))
    assert replace(again, source=None) == replace(cfg, source=None)
    plain = load_experiment(ROOT / "experiments" / "il7_demo.toml")
    assert "[model.search]" not in plain.to_toml()
    assert replace(load_experiment(_write(tmp_path, plain.to_toml())), source=None) == replace(plain, source=None)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["model"]["search"]["max_depth"] == list(cfg.model.search.max_depth)
    on_dask = replace(plain, features=replace(plain.features, scheduler="tcp://10.0.0.5:8786"))
    assert 'scheduler = "tcp://10.0.0.5:8786"' in on_dask.to_toml()
    assert load_experiment(_write(tmp_path, on_dask.to_toml())).features == on_dask.features


def test_shipped_experiments_load() -> None:
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        cfg = load_experiment(path)
        assert cfg.name == path.stem
    surv = load_experiment(ROOT / "experiments" / "il7_survival.toml")
    assert surv.outcome.kind == "survival" and surv.model.covariates == ()
    for name in ("il7_demo", "il7_baseline", "il7_tuned"):  # adjusted for the arm
        assert load_experiment(ROOT / "experiments" / f"{name}.toml").model.covariates == ("arm",)


def test_covariates_are_read_and_checked(tmp_path) -> None:
    cfg = load_experiment(_write(tmp_path, '[model]\ncovariates = ["arm", "age"]\n'))
    assert cfg.model.covariates == ("arm", "age")
    assert ExperimentConfig().model.covariates == ()
    again = load_experiment(_write(tmp_path, cfg.to_toml()))
    assert again.model.covariates == ("arm", "age")
    for body, message in [
        ('covariates = "arm"', r"'covariates' parameter of \[model\] of .* must be a list. Got 'arm'"),
        ('covariates = ["arm", "arm"]', r"'covariates' parameter of \[model\] must be a list of clinical "
                                        r"table column names without repeats"),
        ('covariates = [""]', r"'covariates' parameter of \[model\] must be a list of clinical"),
        ("covariates = [1]", r"'covariates' parameter of \[model\] must be a list of clinical"),
        ('covariates = ["response"]', r"must be clinical columns other than patient_id and the outcome. "
                                      r"Got \['response'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_experiment(_write(tmp_path, f"[model]\n{body}\n"))
    with pytest.raises(ConfigError, match="other than patient_id and the outcome. Got \\['time'\\]"):
        load_experiment(_write(tmp_path, "[outcome]\nkind = 'survival'\n[model]\ncovariates = ['time']\n"))


# ------------------------------------------------------------------------------ end to end


def _config(cohort, work: Path, name: str, **kw) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        data=DataConfig(samples=cohort.samples, clinical=kw.pop("clinical", cohort.clinical),
                        panel=cohort.panel),
        tracking=TrackingConfig(store=work / "mlflow.db", artifacts=work / "mlruns",
                                models=work / "models", experiment="tests"),
        **kw,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from predictor.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("exp")
    c = simulate_cohort(root / "train", n_patients=60, seed=0, cells_per_sample=1500, n_jobs=2)
    return root, c


def _runs(work: Path, run_id: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    parent = mlflow.get_run(run_id)
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return parent, children


@pytest.mark.slow
def test_cv_estimate_generalises_to_an_independent_cohort(cohort, capsys):
    """The CV AUROC is an honest forecast of the frozen model's AUROC on new patients.

    Training: 60 simulated patients; independent: 150 new patients from the same generator
    (new seed). Tolerance 0.15: the SE of an AUROC near 0.75 is ≈ 0.06 at 60 patients and
    ≈ 0.04 at 150, so the difference has SE ≈ 0.075 and 0.15 is two SEs. Neither may beat the
    best achievable AUROC (true probabilities vs outcomes drawn from them) by more than sampling
    noise (0.05).
    """
    from predictor.model.experiment import run_experiment
    from predictor.score import score_samples
    from predictor.simulate import simulate_cohort

    root, c = cohort
    work = root / "work"
    cfg = _config(c, work, "generalisation", cv=CVConfig(permutations=20, bootstrap=200))
    res = run_experiment(cfg, feature_cache=root / "cache")
    cv_auc = res.training.metrics["auroc"]["estimate"]

    new = simulate_cohort(root / "independent", n_patients=150, seed=11, cells_per_sample=1500,
                          id_prefix="V", n_jobs=2)
    scores, _ = score_samples(res.bundle, new.samples)
    clinical = pd.read_csv(new.clinical).set_index("patient_id")
    scores = scores.set_index("patient_id")
    indep_auc = fast_auroc(clinical.loc[scores.index, "response"].to_numpy(),
                           scores["probability"].to_numpy())
    best_train = json.loads(c.truth.read_text())["best_auroc"]
    best_new = json.loads(new.truth.read_text())["best_auroc"]
    with capsys.disabled():
        print(f"\n[generalisation] CV AUROC {cv_auc:.3f} "
              f"(95% CI {res.training.metrics['auroc']['ci_low']:.3f}–"
              f"{res.training.metrics['auroc']['ci_high']:.3f}), independent AUROC "
              f"{indep_auc:.3f} on {len(scores)} patients, best achievable "
              f"{best_train:.3f} (training cohort) / {best_new:.3f} (independent)")
    assert abs(cv_auc - indep_auc) <= 0.15
    assert cv_auc <= best_train + 0.05 and indep_auc <= best_new + 0.05
    assert indep_auc > 0.6  # the model did learn something that transfers

    # The MLflow run has everything a colleague needs to inspect or reproduce it.
    parent, children = _runs(work, res.run_id)
    assert len(children) == 10  # one nested run per outer fold (5 folds × 2 repeats)
    assert {"metrics.auroc", "metrics.n_features"} <= set(children.columns)
    assert parent.data.metrics["auroc"] == pytest.approx(cv_auc)
    assert parent.data.tags["permutation_procedure"] == "cv"
    art = Path(parent.info.artifact_uri.removeprefix("file://"))
    for f in ("config/experiment.toml", "config/experiment.json", "evaluation/oof_predictions.csv",
              "evaluation/feature_schema.json", "evaluation/fold_metrics.csv",
              "evaluation/fold_importance.csv", "plots/roc.png", "plots/calibration.png",
              "report/report.html", "bundle/oof_shap.csv", "bundle/model.json"):
        assert (art / f).is_file(), f
    assert load_experiment(art / "config" / "experiment.toml").cv == cfg.cv
    shap = pd.read_csv(res.bundle / "oof_shap.csv")
    assert shap.columns[0] == "patient_id" and shap.columns[-1] == "base_value"
    assert shap.shape == (60, res.features.X.shape[1] + 2)
    fi = pd.read_csv(res.bundle / "fold_importance.csv")
    assert fi.groupby(["repeat", "fold"]).size().eq(200).all()


@pytest.mark.slow
def test_null_cohort_is_at_chance(cohort, capsys):
    """Outcome independent of the data: CV AUROC ≈ 0.5 and a large permutation p-value.

    With 60 patients and ~2,500 features, any leak (feature filtering or tuning outside the
    folds) would push the CV AUROC well above 0.65 on pure noise.
    """
    from predictor.model.experiment import run_experiment

    root, c = cohort
    clinical = pd.read_csv(c.clinical)
    clinical["response"] = np.random.default_rng(123).permutation(clinical["response"].to_numpy())
    null_csv = root / "clinical_null.csv"
    clinical.to_csv(null_csv, index=False)
    cfg = _config(c, root / "work", "null", clinical=null_csv,
                  cv=CVConfig(permutations=40, bootstrap=200))
    res = run_experiment(cfg, feature_cache=root / "cache")
    auc = res.training.metrics["auroc"]
    perm = res.training.permutation
    with capsys.disabled():
        print(f"\n[null] CV AUROC {auc['estimate']:.3f} ({auc['ci_low']:.3f}–{auc['ci_high']:.3f}), "
              f"permutation p {perm['p_value']:.3f} (null mean {perm['null_mean']:.3f}), "
              f"elastic net {res.training.baselines['elastic_net']['auroc']['estimate']:.3f}")
    assert 0.35 <= auc["estimate"] <= 0.65
    assert auc["ci_low"] < 0.5 < auc["ci_high"]
    assert perm["p_value"] > 0.05
    assert 0.4 < perm["null_mean"] < 0.6


@pytest.mark.slow
def test_survival_experiment_with_tuning_end_to_end(cohort, capsys):
    from predictor.model.bundle import load_bundle
    from predictor.model.experiment import run_experiment

    root, c = cohort
    work = root / "work"
    search = SearchConfig(max_depth=(1, 2), n_estimators=(50, 150))
    cfg = _config(c, work, "survival", outcome=OutcomeConfig(kind="survival"),
                  model=ModelConfig(search=search),
                  cv=CVConfig(folds=5, repeats=1, permutations=20, bootstrap=200))
    res = run_experiment(cfg, feature_cache=root / "cache")
    r = res.training
    ci = r.metrics["cindex"]
    with capsys.disabled():
        print(f"\n[survival] OOF C-index {ci['estimate']:.3f} ({ci['ci_low']:.3f}–{ci['ci_high']:.3f}), "
              f"permutation p {r.permutation['p_value']:.3f} ({r.permutation['procedure']}), "
              f"best single feature {r.baselines['best_single_feature']['cindex']['estimate']:.3f}, "
              f"chosen per fold {r.fold_metrics[['max_depth', 'n_estimators']].values.tolist()}, "
              f"final {r.tuning['final']}")
    assert ci["estimate"] > 0.55
    clinical = pd.read_csv(c.clinical).set_index("patient_id").loc[r.oof.index]
    assert ci["estimate"] == pytest.approx(
        concordance_index(clinical["time"], clinical["event"], r.oof["risk"]))
    assert r.permutation["procedure"] == "fixed"
    for key, values in search.grid.items():
        assert set(r.fold_metrics[key]) <= set(values) and r.settings[key] in values

    parent, children = _runs(work, res.run_id)
    assert len(children) == 5
    assert {"params.max_depth", "params.n_estimators", "metrics.cindex", "metrics.inner_cindex"} <= set(children.columns)
    assert set(children["params.max_depth"].astype(int)) <= {1, 2}
    assert parent.data.params["final.max_depth"] == str(r.settings["max_depth"])
    assert parent.data.params["model.search.max_depth"] == "[1, 2]"
    assert "cindex_permutation_p" in parent.data.metrics
    assert parent.data.tags["outcome_kind"] == "survival" and parent.data.tags["tuned"] == "true"

    bundle = load_bundle(res.bundle)
    assert bundle.meta["outcome"]["kind"] == "survival" and bundle.meta["threshold_rule"] == "median-risk"
    assert bundle.meta["calibration"] == {} and bundle.meta["settings"] == r.settings
    assert (res.bundle / "tuning.csv").is_file() and (res.bundle / "oof_shap.csv").is_file()
    m = bundle.metrics()
    assert m["kind"] == "survival" and m["tuning"]["final"] == r.tuning["final"]
    assert len(m["tuning"]["settings_scores"]) == 4
