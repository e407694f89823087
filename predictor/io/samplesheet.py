"""The sample sheet: one row per FCS file, and how the files make up a cohort.

Row numbers in messages are those a spreadsheet shows: the header is row 1, the first sample
row 2.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from itertools import product
from pathlib import Path

import pandas as pd

from predictor.errors import ClinicalError, PredictorError, SampleSheetError

__all__ = [
    "select_samples", "SAMPLE_COLUMNS", "read_sample_sheet", "check_cohort"]

SAMPLE_COLUMNS = ("sample_id", "patient_id", "file", "path", "timepoint", "condition", "batch")
_REQUIRED = ("sample_id", "patient_id", "file", "timepoint", "condition")
_ALIASES = {
    "sample_id": ("sample", "sample_name", "sampleid", "id", "name", "shortname"),
    "patient_id": ("patient", "subject", "subject_id", "donor", "donor_id", "individual", "pid"),
    "file": ("file_name", "filename", "fcs", "fcs_file", "path", "filepath", "file_path"),
    "timepoint": ("time", "visit", "time_point", "week", "day"),
    "condition": ("stim", "stimulation", "treatment", "state"),
    "batch": ("run", "plate", "batch_id"),
}
_LIST_MAX = 8


# ------------------------------------------------------------------ helpers shared with clinical


def _row(i: int) -> int:
    """Spreadsheet row of the ``i``-th data row (0-based): the header is row 1."""
    return int(i) + 2


def _listing(items: Sequence[str], *, limit: int = _LIST_MAX) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[close[0]]!r}?" if close else ""


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _column_hint(wanted: str, columns: Sequence[str], aliases: Sequence[str] = ()) -> str:
    """Which existing column is probably meant to be ``wanted``."""
    norms = {_norm(c): c for c in columns}
    for cand in (wanted, *aliases):
        if _norm(cand) in norms:
            return norms[_norm(cand)]
    close = difflib.get_close_matches(_norm(wanted), list(norms), n=1, cutoff=0.7)
    return norms[close[0]] if close else ""


def _read_csv(path: Path, error: type[PredictorError], what: str, how: str) -> pd.DataFrame:
    """A CSV as a frame of stripped strings (empty cells ''), rows that are all empty dropped."""
    if not path.is_file():
        raise error(f"{path}: {what} not found. {how}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                         skipinitialspace=True)
    except UnicodeDecodeError:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="latin-1",
                         skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise error(f"{path}: the {what} is empty. {how}") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise error(f"{path}: not a readable CSV file ({str(exc).strip()}). Save it as CSV "
                    "(comma separated).") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df.columns) == 1 and ";" in df.columns[0]:
        raise error(f"{path}: the columns are separated by ';'. Save the {what} as CSV with "
                    "commas.")
    unnamed = [c for c in df.columns if c.startswith("Unnamed:")]
    df = df.drop(columns=[c for c in unnamed if (df[c].str.strip() == "").all()])
    df = df.apply(lambda col: col.str.strip())
    keep = (df != "").any(axis=1)
    df = df.loc[keep]  # the original index stays: row numbers remain those of the file
    return df


def _require_columns(
    df: pd.DataFrame,
    required: Sequence[str],
    source: Path,
    error: type[PredictorError],
    aliases: dict[str, Sequence[str]],
) -> None:
    missing = [c for c in required if c not in df.columns]
    if not missing:
        return
    hints = []
    for col in missing:
        hint = _column_hint(col, [c for c in df.columns if c not in required], aliases.get(col, ()))
        if hint:
            hints.append(f"'{hint}' should probably be named '{col}'")
    detail = f" ({'; '.join(hints)})" if hints else ""
    raise error(
        f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}{detail}. The file "
        f"has columns {', '.join(repr(c) for c in df.columns)}; it needs "
        f"{', '.join(required)}. Rename the header cells."
    )


def _check_filled(df: pd.DataFrame, columns: Sequence[str], source: Path,
                  error: type[PredictorError]) -> None:
    empty = [(i, c) for i, r in df[list(columns)].iterrows() for c in columns if r[c] == ""]
    if empty:
        where = _listing([f"row {_row(i)}, column '{c}'" for i, c in empty], limit=5)
        raise error(f"{source}: empty cell(s) at {where}. Fill them in or delete the rows.")


def _check_unique(df: pd.DataFrame, column: str, source: Path, error: type[PredictorError]) -> None:
    dup = df[column].duplicated(keep=False)
    if dup.any():
        groups = df.index[dup].groupby(df.loc[dup, column])
        parts = [f"{value!r} in rows {', '.join(str(_row(i)) for i in idx)}"
                 for value, idx in groups.items()]
        raise error(
            f"{source}: column '{column}' must be unique; repeated: {_listing(parts, limit=5)}."
            " Give each row its own id or delete the duplicates."
        )


# ------------------------------------------------------------------ sample sheet


def read_sample_sheet(
    path: str | os.PathLike,
    *,
    timepoints: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read and validate a sample sheet (CSV, one row per FCS file).

    Parameters
    ----------
    path
        CSV with columns ``sample_id, patient_id, file, timepoint, condition`` and optionally
        ``batch`` (other columns are kept). ``file`` is relative to the sheet's folder.
    timepoints, conditions
        The labels the experiment declares; every row must use one of them.

    Returns
    -------
    pandas.DataFrame
        Columns ``sample_id, patient_id, file, path, timepoint, condition, batch`` (all str;
        ``path`` absolute, ``batch`` '1' when not given) then any extra columns. ``attrs``
        holds the ``source`` file.

    Raises
    ------
    SampleSheetError
        Naming the file, row and column at fault and how to fix it.
    """
    source = Path(path)
    df = _read_csv(source, SampleSheetError, "sample sheet",
                   "Give the CSV listing sample_id, patient_id, file, timepoint, condition.")
    _require_columns(df, _REQUIRED, source, SampleSheetError, _ALIASES)
    _check_filled(df, _REQUIRED, source, SampleSheetError)
    _check_unique(df, "sample_id", source, SampleSheetError)
    for column, declared in (("timepoint", timepoints), ("condition", conditions)):
        if declared is not None:
            _check_declared(df, column, [str(d) for d in declared], source)
    _check_design_unique(df, source)
    folder = source.resolve().parent
    df["path"] = [str((folder / f).resolve()) if not Path(f).is_absolute() else str(Path(f))
                  for f in df["file"]]
    _check_files(df, source, folder)
    if "batch" not in df.columns:
        df["batch"] = "1"
    df["batch"] = df["batch"].replace("", "1")
    extra = [c for c in df.columns if c not in SAMPLE_COLUMNS]
    out = df[list(SAMPLE_COLUMNS) + extra].reset_index(drop=True).astype(str)
    out.attrs["source"] = str(source)
    return out


