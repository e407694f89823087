"""Clinical covariates as model inputs: encoded on the training patients, reused at scoring.

A trial statistician adjusts for the treatment arm; ``[model] covariates = ["arm"]`` does the
same for the model. :class:`CovariateEncoder` turns clinical columns into numeric model inputs
and remembers how, so that new patients are encoded identically:

- a numeric column (every value a number) stays one input, ``clinical: age``;
- a column with two levels becomes one 0/1 input for its first level in sorted order,
  ``clinical: arm = IL-7`` (1 for IL-7, 0 for the other level);
- a column with more levels becomes one 0/1 input per level, ``clinical: site = A``, ...

Every input carries the metadata column ``covariate`` (the clinical column it encodes; empty
for cytometry features), which keeps it out of the per-population and per-marker sums of
:mod:`predictor.explain`: the report shows the covariates as a group of their own. A missing
value, a level the training never saw or a patient absent from the table is an error that
names the file, the column and the patients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from predictor.errors import ClinicalError
from predictor.features.matrix import META_COLUMNS
from predictor.io.samplesheet import _check_unique, _read_csv, _require_columns

if TYPE_CHECKING:
    from predictor.features import FeatureSet

__all__ = [
    "COVARIATE_GROUP",
    "COVARIATE_PREFIX",
    "CovariateEncoder",
    "covariate_mask",
    "read_covariates",
    "with_covariates",
]

#: Start of every covariate input's name (cytometry feature names start with a population).
COVARIATE_PREFIX = "clinical: "
#: How the report names the covariates taken together.
COVARIATE_GROUP = "clinical covariates"
_KINDS = ("numeric", "categorical")
_LIST_MAX = 5


def _listing(items: Sequence[Any]) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:_LIST_MAX])
    return shown + (f" and {len(items) - _LIST_MAX} more" if len(items) > _LIST_MAX else "")


def _missing(values: pd.Series) -> pd.Series:
    """True where a clinical cell is empty (``''`` from the CSV reader, or NaN)."""
    return values.isna() | values.astype(str).str.strip().eq("")


def _shown(levels: Sequence[str]) -> list[str]:
    """The levels that get a 0/1 input: the first of two, else every one."""
    return list(levels[:1]) if len(levels) == 2 else list(levels)


def covariate_mask(meta: pd.DataFrame) -> pd.Series:
    """True for the rows of feature metadata that are clinical covariates."""
    if "covariate" not in meta.columns:
        return pd.Series(False, index=meta.index)
    return meta["covariate"].fillna("").astype(str).ne("")


class CovariateEncoder:
    """Encode clinical columns as model inputs, the same way for training and new patients.

    Parameters
    ----------
    columns
        Clinical table columns to encode, in order (e.g. ``("arm",)``).

    Attributes
    ----------
    specs_ : list of dict
        Per column after :meth:`fit`: ``column``, ``kind`` (``numeric`` or ``categorical``),
        ``levels`` (the training levels, sorted; categorical only) and ``features`` (the
        names of its model inputs).
    """

    def __init__(self, columns: Sequence[str] = ()) -> None:
        self.columns = tuple(columns)

    # ------------------------------------------------------------------ learning

    def fit(self, clinical: pd.DataFrame, *, source: str | os.PathLike | None = None) -> CovariateEncoder:
        """Learn each column's kind and levels from the training patients' clinical table.

        Parameters
        ----------
        clinical
            Index patient_id; the training patients only (as from
            :func:`predictor.io.read_clinical`, restricted to the cohort).
        source
            The clinical file, for error messages.
        """
        where = str(source or clinical.attrs.get("source", "the clinical table"))
        specs = []
        for col in self.columns:
            if col not in clinical.columns:
                raise ClinicalError(
                    f"{where}: no column '{col}', which [model] covariates lists. Columns: "
                    f"{_listing(clinical.columns)}. Add it or remove '{col}' from covariates."
                )
            values = clinical[col]
            self._check_filled(values, col, where)
            numeric = pd.to_numeric(values, errors="coerce")
            if numeric.notna().all():
                if numeric.nunique() < 2:
                    self._constant(col, values, where)
                specs.append({"column": col, "kind": "numeric", "levels": [],
                              "features": [f"{COVARIATE_PREFIX}{col}"]})
                continue
            levels = sorted(values.astype(str).str.strip().unique())
            if len(levels) < 2:
                self._constant(col, values, where)
            specs.append({"column": col, "kind": "categorical", "levels": levels,
                          "features": [f"{COVARIATE_PREFIX}{col} = {lv}" for lv in _shown(levels)]})
        self.specs_ = specs
        return self

    @staticmethod
    def _check_filled(values: pd.Series, col: str, where: str) -> None:
        empty = _missing(values)
        if empty.any():
            raise ClinicalError(
                f"{where}, column '{col}': no value for patient(s) {_listing(values.index[empty])}. "
                "A covariate must be known for every patient: fill it in, or remove "
                f"'{col}' from [model] covariates."
            )

    @staticmethod
    def _constant(col: str, values: pd.Series, where: str) -> None:
        raise ClinicalError(
            f"{where}, column '{col}': every patient has the value {values.iloc[0]!r}, so it "
            f"cannot inform the model. Remove '{col}' from [model] covariates."
        )

    # ------------------------------------------------------------------ using

    def _fitted(self) -> list[dict[str, Any]]:
        if not hasattr(self, "specs_"):
            raise RuntimeError("This CovariateEncoder is not fitted yet; call fit() or from_dict().")
        return self.specs_

    @property
    def features(self) -> list[str]:
        """Names of the model inputs, in order."""
        return [f for spec in self._fitted() for f in spec["features"]]

    def transform(self, clinical: pd.DataFrame, patients: Sequence[str] | pd.Index | None = None, *,
                  source: str | os.PathLike | None = None) -> pd.DataFrame:
        """The model inputs of ``patients`` (default: every row), index patient_id.

        Raises
        ------
        ClinicalError
            A patient absent from the table, a missing value, a value that is not a number
            (numeric covariate) or a level the model was not trained with; the message names
            the file, the column and the patients.
        """
        specs = self._fitted()
        where = str(source or clinical.attrs.get("source", "the clinical table"))
        index = pd.Index(clinical.index.astype(str), name="patient_id")
        table = clinical.set_axis(index, axis=0)
        wanted = index if patients is None else pd.Index([str(p) for p in patients], name="patient_id")
        absent = wanted.difference(index)
        if len(absent):
            raise ClinicalError(
                f"{where}: no row for patient(s) {_listing(sorted(absent))}, whose clinical "
                f"covariate(s) {', '.join(self.columns)} the model needs. Add their rows."
            )
        out = pd.DataFrame(index=wanted)
        for spec in specs:
            col = spec["column"]
            if col not in table.columns:
                raise ClinicalError(
                    f"{where}: no column '{col}'; the model was trained with the clinical "
                    f"covariate(s) {', '.join(self.columns)} and needs them for every patient."
                )
            values = table.loc[wanted, col]
            self._check_filled(values, col, where)
            if spec["kind"] == "numeric":
                num = pd.to_numeric(values, errors="coerce")
                bad = num.isna()
                if bad.any():
                    first = values.index[bad][0]
                    raise ClinicalError(
                        f"{where}, column '{col}', patient {first}: {values[first]!r} is not a "
                        f"number; the model was trained with '{col}' as a number. Fix the value."
                    )
                out[spec["features"][0]] = num.astype(float)
                continue
            text = values.astype(str).str.strip()
            unknown = ~text.isin(spec["levels"])
            if unknown.any():
                pids = list(text.index[unknown])
                raise ClinicalError(
                    f"{where}, column '{col}': {text[pids[0]]!r} (patient {_listing(pids)}) is not "
                    f"a level the model was trained with ({', '.join(spec['levels'])}). Fix the "
                    "value, or retrain with patients of that level."
                )
            for name, level in zip(spec["features"], _shown(spec["levels"]), strict=True):
                out[name] = (text == level).astype(float)
        return out

    def feature_meta(self) -> pd.DataFrame:
        """Feature metadata of the inputs: empty cytometry columns, ``covariate`` = column."""
        rows = [{**dict.fromkeys(META_COLUMNS, ""), "covariate": spec["column"]}
                for spec in self._fitted() for _ in spec["features"]]
        return pd.DataFrame(rows, index=pd.Index(self.features, name="feature"),
                            columns=[*META_COLUMNS, "covariate"])

    def strata(self, X: pd.DataFrame) -> pd.Series | None:
        """Per patient, the combination of its discrete covariates' values (None without any).

        Discrete: categorical covariates, and numeric ones with two values in ``X`` (a 0/1 arm).
        """
        cats = [f for spec in self._fitted() for f in spec["features"]
                if spec["kind"] == "categorical" or X[f].nunique() <= 2]
        if not cats:
            return None
        codes = ["/".join(f"{v:g}" for v in row) for row in X[cats].to_numpy(dtype=float)]
        return pd.Series(codes, index=X.index, name="stratum")

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> list[dict[str, Any]]:
        """The fitted encoding as plain JSON data (stored in a model bundle)."""
        return [{"column": s["column"], "kind": s["kind"], "levels": list(s["levels"]),
                 "features": list(s["features"])} for s in self._fitted()]

    @classmethod
    def from_dict(cls, specs: Sequence[dict[str, Any]]) -> CovariateEncoder:
        """The encoder that :meth:`to_dict` stored; ``ValueError`` when malformed."""
        enc = cls([str(s["column"]) for s in specs])
        out = []
        for s in specs:
            kind = s["kind"]
            levels = [str(v) for v in s.get("levels", [])]
            features = [str(f) for f in s["features"]]
            if kind not in _KINDS or not features or (kind == "categorical" and (
                    len(levels) < 2 or len(features) != len(_shown(levels)))):
                raise ValueError(f"malformed covariate encoding {s!r}")
            out.append({"column": str(s["column"]), "kind": kind, "levels": levels, "features": features})
        enc.specs_ = out
        return enc

    def __repr__(self) -> str:
        return f"CovariateEncoder(columns={list(self.columns)!r})"


def read_covariates(path: str | os.PathLike, columns: Sequence[str]) -> pd.DataFrame:
    """The clinical table of new patients: ``patient_id`` and the covariate ``columns``.

    Unlike :func:`predictor.io.read_clinical` it needs no outcome (new patients have none yet).
    Values are kept as text; :meth:`CovariateEncoder.transform` checks and encodes them.
    """
    source = Path(path)
    df = _read_csv(source, ClinicalError, "clinical table",
                   f"Give a CSV with patient_id and {', '.join(columns)}, one row per patient.")
    _require_columns(df, ["patient_id", *columns], source, ClinicalError,
                     {"patient_id": ("patient", "subject", "subject_id", "donor", "pid", "id")})
    empty_ids = df["patient_id"].str.strip().eq("")
    if empty_ids.any():
        rows = [str(int(i) + 2) for i in df.index[empty_ids]]
        raise ClinicalError(f"{source}: empty patient_id in row(s) {_listing(rows)}. Fill them in "
                            "or delete the rows.")
    _check_unique(df, "patient_id", source, ClinicalError)
    out = df.set_index("patient_id")[list(columns)]
    out.index = out.index.astype(str)
    out.attrs["source"] = str(source)
    return out


def with_covariates(fs: FeatureSet, encoder: CovariateEncoder, clinical: pd.DataFrame, *,
                    source: str | os.PathLike | None = None) -> FeatureSet:
    """``fs`` with its patients' encoded covariates appended to ``X`` and ``meta``."""
    C = encoder.transform(clinical, fs.X.index, source=source).set_axis(fs.X.index)
    meta = pd.concat([fs.meta.assign(covariate=""), encoder.feature_meta()])
    return replace(fs, X=fs.X.join(C), meta=meta)
