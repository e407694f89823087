"""The built-in demo: the whole path on a simulated IL-7 cohort, locally, nothing to configure.

Layout under ``workdir`` (the current folder by default)::

    demo/cohort/            simulated training cohort (FCS, sample sheet, clinical, panel, truth)
    demo/new_patients/      simulated held-out patients to score
    demo/outputs/<stamp>/   scores.csv and report.html of this run
    mlflow.db, mlruns/      MLflow tracking store and artifacts
    models/il7_demo/vNNN/   the model bundle (a new version each run)

The cohorts are deterministic by seed and reused when present; every run adds a new MLflow
run, a new registered model version, a new bundle version and a new outputs folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from predictor.config import DataConfig, ExperimentConfig, ModelConfig, TrackingConfig
from predictor.model.experiment import ExperimentResult, run_experiment
from predictor.report.html import build_report
from predictor.score import score_samples, write_table
from predictor.simulate import SimulatedCohort, simulate_cohort

__all__ = ["DemoResult", "run_demo", "demo_config", "DEMO_PATIENTS", "DEMO_NEW_PATIENTS"]

# 200 training patients: enough for the planted drivers to be seen (at 40–60 patients most
# of the importance outside the strongest drivers is noise; README, "Which cell subsets").
DEMO_PATIENTS = 200
DEMO_NEW_PATIENTS = 12
DEMO_CELLS = 4000


@dataclass
class DemoResult:
    workdir: Path
    cohort: Path
    new_patients: Path
    experiment: ExperimentResult
    scores: Path
    report: Path
    timings: dict[str, float] = field(default_factory=dict)


def _cohort(root: Path, *, n_patients: int, seed: int, cells: int, prefix: str) -> SimulatedCohort:
    """Reuse a simulated cohort made with the same parameters, else simulate it."""
    truth = root / "truth.json"
    if truth.is_file():
        params = json.loads(truth.read_text()).get("parameters", {})
        if (params.get("n_patients"), params.get("seed"), params.get("cells_per_sample")) == (n_patients, seed, cells):
            return SimulatedCohort(root, root / "samples.csv", root / "clinical.csv", root / "panel.csv", truth)
        # A different demo cohort: keep it, simulate beside it.
        root = root.with_name(f"{root.name}-n{n_patients}-s{seed}-c{cells}")
        return _cohort(root, n_patients=n_patients, seed=seed, cells=cells, prefix=prefix)
    return simulate_cohort(root, n_patients=n_patients, seed=seed, cells_per_sample=cells,
                           id_prefix=prefix, n_jobs=2)


def demo_config(workdir: Path, cohort: SimulatedCohort, *, seed: int = 0) -> ExperimentConfig:
    """The demo experiment (same settings as ``experiments/il7_demo.toml``).

    The dataclass defaults, adjusted for the treatment arm (``[model] covariates = ["arm"]``).
    """
    return ExperimentConfig(
        name="il7_demo",
        seed=seed,
        data=DataConfig(samples=cohort.samples, clinical=cohort.clinical, panel=cohort.panel),
        model=ModelConfig(covariates=("arm",)),
        tracking=TrackingConfig(
            store=workdir / "mlflow.db",
            artifacts=workdir / "mlruns",
            models=workdir / "models",
            experiment="il7_demo",
        ),
    )


def run_demo(
    workdir: str | os.PathLike = ".",
    *,
    n_patients: int = DEMO_PATIENTS,
    n_new: int = DEMO_NEW_PATIENTS,
    cells_per_sample: int = DEMO_CELLS,
    seed: int = 0,
    permutations: int | None = None,
    progress: bool = False,
) -> DemoResult:
    """Simulate, extract features, train with MLflow tracking, score new patients, report."""
    from dataclasses import replace

    workdir = Path(workdir).resolve()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cohort = _cohort(workdir / "demo" / "cohort", n_patients=n_patients, seed=seed,
                     cells=cells_per_sample, prefix="P")
    new = _cohort(workdir / "demo" / "new_patients", n_patients=n_new, seed=seed + 1000,
                  cells=cells_per_sample, prefix="N")
    timings["simulate"] = time.perf_counter() - t0

    cfg = demo_config(workdir, cohort, seed=seed)
    if permutations is not None:
        cfg = replace(cfg, cv=replace(cfg.cv, permutations=permutations))
    t0 = time.perf_counter()
    exp = run_experiment(cfg, progress=progress)
    timings["train"] = time.perf_counter() - t0

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = workdir / "demo" / "outputs" / f"{stamp}-v{exp.bundle.name[1:]}"
    out.mkdir(parents=True, exist_ok=False)
    t0 = time.perf_counter()
    scores, fs = score_samples(exp.bundle, new.samples, progress=progress, clinical=new.clinical)
    scores_path = write_table(scores, out / "scores.csv")
    timings["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = build_report(exp.bundle, out / "report.html", scores=scores, score_features=fs.X)
    timings["report"] = time.perf_counter() - t0
    return DemoResult(workdir, cohort.root, new.root, exp, scores_path, report, timings)
