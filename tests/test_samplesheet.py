"""Sample sheets, clinical tables, and whether they make a complete cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from predictor.errors import ClinicalError, SampleSheetError
from predictor.io.clinical import outcome_classes, read_clinical
from predictor.io.samplesheet import SAMPLE_COLUMNS, check_cohort, read_sample_sheet

TPS = ("baseline", "week6")
CONDS = ("unstim", "stim")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _cohort(folder: Path, patients=("P01", "P02"), *, batch: bool = True) -> Path:
    """A complete sample sheet (4 samples per patient) with empty placeholder files."""
    (folder / "fcs").mkdir(exist_ok=True)
    header = "sample_id,patient_id,file,timepoint,condition" + (",batch" if batch else "")
    lines = [header]
    for p in patients:
        for t in TPS:
            for c in CONDS:
                f = f"fcs/{p}_{t}_{c}.fcs"
                (folder / f).write_bytes(b"")
                lines.append(f"{p}_{t}_{c},{p},{f},{t},{c}" + (",B1" if batch else ""))
    return _write(folder, "samples.csv", "\n".join(lines) + "\n")


def _edit(path: Path, old: str, new: str, count: int = 1) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))
    return path


# ------------------------------------------------------------------------------ sample sheet


def test_read_sample_sheet(tmp_path) -> None:
    sheet = read_sample_sheet(_cohort(tmp_path), timepoints=TPS, conditions=CONDS)
    assert list(sheet.columns) == list(SAMPLE_COLUMNS)
    assert len(sheet) == 8
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in sheet["path"])
    assert sheet.loc[0, "path"] == str((tmp_path / "fcs" / "P01_baseline_unstim.fcs").resolve())
    assert (sheet.dtypes == sheet["sample_id"].dtype).all()
    assert sheet.attrs["source"].endswith("samples.csv")


def test_batch_defaults_to_one_and_extra_columns_are_kept(tmp_path) -> None:
    path = _cohort(tmp_path, batch=False)
    _edit(path, "condition\n", "condition,arm\n")
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0]] + [line + ",IL7" for line in text[1:]]) + "\n")
    sheet = read_sample_sheet(path)
    assert set(sheet["batch"]) == {"1"} and list(sheet.columns)[-1] == "arm"


def test_whitespace_bom_and_blank_rows_are_tolerated(tmp_path) -> None:
    path = _cohort(tmp_path)
    text = path.read_text().replace("P02_week6_stim,", " P02_week6_stim ,")
    path.write_text("\ufeff" + text + ",,,,,\n\n", encoding="utf-8")
    sheet = read_sample_sheet(path)
    assert len(sheet) == 8 and "P02_week6_stim" in set(sheet["sample_id"])


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("patient_id", "patient",
         r"missing column\(s\) 'patient_id' \('patient' should probably be named 'patient_id'\)"),
        ("patient_id", "Patient ID", r"'Patient ID' should probably be named 'patient_id'"),
        ("sample_id,", "", r"missing column\(s\) 'sample_id'"),
        ("P01_baseline_stim,P01", ",P01", r"row 3, column 'sample_id'"),
        ("baseline,stim", ",stim", r"empty cell\(s\) at row 3, column 'timepoint'"),
        ("P01_week6_unstim,", "P01_baseline_unstim,",
         r"'sample_id' must be unique; repeated: 'P01_baseline_unstim' in rows 2, 4"),
        ("P01_week6_unstim.fcs,week6", "P01_week6_unstim.fcs,basline",
         r"samples\.csv, row 4, column 'timepoint': 'basline' is not a declared timepoint "
         r"\(baseline, week6\)\. Did you mean 'baseline'\?"),
        ("P02_week6_stim.fcs,week6,stim", "P02_week6_stim.fcs,week6,Stim",
         r"row 9, column 'condition': 'Stim' is not a declared condition \(unstim, stim\)\. "
         r"Did you mean 'stim'\?"),
        ("P01_week6_unstim.fcs,week6,unstim", "P01_week6_unstim.fcs,week6,stim",
         r"rows 4 and 5 are both patient P01 at week6/stim"),
        ("fcs/P02_baseline_unstim.fcs", "fcs/missing.fcs",
         r"1 file\(s\) not found .*row 6 'fcs/missing\.fcs'"),
    ],
)
def test_sample_sheet_errors(tmp_path, old, new, pattern) -> None:
    path = _edit(_cohort(tmp_path), old, new)
    with pytest.raises(SampleSheetError, match=pattern) as info:
        read_sample_sheet(path, timepoints=TPS, conditions=CONDS)
    assert str(path) in str(info.value)


def test_undeclared_value_without_a_close_match(tmp_path) -> None:
    path = _edit(_cohort(tmp_path), "week6,stim", "day90,stim")
    with pytest.raises(SampleSheetError, match=r"'day90' is not a declared timepoint") as info:
        read_sample_sheet(path, timepoints=TPS)
    assert "Did you mean" not in str(info.value)


def test_sample_sheet_missing_or_empty_file(tmp_path) -> None:
    with pytest.raises(SampleSheetError, match="not found"):
        read_sample_sheet(tmp_path / "nope.csv")
    with pytest.raises(SampleSheetError, match="empty"):
        read_sample_sheet(_write(tmp_path, "empty.csv", ""))
    with pytest.raises(SampleSheetError, match="';'"):
        read_sample_sheet(_write(tmp_path, "semi.csv", "sample_id;patient_id\na;b\n"))


def test_absolute_paths_in_file_column(tmp_path) -> None:
    path = _cohort(tmp_path)
    target = (tmp_path / "fcs" / "P01_baseline_unstim.fcs").resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = _write(other, "samples.csv", path.read_text().replace(
        "fcs/P01_baseline_unstim.fcs", str(target)))
    with pytest.raises(SampleSheetError, match="7 file"):
        read_sample_sheet(moved)  # the relative ones are now missing, the absolute one is not


# ------------------------------------------------------------------------------ clinical


def test_read_clinical_response(tmp_path) -> None:
    path = _write(tmp_path, "clinical.csv",
                  "patient_id,response,arm,age,site\nP01,1,IL7,64,A\nP02,no,control,71,\n"
                  "P03,True,IL7,,B\n")
    clin = read_clinical(path)
    assert list(clin.index) == ["P01", "P02", "P03"] and clin.index.name == "patient_id"
    assert clin["response"].tolist() == [1, 0, 1]
    assert clin["arm"].tolist() == ["IL7", "control", "IL7"]
    assert clin["age"].iloc[0] == 64.0 and clin["site"].iloc[0] == "A"
    assert outcome_classes(clin) == {0: 1, 1: 2}


def test_single_class_is_not_an_error(tmp_path) -> None:
    clin = read_clinical(_write(tmp_path, "c.csv", "patient_id,response\nP01,1\nP02,1\n"))
    assert outcome_classes(clin) == {0: 0, 1: 2}


def test_read_clinical_survival(tmp_path) -> None:
    path = _write(tmp_path, "clinical.csv", "patient_id,time,event\nP01,12.5,1\nP02,30,0\n")
    clin = read_clinical(path, outcome="survival")
    assert clin["time"].tolist() == [12.5, 30.0] and clin["event"].tolist() == [1, 0]
    assert outcome_classes(clin) == {0: 1, 1: 1}


def test_read_clinical_other_binary_column(tmp_path) -> None:
    clin = read_clinical(_write(tmp_path, "c.csv", "patient_id,benefit\nP01,yes\nP02,no\n"),
                         outcome="benefit")
    assert clin["benefit"].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("text", "outcome", "pattern"),
    [
        ("patient_id,response\nP01,1\nP02,maybe\n", "response",
         r"clinical\.csv, row 3, column 'response': 'maybe' is not 0 \(no benefit\) or 1"),
        ("patient_id,response\nP01,2\n", "response", r"row 2, column 'response': '2'"),
        ("patient,response\nP01,1\n", "response",
         r"'patient' should probably be named 'patient_id'"),
        ("patient_id,respons\nP01,1\n", "response",
         r"'respons' should probably be named 'response'"),
        ("patient_id,response\nP01,1\nP01,0\n", "response",
         r"'patient_id' must be unique; repeated: 'P01' in rows 2, 3"),
        ("patient_id,response\nP01,1\n,0\n", "response", r"row 3, column 'patient_id'"),
        ("patient_id,response\nP01,\n", "response", r"row 2, column 'response'"),
        ("patient_id,time,event\nP01,0,1\n", "survival",
         r"row 2, column 'time': '0' is not a follow-up time > 0"),
        ("patient_id,time,event\nP01,abc,1\n", "survival", r"row 2, column 'time': 'abc'"),
        ("patient_id,time,event\nP01,5,3\n", "survival", r"row 2, column 'event': '3'"),
        ("patient_id,time\nP01,5\n", "survival", r"missing column\(s\) 'event'"),
    ],
)
def test_clinical_errors(tmp_path, text, outcome, pattern) -> None:
    path = _write(tmp_path, "clinical.csv", text)
    with pytest.raises(ClinicalError, match=pattern) as info:
        read_clinical(path, outcome=outcome)
    assert str(path) in str(info.value)


def test_read_clinical_bad_outcome_parameter(tmp_path) -> None:
    path = _write(tmp_path, "c.csv", "patient_id,response\nP01,1\n")
    with pytest.raises(ValueError, match="The 'outcome' parameter of read_clinical"):
        read_clinical(path, outcome="")


# ------------------------------------------------------------------------------ cohort


def test_check_cohort_complete_and_clinical_only_patients_ignored(tmp_path) -> None:
    sheet = read_sample_sheet(_cohort(tmp_path))
    clin = read_clinical(_write(tmp_path, "c.csv", "patient_id,response\nP01,1\nP02,0\nP99,1\n"))
    check_cohort(sheet, clin, timepoints=TPS, conditions=CONDS)
    check_cohort(sheet, clin)  # labels taken from the sheet


def test_check_cohort_lists_gaps(tmp_path) -> None:
    path = _cohort(tmp_path, patients=("P01", "P02", "P03"))
    lines = [ln for ln in path.read_text().splitlines()
             if not ln.startswith(("P02_week6_stim", "P03_baseline"))]
    path.write_text("\n".join(lines) + "\n")
    sheet = read_sample_sheet(path)
    clin = read_clinical(_write(tmp_path, "c.csv", "patient_id,response\nP01,1\nP02,0\nP03,1\n"))
    with pytest.raises(SampleSheetError, match=r"incomplete patients \(2\): P02: missing "
                       r"week6/stim, P03: missing baseline/unstim, baseline/stim"):
        check_cohort(sheet, clin, timepoints=TPS, conditions=CONDS)


def test_check_cohort_patients_without_clinical_rows(tmp_path) -> None:
    sheet = read_sample_sheet(_cohort(tmp_path))
    clin = read_clinical(_write(tmp_path, "c.csv", "patient_id,response\nP01,1\nP2,0\n"))
    with pytest.raises(ClinicalError, match=r"no row for patient\(s\) P02 of .*samples\.csv "
                       r"\(.*c\.csv has patient\(s\) without samples: P2"):
        check_cohort(sheet, clin, timepoints=TPS, conditions=CONDS)
