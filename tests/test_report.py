"""The explanation report end to end: a real bundle, real headless Chromium, planted drivers.

One module fixture simulates a small IL-7 cohort (FCS files with known drivers), runs the
experiment (features, CV, MLflow, bundle) and writes the report with four patient cards. The
report is then opened in Debian's Chromium through Playwright (never a browser Playwright
downloads itself): no console errors, no network request, every image decoded, every section
there, and a full-page screenshot that is not blank. The planted driver populations of
``truth.json`` must rank above chance in the population-level SHAP importance of that cohort,
and at the top (3 of 5 in the top 5) in a second, 200-patient cohort trained the same way.

Needs ``playwright`` (Python package) and ``/usr/bin/chromium`` (``scripts/ensure-chromium.sh``);
the browser tests skip with a message when either is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from predictor.demo import demo_config
from predictor.explain import explain_bundle
from predictor.model.bundle import load_bundle
from predictor.model.experiment import run_experiment
from predictor.report.html import SECTIONS, build_report, render_report
from predictor.score import score_features
from predictor.simulate import simulate_cohort

pytestmark = pytest.mark.slow
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

N_PATIENTS, CELLS, SEED, N_CARDS = 40, 1500, 0, 4
N_LARGE = 200  # patients of the cohort the drivers' ranking is checked on
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for cand in (os.environ.get("PREDICTOR_CHROMIUM"), "/usr/bin/chromium",
                 shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _write_oof_tables(bundle_path: Path, training) -> None:
    """The training's out-of-fold SHAP tables, in the bundle's documented format, if missing."""
    oof = getattr(training, "oof_shap", None)
    fi = getattr(training, "fold_importance", None)
    if not (bundle_path / "oof_shap.csv").is_file() and oof is not None:
        oof.rename_axis("patient_id").to_csv(bundle_path / "oof_shap.csv")
    if not (bundle_path / "fold_importance.csv").is_file() and fi is not None:
        fi.to_csv(bundle_path / "fold_importance.csv", index=False)


def _simulate_and_train(root: Path, n_patients: int, *, permutations: int,
                        bootstrap: int) -> SimpleNamespace:
    """Simulate a cohort and run the demo's experiment on it (fewer permutations and
    bootstraps), keeping the out-of-fold SHAP tables in the bundle."""
    cohort = simulate_cohort(root / "cohort", n_patients=n_patients, seed=SEED,
                             cells_per_sample=CELLS, n_jobs=2)
    cfg = demo_config(root, cohort, seed=SEED)
    cfg = replace(cfg, cv=replace(cfg.cv, permutations=permutations, bootstrap=bootstrap))
    exp = run_experiment(cfg)
    _write_oof_tables(Path(exp.bundle), exp.training)
    return SimpleNamespace(root=root, cohort=cohort, exp=exp, bundle=load_bundle(exp.bundle))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _simulate_and_train(tmp_path_factory.mktemp("il7"), N_PATIENTS, permutations=10,
                               bootstrap=200)


@pytest.fixture(scope="module")
def report(trained):
    X = trained.exp.features.X.head(N_CARDS)
    scores = score_features(trained.bundle, X)
    out = build_report(trained.bundle.path, trained.root / "report.html", scores=scores, score_features=X)
    return out


@pytest.fixture(scope="module")
def browser_facts(report, tmp_path_factory):
    """What Chromium saw when it opened the report, and a full-page screenshot."""
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="Python package 'playwright' missing: pip install -e '.[test]' (it drives Debian's "
               "chromium; never run 'playwright install').",
    )
    exe = _chromium()
    if exe is None:
        pytest.skip("No Chromium: run scripts/ensure-chromium.sh (installs Debian's chromium).")
    shot = tmp_path_factory.mktemp("shots") / "report.png"
    facts: dict = {"console": [], "page_errors": [], "requests": []}
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = ctx.new_page()
            page.on("console", lambda m: facts["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: facts["page_errors"].append(str(e)))

            def route(r):
                url = r.request.url
                if url.startswith("file:"):
                    r.continue_()
                else:  # anything else would be an external resource: record and refuse
                    facts["requests"].append(url)
                    r.abort()

            page.route("**/*", route)
            page.goto(report.resolve().as_uri(), wait_until="load")
            facts["title"] = page.title()
            facts["images"] = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
                " w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 22)}))"
            )
            facts["sections"] = {s: page.locator(f"#{s}").count() for s in SECTIONS}
            facts["visible"] = {s: page.locator(f"#{s}").is_visible() for s in SECTIONS}
            facts["cards"] = page.locator(".card").count()
            facts["card_items"] = page.locator(".card ul.drivers li").count()
            facts["height"] = page.evaluate("document.documentElement.scrollHeight")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    facts["screenshot"] = shot
    return facts


# ------------------------------------------------------------------------------ the file


def test_report_is_one_self_contained_file(report) -> None:
    text = report.read_text(encoding="utf-8")
    size = report.stat().st_size
    print(f"\nreport: {size:,} bytes, {text.count('<img')} images")
    assert size < 3_000_000
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched
    assert "<script" not in text and "<link" not in text
    assert text.count("<img") == text.count('src="data:image/png;base64,') >= 8
    for s in SECTIONS:
        assert f'id="{s}"' in text
    assert "Permutation test of the AUROC" in text


def test_report_says_where_its_explanations_come_from(trained, report, tmp_path) -> None:
    text = report.read_text(encoding="utf-8")
    oof = (trained.bundle.path / "oof_shap.csv").is_file()
    assert ("<b>out-of-fold</b>" in text) == oof
    if (trained.bundle.path / "fold_importance.csv").is_file():
        assert "share of folds in top" in text
    # The same bundle without the out-of-fold tables: in-sample SHAP, said so, no stability.
    copy = tmp_path / "v001"
    shutil.copytree(trained.bundle.path, copy)
    for name in ("oof_shap.csv", "fold_importance.csv"):
        (copy / name).unlink(missing_ok=True)
    old = render_report(load_bundle(copy))
    assert "final model's in-sample SHAP" in old and "No per-fold importances" in old
    assert 'id="patients"' not in old  # no scored patients, no cards
    assert "<b>out-of-fold</b>" not in old


# ------------------------------------------------------------------------------ in Chromium


def test_report_renders_in_chromium(browser_facts) -> None:
    f = browser_facts
    errors = [t for kind, t in f["console"] if kind == "error"]
    assert errors == [] and f["page_errors"] == []
    assert f["requests"] == []  # offline: no request besides the file itself
    assert f["title"].startswith("predictor report")
    assert len(f["images"]) >= 8
    broken = [i for i in f["images"] if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert broken == []
    assert all(i["src"].startswith("data:image/png") for i in f["images"])
    assert f["sections"] == dict.fromkeys(SECTIONS, 1)
    assert all(f["visible"].values())
    assert f["cards"] == N_CARDS and f["card_items"] >= 3 * N_CARDS


def test_report_screenshot_is_not_blank(browser_facts) -> None:
    from PIL import Image

    shot = browser_facts["screenshot"]
    assert shot.stat().st_size > 100_000
    img = Image.open(shot)
    assert img.width == 1200 and img.height >= 4000 and img.height >= browser_facts["height"] - 10
    grey = np.asarray(img.convert("L"), dtype=float)
    top = grey[:900]  # the first screen: title, navigation, summary, cohort
    print(f"\nscreenshot {img.width}×{img.height}: pixel SD {grey.std():.1f}, "
          f"non-white {100 * (grey < 245).mean():.1f}%")
    assert grey.std() > 20 and top.std() > 10
    assert 0.03 < (grey < 245).mean() < 0.9  # ink, but not a black page


# ------------------------------------------------------------------------------ planted drivers


def _driver_populations(truth: dict) -> list[str]:
    pops = []
    for d in truth["drivers"]:
        pops.append(d["population"])
        if d.get("with"):
            pops.append(d["with"]["population"])
    return sorted(set(pops))


def _driver_ranking(bundle, truth_path: Path) -> SimpleNamespace:
    """The population-level SHAP ranking of a bundle against truth.json's driver populations:
    recall@k for k = the number of drivers and k + 3, the drivers' mean rank, and chance."""
    drivers = _driver_populations(json.loads(Path(truth_path).read_text()))
    k = len(drivers)
    ex = explain_bundle(bundle, interactions=False)
    table = ex.frame("population").set_index("group")
    ranking = list(table.index)
    assert ex.covariates == ["arm"] and "arm" not in ranking and len(ranking) == 20  # ranked apart
    n = len(ranking)
    r = SimpleNamespace(
        drivers=drivers, k=k, n=n, ranking=ranking,
        ranks=table["rank"].reindex(drivers).fillna(n),
        recall={kk: len(set(ranking[:kk]) & set(drivers)) / k for kk in (k, k + 3)},
        chance={kk: kk / n for kk in (k, k + 3)},
    )
    r.mean_rank = float(r.ranks.mean())
    print(f"\n{ex.source} SHAP: drivers {drivers}")
    print(f"ranks: {r.ranks.to_dict()}; top {k + 3}: {ranking[:k + 3]}")
    print(f"recall@{k} = {r.recall[k]:.2f} (chance {r.chance[k]:.2f}); "
          f"recall@{k + 3} = {r.recall[k + 3]:.2f} (chance {r.chance[k + 3]:.2f}); "
          f"drivers' mean rank {r.mean_rank:.1f} of {n} (chance {(n + 1) / 2:.1f})")
    print("clinical covariates:\n" + ex.frame("covariate").round(3).to_string())
    return r


