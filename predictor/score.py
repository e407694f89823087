"""Batch scoring of new patients with a frozen model bundle.

The bundle's panel, gating and feature settings are applied unchanged to the new files; the
booster gives a probability, the bundle's calibration and threshold a calibrated probability
and a flag, and SHAP values the top drivers of each patient's score. A model trained with
clinical covariates (``[model] covariates``) takes them from the new patients' clinical table,
encoded as in training. Results are written atomically and never overwrite an existing file
unless asked to.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from predictor.covariates import read_covariates, with_covariates
from predictor.errors import OutputExistsError, ScoringError
from predictor.explain import shap_values, top_drivers
from predictor.features import FeatureSet, extract_features
from predictor.io.fcs import read_fcs_header
from predictor.io.panel import Panel
from predictor.io.samplesheet import read_sample_sheet, select_samples
from predictor.model.bundle import Bundle, load_bundle
from predictor.model.train import calibrate
from predictor.populations.gating import Gating

__all__ = ["score_features", "score_samples", "write_table", "check_panel", "affected_features"]


def write_table(df: pd.DataFrame, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write CSV or Parquet (by suffix) atomically; refuse to overwrite unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix.lower() == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return out


def score_features(bundle: Bundle, X: pd.DataFrame, *, n_drivers: int = 3) -> pd.DataFrame:
    """Score a patient × feature matrix with a bundle (columns matched by name).

    A bundle with clinical covariates needs their encoded columns in ``X`` too (as
    :func:`score_samples` adds them, or :meth:`CovariateEncoder.transform` of
    ``bundle.covariates`` gives them), with a value for every patient.
    """
    schema = bundle.schema
    covariates = bundle.covariates
    if covariates is not None:
        absent = [f for f in covariates.features if f not in X.columns]
        if absent:
            raise ScoringError(
                f"The model {bundle.path} takes the clinical covariate(s) "
                f"{', '.join(covariates.columns)} as inputs, but the feature matrix lacks "
                f"{', '.join(absent)}. Score with the new patients' clinical table "
                "(`predictor score --clinical FILE`)."
            )
        blank = X[covariates.features].isna().any(axis=1)
        if blank.any():
            raise ScoringError(
                f"Clinical covariate input(s) {', '.join(covariates.features)} missing for "
                f"patient(s) {', '.join(map(str, X.index[blank][:5]))}; the model "
                f"{bundle.path} needs them for every patient."
            )
    missing = [f for f in bundle.features if f not in X.columns]
    Xm = X.reindex(columns=bundle.features).astype(float)
    dm = xgb.DMatrix(Xm.to_numpy(dtype=np.float32), missing=np.nan, feature_names=bundle.features)
    raw = bundle.booster.predict(dm)
    cal = bundle.meta.get("calibration", {})
    prob = calibrate(raw, cal["a"], cal["b"]) if cal else raw
    values, _ = shap_values(bundle.booster, Xm)
    drivers = top_drivers(values, n_drivers)
    lo, hi = schema["min"].astype(float), schema["max"].astype(float)
    rows = []
    for i, pid in enumerate(Xm.index):
        x = Xm.iloc[i]
        notes = []
        absent = [f for f in bundle.features if pd.isna(x[f])]
        if missing:
            notes.append(f"{len(missing)} model feature(s) not computable for this cohort")
        elif absent:
            notes.append(f"{len(absent)} feature(s) missing")
        outside = [f for f in bundle.features if pd.notna(x[f]) and not lo[f] <= x[f] <= hi[f]]
        if outside:
            notes.append(f"{len(outside)} feature(s) outside the training range: " + "; ".join(outside[:3]))
        row = {
            "patient_id": pid,
            "probability": float(prob[i]),
            "probability_uncalibrated": float(raw[i]),
            "flag": bool(prob[i] >= bundle.threshold),
            "threshold": bundle.threshold,
        }
        for k, (name, val) in enumerate(drivers[i], start=1):
            row[f"driver_{k}"] = name
            row[f"driver_{k}_value"] = float(x[name]) if pd.notna(x[name]) else np.nan
            row[f"driver_{k}_shap"] = val
        row["warnings"] = " | ".join(notes)
        rows.append(row)
    scores = pd.DataFrame(rows)
    if bundle.meta.get("outcome", {}).get("kind") == "survival":
        # A Cox model scores risk: the hazard ratio vs the training median, flag = higher risk.
        scores = scores.rename(columns={
            "probability": "hazard_ratio", "probability_uncalibrated": "log_hazard_raw",
            "flag": "high_risk",
        })
    return scores


def _ancestors(gating: Gating, name: str) -> list[str]:
    out = []
    while name != "root":
        out.append(name)
        name = gating.parent(name)
    return out


def _populations_using(gating: Gating, markers: set[str]) -> set[str]:
    """Populations whose own rules, or an ancestor's, read one of ``markers``."""
    direct = {
        pop for pop, terms in gating.resolved.items()
        if any(m in markers for ms, _pos in terms for m in ms)
    }
    return {p for p in gating.populations if direct & set(_ancestors(gating, p))}


