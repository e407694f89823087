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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from predictor.config import FeatureConfig
from predictor.errors import FeatureError, OutputExistsError
from predictor.features.matrix import build_matrix
from predictor.features.stats import sample_statistics
from predictor.io.fcs import read_fcs
from predictor.io.panel import Panel, apply_panel
from predictor.populations.gating import (
    Gating,
    GatingTemplate,
    apply_gating,
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
    gating : Gating
        The frozen gating used.
    """

    X: pd.DataFrame
    meta: pd.DataFrame
    long: pd.DataFrame
    populations: pd.DataFrame
    qc: pd.DataFrame
    gating: Gating

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
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        return out

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
            gating=Gating.from_dict(json.loads((path / "gating.json").read_text())),
        )


def clean_sample(path: str, panel: Panel) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read one FCS file, apply the panel and the cleanup gates: (clean cells, QC row)."""
    sample = read_fcs(path, warn=False)  # quirks go to the QC table instead
    raw = apply_panel(sample, panel)
    result = cleanup(raw, panel)
    return result.cells, {**result.qc, "quirks": "; ".join(sample.quirks)}


def _pass1(job: tuple[str, str, Panel, int, int]) -> tuple[str, pd.DataFrame, dict[str, Any]]:
    sample_id, path, panel, max_cells, seed = job
    cells, qc = clean_sample(path, panel)
    rng = np.random.default_rng(seed)
    if len(cells) > max_cells:
        cells = cells.iloc[np.sort(rng.choice(len(cells), max_cells, replace=False))]
    return sample_id, cells.reset_index(drop=True), qc


def _pass2(job: tuple[str, str, Panel, Gating, FeatureConfig, list[str]]):
    sample_id, path, panel, gating, cfg, markers = job
    cells, qc = clean_sample(path, panel)
    membership = apply_gating(gating, cells)
    pops = population_table(gating, membership, sample_id=sample_id)
    stats = sample_statistics(
        cells, membership, pops, markers=markers, statistics=cfg.statistics,
        frac_pos_threshold=cfg.frac_pos_threshold, min_cells=cfg.min_cells,
    )
    stats.insert(0, "sample_id", sample_id)
    return sample_id, pops, stats, qc


def _map(fn: Callable, jobs: list, n_jobs: int, progress: str | None) -> Iterator:
    def wrap(it: Iterable) -> Iterable:
        if not progress:
            return it
        from rich.progress import track

        return track(it, description=progress, total=len(jobs), transient=True)

    if n_jobs <= 1 or len(jobs) <= 1:
        yield from wrap(map(fn, jobs))
        return
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=get_context("forkserver")) as ex:
        yield from wrap(ex.map(fn, jobs, chunksize=1))


def extract_features(
    samples: pd.DataFrame,
    panel: Panel,
    *,
    config: FeatureConfig | None = None,
    template: GatingTemplate | str = "default",
    gating: Gating | None = None,
    max_cells_per_sample: int = 5000,
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
        A frozen gating (e.g. from a model bundle); no thresholds are refitted.
    max_cells_per_sample
        Cells per sample in the pooled subsample the gating is fitted on.
    progress
        Show progress bars.
    random_state
        Seed of the subsampling.
    """
    cfg = config or FeatureConfig()
    need = samples[samples["timepoint"].isin(cfg.timepoints) & samples["condition"].isin(cfg.conditions)]
    if need.empty:
        raise FeatureError(
            f"No sample has a timepoint in {list(cfg.timepoints)} and a condition in "
            f"{list(cfg.conditions)}; check the sample sheet against the experiment's [features]."
        )
    rows = list(need[["sample_id", "path"]].itertuples(index=False, name=None))
    if gating is None:
        jobs1 = [(sid, p, panel, max_cells_per_sample, random_state + i) for i, (sid, p) in enumerate(rows)]
        subsamples = []
        for _, cells, _ in _map(_pass1, jobs1, cfg.n_jobs, "Fitting gates" if progress else None):
            subsamples.append(cells)
        gating = fit_gating(subsamples, template, random_state=random_state)
    markers = panel.by_role("functional") or panel.by_role("lineage")
    jobs2 = [(sid, p, panel, gating, cfg, markers) for sid, p in rows]
    pops, stats, qcs = [], [], []
    for sid, pop, st, qc in _map(_pass2, jobs2, cfg.n_jobs, "Extracting features" if progress else None):
        pops.append(pop)
        stats.append(st)
        qcs.append({"sample_id": sid, **qc})
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
