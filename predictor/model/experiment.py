"""One experiment end to end: data → features → evaluation → MLflow run → bundle → report.

:func:`run_experiment` is what ``predictor train experiments/NAME.toml`` calls. The MLflow run
holds the configuration (params, and the experiment as TOML and JSON), the headline metrics
with CIs, the baselines and the permutation test, one nested run per outer fold (with the
settings the inner loop chose when tuning), the registered model, and as artifacts the bundle,
the out-of-fold predictions, SHAP values and per-fold rankings, the feature schema, the ROC
and calibration plots and the HTML report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import predictor
from predictor.config import ExperimentConfig
from predictor.covariates import CovariateEncoder, with_covariates
from predictor.features import FeatureSet, extract_features
from predictor.io.clinical import read_clinical
from predictor.io.panel import read_panel
from predictor.io.samplesheet import check_cohort, read_sample_sheet, select_samples
from predictor.model.bundle import save_bundle
from predictor.model.tracking import TrackingTarget, git_commit, start_experiment_run
from predictor.model.train import TrainingResult, train_model

__all__ = ["ExperimentResult", "run_experiment", "load_experiment_data", "hash_files"]


@dataclass
class ExperimentResult:
    """One experiment's outputs. ``features`` holds the model inputs: the cytometry features
    and, with ``[model] covariates``, the encoded clinical covariates (see ``covariates``)."""

    config: ExperimentConfig
    features: FeatureSet
    training: TrainingResult
    run_id: str
    experiment_id: str
    bundle: Path
    model: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    covariates: CovariateEncoder | None = None


def hash_files(paths: list[Path]) -> str:
    """SHA-256 over the contents of files (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_experiment_data(cfg: ExperimentConfig):
    """Validated (panel, samples, clinical) of an experiment."""
    fc = cfg.features
    panel = read_panel(cfg.data.panel)
    samples = read_sample_sheet(cfg.data.samples, timepoints=None, conditions=None)
    samples = select_samples(samples, timepoints=fc.timepoints, conditions=fc.conditions)
    outcome = "survival" if cfg.outcome.kind == "survival" else cfg.outcome.column
    clinical = read_clinical(cfg.data.clinical, outcome=outcome)
    check_cohort(samples, clinical, timepoints=fc.timepoints, conditions=fc.conditions)
    return panel, samples, clinical


def _outcome(cfg: ExperimentConfig, clinical: pd.DataFrame, index: pd.Index) -> pd.Series | pd.DataFrame:
    if cfg.outcome.kind == "survival":
        return clinical[["time", "event"]].reindex(index)
    return clinical[cfg.outcome.column].reindex(index)


def _flat_metrics(result: TrainingResult, n_patients: int, n_features: int,
                  timings: dict[str, float]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for metric, v in result.metrics.items():
        flat[metric] = v["estimate"]
        flat[f"{metric}_ci_low"] = v["ci_low"]
        flat[f"{metric}_ci_high"] = v["ci_high"]
    for base, table in result.baselines.items():
        for metric, v in table.items():
            flat[f"{base}.{metric}"] = v["estimate"]
    perm = result.permutation
    flat[f"{result.metric}_permutation_p"] = perm["p_value"]
    flat["permutation_observed"] = perm["observed"]
    flat["permutation_null_mean"] = perm["null_mean"]
    flat["threshold"] = result.threshold
    flat["n_patients"] = n_patients
    flat["n_features"] = n_features - len(result.covariates)
    if result.kind == "binary":
        flat["n_responders"] = int(result.oof["y"].sum())
    else:
        flat["n_events"] = int(result.oof["event"].sum())
    if result.tuning is not None:
        flat["final_inner_score"] = result.tuning["final_inner_score"]
    flat.update({f"time_{k}_s": v for k, v in timings.items()})
    return flat


def _payload(result: TrainingResult, fs: FeatureSet, timings: dict[str, float]) -> dict[str, Any]:
    """``metrics.json`` of the bundle: the whole evaluation as plain data."""
    tuning = None
    if result.tuning is not None:
        tuning = {k: v for k, v in result.tuning.items() if k != "table"}
        tuning["settings_scores"] = result.tuning["table"].to_dict("records")
    payload = {
        "kind": result.kind,
        "metric": result.metric,
        "metrics": result.metrics,
        "baselines": result.baselines,
        "permutation": result.permutation,
        "folds": result.fold_metrics.to_dict("records"),
        "single_feature_choices": result.single_feature_choices,
        "settings": result.settings,
        "tuning": tuning,
        "feature_stability_top10": result.stability(10).head(30).to_dict("records"),
        "oof_shap": {
            "file": "oof_shap.csv",
            "scale": "log-odds" if result.kind == "binary" else "log hazard ratio",
            "note": "each patient's SHAP values from the boosters of the outer folds that tested "
                    "them, averaged over repeats; features a fold did not select are 0; a row "
                    "plus base_value sums to the mean out-of-fold margin.",
        },
        "timings": timings,
        "n_patients": len(fs.X),
        "n_features_total": int(fs.X.shape[1]) - len(result.covariates),
        "covariates": list(result.covariates),
    }
    if result.calibration:
        payload["calibration"] = result.calibration
    return payload


def _write_evaluation(tmpd: Path, cfg: ExperimentConfig, result: TrainingResult, fs: FeatureSet,
                      bundle: Path) -> list[str]:
    """Files for the run's artifacts (config, evaluation tables, plots); returns problems."""
    problems: list[str] = []
    (tmpd / "config").mkdir()
    (tmpd / "config" / "experiment.toml").write_text(cfg.to_toml(), encoding="utf-8")
    (tmpd / "config" / "experiment.json").write_text(
        json.dumps(cfg.to_dict(), indent=1, default=str), encoding="utf-8")
    if cfg.source is not None and Path(cfg.source).is_file():
        shutil.copyfile(cfg.source, tmpd / "config" / f"source-{Path(cfg.source).name}")
    ev = tmpd / "evaluation"
    ev.mkdir()
    result.oof.rename_axis("patient_id").to_csv(ev / "oof_predictions.csv")
    result.fold_metrics.to_csv(ev / "fold_metrics.csv", index=False)
    result.frame().to_csv(ev / "metrics_table.csv", index=False)
    if result.fold_importance is not None:
        result.fold_importance.to_csv(ev / "fold_importance.csv", index=False)
        result.stability(10).to_csv(ev / "feature_stability.csv", index=False)
    if result.null_importance is not None:
        result.null_importance.to_csv(ev / "null_importance.csv", index=False)
    if result.tuning is not None:
        result.tuning["table"].to_csv(ev / "tuning_final.csv", index=False)
    shutil.copyfile(bundle / "schema.json", ev / "feature_schema.json")
    fs.meta.rename_axis("feature").to_csv(ev / "all_features.csv")
    tables = tmpd / "tables"
    tables.mkdir()
    fs.qc.to_csv(tables / "qc.csv", index=False)
    fs.populations.to_csv(tables / "populations.csv", index=False)
    if result.kind == "binary":
        try:
            from predictor.report import plots

            (tmpd / "plots").mkdir()
            oof = result.oof
            curves = {"xgboost": oof["probability"].to_numpy()}
            aucs = {"xgboost": result.metrics["auroc"]["estimate"]}
            for b, table in result.baselines.items():
                curves[b] = oof[b].to_numpy()
                aucs[b] = table["auroc"]["estimate"]
            y = oof["y"].to_numpy()
            (tmpd / "plots" / "roc.png").write_bytes(plots.roc_plot(y, curves, aucs))
            cal = result.calibration
            (tmpd / "plots" / "calibration.png").write_bytes(
                plots.calibration_plot(cal["curve_raw"], cal["curve_calibrated"]))
        except Exception as exc:  # a plot must never cost the run
            problems.append(f"plots ({type(exc).__name__}: {exc})")
    try:
        from predictor.report.html import build_report

        (tmpd / "report").mkdir()
        build_report(bundle, tmpd / "report" / "report.html")
    except Exception as exc:  # the report must never cost the run
        problems.append(f"HTML report ({type(exc).__name__}: {exc})")
    return problems


def run_experiment(
    cfg: ExperimentConfig,
    *,
    progress: bool = False,
    n_jobs: int = 2,
    feature_cache: str | os.PathLike | None = None,
) -> ExperimentResult:
    """Run an experiment: features, honest evaluation, final model, MLflow run, bundle, report.

    Parameters
    ----------
    cfg
        The experiment (``predictor.config.load_experiment``).
    progress
        Show progress bars.
    n_jobs
        Processes for the permutation test (and the outer folds when tuning).
    feature_cache
        Folder of per-sample feature results reused between runs (see
        :func:`predictor.features.extract_features`); ``None`` caches nothing.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    panel, samples, clinical = load_experiment_data(cfg)
    encoder = None
    if cfg.model.covariates:  # checked before the (slow) features: columns, values, levels
        patients = pd.Index(samples["patient_id"].astype(str).unique())
        encoder = CovariateEncoder(cfg.model.covariates).fit(clinical.reindex(patients),
                                                             source=cfg.data.clinical)
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fs = extract_features(
        samples, panel, config=cfg.features, template=cfg.data.template, progress=progress,
        random_state=cfg.seed, cache=feature_cache,
    )
    timings["features"] = time.perf_counter() - t0
    covariates: list[str] = []
    strata = None
    if encoder is not None:
        fs = with_covariates(fs, encoder, clinical, source=cfg.data.clinical)
        covariates = encoder.features
        strata = encoder.strata(fs.X)

    t0 = time.perf_counter()
    y = _outcome(cfg, clinical, fs.X.index)
    columns = "'time', 'event'" if cfg.outcome.kind == "survival" else f"'{cfg.outcome.column}'"
    result = train_model(fs.X, y, model=cfg.model, cv=cfg.cv, outcome=cfg.outcome.kind,
                         random_state=cfg.seed, n_jobs=n_jobs,
                         where=f"{cfg.data.clinical}, column {columns}",
                         covariates=covariates, strata=strata)
    timings["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tr = cfg.tracking
    target = TrackingTarget(tr.store, tr.artifacts, tr.experiment)
    data_files = [cfg.data.samples, cfg.data.clinical, cfg.data.panel, *map(Path, samples["path"])]
    config_json = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    all_timings = {**timings, **result.timings}
    searched = list(cfg.model.search.grid) if cfg.model.search is not None else []
    with start_experiment_run(target, run_name=cfg.name) as run:
        run.params(cfg.to_dict())
        if searched:
            run.params({"final": {k: result.settings[k] for k in searched}})
        run.metrics(_flat_metrics(result, len(fs.X), fs.X.shape[1], all_timings))
        run.tags(
            {
                "predictor.version": predictor.__version__,
                "git_commit": git_commit(Path(__file__).parent),
                "data_sha256": hash_files(data_files),
                "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
                "experiment_file": str(cfg.source or ""),
                "outcome_kind": cfg.outcome.kind,
                "tuned": str(bool(searched)).lower(),
                "permutation_procedure": result.permutation["procedure"],
                "covariates": ", ".join(cfg.model.covariates),
            }
        )
        run.folds(result.fold_metrics, params=searched)
        selected = fs.X[result.features]
        model_info = run.model(result.booster, selected.head(5), cfg.model_name,
                               output_name="probability" if result.kind == "binary" else "risk")
        if result.kind == "binary":
            outcome_info = {"kind": "binary", "column": cfg.outcome.column}
            calibration = {"method": "platt", "a": result.calibration["a"], "b": result.calibration["b"]}
        else:
            outcome_info = {"kind": "survival", "time": "time", "event": "event",
                            "score": "hazard ratio (exp of the Cox margin); flag = above threshold"}
            calibration = {}
        tables = {"qc": fs.qc, "populations": fs.populations}
        if result.oof_shap is not None:
            tables["oof_shap"] = result.oof_shap.rename_axis("patient_id").reset_index()
            # values of every feature some fold model used (the final model's are in
            # features_train.parquet): explanations colour and compare them too
            shap_cols = result.oof_shap.drop(columns=["base_value"], errors="ignore")
            used = [c for c in shap_cols.columns[shap_cols.abs().sum().to_numpy() > 0]
                    if c not in result.features and c in fs.X.columns]
            if used:
                tables["features_oof"] = fs.X[used].rename_axis("patient_id").reset_index()
        if result.fold_importance is not None:
            tables["fold_importance"] = result.fold_importance
            tables["feature_stability"] = result.stability(10)
        if result.null_importance is not None:
            tables["null_importance"] = result.null_importance
        if result.tuning is not None:
            tables["tuning"] = result.tuning["table"]
        bundle = save_bundle(
            tr.models,
            cfg.model_name,
            booster=result.booster,
            features=selected,
            meta=fs.meta,
            gating=fs.gating,
            panel=panel,
            feature_config=cfg.features,
            info={
                "threshold": result.threshold,
                "threshold_rule": result.threshold_rule,
                "calibration": calibration,
                "outcome": outcome_info,
                "settings": result.settings,
                "mlflow": {
                    "run_id": run.run_id,
                    "experiment_id": run.experiment_id,
                    "tracking_uri": target.uri,
                    **model_info,
                },
                "headline": dict(result.metrics),
                "permutation_p": result.permutation["p_value"],
                "predictor_version": predictor.__version__,
                "covariates": encoder.to_dict() if encoder is not None else [],
            },
            oof=result.oof,
            metrics=_payload(result, fs, all_timings),
            experiment=cfg.to_dict(),
            tables=tables,
        )
        run.tags({"bundle_path": str(bundle.resolve())})
        run.artifact_dir(bundle, "bundle")
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            problems = _write_evaluation(tmpd, cfg, result, fs, bundle)
            run.artifact_dir(tmpd)
        for problem in problems:
            warnings.warn(
                f"Experiment {cfg.name}: the {problem} could not be made; the MLflow run "
                f"{run.run_id} and the bundle {bundle} are complete without it.",
                UserWarning,
                stacklevel=2,
            )
        if problems:
            run.tags({"artifact_problems": "; ".join(problems)[:5000]})
        timings["tracking"] = time.perf_counter() - t0
        return ExperimentResult(
            cfg, fs, result, run.run_id, run.experiment_id, bundle, model_info, timings, encoder
        )
