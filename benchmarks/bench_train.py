"""Default evaluation of the demo cohort (features → train_model), split by stage.

Subject: ``train_model`` with the demo settings (60 patients, ~2,500 features plus the arm as a
clinical covariate, 5-fold × 2 repeats grouped CV, 200 permutations within arm, 1,000
bootstraps, baselines, final fit) on 2 processes,
and the same with the ``experiments/il7_tuned.toml`` grid in the inner loop.
Reference, measured in the same run: one plain XGBoost fit of the demo model on all patients
(top-200 features) times the number of such fits the evaluation makes, run serially — the
floor of the work whatever the bookkeeping. Target: the default evaluation ≤ 60 s on 2 cores.

The simulated cohort and its feature matrix are cached under the system temp folder
(``predictor-bench/``, keyed by a hash of the feature code), so only the first run pays for
simulation and feature extraction.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import BenchResult, best_time
from predictor.config import CVConfig, ModelConfig, load_experiment
from predictor.demo import DEMO_CELLS
from predictor.simulate import simulate_cohort

TRIAL_PATIENTS = 60  # a trial-sized cohort (the demo's is larger), comparable between runs

ROOT = Path(__file__).resolve().parents[1]


def _with_arm(X: pd.DataFrame, clinical: pd.DataFrame) -> tuple[pd.DataFrame, list[str], pd.Series | None]:
    """X plus the encoded arm, as the demo trains (``[model] covariates = ["arm"]``)."""
    from predictor.covariates import CovariateEncoder

    enc = CovariateEncoder(["arm"]).fit(clinical.reindex(X.index))
    Xc = pd.concat([X, enc.transform(clinical, X.index)], axis=1)
    return Xc, enc.features, enc.strata(Xc)


def _features(n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature matrix and clinical table of the simulated demo cohort of ``n`` patients (cached)."""
    from predictor.demo import demo_config
    from predictor.features import extract_features
    from predictor.model.experiment import load_experiment_data

    code = hashlib.sha256(b"".join(  # features computed by other code are not reused
        p.read_bytes() for pattern in ("features/*.py", "populations/*.py", "preprocess.py", "io/*.py")
        for p in sorted((ROOT / "predictor").glob(pattern)))).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / "predictor-bench" / f"demo-n{n}-s0-c{DEMO_CELLS}-{code}"
    x_path = cache / "features.parquet"
    if not (cache / "truth.json").is_file():
        simulate_cohort(cache, n_patients=n, seed=0, cells_per_sample=DEMO_CELLS, n_jobs=2,
                        overwrite=True)
    if not x_path.is_file():
        from predictor.simulate import SimulatedCohort

        c = SimulatedCohort(cache, cache / "samples.csv", cache / "clinical.csv",
                            cache / "panel.csv", cache / "truth.json")
        cfg = demo_config(cache, c)
        panel, samples, _ = load_experiment_data(cfg)
        fs = extract_features(samples, panel, config=cfg.features, template=cfg.data.template)
        tmp = x_path.with_suffix(".tmp")
        fs.X.to_parquet(tmp)
        tmp.replace(x_path)
    X = pd.read_parquet(x_path)
    clinical = pd.read_csv(cache / "clinical.csv").set_index("patient_id")
    json.loads((cache / "truth.json").read_text())  # a complete cohort
    return X, clinical


def _one_fit_seconds(X: pd.DataFrame, y: pd.Series, model: ModelConfig) -> float:
    from predictor.model.train import Outcome, _fit, select_features

    Xa = X.to_numpy(np.float32)
    out = Outcome("binary", y.to_numpy().astype(int))
    cols = select_features(Xa, out, model.max_features)
    return best_time(lambda: _fit(Xa[:, cols], out, model, 0), repeat=5)


def run(quick: bool = False) -> list[BenchResult]:
    from predictor.model.train import train_model

    n = 30 if quick else TRIAL_PATIENTS
    X, clinical = _features(n)
    y = clinical["response"].reindex(X.index)
    X, covariates, strata = _with_arm(X, clinical)
    model = ModelConfig(covariates=("arm",))
    cv = CVConfig(permutations=50) if quick else CVConfig()
    fit_s = _one_fit_seconds(X, y, model)
    n_fits = cv.folds * cv.repeats + cv.permutations * cv.folds + 1
    reference = fit_s * n_fits

    t0 = time.perf_counter()
    res = train_model(X, y, model=model, cv=cv, random_state=0, n_jobs=2, covariates=covariates,
                      strata=strata)
    total = time.perf_counter() - t0
    label = f"{n} patients × {X.shape[1]} features, {cv.folds}×{cv.repeats} CV, {cv.permutations} perm."
    out = [
        BenchResult(f"default evaluation ({label})", total, "s", reference,
                    f"{n_fits} plain fits, serial", "≤ 60 s on 2 cores"),
    ]
    for stage in ("cv", "permutation", "baselines", "bootstrap", "final_fit"):
        out.append(BenchResult(f"  stage: {stage}", res.timings[stage], "s", total, "evaluation total"))
    out.append(BenchResult("  one plain XGBoost fit (150 trees, top-200)", fit_s * 1000, "ms"))

    tuned_cfg = load_experiment(ROOT / "experiments" / "il7_tuned.toml")
    tuned_model = tuned_cfg.model
    if quick:
        tuned_model = replace(tuned_model, search=replace(tuned_model.search, max_depth=(1, 2)))
    t0 = time.perf_counter()
    tuned = train_model(X, y, model=tuned_model, cv=cv, random_state=0, n_jobs=2,
                        covariates=covariates, strata=strata)
    tuned_total = time.perf_counter() - t0
    out.append(BenchResult(
        f"tuned evaluation ({tuned_model.search.size} settings, {tuned_model.search.inner_folds} inner "
        "folds, fixed-param. permutations)", tuned_total, "s", total, "default evaluation"))
    out.append(BenchResult("  stage: nested cv (inner tuning included)", tuned.timings["cv"], "s",
                           res.timings["cv"], "untuned cv"))
    out.append(BenchResult("  stage: final tuning + fit", tuned.timings["final_fit"], "s",
                           res.timings["final_fit"], "untuned final fit"))
    out.append(BenchResult("  CV AUROC default / tuned", res.metrics["auroc"]["estimate"], "",
                           tuned.metrics["auroc"]["estimate"], "tuned"))
    return out
