"""Feature extraction execution: per-sample cache (re-runs skip, interrupted runs resume), a real
Dask LocalCluster giving the same features as the local pool, and the AnnData export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import predictor.features.cohort as cohort
from predictor.config import FeatureConfig
from predictor.features import FeatureSet, extract_features
from predictor.io.panel import read_panel
from predictor.io.samplesheet import read_sample_sheet
from predictor.simulate import simulate_cohort


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    c = simulate_cohort(root / "c", n_patients=4, seed=3, cells_per_sample=1000)
    return read_sample_sheet(c.samples), read_panel(c.panel)


@pytest.fixture
def count_cleaning(monkeypatch):
    calls: list[str] = []
    real = cohort.load_sample

    def counting(path, panel, **kwargs):
        calls.append(path)
        return real(path, panel, **kwargs)

    monkeypatch.setattr(cohort, "load_sample", counting)
    return calls


def test_cache_skips_finished_samples_and_resumes(tiny, tmp_path, count_cleaning):
    sheet, panel = tiny
    cfg = FeatureConfig(n_jobs=1)
    cache = tmp_path / "cache"
    first = extract_features(sheet, panel, config=cfg, cache=cache)
    assert len(count_cleaning) == 2 * len(sheet)  # pass 1 and pass 2 per sample
    count_cleaning.clear()
    again = extract_features(sheet, panel, config=cfg, cache=cache)
    assert count_cleaning == []  # everything came from the cache
    pd.testing.assert_frame_equal(first.X, again.X)
    # An interrupted run: drop the entries of some samples, only those are redone.
    entries = sorted(p for p in cache.glob("*/*") if p.is_dir())
    for p in entries[:3]:
        shutil.rmtree(p)
    count_cleaning.clear()
    resumed = extract_features(sheet, panel, config=cfg, cache=cache)
    assert 1 <= len(count_cleaning) <= 3
    pd.testing.assert_frame_equal(first.X, resumed.X)


def test_cache_key_follows_settings(tiny, tmp_path, count_cleaning):
    sheet, panel = tiny
    cache = tmp_path / "cache"
    extract_features(sheet, panel, config=FeatureConfig(n_jobs=1), cache=cache)
    count_cleaning.clear()
    extract_features(sheet, panel, config=FeatureConfig(n_jobs=1, min_cells=5), cache=cache)
    assert len(count_cleaning) == len(sheet)  # pass 2 redone (settings changed), pass 1 cached


def test_process_pool_matches_inline(tiny):
    sheet, panel = tiny
    a = extract_features(sheet, panel, config=FeatureConfig(n_jobs=1))
    b = extract_features(sheet, panel, config=FeatureConfig(n_jobs=2))
    pd.testing.assert_frame_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.populations, b.populations)


def test_frozen_gating_cleans_each_file_as_the_fitted_run_did(tiny, monkeypatch):
    """Without pass 1 (a model's frozen gating) each file's cleanup is fitted on the events
    pass 1 would have read: the same thresholds, so the same features as in training, and
    not the thresholds of all its events."""
    sheet, panel = tiny
    monkeypatch.setattr(cohort, "CLEANUP_FIT_EVENTS", 300)  # files have ~1000 events
    kw = {"config": FeatureConfig(n_jobs=1), "max_cells_per_sample": 200, "random_state": 7}
    fitted = extract_features(sheet, panel, **kw)
    frozen = extract_features(sheet, panel, gating=fitted.gating, **kw)
    pd.testing.assert_frame_equal(frozen.qc, fitted.qc)
    pd.testing.assert_frame_equal(frozen.X, fitted.X)
    cols = [c for c in fitted.qc if c.startswith("threshold_")]
    path = sheet["path"].iloc[0]
    _, _, qc_all = cohort.load_sample(path, panel)  # fitted on every event instead
    assert [qc_all[c] for c in cols] != fitted.qc.loc[0, cols].tolist()
    other_seed = extract_features(sheet, panel, gating=fitted.gating,
                                  **{**kw, "random_state": 8})
    assert not other_seed.qc[cols].equals(fitted.qc[cols])


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c:
        yield c


def _ran_on(cluster, run) -> set[str]:
    """Run ``run()``; the names of the task functions the cluster's scheduler saw meanwhile
    (empty when nothing ran there)."""
    sched = cluster.scheduler
    before = sched.transition_counter
    run()
    return set(sched.task_prefixes) if sched.transition_counter > before else set()


@pytest.mark.timeout(180)
def test_dask_local_cluster_matches_local_pool(tiny, cluster):
    sheet, panel = tiny
    local = extract_features(sheet, panel, config=FeatureConfig(n_jobs=1))
    out = {}
    ran = _ran_on(cluster, lambda: out.setdefault("fs", extract_features(
        sheet, panel, config=FeatureConfig(n_jobs=1), scheduler=cluster.scheduler_address)))
    assert {"pass1", "pass2"} <= ran  # Dask names tasks without the leading _
    pd.testing.assert_frame_equal(local.X, out["fs"].X)
    pd.testing.assert_frame_equal(local.qc, out["fs"].qc)


@pytest.mark.timeout(300)
def test_experiment_file_names_the_dask_scheduler(tmp_path, cluster, capsys):
    """`[features] scheduler` in the experiment file sends training's feature extraction to
    that cluster; the bundle does not keep the address (scoring runs where it is told)."""
    import json

    from predictor.cli import main

    simulate_cohort(tmp_path / "c", n_patients=12, seed=8, cells_per_sample=800)
    toml = tmp_path / "dask.toml"
    toml.write_text(
        'name = "ondask"\n[data]\nsamples = "c/samples.csv"\nclinical = "c/clinical.csv"\n'
        f'panel = "c/panel.csv"\n[features]\nn_jobs = 1\nscheduler = "{cluster.scheduler_address}"\n'
        "[cv]\nfolds = 3\nrepeats = 1\npermutations = 5\nbootstrap = 50\n"
        '[tracking]\nstore = "mlflow.db"\nartifacts = "mlruns"\nmodels = "models"\n'
    )
    ran = _ran_on(cluster, lambda: main(["train", str(toml)]) == 0 or pytest.fail(
        capsys.readouterr().err))
    assert "pass2" in ran
    bundle = json.loads(next((tmp_path / "models" / "ondask").glob("v*/bundle.json")).read_text())
    assert "scheduler" not in bundle["feature_config"]
    assert bundle["feature_config"]["min_cells"] == 20


def test_a_bad_scheduler_setting_names_the_key(tmp_path, tiny, capsys):
    from predictor.cli import main

    toml = tmp_path / "bad.toml"
    toml.write_text('name = "bad"\n[features]\nscheduler = 8786\n')
    assert main(["train", str(toml)]) == 2
    assert "'scheduler' parameter of [features]" in capsys.readouterr().err
    toml.write_text('name = "bad"\n')
    assert main(["train", str(toml), "--scheduler", "tcp:// host:8786"]) == 2
    err = capsys.readouterr().err
    assert "'scheduler' parameter of [features]" in err and "tcp:// host:8786" in err


def test_unreachable_scheduler_is_a_clear_error(tiny):
    from predictor.errors import ConfigError

    sheet, panel = tiny
    with pytest.raises(ConfigError, match="Dask scheduler"):
        extract_features(sheet, panel, config=FeatureConfig(n_jobs=1), scheduler="tcp://127.0.0.1:9")


def test_save_writes_parquet_csv_and_anndata(tiny, tmp_path):
    import anndata

    sheet, panel = tiny
    fs = extract_features(sheet, panel, config=FeatureConfig(n_jobs=1))
    out = fs.save(tmp_path / "features")
    for name in ("features", "features_long", "populations", "feature_meta", "qc"):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file()
    ad = anndata.read_h5ad(out / "features.h5ad")
    assert ad.shape == fs.X.shape
    assert list(ad.var_names) == list(fs.X.columns)
    assert list(ad.var["population"]) == list(fs.meta.loc[fs.X.columns, "population"])
    np.testing.assert_allclose(ad.X, fs.X.to_numpy(dtype=np.float32), equal_nan=True)
    loaded = FeatureSet.load(out)
    pd.testing.assert_frame_equal(loaded.X, fs.X)


def test_clusters_instead_of_gating_round_trip(tiny, tmp_path):
    from predictor.populations import Clustering

    sheet, panel = tiny
    fs = extract_features(sheet, panel, config=FeatureConfig(n_jobs=1), clusters=8)
    assert isinstance(fs.gating, Clustering)
    pops = set(fs.populations["population"])
    assert len(pops) == 8 and any("-like (MC" in p for p in pops)
    loaded = FeatureSet.load(fs.save(tmp_path / "f"))
    assert isinstance(loaded.gating, Clustering)
    again = extract_features(sheet, panel, config=FeatureConfig(n_jobs=1), gating=loaded.gating)
    pd.testing.assert_frame_equal(again.X, fs.X)


# ------------------------------------------------------------------------------ positivity


def _gated_sample(path, panel, gating, batch):
    """Independent path: the transformed clean cells of one file and their membership."""
    from predictor.io.fcs import read_fcs
    from predictor.io.panel import apply_panel
    from predictor.preprocess import cleanup

    cells = cleanup(apply_panel(read_fcs(path, warn=False), panel), panel).cells
    return cells, gating.apply(cells, batch=batch)


def test_frac_pos_gated_by_the_unstimulated_sample(tiny):
    """frac_pos_reference = 'unstim': each population × marker of a stimulated sample is
    gated at the quantile of the same patient's unstimulated sample at that timepoint."""
    sheet, panel = tiny
    cfg = FeatureConfig(n_jobs=1, frac_pos_reference="unstim", frac_pos_quantile=0.9)
    fs = extract_features(sheet, panel, config=cfg)
    long = fs.long.set_index(["sample_id", "population", "marker", "statistic"])["value"]
    pid, tp = sheet["patient_id"].iloc[0], sheet["timepoint"].iloc[0]
    pair = sheet[(sheet["patient_id"] == pid) & (sheet["timepoint"] == tp)].set_index("condition")
    batch = str(pair["batch"].iloc[0]) if "batch" in pair else None
    unstim, um = _gated_sample(pair.at["unstim", "path"], panel, fs.gating, batch)
    stim, sm = _gated_sample(pair.at["stim", "path"], panel, fs.gating, batch)
    checked = 0
    for pop in ("T cells", "CD4 T", "CD8 T"):
        for marker in ("IFNg", "TNFa", "IL-2"):
            u = unstim.loc[um[pop], marker].to_numpy()
            s = stim.loc[sm[pop], marker].to_numpy()
            if len(u) < cfg.min_cells or len(s) < cfg.min_cells:
                continue
            gate = np.quantile(u.astype(np.float64), 0.9)
            got = long[(pair.at["stim", "sample_id"], pop, marker, "frac_pos")]
            assert got == pytest.approx((s > gate).mean(), abs=1.5 / len(s)), (pop, marker)
            own = long[(pair.at["unstim", "sample_id"], pop, marker, "frac_pos")]
            assert own <= 0.1 + 1 / len(u)  # ~10% above its own 90th percentile
            checked += 1
    assert checked >= 6
    assert (fs.meta["statistic"] == "frac_pos").sum() > 100


def test_frac_pos_reference_needs_the_unstimulated_partner(tiny):
    from predictor.errors import FeatureError

    sheet, panel = tiny
    drop = sheet[sheet["condition"] == "unstim"].index[0]
    lonely = sheet.loc[drop]
    with pytest.raises(FeatureError, match=rf"patient '{lonely['patient_id']}', timepoint "
                       rf"'{lonely['timepoint']}'\) has no 'unstim' sample .* "
                       "frac_pos_reference = 'fixed'"):
        extract_features(sheet.drop(index=drop), panel,
                         config=FeatureConfig(n_jobs=1, frac_pos_reference="unstim"))
    # Scoring is not strict: the orphaned stimulated sample gets no positivity gates (missing
    # fractions positive), everything else is computed.
    fs = extract_features(sheet.drop(index=drop), panel, strict_reference=False,
                          config=FeatureConfig(n_jobs=1, frac_pos_reference="unstim"))
    orphan = sheet[(sheet["patient_id"] == lonely["patient_id"])
                   & (sheet["timepoint"] == lonely["timepoint"])
                   & (sheet["condition"] == "stim")]["sample_id"].item()
    rows = fs.long[fs.long["sample_id"] == orphan]
    assert rows.loc[rows["statistic"] == "frac_pos", "value"].isna().all()
    assert rows.loc[rows["statistic"] == "median", "value"].notna().any()
    others = fs.long[(fs.long["sample_id"] != orphan) & (fs.long["statistic"] == "frac_pos")]
    assert others["value"].notna().any()


def test_frac_pos_reference_is_validated(tmp_path):
    from predictor.config import load_experiment
    from predictor.errors import ConfigError

    exp = tmp_path / "e.toml"
    exp.write_text("[features]\nfrac_pos_reference = 'unstimulated'\n")
    with pytest.raises(ConfigError, match="'frac_pos_reference' parameter of \\[features\\] must "
                       "be one of fixed, unstim. Got 'unstimulated'"):
        load_experiment(exp)
    exp.write_text("[features]\nfrac_pos_reference = 'unstim'\nfrac_pos_quantile = 99\n")
    with pytest.raises(ConfigError, match="'frac_pos_quantile' .* in \\(0, 1\\)"):
        load_experiment(exp)


def test_cli_features_with_unstim_positivity_and_a_bad_reference(tiny, tmp_path, capsys):
    from predictor.cli import main

    sheet, _ = tiny
    root = Path(sheet["path"].iloc[0]).parents[1]
    args = ["features", "--samples", str(root / "samples.csv"), "--panel", str(root / "panel.csv"),
            "--jobs", "1"]
    assert main([*args, "--out", str(tmp_path / "f"), "--frac-pos-reference", "unstim",
                 "--frac-pos-quantile", "0.95"]) == 0
    long = pd.read_parquet(tmp_path / "f" / "features_long.parquet")
    unstim = long[(long["statistic"] == "frac_pos") & (long["condition"] == "unstim")]
    assert unstim["value"].max() <= 0.05 + 1 / 20  # ~5% above its own 95th percentile
    assert main([*args, "--out", str(tmp_path / "g"), "--frac-pos-reference", "unstimulated"]) == 2
    err = capsys.readouterr().err
    assert ("The 'frac_pos_reference' parameter of [features] must be one of fixed, unstim. "
            "Got 'unstimulated' instead.") in err
    assert not (tmp_path / "g").exists()


def test_cli_features_medians_of_lineage_markers_too(tiny, tmp_path, capsys):
    """--median-markers functional,lineage adds each lineage marker's median per population
    (fractions positive stay on the functional markers); the default features are a subset
    with the same values. A name the panel lacks stops the run: exit 2, nothing written."""
    from predictor.cli import main
    from predictor.io.panel import read_panel

    sheet, _ = tiny
    root = Path(sheet["path"].iloc[0]).parents[1]
    panel = read_panel(root / "panel.csv")
    args = ["features", "--samples", str(root / "samples.csv"), "--panel", str(root / "panel.csv"),
            "--jobs", "1"]
    assert main([*args, "--out", str(tmp_path / "f")]) == 0
    assert main([*args, "--out", str(tmp_path / "all"), "--median-markers", "functional,lineage"]) == 0
    base = pd.read_parquet(tmp_path / "f" / "features.parquet")
    wide = pd.read_parquet(tmp_path / "all" / "features.parquet")
    meta = pd.read_parquet(tmp_path / "all" / "feature_meta.parquet")
    lineage, functional = panel.by_role("lineage"), panel.by_role("functional")
    medians = set(meta.loc[meta["statistic"] == "median", "marker"])
    assert medians == set(lineage) | set(functional)
    assert set(meta.loc[meta["statistic"] == "frac_pos", "marker"]) == set(functional)
    pd.testing.assert_frame_equal(wide[base.columns], base)
    assert main([*args, "--out", str(tmp_path / "bad"), "--median-markers", "functional,CD999"]) == 2
    err = capsys.readouterr().err
    assert "median_markers: 'CD999' is not a marker of the panel" in err and "panel.csv" in err
    assert not (tmp_path / "bad").exists()


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative job {x}")
    return x * x


# The fork case pretends to run one thread: earlier tests may have left Dask's behind.
@pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")
@pytest.mark.parametrize(("threads", "method"), [(1, "fork"), (2, "forkserver")])
def test_task_runner_pool_returns_every_job_once_and_raises_errors(monkeypatch, threads, method):
    from predictor.features import execution
    from predictor.features.execution import TaskRunner

    # Workers are forked from a process running one thread only, else from a forkserver.
    monkeypatch.setattr(execution.threading, "active_count", lambda: threads)
    jobs = list(range(40))
    with TaskRunner(n_jobs=2) as runner:
        # While forkserver workers start, this process takes jobs itself, from the back.
        assert sorted(runner.map(_square, jobs)) == [x * x for x in jobs]
        pool = runner._pool
        assert pool._mp_context.get_start_method() == method
        if runner._starting is not None:
            runner._starting.join()  # workers up: the next maps run on them
        assert sorted(runner.map(_square, jobs)) == [x * x for x in jobs]
        assert runner._pool is pool  # one pool serves every map
        with pytest.raises(ValueError, match="negative job -3"):
            list(runner.map(_square, [1, 2, -3, 4]))
    with TaskRunner(n_jobs=2) as runner:  # the failing job is the first one run here
        with pytest.raises(ValueError, match="negative job -1"):
            list(runner.map(_square, [*range(10), -1]))


def test_prefetch_reads_ahead_in_order_within_its_budget(tmp_path, monkeypatch):
    import os
    import threading
    import time

    from predictor.features.execution import Prefetch

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"s{i}.fcs")
        paths[-1].write_bytes(b"x" * 100)
    paths.insert(2, tmp_path / "missing.fcs")  # skipped: its worker reports it
    asked, lock = [], threading.Lock()

    def advise(fd, offset, length, advice):
        assert (offset, length, advice) == (0, 100, os.POSIX_FADV_WILLNEED)
        with lock:
            asked.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))

    def wait_for(n):
        for _ in range(500):
            with lock:
                if len(asked) >= n:
                    break
            time.sleep(0.01)
        time.sleep(0.05)  # and nothing more comes
        with lock:
            return list(asked)

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    with Prefetch([str(p) for p in paths], budget=250) as pf:
        time.sleep(0.05)
        assert asked == []  # nothing before start()
        pf.start()
        pf.start()  # once
        assert wait_for(2) == ["s0.fcs", "s1.fcs"]  # a third 100 bytes would pass 250
        pf.done()  # s0 finished: the missing file (0 bytes) and s2 fit in the budget
        assert wait_for(3) == ["s0.fcs", "s1.fcs", "s2.fcs"]
        pf.done(2)  # s1 and the missing file: s3 fits
        assert wait_for(4) == ["s0.fcs", "s1.fcs", "s2.fcs", "s3.fcs"]
        pf.done()
        assert wait_for(5) == ["s0.fcs", "s1.fcs", "s2.fcs", "s3.fcs", "s4.fcs"]
    with Prefetch([str(p) for p in paths], budget=1) as pf:
        pf.start()  # the first file is asked for whatever its size; then it waits
        assert wait_for(6) == ["s0.fcs", "s1.fcs", "s2.fcs", "s3.fcs", "s4.fcs", "s0.fcs"]
    assert not pf._thread.is_alive()  # leaving stopped it while it waited for room


