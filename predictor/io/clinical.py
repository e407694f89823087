"""The clinical table: one row per patient with the outcome to predict."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from predictor.errors import ClinicalError
from predictor.io.samplesheet import (
    _check_filled,
    _check_unique,
    _read_csv,
    _require_columns,
    _row,
)

__all__ = ["read_clinical", "outcome_classes"]

_TRUE = {"1", "1.0", "true", "t", "yes", "y", "responder", "response", "r", "benefit",
         "event", "dead", "died", "deceased"}
_FALSE = {"0", "0.0", "false", "f", "no", "n", "non-responder", "nonresponder",
          "non responder", "non_responder", "nr", "no response", "no benefit", "none",
          "censored", "alive"}
_BINARY_TRUE = _TRUE - {"event", "dead", "died", "deceased"}
_BINARY_FALSE = _FALSE - {"censored", "alive"}
_EVENT_TRUE = {"1", "1.0", "true", "t", "yes", "y", "event", "dead", "died", "deceased"}
_EVENT_FALSE = {"0", "0.0", "false", "f", "no", "n", "censored", "alive"}
_ALIASES = {
    "patient_id": ("patient", "subject", "subject_id", "donor", "pid", "id"),
    "response": ("responder", "outcome", "benefit", "label", "y"),
    "time": ("os", "os_time", "survival", "survival_time", "months", "days", "pfs", "time_to"),
    "event": ("status", "death", "dead", "os_event", "censor", "vital_status"),
}


def read_clinical(path: str | os.PathLike, *, outcome: str = "response") -> pd.DataFrame:
    """Read and validate the clinical table (CSV, one row per patient).

    Parameters
    ----------
    path
        CSV with ``patient_id``, the outcome, and optionally ``arm`` and covariates.
    outcome
        ``'survival'``: columns ``time`` (> 0) and ``event`` (0/1). Anything else names a
        binary column (default ``'response'``) holding 0/1; true/false, yes/no and
        responder/non-responder are accepted too.

    Returns
    -------
    pandas.DataFrame
        Index ``patient_id`` (str). The outcome as int 0/1 (and ``time`` as float for
        survival); other columns as numbers when all their cells are numbers, else str.
        ``attrs`` holds ``source`` and ``outcome``. A single-class outcome is not an error
        here (see :func:`outcome_classes`); training decides.

    Raises
    ------
    ClinicalError
        Naming the file, row and column at fault and how to fix it.
    """
    if not isinstance(outcome, str) or not outcome.strip():
        raise ValueError(
            f"The 'outcome' parameter of read_clinical must be 'survival' or the name of a "
            f"binary column. Got {outcome!r} instead."
        )
    source = Path(path)
    df = _read_csv(source, ClinicalError, "clinical table",
                   "Give the CSV with patient_id and the outcome, one row per patient.")
    needed = ["patient_id", "time", "event"] if outcome == "survival" else ["patient_id", outcome]
    _require_columns(df, needed, source, ClinicalError, _ALIASES)
    _check_filled(df, needed, source, ClinicalError)
    _check_unique(df, "patient_id", source, ClinicalError)
    if outcome == "survival":
        df["time"] = _positive_times(df, source)
        df["event"] = _binary(df, "event", source, _EVENT_TRUE, _EVENT_FALSE,
                              "0 (censored) or 1 (event)")
    else:
        df[outcome] = _binary(df, outcome, source, _BINARY_TRUE, _BINARY_FALSE,
                              "0 (no benefit) or 1 (benefit)")
    for col in df.columns:
        if col in needed or col == "arm" or not pd.api.types.is_string_dtype(df[col]):
            continue
        as_num = pd.to_numeric(df[col].replace("", float("nan")), errors="coerce")
        if as_num.notna().sum() == (df[col] != "").sum() and as_num.notna().any():
            df[col] = as_num
    out = df.set_index("patient_id")
    out.index = out.index.astype(str)
    out.index.name = "patient_id"
    out.attrs["source"] = str(source)
    out.attrs["outcome"] = outcome
    return out


def _binary(df: pd.DataFrame, column: str, source: Path, true: set[str], false: set[str],
            expected: str) -> pd.Series:
    values = []
    for i, raw in df[column].items():
        key = raw.strip().lower()
        if key in true:
            values.append(1)
        elif key in false:
            values.append(0)
        else:
            raise ClinicalError(
                f"{source}, row {_row(i)}, column '{column}': {raw!r} is not {expected}. Use "
                "0/1 (true/false and yes/no are read too)."
            )
    return pd.Series(values, index=df.index, dtype="int64")


def _positive_times(df: pd.DataFrame, source: Path) -> pd.Series:
    values = []
    for i, raw in df["time"].items():
        try:
            t = float(raw)
        except ValueError:
            t = float("nan")
        if not (math.isfinite(t) and t > 0):
            raise ClinicalError(
                f"{source}, row {_row(i)}, column 'time': {raw!r} is not a follow-up time > 0. "
                "Give the time to event or censoring as a positive number."
            )
        values.append(t)
    return pd.Series(values, index=df.index, dtype="float64")


def outcome_classes(clinical: pd.DataFrame, *, outcome: str | None = None) -> dict[int, int]:
    """Number of patients per outcome class (events vs censored for survival).

    Parameters
    ----------
    clinical
        From :func:`read_clinical`.
    outcome
        The outcome it was read with (default: the one recorded in ``clinical.attrs``).

    Returns
    -------
    dict[int, int]
        ``{0: n0, 1: n1}``; a class with no patient has count 0.
    """
    outcome = outcome or clinical.attrs.get("outcome", "response")
    column = "event" if outcome == "survival" else outcome
    if column not in clinical.columns:
        raise ValueError(
            f"The 'outcome' parameter of outcome_classes must name a column of the table. Got "
            f"{outcome!r} instead."
        )
    counts = clinical[column].value_counts()
    return {0: int(counts.get(0, 0)), 1: int(counts.get(1, 0))}
