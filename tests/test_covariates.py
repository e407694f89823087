"""Clinical covariates as model inputs: encoding, its storage, the metadata flag and the errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from predictor.covariates import (
    COVARIATE_PREFIX,
    CovariateEncoder,
    covariate_mask,
    read_covariates,
)
from predictor.errors import ClinicalError, PredictorError
from predictor.features.matrix import META_COLUMNS


def _clinical(**cols) -> pd.DataFrame:
    df = pd.DataFrame(cols, index=pd.Index([f"P{i}" for i in range(len(next(iter(cols.values()))))],
                                           name="patient_id"))
    df.attrs["source"] = "clin.csv"
    return df


def test_binary_column_is_one_indicator_of_its_first_level() -> None:
    train = _clinical(arm=["observation", "IL-7", "IL-7", "observation"])
    enc = CovariateEncoder(["arm"]).fit(train)
    assert enc.features == ["clinical: arm = IL-7"]
    assert enc.specs_ == [{"column": "arm", "kind": "categorical", "levels": ["IL-7", "observation"],
                           "features": ["clinical: arm = IL-7"]}]
    X = enc.transform(train)
    assert X["clinical: arm = IL-7"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert list(X.index) == ["P0", "P1", "P2", "P3"]


def test_more_levels_are_one_hot_and_numbers_stay_numbers() -> None:
    train = _clinical(site=["B", "A", "C", "A"], age=[61, 70.5, 58, 66])
    enc = CovariateEncoder(["site", "age"]).fit(train)
    assert enc.features == ["clinical: site = A", "clinical: site = B", "clinical: site = C", "clinical: age"]
    X = enc.transform(train, ["P2", "P0"])  # the patients asked for, in that order
    assert list(X.index) == ["P2", "P0"]
    assert X.loc["P2"].tolist() == [0.0, 0.0, 1.0, 58.0]
    assert X.loc["P0"].tolist() == [0.0, 1.0, 0.0, 61.0]
    # numbers read as text (the scoring reader keeps text) encode the same
    as_text = _clinical(site=["A"], age=["70.5"])
    assert enc.transform(as_text).iloc[0].tolist() == [1.0, 0.0, 0.0, 70.5]


def test_encoding_round_trips_through_json_and_encodes_new_patients_identically() -> None:
    train = _clinical(arm=["IL-7", "observation", "IL-7"], age=[60, 70, 80])
    enc = CovariateEncoder(["arm", "age"]).fit(train)
    stored = json.loads(json.dumps(enc.to_dict()))
    again = CovariateEncoder.from_dict(stored)
    new = _clinical(arm=["observation", "observation"], age=[90, 55])  # one level only: fine
    pd.testing.assert_frame_equal(again.transform(new), enc.transform(new))
    assert again.features == enc.features and again.columns == ("arm", "age")
    with pytest.raises(ValueError, match="malformed"):
        CovariateEncoder.from_dict([{"column": "arm", "kind": "categorical", "levels": ["x"],
                                     "features": ["clinical: arm = x"]}])
    with pytest.raises(RuntimeError, match="not fitted"):
        CovariateEncoder(["arm"]).features  # noqa: B018


def test_feature_meta_flags_the_covariates() -> None:
    enc = CovariateEncoder(["arm", "age"]).fit(_clinical(arm=["a", "b"], age=[1, 2]))
    meta = enc.feature_meta()
    assert list(meta.columns) == [*META_COLUMNS, "covariate"]
    assert meta["covariate"].tolist() == ["arm", "age"]
    assert (meta[list(META_COLUMNS)] == "").all().all()
    both = pd.concat([pd.DataFrame({"population": ["NK"]}, index=["NK | % live | unstim | baseline"]), meta])
    assert covariate_mask(both).tolist() == [False, True, True]
    assert all(f.startswith(COVARIATE_PREFIX) for f in meta.index)


def test_strata_combine_the_categorical_covariates() -> None:
    train = _clinical(arm=["x", "y", "x", "y"], sex=["f", "f", "m", "m"], age=[1, 2, 3, 4])
    enc = CovariateEncoder(["arm", "sex", "age"]).fit(train)
    strata = enc.strata(enc.transform(train))
    assert strata.nunique() == 4 and list(strata.index) == list(train.index)
    ages = enc.transform(train)[["clinical: age"]]
    assert CovariateEncoder(["age"]).fit(train).strata(ages) is None  # continuous: no strata
    coded = _clinical(arm=[0, 1, 1, 0])  # a 0/1-coded arm is a number, but still a stratum
    enc01 = CovariateEncoder(["arm"]).fit(coded)
    assert enc01.features == ["clinical: arm"]
    assert enc01.strata(enc01.transform(coded)).tolist() == ["0", "1", "1", "0"]
    dose = _clinical(dose=[0.2, 0.7, 0.7, 0.2])
    enc_dose = CovariateEncoder(["dose"]).fit(dose)
    assert enc_dose.strata(enc_dose.transform(dose)).nunique() == 2


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (_clinical(arm=["IL-7", "", "observation"]), r"clin.csv, column 'arm': no value for patient\(s\) P1"),
        (_clinical(arm=["IL-7", float("nan"), "x"]), r"no value for patient\(s\) P1"),
        (_clinical(arm=["IL-7", "IL-7"]), r"column 'arm': every patient has the value 'IL-7'"),
        (_clinical(age=[60, 61]), r"no column 'arm', which \[model\] covariates lists. Columns: age"),
    ],
)
def test_fit_errors_name_file_column_and_patients(train, message) -> None:
    with pytest.raises(ClinicalError, match=message):
        CovariateEncoder(["arm"]).fit(train)


def test_transform_errors_name_file_column_and_patients() -> None:
    enc = CovariateEncoder(["arm", "age"]).fit(_clinical(arm=["IL-7", "observation"], age=[60, 70]))
    with pytest.raises(ClinicalError, match=r"new.csv, column 'arm': 'placebo' \(patient P1\) is not a "
                                            r"level the model was trained with \(IL-7, observation\)"):
        enc.transform(_clinical(arm=["IL-7", "placebo"], age=[1, 2]), source="new.csv")
    with pytest.raises(ClinicalError, match=r"new.csv, column 'age': no value for patient\(s\) P0"):
        enc.transform(_clinical(arm=["IL-7"], age=[""]), source="new.csv")
    with pytest.raises(ClinicalError, match=r"column 'age', patient P0: 'old' is not a number"):
        enc.transform(_clinical(arm=["IL-7"], age=["old"]), source="new.csv")
    with pytest.raises(ClinicalError, match=r"new.csv: no row for patient\(s\) N9"):
        enc.transform(_clinical(arm=["IL-7"], age=[1]), ["P0", "N9"], source="new.csv")
    with pytest.raises(ClinicalError, match=r"new.csv: no column 'age'"):
        enc.transform(_clinical(arm=["IL-7"]), source="new.csv")
    assert issubclass(ClinicalError, PredictorError) and ClinicalError.exit_code == 2


def test_read_covariates_needs_no_outcome(tmp_path) -> None:
    path = tmp_path / "new.csv"
    path.write_text("patient_id,arm,age\nN1,IL-7,60\nN2,observation,\n", encoding="utf-8")
    table = read_covariates(path, ["arm", "age"])
    assert list(table.index) == ["N1", "N2"] and table.loc["N2", "age"] == ""
    assert table.attrs["source"] == str(path)
    enc = CovariateEncoder(["arm"]).fit(_clinical(arm=["IL-7", "observation"]))
    assert enc.transform(table, source=path)["clinical: arm = IL-7"].tolist() == [1.0, 0.0]
    with pytest.raises(ClinicalError, match="'sex'"):
        read_covariates(path, ["sex"])
    with pytest.raises(ClinicalError, match="not found"):
        read_covariates(tmp_path / "nope.csv", ["arm"])
    dup = tmp_path / "dup.csv"
    dup.write_text("patient_id,arm\nN1,IL-7\nN1,observation\n", encoding="utf-8")
    with pytest.raises(ClinicalError, match="must be unique"):
        read_covariates(dup, ["arm"])
    assert np.isfinite(enc.transform(table, ["N1"]).to_numpy()).all()
