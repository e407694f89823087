"""Batch scoring of new patients with a frozen model bundle.

The bundle's panel, gating and feature settings are applied unchanged to the new files; the
booster gives a probability, the bundle's calibration and threshold a calibrated probability
and a flag, and SHAP values the top drivers of each patient's score. Results are written
atomically and never overwrite an existing file unless asked to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from predictor.errors import OutputExistsError, ScoringError
from predictor.explain import shap_values, top_drivers
from predictor.features import FeatureSet, extract_features
from predictor.io.samplesheet import read_sample_sheet
from predictor.model.bundle import Bundle, load_bundle
from predictor.model.train import calibrate

__all__ = ["score_features", "score_samples", "write_table"]


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
    """Score a patient × feature matrix with a bundle (columns matched by name)."""
    schema = bundle.schema
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
    return pd.DataFrame(rows)


def score_samples(
    model: str | os.PathLike,
    samples: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    n_jobs: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, FeatureSet]:
    """Score the patients of a sample sheet with a bundle; write ``out`` when given.

    Parameters
    ----------
    model
        ``models/NAME`` (newest version) or ``models/NAME/vNNN``.
    samples
        Sample sheet of the new patients (same timepoints/conditions as the training).
    out
        CSV or Parquet path for the scores; refused if it exists unless ``force``.
    """
    if out is not None and Path(out).exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    bundle = load_bundle(model)
    fc = bundle.feature_config
    if n_jobs is not None:
        from dataclasses import replace

        fc = replace(fc, n_jobs=n_jobs)
    sheet = read_sample_sheet(samples)
    sheet = sheet[sheet["timepoint"].isin(fc.timepoints) & sheet["condition"].isin(fc.conditions)]
    if sheet.empty:
        raise ScoringError(
            f"{samples}: no sample with timepoint in {list(fc.timepoints)} and condition in "
            f"{list(fc.conditions)}, which the model {bundle.path} needs."
        )
    have = sheet.groupby("patient_id")[["timepoint", "condition"]].apply(
        lambda d: set(zip(d["timepoint"], d["condition"], strict=True))
    )
    need = {(t, c) for t in fc.timepoints for c in fc.conditions}
    gaps = {p: sorted(need - s) for p, s in have.items() if need - s}
    fs = extract_features(sheet, bundle.panel, config=fc, gating=bundle.gating, progress=progress)
    scores = score_features(bundle, fs.X)
    for pid, missing in gaps.items():
        msg = "missing samples: " + ", ".join(f"{t}/{c}" for t, c in missing)
        mask = scores["patient_id"] == pid
        scores.loc[mask, "warnings"] = (msg + " | " + scores.loc[mask, "warnings"]).str.strip(" |")
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
    return scores, fs