def _check_declared(df: pd.DataFrame, column: str, declared: list[str], source: Path) -> None:
    for i, value in df[column].items():
        if value not in declared:
            raise SampleSheetError(
                f"{source}, row {_row(i)}, column '{column}': {value!r} is not a declared "
                f"{column} ({', '.join(declared)}).{_did_you_mean(value, declared)}"
            )


def _check_design_unique(df: pd.DataFrame, source: Path) -> None:
    keys = ["patient_id", "timepoint", "condition"]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        parts = []
        for key, idx in df.index[dup].groupby(list(zip(*(df.loc[dup, k] for k in keys),
                                                        strict=True))).items():
            rows = " and ".join(str(_row(i)) for i in idx)
            parts.append(f"rows {rows} are both patient {key[0]} at {key[1]}/{key[2]}")
        raise SampleSheetError(
            f"{source}: {_listing(parts, limit=4)}. Each patient has one sample per timepoint "
            "and condition; delete the extra rows or fix their labels."
        )


def _check_files(df: pd.DataFrame, source: Path, folder: Path) -> None:
    missing = [f"row {_row(i)} {f!r}" for i, f, p in zip(df.index, df["file"], df["path"],
                                                           strict=True)
               if not Path(p).is_file()]
    if missing:
        raise SampleSheetError(
            f"{source}: {len(missing)} file(s) not found (paths are relative to {folder}): "
            f"{_listing(missing, limit=5)}. Fix the 'file' column or move the files."
        )