def _without_markers(gating: Gating, panel: Panel, missing: set[str]) -> tuple[Gating, Panel]:
    """The gating and panel with the missing markers' channels and dependent populations dropped."""
    dropped = _populations_using(gating, missing)
    resolved = {k: v for k, v in gating.resolved.items() if k not in dropped}
    reduced = replace(
        gating,
        resolved=resolved,
        thresholds={k: v for k, v in gating.thresholds.items() if k in resolved},
        skipped={**gating.skipped, **{p: "marker missing in the new files" for p in dropped}},
        markers=tuple(m for m in gating.markers if m not in missing),
    )
    table = panel.table[~panel.table["marker"].isin(missing)].reset_index(drop=True)
    return reduced, Panel(table, panel.source)


def check_panel(bundle: Bundle, sheet: pd.DataFrame) -> dict[str, list[str]]:
    """Markers of the bundle's panel that files of ``sheet`` lack: marker → files (headers only)."""
    wanted = bundle.panel.table[bundle.panel.table["role"] != "exclude"]
    missing: dict[str, list[str]] = {}
    for path in sheet["path"]:
        have = set(read_fcs_header(path).pnn)
        for channel, marker in zip(wanted["channel"], wanted["marker"], strict=True):
            if channel not in have:
                missing.setdefault(marker, []).append(Path(path).name)
    return missing


def affected_features(bundle: Bundle, markers: set[str]) -> list[str]:
    """The model's features a set of missing markers makes uncomputable."""
    pops = _populations_using(bundle.gating, markers)
    schema = bundle.schema
    hit = schema["marker"].isin(markers) | schema["population"].isin(pops)
    return list(schema.index[hit])


def _resolve_model(model: str | os.PathLike, store: str | os.PathLike) -> Path:
    if str(model).startswith("models:/"):
        from predictor.model.tracking import resolve_model_uri

        if not Path(store).is_file():
            raise ScoringError(f"{store}: MLflow store not found; pass --store path/to/mlflow.db.")
        return resolve_model_uri(str(model), store)
    return Path(model)


