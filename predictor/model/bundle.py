"""Model bundles: everything needed to score new patients, in plain files, versioned.

Layout of ``models/<name>/vNNN/``::

    bundle.json          name, version, threshold, calibration, metrics, MLflow run, versions,
                         and the clinical covariates' encoding (``covariates``; [] without)
    model.json           the XGBoost booster in XGBoost's own JSON format
    schema.json          the model's features in order, their metadata and training ranges
    gating.json          the frozen gating (template + thresholds)
    panel.csv            the panel the training files were read with
    experiment.json      the experiment configuration
    features_train.parquet   training patients' values of the model's features
    oof.csv              out-of-fold predictions of the training patients
    metrics.json         the full evaluation (metrics with CIs, permutation test, baselines)
    qc.csv, populations.csv          training cleanup QC and population table
    oof_shap.csv         out-of-fold SHAP values of the training patients (all features)
    fold_importance.csv, feature_stability.csv   per-fold SHAP importance and its stability
    null_importance.csv  each feature's importance in every permuted-outcome CV (the null)
    features_oof.csv     training values of the other features some CV fold model used
    tuning.csv           inner-loop tuning choices (when the experiment has [model.search])

``models/<name>`` resolves to its newest version. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from predictor.config import FeatureConfig
from predictor.covariates import CovariateEncoder
from predictor.errors import BundleError, GatingError
from predictor.io.panel import Panel, read_panel
from predictor.populations import Clustering, populations_from_dict
from predictor.populations.gating import Gating

__all__ = ["Bundle", "save_bundle", "load_bundle", "resolve_bundle_path"]

_VERSION = re.compile(r"^v(\d{3,})$")
REQUIRED = ("bundle.json", "model.json", "schema.json", "gating.json", "panel.csv")


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    booster: xgb.Booster
    schema: pd.DataFrame  # index = feature names in model order
    gating: Gating | Clustering
    panel: Panel
    feature_config: FeatureConfig

    @property
    def features(self) -> list[str]:
        return list(self.schema.index)

    @property
    def covariates(self) -> CovariateEncoder | None:
        """How the model's clinical covariates are encoded (None when it has none)."""
        specs = self.meta.get("covariates") or []
        return CovariateEncoder.from_dict(specs) if specs else None

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    @property
    def seed(self) -> int:
        """The training's seed (of its subsampling): 0 when the bundle does not say."""
        try:
            return int(json.loads((self.path / "experiment.json").read_text()).get("seed", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    def train_features(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "features_train.parquet")

    def oof(self) -> pd.DataFrame:
        return read_indexed_csv(self.path / "oof.csv")

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / "metrics.json").read_text())


def read_indexed_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A bundle table indexed by patient id: the ids stay strings ('007' is not 7)."""
    return pd.read_csv(path, index_col=0, converters={0: str})


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name)))


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    """``models/NAME`` → its newest ``vNNN`` folder; a version folder is returned as is."""
    path = Path(path)
    if (path / "bundle.json").is_file():
        return path
    versions = _versions(path)
    if not versions:
        raise BundleError(
            f"{path}: no model bundle here (expected bundle.json or vNNN/ folders). Train one "
            "with `predictor train experiments/NAME.toml`."
        )
    return path / f"v{versions[-1]:03d}"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_bundle(
    models_dir: str | os.PathLike,
    name: str,
    *,
    booster: xgb.Booster,
    features: pd.DataFrame,
    meta: pd.DataFrame,
    gating: Gating | Clustering,
    panel: Panel,
    feature_config: FeatureConfig,
    info: dict[str, Any],
    oof: pd.DataFrame,
    metrics: dict[str, Any],
    experiment: dict[str, Any],
    tables: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Write a new version of bundle ``name`` under ``models_dir`` (never overwrites).

    Parameters
    ----------
    booster
        The final model; its ``feature_names`` give the feature order.
    features
        Training patients × the model's features (ranges and explanations).
    meta
        Feature metadata (index = feature names).
    info
        Threshold, calibration, MLflow run and the like, stored in ``bundle.json``.
    tables
        Extra tables written as ``<name>.csv`` (e.g. the training QC).
    """
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    names = list(booster.feature_names or [])
    if names != list(features.columns):
        raise BundleError("The booster's features and the training matrix disagree; not saved.")
    tmp = root / f".tmp-{os.getpid()}-{datetime.now(UTC).strftime('%H%M%S%f')}"
    tmp.mkdir()
    try:
        booster.save_model(tmp / "model.json")
        schema = meta.loc[names].copy()
        schema["min"] = features.min(axis=0)
        schema["max"] = features.max(axis=0)
        schema["median"] = features.median(axis=0)
        schema["missing_fraction"] = features.isna().mean(axis=0)
        schema_rows = [{"name": n, **{k: _clean(v) for k, v in row.items()}} for n, row in schema.iterrows()]
        (tmp / "schema.json").write_text(json.dumps({"features": schema_rows}, indent=1, ensure_ascii=False))
        (tmp / "gating.json").write_text(json.dumps(gating.to_dict(), indent=1))
        panel.to_csv(tmp / "panel.csv")
        (tmp / "experiment.json").write_text(json.dumps(experiment, indent=1, default=_json_default))
        features.to_parquet(tmp / "features_train.parquet")
        oof.to_csv(tmp / "oof.csv")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
        for tname, table in (tables or {}).items():
            table.to_csv(tmp / f"{tname}.csv", index=False)
        for attempt in range(1000):
            version = (_versions(root) or [0])[-1] + 1
            body = {
                "name": name,
                "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "format": 1,
                "feature_config": _feature_settings(feature_config),
                **info,
            }
            (tmp / "bundle.json").write_text(json.dumps(body, indent=1, default=_json_default))
            final = root / f"v{version:03d}"
            try:
                os.rename(tmp, final)  # fails if another writer took this version meanwhile
                return final
            except OSError:
                if attempt == 999:
                    raise
        raise BundleError(f"{root}: could not allocate a new version.")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _clean(v: Any) -> Any:
    if isinstance(v, float | np.floating) and not np.isfinite(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _feature_settings(fc: FeatureConfig) -> dict[str, Any]:
    """What a bundle keeps of the feature settings: not the Dask scheduler the training ran on
    (an address that may be gone when the model scores; scoring runs where it is told)."""
    return {k: v for k, v in dataclasses.asdict(fc).items() if k != "scheduler"}


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load a bundle (``models/NAME`` for the newest version, or ``models/NAME/vNNN``)."""
    path = resolve_bundle_path(path)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise BundleError(f"{path}: incomplete bundle, missing {', '.join(missing)}.")
    try:
        meta = json.loads((path / "bundle.json").read_text())
        booster = xgb.Booster()
        booster.load_model(path / "model.json")
        rows = json.loads((path / "schema.json").read_text())["features"]
        schema = pd.DataFrame(rows).set_index("name")
        gating = populations_from_dict(json.loads((path / "gating.json").read_text()))
        fc = meta.get("feature_config", {})
        feature_config = FeatureConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fc.items()}
        )
        covariates = CovariateEncoder.from_dict(meta.get("covariates") or [])
        if not set(covariates.features) <= set(schema.index):
            raise KeyError(f"covariate inputs {covariates.features} missing from schema.json")
    except (
        json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, GatingError,
        xgb.core.XGBoostError,
    ) as exc:
        raise BundleError(f"{path}: corrupt bundle ({exc}).") from None
    booster.feature_names = list(schema.index)
    return Bundle(path, meta, booster, schema, gating, read_panel(path / "panel.csv"), feature_config)
