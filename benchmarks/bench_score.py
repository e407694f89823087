"""Batch scoring throughput: 50 new patients (200 FCS files) with a frozen bundle, file reading
included. Reference, same run: reading the same files once."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks._common import BenchResult
from predictor.config import CVConfig, DataConfig, ExperimentConfig, TrackingConfig
from predictor.io.fcs import read_fcs
from predictor.model.experiment import run_experiment
from predictor.score import score_samples
from predictor.simulate import simulate_cohort


def run(quick: bool = False) -> list[BenchResult]:
    n_new = 10 if quick else 50
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        root = Path(tmp)
        train = simulate_cohort(root / "train", n_patients=24, seed=0, cells_per_sample=2000, n_jobs=2)
        new = simulate_cohort(root / "new", n_patients=n_new, seed=99, cells_per_sample=4000,
                              id_prefix="N", n_jobs=2)
        cfg = ExperimentConfig(
            name="bench",
            data=DataConfig(samples=train.samples, clinical=train.clinical, panel=train.panel),
            cv=CVConfig(folds=3, repeats=1, permutations=0, bootstrap=0),
            tracking=TrackingConfig(store=root / "mlflow.db", artifacts=root / "mlruns",
                                    models=root / "models", experiment="bench"),
        )
        bundle = run_experiment(cfg).bundle
        files = [new.root / f for f in pd.read_csv(new.samples)["file"]]
        t0 = time.perf_counter()
        for f in files:
            read_fcs(f, warn=False)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_samples(bundle, new.samples, root / "scores.csv")
        score_s = time.perf_counter() - t0
    return [
        BenchResult(f"scoring {n_new} patients ({len(files)} files), 2 workers", n_new / score_s,
                    "patients/s", n_new / read_s, "patients/s of reading the files alone"),
        BenchResult("  scoring wall time", score_s, "s", read_s, "reading the files once"),
    ]