def score_samples(
    model: str | os.PathLike,
    samples: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    allow_missing_markers: bool = False,
    store: str | os.PathLike = "mlflow.db",
    n_jobs: int | None = None,
    scheduler: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
    clinical: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, FeatureSet]:
    """Score the patients of a sample sheet with a bundle; write ``out`` when given.

    Parameters
    ----------
    model
        ``models/NAME`` (newest version), ``models/NAME/vNNN``, or a registry URI
        ``models:/NAME@alias`` / ``models:/NAME/VERSION`` looked up in ``store``.
    samples
        Sample sheet of the new patients (same timepoints/conditions as the training).
    out
        CSV or Parquet path for the scores; refused if it exists unless ``force``.
    allow_missing_markers
        Score even when files lack panel markers: the populations and features that need them
        become missing values and every patient's ``warnings`` says so. Otherwise an error
        names the markers, the files and the features affected.
    store
        MLflow SQLite store for ``models:/`` URIs.
    n_jobs, scheduler
        Local worker processes, or the address of a Dask scheduler, as for feature extraction.
    cache
        Per-sample cache folder. With ``out`` and no cache, a hidden folder beside ``out`` is
        used and removed on success, so an interrupted batch resumes where it stopped.
    clinical
        Clinical table of the new patients (CSV with ``patient_id`` and the covariate columns;
        no outcome needed). Required when the model has clinical covariates, ignored otherwise.
        Every scored patient needs a row and a value the model knows (a level seen in
        training, or a number); the error names the file, column and patients otherwise.

    Returns
    -------
    scores, features
        The scores, and the new patients' features (with the encoded covariates, if any).
    """
    if out is not None and Path(out).exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    bundle = load_bundle(_resolve_model(model, store))
    covariates = bundle.covariates
    table = None
    if covariates is not None:  # checked before the (slow) features
        if clinical is None:
            raise ScoringError(
                f"The model {bundle.path} takes the clinical covariate(s) "
                f"{', '.join(covariates.columns)} as inputs; pass the new patients' clinical "
                f"table with --clinical FILE (CSV with patient_id, {', '.join(covariates.columns)})."
            )
        table = read_covariates(clinical, covariates.columns)
    fc = bundle.feature_config
    if n_jobs is not None:
        fc = replace(fc, n_jobs=n_jobs)
    sheet = read_sample_sheet(samples)
    sheet = select_samples(sheet, timepoints=fc.timepoints, conditions=fc.conditions)
    if sheet.empty:
        raise ScoringError(
            f"{samples}: no sample with timepoint in {list(fc.timepoints)} and condition in "
            f"{list(fc.conditions)}, which the model {bundle.path} needs."
        )
    if covariates is not None:
        covariates.transform(table, sheet["patient_id"].astype(str).unique(), source=clinical)
    gating, panel = bundle.gating, bundle.panel
    missing = check_panel(bundle, sheet)
    notes: list[str] = []
    if missing and not isinstance(gating, Gating):
        raise ScoringError(
            f"{samples}: files lack marker(s) {', '.join(missing)} that the model's FlowSOM "
            "clusters are defined on; clusters cannot be assigned without them. Fix the files' panel."
        )
    if missing:
        lost = affected_features(bundle, set(missing))
        where = "; ".join(f"{m} (e.g. {files[0]}, {len(files)} file(s))" for m, files in missing.items())
        if not allow_missing_markers:
            raise ScoringError(
                f"{samples}: files lack marker(s) of the model's panel: {where}. This affects "
                f"{len(lost)} of the model's {len(bundle.features)} features"
                + (f" (e.g. {lost[0]})" if lost else "")
                + ". Fix the files' panel, or pass --allow-missing-markers to score with those "
                "features missing."
            )
        gating, panel = _without_markers(gating, panel, set(missing))
        fc = replace(fc, median_markers=tuple(m for m in fc.median_markers if m not in missing))
        notes.append(f"missing marker(s) {', '.join(missing)}: {len(lost)} feature(s) not computed")
    have = sheet.groupby("patient_id")[["timepoint", "condition"]].apply(
        lambda d: set(zip(d["timepoint"], d["condition"], strict=True))
    )
    need = {(t, c) for t in fc.timepoints for c in fc.conditions}
    gaps = {p: sorted(need - s) for p, s in have.items() if need - s}
    partial = None
    if cache is None and out is not None:
        partial = Path(out).with_name(f".{Path(out).name}.partial")
        cache = partial
    fs = extract_features(sheet, panel, config=fc, gating=gating, cache=cache,
                          scheduler=scheduler, progress=progress, strict_reference=False,
                          random_state=bundle.seed)  # each file cleaned as in training
    if covariates is not None:
        fs = with_covariates(fs, covariates, table, source=clinical)
    scores = score_features(bundle, fs.X)
    for pid, lacking in gaps.items():
        msg = "missing samples: " + ", ".join(f"{t}/{c}" for t, c in lacking)
        mask = scores["patient_id"] == pid
        scores.loc[mask, "warnings"] = (msg + " | " + scores.loc[mask, "warnings"]).str.strip(" |")
    for note in notes:
        scores["warnings"] = (note + " | " + scores["warnings"]).str.strip(" |")
    if gaps:
        warnings.warn(
            f"{len(gaps)} patient(s) lack samples the model uses; their scores rest on missing "
            "features (see the 'warnings' column).",
            UserWarning,
            stacklevel=2,
        )
    scores.insert(1, "model", f"{bundle.name}/v{bundle.version:03d}")
    if out is not None:
        write_table(scores, out, force=force)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return scores, fs