@pytest.mark.parametrize("n_events, n_rows", [(200_000, 50_000), (50_001, 50_000), (40, 39),
                                              (10, 3), (7, 1), (100, 100)])
def test_spread_rows_reads_stretches_over_the_whole_file(n_events, n_rows):
    rows = cohort.spread_rows(n_events, n_rows, np.random.default_rng(1))
    assert len(rows) == min(n_rows, n_events)
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < n_events
    runs = np.count_nonzero(np.diff(rows) > 1) + 1
    assert runs <= cohort.SUBSAMPLE_STRETCHES


def test_spread_rows_sample_every_part_of_the_run():
    rows = cohort.spread_rows(200_000, 50_000, np.random.default_rng(3))
    k = cohort.SUBSAMPLE_STRETCHES
    parts = np.searchsorted(np.linspace(0, 200_000, k + 1), rows, side="right") - 1
    assert np.array_equal(np.unique(parts), np.arange(k))  # one stretch in each equal part
    assert set(np.bincount(parts, minlength=k)) <= {50_000 // k, 50_000 // k + 1}


def test_spread_rows_place_stretches_at_random():
    a = cohort.spread_rows(200_000, 50_000, np.random.default_rng(1))
    b = cohort.spread_rows(200_000, 50_000, np.random.default_rng(2))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, cohort.spread_rows(200_000, 50_000, np.random.default_rng(1)))
