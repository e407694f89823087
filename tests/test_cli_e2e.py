"""End to end through the command line, on a tiny simulated cohort (real FCS, MLflow, XGBoost)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from predictor.cli import main

pytestmark = pytest.mark.slow
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TINY = ["--patients", "20", "--new-patients", "4", "--cells-per-sample", "1500", "--permutations", "20"]


@pytest.fixture(scope="module")
def demo_twice(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--workdir", str(work), *TINY]) == 0
    first = sorted((work / "demo" / "outputs").iterdir())
    v1_model = (work / "models" / "il7_demo" / "v001" / "model.json").read_bytes()
    assert main(["demo", "--workdir", str(work), *TINY]) == 0
    return work, first, v1_model


def test_demo_leaves_run_model_bundle_scores_report(demo_twice):
    import mlflow
    from mlflow import MlflowClient

    work, _, _ = demo_twice
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["il7_demo"], filter_string="attributes.run_name = 'il7_demo'")
    assert len(runs) == 2  # two demo runs, both kept
    assert {"metrics.auroc", "metrics.auroc_ci_low", "metrics.auroc_permutation_p"} <= set(runs.columns)
    versions = MlflowClient().search_model_versions("name='il7_demo'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    bundles = sorted(p.name for p in (work / "models" / "il7_demo").iterdir())
    assert bundles == ["v001", "v002"]
    outputs = sorted((work / "demo" / "outputs").iterdir())
    assert len(outputs) == 2
    for out in outputs:
        scores = pd.read_csv(out / "scores.csv")
        assert len(scores) == 4 and scores["patient_id"].is_unique
        assert scores["probability"].between(0, 1).all()
        assert {"flag", "driver_1", "driver_1_shap", "warnings"} <= set(scores.columns)
        html = (out / "report.html").read_text()
        assert "<img" in html and 'src="http' not in html and "data:image/png;base64," in html
    # Artifacts live under the workdir's mlruns/, the run links to the bundle.
    assert any((work / "mlruns").rglob("model.json"))


def test_second_demo_does_not_clobber_first(demo_twice):
    work, first, v1_model = demo_twice
    assert (work / "models" / "il7_demo" / "v001" / "model.json").read_bytes() == v1_model
    for out in first:
        assert (out / "scores.csv").is_file()


def test_score_reproduces_and_refuses_overwrite(demo_twice, capsys):
    work, _, _ = demo_twice
    latest = sorted((work / "demo" / "outputs").iterdir())[-1]
    out = work / "rescored.csv"
    new = work / "demo" / "new_patients"
    args = ["score", "--model", str(work / "models" / "il7_demo"),
            "--samples", str(new / "samples.csv"), "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2  # the demo model adjusts for the arm: the new patients' arm is needed
    err = capsys.readouterr().err
    assert "--clinical" in err and "arm" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    args += ["--clinical", str(new / "clinical.csv")]
    assert main(args) == 0
    a = pd.read_csv(out).set_index("patient_id")
    b = pd.read_csv(latest / "scores.csv").set_index("patient_id")
    pd.testing.assert_series_equal(a["probability"], b["probability"])
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_report_from_mlflow_run(demo_twice):
    import mlflow

    work, _, _ = demo_twice
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["il7_demo"], filter_string="attributes.run_name = 'il7_demo'")
    run_id = runs["run_id"].iloc[0]
    out = work / "from_run.html"
    assert main(["report", "--run", run_id, "--store", str(work / "mlflow.db"), "--out", str(out)]) == 0
    assert "Permutation test" in out.read_text()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["score", "--model", str(tmp_path / "nope"), "--samples", str(tmp_path / "x.csv"),
                 "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "s.csv").exists()


def test_unknown_option_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "predictor", "train", "--bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--bogus" in proc.stderr


def test_shipped_demo_experiment_matches_demo_defaults(tmp_path):
    from dataclasses import replace

    from predictor.config import load_experiment
    from predictor.demo import demo_config
    from predictor.simulate import SimulatedCohort

    root = Path(__file__).resolve().parents[1]
    shipped = load_experiment(root / "experiments" / "il7_demo.toml")
    cohort_dir = root / "demo" / "cohort"
    cohort = SimulatedCohort(cohort_dir, cohort_dir / "samples.csv", cohort_dir / "clinical.csv",
                             cohort_dir / "panel.csv", cohort_dir / "truth.json")
    built = demo_config(root, cohort)
    assert replace(shipped, source=None) == built
    baseline = load_experiment(root / "experiments" / "il7_baseline.toml")
    assert baseline.features.mode == "baseline" and baseline.features.timepoints == ("baseline",)


def test_typo_in_sample_sheet_is_named_not_dropped(tmp_path, capsys):
    from predictor.simulate import simulate_cohort

    c = simulate_cohort(tmp_path / "c", n_patients=4, seed=2, cells_per_sample=500)
    sheet = pd.read_csv(c.samples)
    sheet.loc[2, "timepoint"] = "basline"
    sheet["file"] = [str(c.root / f) for f in sheet["file"]]
    sheet.to_csv(tmp_path / "typo.csv", index=False)
    capsys.readouterr()
    rc = main(["features", "--samples", str(tmp_path / "typo.csv"), "--panel", str(c.panel),
               "--out", str(tmp_path / "out"), "--jobs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "row 4" in err and "'timepoint'" in err and "Did you mean 'baseline'" in err
    assert not (tmp_path / "out").exists()


def test_single_class_outcome_names_file_and_column(tmp_path, capsys):
    from predictor.simulate import simulate_cohort

    c = simulate_cohort(tmp_path / "c", n_patients=4, seed=5, cells_per_sample=500)
    clinical = pd.read_csv(c.clinical)
    clinical["response"] = 1
    clinical.to_csv(c.clinical, index=False)
    toml = tmp_path / "single.toml"
    toml.write_text(
        'name = "single"\n[data]\nsamples = "c/samples.csv"\nclinical = "c/clinical.csv"\n'
        'panel = "c/panel.csv"\n[features]\nn_jobs = 1\n[cv]\npermutations = 0\n'
        '[tracking]\nstore = "mlflow.db"\nartifacts = "mlruns"\nmodels = "models"\n'
    )
    capsys.readouterr()
    assert main(["train", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "clinical.csv" in err and "column 'response'" in err and "both responders" in err
    assert not any((tmp_path / name).exists() for name in ("mlflow.db", "mlruns", "models"))
