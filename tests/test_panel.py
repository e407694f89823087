"""Panels: reading, validation, drafting from files, applying to files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from predictor.errors import PanelError
from predictor.io.fcs import FCSData, FCSQuirkWarning, read_fcs, write_fcs
from predictor.io.panel import (
    apply_panel,
    draft_panel,
    normalize_marker,
    panel_from_frame,
    parse_channel,
    read_panel,
    read_panel_events,
)

PBMC8 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc8"
PBMC8_FILE = PBMC8 / "PBMC8_30min_patient1_BCR-XL.fcs"
needs_pbmc8 = pytest.mark.skipif(not PBMC8_FILE.is_file(),
                                 reason=f"PBMC8 files not found in {PBMC8}")


def _csv(tmp_path: Path, text: str, name: str = "panel.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _sample(pnn: list[str], pns: list[str] | None = None, n: int = 10) -> FCSData:
    ev = np.arange(n * len(pnn), dtype=np.float32).reshape(n, len(pnn))
    return FCSData(Path("s.fcs"), ev, pnn, pns or [""] * len(pnn), "3.1", {})


# ------------------------------------------------------------------------------ reading


def test_read_panel_any_column_order_extra_columns_and_cofactors(tmp_path) -> None:
    path = _csv(tmp_path, "role,notes,marker,channel,cofactor\n"
                          "lineage,x,CD3,Er170Di,\n"
                          "functional,,IFNg,Gd158Di,150\n"
                          "dna,,,Ir191Di,\n")
    panel = read_panel(path, default_cofactor=5.0)
    assert panel.channels == ["Er170Di", "Gd158Di", "Ir191Di"]
    assert panel.markers == ["CD3", "IFNg", "Ir191Di"]  # empty marker -> channel
    assert panel.cofactors() == {"CD3": 5.0, "IFNg": 150.0, "Ir191Di": 5.0}
    assert panel.by_role("lineage", "functional") == ["CD3", "IFNg"]
    assert panel.source == str(path)


def test_read_panel_catalyst_format(tmp_path) -> None:
    path = _csv(tmp_path, "fcs_colname,antigen,marker_class\n"
                          "Er170Di,CD3,type\nGd158Di,IFNg,state\nIr191Di,DNA1,none\n")
    panel = read_panel(path)
    assert list(panel.table["role"]) == ["lineage", "functional", "exclude"]


def test_panel_round_trip(tmp_path) -> None:
    panel = panel_from_frame(pd.DataFrame({"channel": ["a", "b"], "marker": ["CD3", "CD4"],
                                           "role": ["lineage", "lineage"]}))
    panel.to_csv(tmp_path / "p.csv")
    again = read_panel(tmp_path / "p.csv")
    pd.testing.assert_frame_equal(again.table, panel.table)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("channel,marker\na,CD3\n", r"missing column\(s\) role"),
        ("chanel,marker,role\na,CD3,lineage\n", "rename 'chanel' to 'channel'"),
        ("channel,marker,role\na,CD3,linage\n", r"row 2, column 'role'.*Did you mean 'lineage'"),
        ("channel,marker,role\na,CD3,lineage\n,CD4,lineage\n", r"row 3, column 'channel': empty"),
        ("channel,marker,role\na,CD3,lineage\na,CD4,lineage\n", "listed twice: a"),
        ("channel,marker,role\na,CD3,lineage\nb,CD3,lineage\n", "marker.*twice: CD3"),
        ("channel,marker,role,cofactor\na,CD3,lineage,-5\n",
         r"row 2, column 'cofactor'.*Got '-5' instead"),
        ("channel,marker,role,cofactor\na,CD3,lineage,five\n", "column 'cofactor'"),
    ],
)
def test_read_panel_errors_name_file_row_and_fix(tmp_path, text, pattern) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(PanelError, match=pattern) as info:
        read_panel(path)
    assert "panel.csv" in str(info.value)


def test_read_panel_missing_file(tmp_path) -> None:
    with pytest.raises(PanelError, match="predictor panel"):
        read_panel(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------ drafting


@pytest.mark.parametrize(
    ("name", "label", "metal"),
    [
        ("CD3(110:114)Dd", "CD3", ("Cd", 110)),
        ("pNFkB(Nd142)Dd", "pNFkB", ("Nd", 142)),
        ("Nd142Di", "", ("Nd", 142)),
        ("142Nd_CD19", "CD19", ("Nd", 142)),
        ("CD19_Nd142Di", "CD19", ("Nd", 142)),
        ("IL-17A", "IL-17A", None),
        ("Time", "Time", None),
    ],
)
def test_parse_channel(name, label, metal) -> None:
    assert parse_channel(name) == (label, metal)


def test_normalize_marker() -> None:
    assert normalize_marker("IFNγ") == normalize_marker("IFN-gamma") == "ifng"
    assert normalize_marker("HLA-DR") == normalize_marker("HLADR")


@needs_pbmc8
def test_draft_panel_from_pbmc8() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSQuirkWarning)
        sample = read_fcs(PBMC8_FILE)
    panel = draft_panel(sample)
    role = dict(zip(panel.markers, panel.table["role"], strict=True))
    assert role["CD3"] == "lineage" and role["HLA-DR"] == "lineage" and role["IgM"] == "lineage"
    assert role["pS6"] == "functional" and role["pp38"] == "functional"
    assert role["DNA-1"] == "dna" and role["DNA-2"] == "dna"
    assert role["BC1"] == "barcode" and role["BC7"] == "barcode"
    assert role["Time"] == "time" and role["Cell_length"] == "event_length"
    assert len(panel.by_role("lineage")) == 10 and len(panel.by_role("functional")) == 14
    assert set(panel.table["cofactor"]) == {5.0}
    frame = apply_panel(sample, panel)
    assert frame.shape == (sample.n_events, 35) and frame.dtypes.eq(np.float32).all()


def test_draft_panel_guesses_roles_from_decorated_names() -> None:
    pnn = ["Time", "Event_length", "Ce140Di", "Nd142Di", "Ir191Di", "Ir193Di", "Pt195Di",
           "Pd104Di", "Gd158Di", "Er168Di", "Yb173Di", "Sm152Di", "Y89Di", "Eu151Di", "Dy161Di",
           "Tb159Di"]
    pns = ["", "", "140Ce_Beads", "142Nd_CD19", "191Ir_DNA1", "193Ir_DNA2", "195Pt_Cisplatin",
           "", "158Gd_IFNg", "168Er_Ki-67", "GzmB", "TCRgd", "89Y_CD45", "", "161Dy_Foo",
           "159Tb_PD-1"]
    panel = draft_panel(_sample(pnn, pns))
    got = dict(zip(panel.channels, zip(panel.markers, panel.table["role"], strict=True),
                   strict=True))
    assert got["Ce140Di"] == ("Beads", "bead")
    assert got["Nd142Di"] == ("CD19", "lineage")
    assert got["Ir191Di"] == ("DNA1", "dna")
    assert got["Pt195Di"] == ("Cisplatin", "viability")
    assert got["Pd104Di"] == ("Pd104Di", "barcode")
    assert got["Gd158Di"] == ("IFNg", "functional")
    assert got["Er168Di"] == ("Ki-67", "functional")
    assert got["Yb173Di"] == ("GzmB", "functional")
    assert got["Sm152Di"] == ("TCRgd", "lineage")
    assert got["Y89Di"] == ("CD45", "lineage")
    assert got["Eu151Di"] == ("Eu151Di", "bead")  # unnamed bead metal
    assert got["Dy161Di"] == ("Foo", "exclude")  # unknown marker
    assert got["Tb159Di"] == ("PD-1", "functional")
    assert got["Event_length"][1] == "event_length" and got["Time"][1] == "time"


def test_draft_panel_makes_duplicate_markers_unique() -> None:
    panel = draft_panel(_sample(["Nd142Di", "Nd143Di"], ["CD3", "CD3"]))
    assert panel.markers == ["CD3 (Nd142Di)", "CD3 (Nd143Di)"]


def test_draft_panel_of_a_written_file(tmp_path) -> None:
    path = write_fcs(tmp_path / "x.fcs", np.ones((3, 2)), ["Nd142Di", "Ir191Di"],
                     ["142Nd_CD19", "191Ir_DNA"])
    panel = draft_panel(read_fcs(path))
    assert panel.markers == ["CD19", "DNA"] and list(panel.table["role"]) == ["lineage", "dna"]


# ------------------------------------------------------------------------------ applying


def test_apply_panel_matches_channels_in_any_order() -> None:
    sample = _sample(["c", "a", "b"])
    panel = panel_from_frame(pd.DataFrame({"channel": ["a", "B ", "c"], "marker": ["A", "Bm", "C"],
                                           "role": ["lineage", "functional", "exclude"]}))
    frame = apply_panel(sample, panel)
    assert list(frame.columns) == ["A", "Bm"]
    np.testing.assert_array_equal(frame["A"], sample.events[:, 1])
    np.testing.assert_array_equal(frame["Bm"], sample.events[:, 2])  # case/space-insensitive
    assert list(apply_panel(sample, panel, roles=("functional",)).columns) == ["Bm"]


def test_apply_panel_names_file_and_missing_markers() -> None:
    panel = panel_from_frame(pd.DataFrame({"channel": ["a", "zz"], "marker": ["A", "Z"],
                                           "role": ["lineage", "lineage"]}))
    with pytest.raises(PanelError, match=r"s\.fcs: lacks the panel channel\(s\) Z \(zz\)"):
        apply_panel(_sample(["a", "b"]), panel)


@needs_pbmc8
def test_read_panel_events_equals_apply_panel_of_read_fcs(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSQuirkWarning)
        sample = read_fcs(PBMC8_FILE)
    panel = draft_panel(sample)
    frame, quirks = read_panel_events(PBMC8_FILE, panel)
    pd.testing.assert_frame_equal(frame, apply_panel(sample, panel))
    assert quirks == sample.quirks and quirks  # the known off-by-one offsets, recorded
    # channels in another order than the file's, one excluded
    table = panel.table.iloc[::-1].copy()
    table.loc[table["marker"] == "CD3", "role"] = "exclude"
    shuffled = panel_from_frame(table)
    frame, _ = read_panel_events(PBMC8_FILE, shuffled)
    pd.testing.assert_frame_equal(frame, apply_panel(sample, shuffled))
    assert "CD3" not in frame.columns
    missing = panel_from_frame(pd.concat([panel.table, pd.DataFrame(
        {"channel": ["Zz999Di"], "marker": ["CD999"], "role": ["lineage"], "cofactor": [5.0]})]))
    with pytest.raises(PanelError, match=r"lacks the panel channel\(s\) CD999 \(Zz999Di\)"):
        read_panel_events(PBMC8_FILE, missing)
