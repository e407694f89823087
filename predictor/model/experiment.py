"""One experiment end to end: data → features → evaluation → MLflow run → bundle.

:func:`run_experiment` is what ``predictor train experiments/NAME.toml`` calls.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import predictor
from predictor.config import ExperimentConfig
from predictor.errors import ConfigError
from predictor.features import FeatureSet, extract_features
from predictor.io.clinical import read_clinical
from predictor.io.panel import read_panel
from predictor.io.samplesheet import check_cohort, read_sample_sheet
from predictor.model.bundle import save_bundle
from predictor.model.tracking import TrackingTarget, git_commit, start_experiment_run
from predictor.model.train import TrainingResult, train_model

__all__ = ["ExperimentResult", "run_experiment", "load_experiment_data", "hash_files"]


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    features: FeatureSet
    training: TrainingResult
    run_id: str
    experiment_id: str
    bundle: Path
    model: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


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
    samples = samples[samples["timepoint"].isin(fc.timepoints) & samples["condition"].isin(fc.conditions)]
    outcome = "survival" if cfg.outcome.kind == "survival" else cfg.outcome.column
    clinical = read_clinical(cfg.data.clinical, outcome=outcome)
    check_cohort(samples, clinical, timepoints=fc.timepoints, conditions=fc.conditions)
    return panel, samples, clinical


def run_experiment(cfg: ExperimentConfig, *, progress: bool = False, n_jobs: int = 2) -> ExperimentResult:
    """Run an experiment: features, honest evaluation, final model, MLflow run and bundle."""
    if cfg.outcome.kind != "binary":
        raise ConfigError(
            f"{cfg.source}: [outcome] kind = {cfg.outcome.kind!r} is not supported yet; use "
            "kind = 'binary' with a 0/1 column."
        )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    panel, samples, clinical = load_experiment_data(cfg)
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fs = extract_features(
        samples, panel, config=cfg.features, template=cfg.data.template, progress=progress,
        random_state=cfg.seed,
    )
    timings["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    y = clinical[cfg.outcome.column].reindex(fs.X.index)
    result = train_model(fs.X, y, model=cfg.model, cv=cfg.cv, random_state=cfg.seed, n_jobs=n_jobs)
    timings["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tr = cfg.tracking
    target = TrackingTarget(tr.store, tr.artifacts, tr.experiment)
    data_files = [cfg.data.samples, cfg.data.clinical, cfg.data.panel, *map(Path, samples["path"])]
    config_json = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    with start_experiment_run(target, run_name=cfg.name) as run:
        run.params(cfg.to_dict())
        flat: dict[str, float] = {}
        for metric, v in result.metrics.items():
            flat[metric] = v["estimate"]
            flat[f"{metric}_ci_low"] = v["ci_low"]
            flat[f"{metric}_ci_high"] = v["ci_high"]
        for base, table in result.baselines.items():
            for metric, v in table.items():
                flat[f"{base}.{metric}"] = v["estimate"]
        flat["auroc_permutation_p"] = result.permutation["p_value"]
        flat["threshold"] = result.threshold
        flat["n_patients"] = len(fs.X)
        flat["n_features"] = fs.X.shape[1]
        flat["n_responders"] = int(result.oof["y"].sum())
        flat.update({f"time_{k}_s": v for k, v in {**timings, **result.timings}.items()})
        run.metrics(flat)
        run.tags(
            {
                "predictor.version": predictor.__version__,
                "git_commit": git_commit(Path(__file__).parent),
                "data_sha256": hash_files(data_files),
                "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
                "experiment_file": str(cfg.source or ""),
            }
        )
        run.folds(result.fold_metrics)
        selected = fs.X[result.features]
        model_info = run.model(result.booster, selected.head(5), cfg.model_name)
        metrics_payload = {
            "metrics": result.metrics,
            "baselines": result.baselines,
            "permutation": result.permutation,
            "calibration": result.calibration,
            "folds": result.fold_metrics.to_dict("records"),
            "single_feature_choices": result.single_feature_choices,
            "timings": {**timings, **result.timings},
            "n_patients": len(fs.X),
            "n_features_total": int(fs.X.shape[1]),
        }
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
                "calibration": {"method": "platt", "a": result.calibration["a"], "b": result.calibration["b"]},
                "outcome": {"kind": cfg.outcome.kind, "column": cfg.outcome.column},
                "mlflow": {
                    "run_id": run.run_id,
                    "experiment_id": run.experiment_id,
                    "tracking_uri": target.uri,
                    **model_info,
                },
                "headline": {k: v for k, v in result.metrics.items()},
                "permutation_p": result.permutation["p_value"],
                "predictor_version": predictor.__version__,
            },
            oof=result.oof,
            metrics=metrics_payload,
            experiment=cfg.to_dict(),
            tables={"qc": fs.qc, "populations": fs.populations},
        )
        run.tags({"bundle_path": str(bundle.resolve())})
        run.artifact_dir(bundle, "bundle")
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            fs.qc.to_csv(tmpd / "qc.csv", index=False)
            fs.populations.to_csv(tmpd / "populations.csv", index=False)
            pd.DataFrame(result.frame()).to_csv(tmpd / "metrics_table.csv", index=False)
            run.artifact_dir(tmpd, "tables")
        timings["tracking"] = time.perf_counter() - t0
        return ExperimentResult(
            cfg, fs, result, run.run_id, run.experiment_id, bundle, model_info, timings
        )
