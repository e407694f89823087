"""The one module that talks to MLflow: runs, metrics, artifacts, model registry.

The tracking store is SQLite (``sqlite:///…/mlflow.db``) with artifacts in a folder
(``mlruns/``); ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` serves it. Everything else
in predictor produces plain payloads that this module logs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["TrackingTarget", "tracking_uri", "start_experiment_run", "log_model", "git_commit",
           "download_run_artifacts", "ui_command"]

PIP_REQUIREMENTS = ["xgboost>=3.2", "pandas", "numpy"]


@dataclass(frozen=True)
class TrackingTarget:
    store: Path  # the SQLite file
    artifacts: Path  # artifact root folder
    experiment: str

    @property
    def uri(self) -> str:
        return tracking_uri(self.store)


def tracking_uri(store: str | os.PathLike) -> str:
    return f"sqlite:///{Path(store).resolve()}"


def ui_command(store: str | os.PathLike) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri(store)}"


def _mlflow(target: TrackingTarget):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    target.store.parent.mkdir(parents=True, exist_ok=True)
    target.artifacts.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(target.uri)
    return mlflow


def git_commit(path: str | os.PathLike) -> str:
    """The git commit of the folder ``path`` is in, or '' outside a repository."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class RunLogger:
    """Handle on an active MLflow run: log payloads, nested fold runs, artifacts."""

    def __init__(self, mlflow: Any, run: Any, target: TrackingTarget) -> None:
        self._mlflow = mlflow
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.target = target

    def params(self, params: Mapping[str, Any]) -> None:
        flat = _flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 90):
            self._mlflow.log_params(dict(items[i : i + 90]))

    def metrics(self, metrics: Mapping[str, float]) -> None:
        clean = {k.replace("|", "_"): float(v) for k, v in metrics.items() if v == v}
        self._mlflow.log_metrics(clean)

    def tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def folds(self, fold_metrics: pd.DataFrame, *, params: Sequence[str] = ()) -> None:
        """One nested run per outer fold: ``params`` columns (e.g. tuned settings) as params,
        the other numeric columns as metrics."""
        keep = {"repeat", "fold", *params}
        for row in fold_metrics.to_dict("records"):
            name = f"repeat{int(row['repeat'])}-fold{int(row['fold'])}"
            # the parent's experiment explicitly: MLflow files nested runs without one under
            # the active (else Default) experiment, not the parent's
            with self._mlflow.start_run(run_name=name, nested=True, experiment_id=self.experiment_id):
                self._mlflow.log_params(
                    {"repeat": int(row["repeat"]), "fold": int(row["fold"]),
                     **{k: row[k] for k in params if k in row}}
                )
                self._mlflow.log_metrics(
                    {k: float(v) for k, v in row.items() if k not in keep and v == v}
                )

    def artifact_dir(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def model(self, booster: Any, example: pd.DataFrame, registered_model: str,
              *, output_name: str = "probability") -> dict[str, Any]:
        return log_model(self._mlflow, booster, example, registered_model, output_name=output_name)


@contextmanager
def start_experiment_run(target: TrackingTarget, *, run_name: str) -> Iterator[RunLogger]:
    """Start (and end) a parent run in the experiment, creating the experiment if needed."""
    mlflow = _mlflow(target)
    exp = mlflow.get_experiment_by_name(target.experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(
            target.experiment, artifact_location=target.artifacts.resolve().as_uri()
        )
    else:
        exp_id = exp.experiment_id
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        yield RunLogger(mlflow, run, target)


def log_model(mlflow: Any, booster: Any, example: pd.DataFrame, registered_model: str,
              *, output_name: str = "probability") -> dict[str, Any]:
    """Log the booster (XGBoost flavour, signature, explicit pip requirements) and register it.

    ``output_name`` names the booster's output in the signature: ``probability``, or ``risk``
    (hazard ratio) for a survival model.
    """
    import mlflow.xgboost
    import xgboost as xgb
    from mlflow.models import infer_signature

    probs = booster.predict(xgb.DMatrix(example))
    signature = infer_signature(example, pd.Series(probs, name=output_name))
    info = mlflow.xgboost.log_model(
        booster,
        name="model",
        signature=signature,
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model,
    )
    version = getattr(info, "registered_model_version", None)
    return {
        "model_uri": info.model_uri,
        "registered_model": registered_model,
        "registered_version": int(version) if version is not None else None,
    }


def download_run_artifacts(target_store: str | os.PathLike, run_id: str, artifact_path: str) -> Path:
    """Download an artifact folder of a run into a fresh temporary folder."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(target_store))
    dst = Path(tempfile.mkdtemp(prefix="predictor-run-"))
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))


def resolve_model_uri(uri: str, store: str | os.PathLike) -> Path:
    """Download the bundle behind ``models:/NAME@alias`` or ``models:/NAME/VERSION``.

    The registered version points at the run that logged it; that run's ``bundle`` artifact is
    the model bundle. Returns the local folder it was downloaded to.
    """
    from predictor.errors import BundleError

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    body = uri.removeprefix("models:/")
    mlflow.set_tracking_uri(tracking_uri(store))
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, ver = body.partition("/")
            if not ver:
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise MlflowException(f"no versions of {name!r}")
                ver = str(max(int(v.version) for v in versions))
            mv = client.get_model_version(name, ver)
    except MlflowException as exc:
        msg = str(exc).splitlines()[0]
        raise BundleError(
            f"{uri}: not found in the MLflow store {store} ({msg}). Check the name and the alias "
            "or version (mlflow ui shows them)."
        ) from None
    if not mv.run_id:
        raise BundleError(f"{uri}: the registered version has no run to take the bundle from.")
    return download_run_artifacts(store, mv.run_id, "bundle")