def select_samples(
    samples: pd.DataFrame,
    *,
    timepoints: Sequence[str],
    conditions: Sequence[str],
    source: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """The rows an analysis uses: declared timepoints and conditions.

    Other labels (e.g. a ``week12`` the experiment does not use) are left out, but a label
    that looks like a typo of a declared one (``basline``) is an error naming the row and
    column, never a silently dropped sample.
    """
    source = source or samples.attrs.get("source", "the sample sheet")
    for column, declared in (("timepoint", list(timepoints)), ("condition", list(conditions))):
        for i, value in samples[column].items():
            if value not in declared and _did_you_mean(value, declared):
                raise SampleSheetError(
                    f"{source}, row {_row(i)}, column '{column}': {value!r} is not a declared "
                    f"{column} ({', '.join(declared)}).{_did_you_mean(value, declared)}"
                )
    keep = samples["timepoint"].isin(timepoints) & samples["condition"].isin(conditions)
    return samples[keep]


# ------------------------------------------------------------------ cohort


def check_cohort(
    samples: pd.DataFrame,
    clinical: pd.DataFrame,
    *,
    timepoints: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
) -> None:
    """Check that the sample sheet and the clinical table describe the same complete cohort.

    Parameters
    ----------
    samples
        From :func:`read_sample_sheet`.
    clinical
        From :func:`~predictor.io.clinical.read_clinical` (index ``patient_id``).
    timepoints, conditions
        Every patient needs one sample per (timepoint, condition); ``None`` means those found
        in the sheet.

    Raises
    ------
    ClinicalError
        Patients of the sheet lack a clinical row (clinical-only patients are ignored; they
        are listed in the message to help spot id typos).
    SampleSheetError
        Patients lack some (timepoint, condition) samples; every gap is listed.
    """
    s_src = samples.attrs.get("source", "the sample sheet")
    c_src = clinical.attrs.get("source", "the clinical table")
    in_sheet = list(dict.fromkeys(samples["patient_id"].astype(str)))
    in_clinical = {str(p) for p in clinical.index}
    no_clinical = [p for p in in_sheet if p not in in_clinical]
    if no_clinical:
        only_clinical = sorted(in_clinical - set(in_sheet))
        also = (f" ({c_src} has patient(s) without samples: {_listing(only_clinical)}; "
                "same patients under other ids?)") if only_clinical else ""
        raise ClinicalError(
            f"{c_src}: no row for patient(s) {_listing(no_clinical)} of {s_src}{also}. Add "
            "their clinical rows, fix the ids, or drop their samples."
        )
    tps = list(timepoints) if timepoints is not None else list(dict.fromkeys(samples["timepoint"]))
    conds = (list(conditions) if conditions is not None
             else list(dict.fromkeys(samples["condition"])))
    have = set(zip(samples["patient_id"].astype(str), samples["timepoint"],
                   samples["condition"], strict=True))
    gaps = []
    for pid in in_sheet:
        lacking = [f"{t}/{c}" for t, c in product(tps, conds) if (pid, t, c) not in have]
        if lacking:
            gaps.append(f"{pid}: missing {', '.join(lacking)}")
    if gaps:
        raise SampleSheetError(
            f"{s_src}: incomplete patients ({len(gaps)}): {_listing(gaps, limit=6)}. Every "
            f"patient needs a sample for each timepoint ({', '.join(tps)}) and condition "
            f"({', '.join(conds)}); add the files or drop the patients."
        )