def test_planted_driver_populations_rank_high_in_a_small_cohort(trained) -> None:
    """At a trial's size (40 patients) the drivers rank above chance, not all at the top.

    Over 10 cohorts (40 patients: seeds 0–3, 6–9; 60: seeds 4–5): recall@5 0.50 (0.2–0.8),
    recall@8 0.76 (0.6–1.0), drivers' mean rank 6.0 (chance 0.25, 0.40, 10.5); this seed
    0.4, 0.6, 7.0. At this size most of the importance outside the drivers is noise: refitting
    on permuted outcomes, only the best readouts of the two strongest drivers beat the null.
    :func:`test_planted_drivers_rank_at_the_top_of_a_larger_cohort` checks the ranking where
    the drivers can be seen. Floors (the worst of the 10): recall@8 ≥ 0.6 and a mean rank
    better than chance.
    """
    r = _driver_ranking(trained.bundle, trained.cohort.truth)
    assert r.recall[r.k + 3] >= 0.6
    assert r.mean_rank < (r.n + 1) / 2


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A 200-patient cohort trained as the demo is, without the permutation test."""
    return _simulate_and_train(tmp_path_factory.mktemp("il7-large"), N_LARGE, permutations=0,
                               bootstrap=100)


def test_planted_drivers_rank_at_the_top_of_a_larger_cohort(large) -> None:
    """Recall of the planted driver populations in the population-level SHAP ranking.

    truth.json plants 5 driver populations (CD4 T, CD8 T, Monocytes, NK, Treg) among the 20
    gated ones. Measured as the demo trains (out-of-fold SHAP, default model, 5-fold × 2 CV,
    seed = cohort seed, arm as a clinical covariate, 1500 cells per sample; a child gate's
    feature counts for its parent when both read the same, |Spearman ρ| ≥ 0.9):

    ========  =======  ===============  ===============  ==================  ===========
    patients  cohorts  recall@5         recall@8         drivers' mean rank  AUROC
    ========  =======  ===============  ===============  ==================  ===========
    40 / 60   10       0.50 (0.2–0.8)   0.76 (0.6–1.0)   6.0 (3.8–8.2)       0.78
    120       10       0.62 (0.4–0.8)   0.78 (0.6–1.0)   5.0 (4.2–5.8)       0.82
    200       10       0.64 (0.6–0.8)   0.76 (0.6–0.8)   5.4 (4.2–6.8)       0.84
    chance             0.25             0.40             10.5
    ========  =======  ===============  ===============  ==================  ===========

    Ranks per driver at 200 patients (median, range over the 10 cohorts; weight in the
    linear predictor): Monocytes 2 (1–4; hinge −3.2), Treg 2 (1–8; −0.8), CD8 T 3.5 (1–9;
    +2.2 expansion, −0.6 PD-1), CD4 T 5.5 (1–11; +0.8 IL-2), NK 12 (3–14; +0.6 × CD8 IFNγ).
    Past ~120 patients more patients do not move the ranking: what keeps a driver from the
    top is that the simulated biology ties it to other subsets, not noise. NK's term is an
    interaction of two on-treatment changes that rise together under IL-7, so its own main
    effect is small. Every IL-7 effect follows the patient's responsiveness, and CD8 T
    expansion lowers every other subset's % of live cells, so non-driver subsets carry the
    predictive drivers' signal too (seed 0, Spearman ρ with the driver feature over the 200
    patients: T cells Δ % live 0.85 and Monocytes Δ % live −0.82 with CD8 T's; γδ T Δ IL-2
    0.73 with CD4 T's), and the model may split on those instead. The seed-0 cohort: recall@5
    0.8, recall@8 0.8, mean rank 4.2. Floors, from the worst of the 10: recall@5 ≥ 0.6 (3 of
    the 5 drivers are the top 5), mean rank ≤ 7, and the strongest driver in the top 5.
    """
    r = _driver_ranking(large.bundle, large.cohort.truth)
    assert r.recall[r.k] >= 0.6  # 3 of the 5 drivers are the top 5 of 20 populations
    assert r.recall[r.k + 3] >= 0.6
    assert r.mean_rank <= 7.0
    assert r.ranks["Monocytes"] <= 5  # the strongest driver (weight −3.2)


def test_report_shows_the_covariates_apart(report) -> None:
    text = report.read_text(encoding="utf-8")
    assert "id='covariates'" in text and "Clinical covariates (adjusted for, not cell subsets)" in text
    assert "adjusted for arm" in text  # at a glance
    assert "covariates alone" in text or "covariates only" in text


# ------------------------------------------------------------------------------ report tables


def test_qc_tables_summarise_steps_and_flag_low_samples() -> None:
    import pandas as pd

    from predictor.report import tables

    qc = pd.DataFrame({
        "sample_id": ["A", "B", "C"],
        "events_in": [1000, 2000, 1000],
        "after_beads": [900, 1900, 950],
        "kept": [800, 1800, 300],
        "flagged_low": [False, False, True],
        "quirks": ["", "", "offset"],
    })
    steps = tables.qc_steps(qc)
    assert list(steps["step"]) == ["events in file", "beads removed", "kept"]
    assert steps["median events"].tolist() == [1000, 950, 800]
    assert steps["median % of input"].tolist() == pytest.approx([100.0, 95.0, 80.0])
    low = tables.low_samples(qc)
    assert low["sample_id"].tolist() == ["C"] and low.at[0, "% kept"] == pytest.approx(30.0)
    assert low.at[0, "quirks"] == "offset"
    pops = pd.DataFrame({
        "sample_id": ["A", "B", "A", "B"], "population": ["T cells", "T cells", "pDC", "pDC"],
        "parent": ["root", "root", "DC", "DC"], "count": [500, 700, 5, 30], "pct_live": [50, 60, 0.5, 2.0],
    })
    cells = tables.population_cells(pops, min_cells=20)
    assert cells["population"].tolist() == ["T cells", "pDC"]
    assert cells["samples < 20 cells"].tolist() == [0, 1]
    assert cells.loc[1, "median cells"] == pytest.approx(17.5)


def test_performance_table_reads_metrics_json() -> None:
    from predictor.report import tables

    m = {"metrics": {"auroc": {"estimate": 0.8, "ci_low": 0.7, "ci_high": 0.9}},
         "baselines": {"elastic_net": {"auroc": {"estimate": 0.6, "ci_low": 0.5, "ci_high": 0.7}}},
         "folds": [{"auroc": 0.7}, {"auroc": 0.9}, {"auroc": float("nan")}]}
    perf = tables.performance(m)
    assert perf["model"].tolist() == ["XGBoost", "elastic net"]
    assert perf["estimate"].tolist() == [0.8, 0.6]
    folds = tables.fold_summary(m).iloc[0]
    assert (folds["folds"], folds["min"], folds["max"]) == (2, 0.7, 0.9)


def test_report_lists_child_readouts_counted_for_a_parent(report, trained) -> None:
    text = report.read_text(encoding="utf-8")
    ex = explain_bundle(trained.bundle, interactions=False)
    assert ex.same_readouts is not None and len(ex.same_readouts) > 0  # nested gates agree
    assert "Same readout, counted once" in text
    assert f"Table of {len(ex.same_readouts)} features counted for a parent" in text
    first = ex.same_readouts.iloc[0]
    assert f"{first['population']} → {first['credited_to']}" in text


def test_report_tests_each_population_against_permuted_outcomes(report, trained) -> None:
    text = report.read_text(encoding="utf-8")
    ex = explain_bundle(trained.bundle, interactions=False)
    nt = ex.null_test("population")
    assert nt is not None and nt["null_p"].between(0, 1).all() and len(nt) == 20
    beat = int((nt["null_p"] < 0.05).sum())
    assert f"<b>Against chance:</b> {beat} of 20 subsets" in text and "p (permuted outcome)" in text
    print("\npopulations beating the permuted-outcome null:\n"
          + nt.sort_values("null_p").head(8).round(3).to_string())
