"""Cohort feature extraction: read → clean → gate → statistics, one sample at a time.

Per-sample work runs in a local process pool (``n_jobs``); only summaries travel back, so
memory stays bounded to a few samples per worker. Gating thresholds are fitted on a balanced
subsample pooled over all samples (pass 1), then frozen and applied to every sample (pass 2);
a frozen :class:`~predictor.populations.gating.Gating` (from a model bundle) skips pass 1.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from predictor import __version__
from predictor.config import FeatureConfig
from predictor.errors import FeatureError, OutputExistsError
from predictor.features.cache import SampleCache, file_digest, settings_digest
from predictor.features.execution import run_tasks
from predictor.features.matrix import build_matrix
from predictor.features.stats import sample_statistics
from predictor.io.fcs import read_fcs
from predictor.io.panel import Panel, apply_panel
from predictor.io.samplesheet import select_samples
from predictor.populations import Clustering, fit_clustering, populations_from_dict
from predictor.populations.gating import (
    Gating,
    GatingTemplate,
    fit_gating,
    population_table,
)
from predictor.preprocess import cleanup

__all__ = ["FeatureSet", "extract_features", "clean_sample"]


@dataclass
class FeatureSet:
    """Everything feature extraction produced for a cohort.

    Attributes
    ----------
    X : DataFrame
        Patients × features (index patient_id).
    meta : DataFrame
        Feature metadata (index = feature names; population, marker, statistic, condition,
        timepoint).
    long : DataFrame
        Tidy per-sample statistics.
    populations : DataFrame
        Per-sample population table (count, % of parent, % of live).
    qc : DataFrame
        Per-sample cleanup QC (events in, kept after each step).
    gating : Gating or Clustering
        The frozen populations used (a gating template's gates, or FlowSOM clusters).
    """

    X: pd.DataFrame
    meta: pd.DataFrame
    long: pd.DataFrame
    populations: pd.DataFrame
    qc: pd.DataFrame
    gating: Gating | Clustering

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the tables (Parquet and CSV) and the gating (JSON) into ``out``, atomically."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out}: is a file, not a folder; choose another --out.")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"{out}: folder exists and is not empty; choose another --out or pass --force."
            )
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tables = {
            "features": self.X,
            "feature_meta": self.meta,
            "features_long": self.long,
            "populations": self.populations,
            "qc": self.qc,
        }
        for name, df in tables.items():
            keep_index = name in ("features", "feature_meta")
            df.to_parquet(tmp / f"{name}.parquet", index=keep_index)
            df.to_csv(tmp / f"{name}.csv", index=keep_index)
        (tmp / "gating.json").write_text(json.dumps(self.gating.to_dict(), indent=2))
        self.to_anndata().write_h5ad(tmp / "features.h5ad")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        return out

    def to_anndata(self):
        """Patients × features as an ``AnnData`` (feature metadata in ``.var``) for scanpy."""
        import anndata

        var = self.meta.loc[self.X.columns].astype(str)
        var.index = var.index.astype(str)
        obs = pd.DataFrame(index=self.X.index.astype(str))
        return anndata.AnnData(X=self.X.to_numpy(dtype=np.float32, copy=True), obs=obs, var=var)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        path = Path(path)
        if not (path / "features.parquet").is_file():
            raise FeatureError(f"{path}: no features.parquet; run `predictor features` first.")
        return cls(
            X=pd.read_parquet(path / "features.parquet"),
            meta=pd.read_parquet(path / "feature_meta.parquet"),
            long=pd.read_parquet(path / "features_long.parquet"),
            populations=pd.read_parquet(path / "populations.parquet"),
            qc=pd.read_parquet(path / "qc.parquet"),
            gating=populations_from_dict(json.loads((path / "gating.json").read_text())),
        )


def clean_sample(path: str, panel: Panel) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read one FCS file, apply the panel and the cleanup gates: (clean cells, QC row)."""
    sample = read_fcs(path, warn=False)  # quirks go to the QC table instead
    raw = apply_panel(sample, panel)
    result = cleanup(raw, panel)
    return result.cells, {**result.qc, "quirks": "; ".join(sample.quirks)}


def _cached(cache_dir, make_key, compute):
    """Look the key up in the cache (when there is one), else compute and store.

    ``make_key`` is only called when there is a cache: keys hash the file's contents.
    """
    if cache_dir is None:
        return compute(), False
    key = make_key()
    cache = SampleCache(cache_dir)
    hit = cache.get(key)
    if hit is not None:
        return hit, True
    tables, data = compute()
    cache.put(key, tables, data)
    return (tables, data), False


def _pass1(job):
    """Clean one sample and draw its share of the pooled subsample gates are fitted on."""
    sample_id, path, panel, max_cells, seed, cache_dir = job
    digest = file_digest(path)

    def compute():
        cells, qc = clean_sample(path, panel)
        rng = np.random.default_rng([seed, int(digest[:12], 16)])  # order-independent draw
        if len(cells) > max_cells:
            cells = cells.iloc[np.sort(rng.choice(len(cells), max_cells, replace=False))]
        return {"cells": cells.reset_index(drop=True)}, {"qc": qc}

    def key():
        return settings_digest("pass1", digest, panel.table.to_dict("list"), max_cells, seed,
                               __version__)

    (tables, data), _ = _cached(cache_dir, key, compute)
    return sample_id, tables["cells"], data["qc"], digest


def _pass2(job):
    """Clean, gate and summarise one sample: (sample_id, populations, statistics, QC)."""
    sample_id, path, panel, gating, cfg, markers, cache_dir, batch, digest = job

    def compute():
        cells, qc = clean_sample(path, panel)
        membership = gating.apply(cells, batch=batch) if isinstance(gating, Gating) else gating.apply(cells)
        pops = population_table(gating, membership, sample_id=sample_id)
        stats = sample_statistics(
            cells, membership, pops, markers=markers, statistics=cfg.statistics,
            frac_pos_threshold=cfg.frac_pos_threshold, min_cells=cfg.min_cells,
        )
        return {"pops": pops, "stats": stats}, {"qc": qc}

    def key():
        return settings_digest(
            "pass2", digest or file_digest(path), batch, panel.table.to_dict("list"),
            gating.to_dict(), list(markers), list(cfg.statistics), cfg.frac_pos_threshold,
            cfg.min_cells, __version__,
        )

    (tables, data), _ = _cached(cache_dir, key, compute)
    pops = tables["pops"].assign(sample_id=sample_id)
    stats = tables["stats"].copy()
    stats.insert(0, "sample_id", sample_id)
    return sample_id, pops, stats, data["qc"]


def extract_features(
    samples: pd.DataFrame,
    panel: Panel,
    *,
    config: FeatureConfig | None = None,
    template: GatingTemplate | str = "default",
    gating: Gating | Clustering | None = None,
    clusters: int | None = None,
    max_cells_per_sample: int = 5000,
    cache: str | os.PathLike | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    random_state: int = 0,
) -> FeatureSet:
    """Populations and features of a cohort.

    Parameters
    ----------
    samples
        A validated sample sheet (:func:`predictor.io.samplesheet.read_sample_sheet`): columns
        sample_id, patient_id, path, timepoint, condition.
    panel
        The panel every file is read with.
    config
        Feature settings (statistics, contrasts, minimum cell count, workers).
    template
        Gating template to fit when ``gating`` is not given.
    gating
        Frozen populations (e.g. from a model bundle): nothing is refitted.
    clusters
        Find populations by FlowSOM with this many metaclusters (named after the template's
        populations they match) instead of gating with the template.
    max_cells_per_sample
        Cells per sample in the pooled subsample the gating is fitted on.
    cache
        Folder of per-sample results keyed by file content and settings: a re-run skips
        finished samples, an interrupted run resumes. ``None`` caches nothing.
    scheduler
        Address of a Dask distributed scheduler (``tcp://host:8786``) to run the per-sample
        work on; by default a local pool of ``config.n_jobs`` processes.
    progress
        Show progress bars.
    random_state
        Seed of the subsampling.
    """
    cfg = config or FeatureConfig()
    need = select_samples(samples, timepoints=cfg.timepoints, conditions=cfg.conditions)
    if need.empty:
        raise FeatureError(
            f"No sample has a timepoint in {list(cfg.timepoints)} and a condition in "
            f"{list(cfg.conditions)}; check the sample sheet against the experiment's [features]."
        )
    batch_col = need["batch"] if "batch" in need else pd.Series("1", index=need.index)
    rows = list(zip(need["sample_id"], need["path"], batch_col.astype(str), strict=True))
    cache_dir = str(cache) if cache is not None else None
    run = {"n_jobs": cfg.n_jobs, "scheduler": scheduler}
    digests: dict[str, str] = {}
    if gating is None:
        jobs1 = [(sid, p, panel, max_cells_per_sample, random_state, cache_dir) for sid, p, _ in rows]
        by_id = {}
        for sid, cells, _, digest in run_tasks(_pass1, jobs1, progress="Fitting gates" if progress else None, **run):
            by_id[sid] = cells
            digests[sid] = digest  # pass 2 reuses it instead of hashing the file again
        subsamples = [by_id[sid] for sid, _, _ in rows]  # sheet order, whatever finished first
        if clusters:
            gating = fit_clustering(subsamples, panel, n_clusters=clusters, template=template,
                                    max_cells_per_sample=max_cells_per_sample,
                                    random_state=random_state)
        else:
            batches = [b for _, _, b in rows]
            gating = fit_gating(subsamples, template, random_state=random_state,
                                batches=batches if len(set(batches)) > 1 else None)
    markers = panel.by_role("functional") or panel.by_role("lineage")
    jobs2 = [(sid, p, panel, gating, cfg, markers, cache_dir, b, digests.get(sid)) for sid, p, b in rows]
    results = {}
    for sid, pop, st, qc in run_tasks(_pass2, jobs2, progress="Extracting features" if progress else None, **run):
        results[sid] = (pop, st, qc)
    order = [sid for sid, _, _ in rows]
    pops = [results[sid][0] for sid in order]
    stats = [results[sid][1] for sid in order]
    qcs = [{"sample_id": sid, **results[sid][2]} for sid in order]
    keys = need[["sample_id", "patient_id", "timepoint", "condition"]]
    long = keys.merge(pd.concat(stats, ignore_index=True), on="sample_id")
    X, meta = build_matrix(long, cfg)
    return FeatureSet(
        X=X,
        meta=meta,
        long=long,
        populations=keys.merge(pd.concat(pops, ignore_index=True), on="sample_id"),
        qc=pd.DataFrame(qcs),
        gating=gating,
    )
