"""``inspect_files`` / ``format_report`` and the ``predictor inspect`` and ``panel`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from predictor.cli import main
from predictor.inspect import FileReport, format_report, inspect_files
from predictor.io.fcs import write_fcs
from predictor.io.panel import read_panel

PBMC8_FILE = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc8"
              / "PBMC8_30min_patient1_BCR-XL.fcs")


@pytest.fixture
def good(tmp_path) -> Path:
    return write_fcs(tmp_path / "good.fcs", np.ones((7, 3)), ["Time", "Nd142Di", "Ir191Di"],
                     ["", "142Nd_CD19", "191Ir_DNA1"])


@pytest.fixture
def bad(tmp_path) -> Path:
    path = tmp_path / "bad.fcs"
    path.write_bytes(b"FCS3.0    garbage")
    return path


def test_inspect_files_reports_good_and_bad(good, bad) -> None:
    reports = inspect_files([good, bad, good.with_name("missing.fcs")])
    assert [r.ok for r in reports] == [True, False, False]
    ok = reports[0]
    assert (ok.version, ok.n_events, ok.n_channels) == ("3.1", 7, 3)
    assert ok.channels[1] == ("Nd142Di", "142Nd_CD19") and ok.quirks == [] and ok.error == ""
    assert "bad.fcs" in reports[1].error and "\n" not in reports[1].error
    assert "not found" in reports[2].error


def test_format_report(good, bad) -> None:
    text = format_report(inspect_files([good]))
    assert "FCS 3.1, 7 events, 3 channels" in text and "Nd142Di" in text and "142Nd_CD19" in text
    assert "quirks" not in text
    text = format_report(FileReport(path=bad, ok=False, error="broken"))
    assert text == f"{bad}\n  ERROR: broken"


@pytest.mark.skipif(not PBMC8_FILE.is_file(), reason="PBMC8 files not found beside the repo")
def test_inspect_pbmc8_shows_quirks() -> None:
    (report,) = inspect_files([PBMC8_FILE])
    assert report.ok and report.n_channels == 35 and report.n_events == 2838
    text = format_report(report)
    assert "quirks:" in text and "off by one" in text and "CD3(110:114)Dd" in text


# ------------------------------------------------------------------------------ CLI


def test_cli_inspect(good, bad, capsys) -> None:
    assert main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "7 events" in out and "142Nd_CD19" in out
    assert main(["inspect", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "7 events" in captured.out and "ERROR" in captured.out  # the good one still reported
    assert "1 of 2 file(s) could not be read: bad.fcs" in captured.err


def test_cli_panel(good, tmp_path, capsys) -> None:
    out = tmp_path / "panel.csv"
    assert main(["panel", str(good), "--out", str(out)]) == 0
    panel = read_panel(out)
    assert panel.markers == ["Time", "CD19", "DNA1"]
    assert list(panel.table["role"]) == ["time", "lineage", "dna"]
    assert "Drafted a panel of 3 channels" in capsys.readouterr().out
    out.write_text("keep me")
    assert main(["panel", str(good), "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["panel", str(good), "--out", str(out), "--force"]) == 0
    assert read_panel(out).markers == ["Time", "CD19", "DNA1"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_panel_bad_file(bad, tmp_path, capsys) -> None:
    out = tmp_path / "panel.csv"
    assert main(["panel", str(bad), "--out", str(out)]) == 2
    assert "bad.fcs" in capsys.readouterr().err and not out.exists()
