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
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from predictor import __version__
from predictor.config import FeatureConfig, validate_features
from predictor.errors import FeatureError, OutputExistsError
from predictor.features.cache import SampleCache, file_digest, settings_digest
from predictor.features.execution import Prefetch, TaskRunner
from predictor.features.matrix import build_matrix
from predictor.features.stats import reference_statistics, sample_statistics
from predictor.io.fcs import read_fcs, read_fcs_header
from predictor.io.panel import Panel, apply_panel, read_panel_events
from predictor.io.samplesheet import select_samples
from predictor.populations import Clustering, fit_clustering, populations_from_dict
from predictor.populations.gating import (
    Gating,
    GatingTemplate,
    fit_gating,
    gate_masks,
    population_table,
)
from predictor.preprocess import cleanup_mask, kept_cells

__all__ = ["FeatureSet", "extract_features", "clean_sample", "load_sample"]

# Pass 1 fits each file's cleanup thresholds (density valleys) on this many events: plenty for
# a 256-bin density, and it spares cleaning every event twice. On 200k-event files, gates fitted
# on 20k events keep or drop 0.04–0.06 % of events differently from gates fitted on 50k: the
# same as two 50k fits from different draws.
CLEANUP_FIT_EVENTS = 20_000
# ... read as this many contiguous stretches spread over the file (see :func:`spread_rows`).
SUBSAMPLE_STRETCHES = 32


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


def spread_rows(n_events: int, n_rows: int, rng: np.random.Generator, *,
                stretches: int = SUBSAMPLE_STRETCHES) -> np.ndarray:
    """``n_rows`` sorted event indices out of ``n_events``: contiguous stretches, one in each
    of ``stretches`` equal parts of the file, each at a random place in its part.

    Events are stored in acquisition order, so stretches spread over the whole run sample
    its drift as random events would, while reading a fraction of the file's pages: random
    events touch nearly every page, which makes a subsample cost a whole read from disk.
    """
    if n_rows >= n_events:
        return np.arange(n_events)
    k = max(1, min(stretches, n_rows))
    edges = np.linspace(0, n_events, k + 1).astype(np.int64)  # part i: [edges[i], edges[i+1])
    lengths = np.diff(edges * n_rows // n_events)  # ≤ its part's length, n_rows in all
    starts = edges[:-1] + (rng.random(k) * (np.diff(edges) - lengths + 1)).astype(np.int64)
    return np.concatenate([np.arange(a, a + m) for a, m in zip(starts, lengths, strict=True)])


def _fit_rows(n_events: int, max_events: int, seed: Sequence[int]) -> np.ndarray:
    """The events cleanup thresholds are fitted on when a file has more than ``max_events``."""
    return spread_rows(n_events, max_events, np.random.default_rng([*seed, 1]))


def load_sample(path: str, panel: Panel, *, thresholds: dict[str, float] | None = None,
                max_events: int | None = None, seed: Sequence[int] = (0,),
                fit_events: int | None = None
                ) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Read one FCS file and find its cleanup mask: (raw events, mask of kept events, QC row).

    ``thresholds`` fixes the cleanup thresholds (e.g. those pass 1 found for this file);
    ``max_events`` keeps that many of the file's events, in stretches spread over the file
    (:func:`spread_rows`, placed with ``seed``). Without ``thresholds``, ``fit_events`` fits
    them on that many of the events (the same ones ``max_events`` would keep, so the same
    thresholds) and applies them to all. The QC row has the thresholds used as
    ``threshold_<key>``.
    """
    rows, header = None, None
    if max_events is not None:
        header = read_fcs_header(path)
        if header.n_events > max_events:
            rows = _fit_rows(header.n_events, max_events, seed)
    if rows is None:  # every event, read straight into the panel's channel-major block
        raw, quirks = read_panel_events(path, panel)
    else:
        sample = read_fcs(path, warn=False, rows=rows, header=header)
        raw, quirks = apply_panel(sample, panel), sample.quirks
    if thresholds is None and fit_events is not None and len(raw) > fit_events:
        _, _, thresholds = cleanup_mask(raw.iloc[_fit_rows(len(raw), fit_events, seed)], panel)
    keep, qc, used = cleanup_mask(raw, panel, thresholds=thresholds)
    qc = {**qc, "quirks": "; ".join(quirks)}  # quirks go to the QC table, not a warning
    return raw, keep, qc | {f"threshold_{k}": v for k, v in used.items()}


def clean_sample(path: str, panel: Panel, *, thresholds: dict[str, float] | None = None,
                 transformed: bool = True, max_cells: int | None = None,
                 max_events: int | None = None, seed: Sequence[int] = (0,),
                 fit_events: int | None = None
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read one FCS file, apply the panel and the cleanup gates: (clean cells, QC row).

    ``transformed=False`` returns the kept cells raw; ``max_cells`` returns a random subset of
    the kept cells (drawn with ``seed``), and only that subset is gathered and transformed;
    ``max_events`` cleans a random subset of the file's events only, ``fit_events`` fits
    the cleanup on one (see :func:`load_sample`).
    """
    raw, keep, qc = load_sample(path, panel, thresholds=thresholds, max_events=max_events,
                                seed=seed, fit_events=fit_events)
    rows = keep
    if max_cells is not None and qc["kept"] > max_cells:
        at = np.flatnonzero(keep)
        pick = np.random.default_rng(list(seed)).choice(len(at), max_cells, replace=False)
        rows = np.zeros_like(keep)
        rows[at[pick]] = True
    return kept_cells(raw, panel, rows, transformed=transformed), qc


def feature_markers(panel: Panel, cfg: FeatureConfig) -> tuple[list[str], list[str]]:
    """The markers that get a median, and those that get a fraction positive, in panel order.

    Fractions positive: the functional markers (the lineage ones when the panel has none).
    Medians: ``cfg.median_markers``, where ``"functional"`` stands for those same markers,
    ``"lineage"`` for the lineage markers, and any other entry is a marker of the panel.
    """
    lineage = panel.by_role("lineage")
    frac = panel.by_role("functional") or lineage
    roles = panel.roles()
    chosen: set[str] = set()
    for name in cfg.median_markers:
        if name in ("functional", "lineage"):
            chosen.update(frac if name == "functional" else lineage)
        elif roles.get(name) in ("functional", "lineage"):
            chosen.add(name)
        else:
            what = f"a {roles[name]} channel" if name in roles else "not a marker of the panel"
            raise FeatureError(
                f"[features] median_markers: {name!r} is {what} ({panel.source}). Name "
                f'"functional", "lineage" or some of the panel\'s markers: '
                f'{", ".join(panel.by_role("lineage", "functional"))}.'
            )
    median = [m for m in panel.by_role("lineage", "functional") if m in chosen]
    return median, frac


def _cleanup_thresholds(qc: dict[str, Any]) -> dict[str, float]:
    return {k.removeprefix("threshold_"): float(v) for k, v in qc.items()
            if k.startswith("threshold_")}


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


def _draw(random_state: int, sample_id: str) -> tuple[int, int]:
    """The seed of a sample's random draws: its own, whatever the order of the samples."""
    return random_state, zlib.crc32(str(sample_id).encode())


def _pass1(job):
    """Clean one sample and draw its share of the pooled subsample gates are fitted on.

    The cleanup thresholds are fitted on a random subset of the file's events
    (:data:`CLEANUP_FIT_EVENTS`), and travel back so pass 2 applies them to every event
    without fitting them again; only the drawn cells are transformed.
    """
    sample_id, path, panel, max_cells, seed, cache_dir = job
    digest = file_digest(path) if cache_dir is not None else None

    def compute():
        cells, qc = clean_sample(path, panel, max_cells=max_cells, seed=_draw(seed, sample_id),
                                 max_events=max(CLEANUP_FIT_EVENTS, max_cells))
        return {"cells": cells}, {"qc": qc}

    def key():
        return settings_digest("pass1", digest, sample_id, panel.table.to_dict("list"),
                               max_cells, seed, CLEANUP_FIT_EVENTS, __version__)

    (tables, data), _ = _cached(cache_dir, key, compute)
    return sample_id, tables["cells"], data["qc"], digest


@dataclass(frozen=True)
class _SampleJob:
    """Pass 2 of one sample: everything a worker needs, picklable."""

    sample_id: str
    path: str
    batch: str
    digest: str | None = None  # file content hash (pass 1's), for cache keys
    cleanup: dict[str, float] | None = None  # pass 1's cleanup thresholds for this file
    positivity: dict[tuple[str, str], float] | None = None  # from the unstimulated partner
    reference: bool = False  # also return this sample's positivity thresholds
    # Without pass 1 (a frozen gating): the cleanup is fitted on the events pass 1 would
    # have read (``fit_events`` of them, placed by ``draw``), so it finds the same thresholds.
    draw: tuple[int, int] = (0, 0)
    fit_events: int = CLEANUP_FIT_EVENTS


def _pass2(job):
    """Clean, gate and summarise one sample: (sample_id, populations, statistics, QC, gates).

    With a template gating, the cells stay raw: gates, medians and positivity thresholds are
    mapped through the monotone arcsinh instead of transforming every event.
    """
    sj, panel, gating, cfg, cache_dir = job
    gated = isinstance(gating, Gating)
    cof = panel.cofactors() if gated else None
    median_markers, frac_markers = feature_markers(panel, cfg)
    summarised = {*(median_markers if "median" in cfg.statistics else ()),
                  *(frac_markers if "frac_pos" in cfg.statistics else ())}
    markers = [m for m in panel.by_role("lineage", "functional") if m in summarised]
    chosen = {"median_markers": median_markers, "frac_pos_markers": frac_markers}

    fit = {"thresholds": sj.cleanup, "seed": sj.draw, "fit_events": sj.fit_events}

    def compute():
        if gated:  # gate every event raw; removed events join no population
            cells, keep, qc = load_sample(sj.path, panel, **fit)
            membership = gate_masks(gating, cells, batch=sj.batch, cofactors=cof, live=keep)
            n_live = int(np.count_nonzero(keep))
        else:
            cells, qc = clean_sample(sj.path, panel, **fit)
            membership, n_live = gating.apply(cells), None
        pops = population_table(gating, membership, sample_id=sj.sample_id, n_live=n_live)
        data: dict[str, Any] = {"qc": qc}
        if sj.reference:  # an unstimulated sample is gated by its own quantiles
            stats, threshold = reference_statistics(
                cells, membership, pops, markers=markers, statistics=cfg.statistics,
                quantile=cfg.frac_pos_quantile, min_cells=cfg.min_cells, cofactors=cof,
                **chosen)
            data["positivity"] = [[p, m, v] for (p, m), v in threshold.items()]
        else:
            stats = sample_statistics(
                cells, membership, pops, markers=markers, statistics=cfg.statistics,
                frac_pos_threshold=sj.positivity if sj.positivity is not None
                else cfg.frac_pos_threshold, min_cells=cfg.min_cells, cofactors=cof, **chosen,
            )
        return {"pops": pops, "stats": stats}, data

    def key():
        return settings_digest(
            "pass2", sj.digest or file_digest(sj.path), sj.batch, sj.cleanup,
            (sj.draw, sj.fit_events) if sj.cleanup is None else None,
            sorted(sj.positivity.items()) if sj.positivity else None, sj.reference,
            panel.table.to_dict("list"), gating.to_dict(), median_markers, frac_markers,
            list(cfg.statistics),
            cfg.frac_pos_threshold, cfg.frac_pos_reference, cfg.frac_pos_quantile,
            cfg.min_cells, __version__,
        )

    (tables, data), _ = _cached(cache_dir, key, compute)
    pops = tables["pops"].assign(sample_id=sj.sample_id)
    stats = tables["stats"].copy()
    stats.insert(0, "sample_id", sj.sample_id)
    gates = {(p, m): float(v) for p, m, v in data.get("positivity", [])}
    return sj.sample_id, pops, stats, data["qc"], gates


def _unstim_partners(need: pd.DataFrame, cfg: FeatureConfig, *, strict: bool = True
                     ) -> dict[str, str | None]:
    """Sample → the unstimulated sample of the same patient and timepoint (itself for the
    unstimulated ones); a sample without one is an error naming it, or maps to None when not
    ``strict``."""
    cols = ["sample_id", "patient_id", "timepoint"]
    is_ref = need["condition"].astype(str).eq(cfg.unstim).to_numpy()
    ref = {(pt, tp): sid for sid, pt, tp in need.loc[is_ref, cols].itertuples(index=False)}
    out = {}
    for sid, pt, tp in need[cols].itertuples(index=False):
        if (pt, tp) not in ref and not strict:
            out[sid] = None
            continue
        if (pt, tp) not in ref:
            raise FeatureError(
                f"Sample {sid!r} (patient {pt!r}, timepoint {tp!r}) has no {cfg.unstim!r} "
                "sample to set its positivity thresholds (frac_pos_reference = 'unstim'); add "
                "it to the sample sheet, or set frac_pos_reference = 'fixed' in [features]."
            )
        out[sid] = ref[pt, tp]
    return out


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
    strict_reference: bool = True,
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
        work on; by default ``config.scheduler`` (an experiment's ``[features]``), and without
        one a local pool of ``config.n_jobs`` processes.
    progress
        Show progress bars.
    random_state
        Seed of the subsampling, and of the events each file's cleanup is fitted on. With a
        frozen ``gating``, the training's seed gives each file the cleanup it had in training.
    strict_reference
        With ``frac_pos_reference = "unstim"``, a stimulated sample without its unstimulated
        partner is an error (training); ``False`` gives it missing fractions positive instead
        (scoring, which reports the missing sample per patient).
    """
    cfg = config or FeatureConfig()
    validate_features(cfg)
    feature_markers(panel, cfg)  # a marker the panel lacks stops the run before any work
    scheduler = scheduler or cfg.scheduler
    need = select_samples(samples, timepoints=cfg.timepoints, conditions=cfg.conditions)
    if need.empty:
        raise FeatureError(
            f"No sample has a timepoint in {list(cfg.timepoints)} and a condition in "
            f"{list(cfg.conditions)}; check the sample sheet against the experiment's [features]."
        )
    batch_col = need["batch"] if "batch" in need else pd.Series("1", index=need.index)
    rows = list(zip(need["sample_id"], need["path"], batch_col.astype(str), strict=True))
    cache_dir = str(cache) if cache is not None else None
    partners = _unstim_partners(need, cfg, strict=strict_reference) if (
        cfg.frac_pos_reference == "unstim" and "frac_pos" in cfg.statistics) else None
    # Pass 2's samples in the order it reads them: with unstim positivity, the unstimulated
    # samples first (their quantiles gate the others). On a local run the kernel reads the
    # files ahead from disk in that order, from the gate fitting on.
    if partners is None:
        groups = [[sid for sid, _, _ in rows]]
    else:
        groups = [[sid for sid, ref in partners.items() if sid == ref],
                  [sid for sid, ref in partners.items() if sid != ref]]
    path_of = {sid: p for sid, p, _ in rows}
    prefetch = Prefetch([path_of[sid] for g in groups for sid in g] if scheduler is None else [])
    with TaskRunner(cfg.n_jobs, scheduler) as runner, prefetch:  # one pool for every pass
        if len(rows) > 1:  # before the read-ahead's thread, so workers can be forked
            runner.start(_pass2)
        pass1: dict[str, tuple[str | None, dict[str, float]]] = {}  # digest, cleanup thresholds
        if gating is None:
            jobs1 = [(sid, p, panel, max_cells_per_sample, random_state, cache_dir) for sid, p, _ in rows]
            by_id = {}
            for sid, cells, qc, digest in runner.map(_pass1, jobs1, progress="Fitting gates" if progress else None):
                by_id[sid] = cells
                pass1[sid] = (digest, _cleanup_thresholds(qc))  # pass 2 reuses both
            subsamples = [by_id[sid] for sid, _, _ in rows]  # sheet order, whatever finished first
            prefetch.start()  # while the gates are fitted (pass 1 reads little of each file)
            if clusters:
                gating = fit_clustering(subsamples, panel, n_clusters=clusters, template=template,
                                        max_cells_per_sample=max_cells_per_sample,
                                        random_state=random_state)
            else:
                batches = [b for _, _, b in rows]
                gating = fit_gating(subsamples, template, random_state=random_state,
                                    batches=batches if len(set(batches)) > 1 else None)
        prefetch.start()  # a frozen gating: nothing was fitted
        fit_events = max(CLEANUP_FIT_EVENTS, max_cells_per_sample)  # as pass 1 reads
        sample_jobs = {
            sid: _SampleJob(sid, p, b, *pass1.get(sid, (None, None)),
                            draw=_draw(random_state, sid), fit_events=fit_events)
            for sid, p, b in rows
        }
        results = {}

        def run_pass2(jobs: list[_SampleJob], label: str) -> None:
            tasks = [(sj, panel, gating, cfg, cache_dir) for sj in jobs]
            for sid, pop, st, qc, gates in runner.map(_pass2, tasks, progress=label if progress else None):
                results[sid] = (pop, st, qc, gates)
                prefetch.done()

        if partners is not None:
            # Unstimulated samples first: their per-population quantiles gate the stimulated
            # sample of the same patient and timepoint.
            refs, others = groups
            run_pass2([replace(sample_jobs[sid], reference=True) for sid in refs],
                      "Extracting features (unstimulated)")
            run_pass2([replace(sample_jobs[sid], positivity=results[partners[sid]][3]
                               if partners[sid] else {})  # {}: no gate, NaN
                       for sid in others], "Extracting features (stimulated)")
        else:
            run_pass2([sample_jobs[sid] for sid in groups[0]], "Extracting features")
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
