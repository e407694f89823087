"""FCS reading: real PBMC8 files, crafted layouts, and hostile files."""

from __future__ import annotations

import os
import tracemalloc
import warnings
from pathlib import Path

import flowio
import numpy as np
import pytest

from predictor.errors import FCSError
from predictor.features.cohort import spread_rows
from predictor.io.fcs import (
    FCSQuirkWarning,
    channel_major,
    read_channels,
    read_fcs,
    read_fcs_header,
    will_need,
    write_fcs,
)

try:
    from tests.fcs_factory import build_fcs, write_bytes
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from fcs_factory import build_fcs, write_bytes

PBMC8 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc8"
PBMC8_FILES = sorted(PBMC8.glob("*.fcs"))
needs_pbmc8 = pytest.mark.skipif(
    len(PBMC8_FILES) != 16, reason=f"PBMC8 files not found in {PBMC8} (../shared beside the repo)"
)
TYPE_MARKERS = ["CD3", "CD45", "CD4", "CD20", "CD33", "CD123", "CD14", "IgM", "HLA-DR", "CD7"]
STATE_MARKERS = ["pNFkB", "pp38", "pStat5", "pAkt", "pStat1", "pSHP2", "pZap70", "pStat3",
                 "pSlp76", "pBtk", "pPlcg2", "pErk", "pLat", "pS6"]


def _events(n: int = 50, p: int = 4, *, integer: bool = False, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if integer:
        return rng.integers(0, 1000, size=(n, p)).astype(np.float64)
    return (rng.gamma(1.0, 20.0, size=(n, p)) - 1.0).astype(np.float32)


def _read_quiet(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSQuirkWarning)
        return read_fcs(path)


# ------------------------------------------------------------------------------ real files


@needs_pbmc8
@pytest.mark.parametrize("path", PBMC8_FILES, ids=lambda p: p.stem.removeprefix("PBMC8_30min_"))
def test_pbmc8_files_read_with_markers_and_counts(path: Path) -> None:
    with pytest.warns(FCSQuirkWarning, match=path.name) as record:
        sample = read_fcs(path)
    assert len(record) == 1
    assert sample.events.dtype == np.float32 and sample.events.flags.c_contiguous
    assert sample.events.shape == (int(sample.text["tot"]), 35)
    assert sample.n_events == read_fcs_header(path).n_events
    assert 2739 <= sample.n_events <= 16725
    assert sample.version == "3.0"
    assert set(TYPE_MARKERS + STATE_MARKERS) <= set(sample.pns)
    assert {"DNA-1", "DNA-2", "Time", "Cell_length"} <= set(sample.pns)
    assert "CD3(110:114)Dd" in sample.pnn
    assert any("off by one" in q for q in sample.quirks)
    assert np.isfinite(sample.events).all()


@needs_pbmc8
def test_pbmc8_values_match_flowio() -> None:
    path = PBMC8_FILES[0]
    sample = _read_quiet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = flowio.FlowData(str(path), ignore_offset_error=True)
    ref = np.asarray(fd.events, dtype=np.float32).reshape(-1, fd.channel_count)
    np.testing.assert_array_equal(sample.events, ref)
    assert sample.pnn == [fd.channels[i + 1]["pnn"] for i in range(fd.channel_count)]


@needs_pbmc8
def test_pbmc8_header_only_is_fast_and_consistent() -> None:
    header = read_fcs_header(PBMC8_FILES[0])
    assert header.byteorder == ">" and header.datatype == "F"
    assert header.n_channels == 35 and header.pns[2] == "CD3"
    assert header.data_bytes == header.n_events * 35 * 4


# ------------------------------------------------------------------------------ layouts


def test_write_read_round_trip(tmp_path: Path) -> None:
    ev = _events(200, 5)
    pnn = ["Time", "Event_length", "Ir191Di", "Nd142Di", "Pt195Di"]
    pns = ["", "", "191Ir_DNA1", "142Nd_CD19", "cisplatin"]
    path = write_fcs(tmp_path / "rt.fcs", ev, pnn, pns, metadata={"$FIL": "rt.fcs"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = read_fcs(path)
    np.testing.assert_array_equal(sample.events, ev)
    assert sample.pnn == pnn and sample.pns == pns
    assert sample.quirks == [] and sample.version == "3.1"
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(FCSError, match="shape"):
        write_fcs(tmp_path / "bad.fcs", np.zeros((3, 2)), ["a", "b", "c"])
    assert not (tmp_path / "bad.fcs").exists()


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(
    ("datatype", "bits"), [("F", None), ("D", None), ("I", [8] * 4), ("I", [16] * 4),
                           ("I", [32] * 4), ("I", [8, 16, 32, 16])],
)
def test_datatypes_and_byte_orders(tmp_path, datatype, bits, byteorder) -> None:
    ev = _events(64, 4, integer=datatype == "I")
    if bits and 8 in bits:
        ev = np.minimum(ev, 255)
    content = build_fcs(ev, datatype=datatype, byteorder=byteorder, bits=bits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = read_fcs(write_bytes(tmp_path, "x.fcs", content))
    assert sample.events.dtype == np.float32
    np.testing.assert_array_equal(sample.events, ev.astype(np.float32))
    assert sample.pns == ["M1", "M2", "M3", "M4"]


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(("datatype", "bits"), [("F", None), ("D", None), ("I", [16] * 4),
                                                ("I", [8, 16, 32, 16])])
@pytest.mark.parametrize("max_runs", [1024, 2])  # run by run; scattered (memory map)
def test_reading_a_subset_of_rows(tmp_path, monkeypatch, datatype, bits, byteorder,
                                  max_runs) -> None:
    """rows= decodes just those events, equal to the full read's rows."""
    monkeypatch.setattr("predictor.io.fcs._MAX_ROW_RUNS", max_runs)
    ev = np.minimum(_events(500, 4, integer=datatype == "I"), 255)
    path = write_bytes(tmp_path, "r.fcs",
                       build_fcs(ev, datatype=datatype, byteorder=byteorder, bits=bits,
                                 ranges=[200] * 4 if datatype == "I" else None))
    full = read_fcs(path).events
    rows = np.array([0, 3, 4, 250, 499])
    part = read_fcs(path, rows=rows).events
    assert part.dtype == np.float32 and part.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(part, full[rows])
    for other in (np.arange(100, 400), np.r_[7:90, 91:95, 300:500], np.array([5, 2, 2, 499])):
        np.testing.assert_array_equal(read_fcs(path, rows=other).events, full[other])
    assert read_fcs(path, rows=np.array([], dtype=int)).events.shape == (0, 4)
    with pytest.raises(ValueError, match=r"'rows' parameter of read_fcs .* \[0, 500\)"):
        read_fcs(path, rows=np.array([1, 500]))
    # a header just read is used as it is, not parsed again
    header = read_fcs_header(path)
    monkeypatch.setattr("predictor.io.fcs.read_fcs_header", None)  # would fail if called
    np.testing.assert_array_equal(read_fcs(path, rows=rows, header=header).events, part)


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(("datatype", "bits"), [("F", None), ("D", None), ("I", [16] * 4),
                                                ("I", [8, 16, 32, 16])])
def test_read_channels_equals_the_full_read_transposed(tmp_path, datatype, bits, byteorder) -> None:
    """Channel-major reading (streamed in chunks for float32) gives read_fcs's numbers."""
    n = 2 * 4096 + 517  # two whole chunks and a part, in blocks of 512 and a remainder
    ev = np.minimum(_events(n, 4, integer=datatype == "I"), 255)
    path = write_bytes(tmp_path, "c.fcs",
                       build_fcs(ev, datatype=datatype, byteorder=byteorder, bits=bits,
                                 ranges=[200] * 4 if datatype == "I" else None))
    full = read_fcs(path).events
    for cols in ([0, 1, 2, 3], [2, 0, 3], [1]):
        got = read_channels(read_fcs_header(path), cols)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == (len(cols), n)
        np.testing.assert_array_equal(got, full[:, cols].T)
        np.testing.assert_array_equal(got, channel_major(full, cols))


def test_read_channels_of_a_file_cut_short_is_a_clear_error(tmp_path) -> None:
    content = build_fcs(_events(5000, 3))
    path = write_bytes(tmp_path, "cut.fcs", content)
    header = read_fcs_header(path)  # the layout is read while the file is whole
    path.write_bytes(content[: len(content) - 4000])
    with pytest.raises(FCSError, match="ended while reading its events"):
        read_channels(header, [0, 1, 2])


@pytest.mark.skipif(not PBMC8_FILES, reason=f"PBMC8 files not found in {PBMC8}")
def test_pbmc8_read_channels_matches_the_full_read() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSQuirkWarning)  # the known off-by-one offsets
        full = read_fcs(PBMC8_FILES[0]).events
    cols = list(range(full.shape[1]))[::-1]
    np.testing.assert_array_equal(read_channels(read_fcs_header(PBMC8_FILES[0]), cols),
                                  full[:, cols].T)


@pytest.mark.parametrize("version", ["2.0", "3.0", "3.1", "3.2"])
def test_versions(tmp_path, version) -> None:
    ev = _events(10, 3)
    kw = {"$MODE": None} if version == "3.2" else None
    sample = read_fcs(write_bytes(tmp_path, "v.fcs", build_fcs(ev, version=version, keywords=kw)))
    assert sample.version == version
    np.testing.assert_array_equal(sample.events, ev)


def test_fcs2_without_tot_derives_it(tmp_path) -> None:
    ev = _events(12, 3)
    content = build_fcs(ev, version="2.0", keywords={"$TOT": None})
    sample, message = _quirky(tmp_path, "v2.fcs", content)
    np.testing.assert_array_equal(sample.events, ev)
    assert "$TOT missing" in message


@pytest.mark.parametrize(("bits", "rng", "mask"), [(16, 1024, 1023), (16, 1000, 1023), (32, 2**20, 2**20 - 1)])
def test_integer_range_bit_mask(tmp_path, bits, rng, mask) -> None:
    ev = np.array([[5, 1023 + 4096], [65535 if bits == 16 else 2**31, 17]], dtype=np.float64)
    for order in "<>":
        for widths in ([bits, bits], [8, bits]):
            data = np.minimum(ev, 255) if widths[0] == 8 else ev
            content = build_fcs(data, datatype="I", bits=widths, byteorder=order, ranges=[rng, rng])
            sample = read_fcs(write_bytes(tmp_path, "m.fcs", content))
            expected = data.astype(np.int64)
            expected[:, 1] &= mask
            if widths[0] != 8:
                expected[:, 0] &= mask
            np.testing.assert_array_equal(sample.events, expected.astype(np.float32))


def test_memory_stays_near_the_event_bytes(tmp_path) -> None:
    ev = _events(100_000, 10)
    for order in "<>":
        path = write_bytes(tmp_path, f"big{order == '>'}.fcs", build_fcs(ev, byteorder=order))
        tracemalloc.start()
        try:
            sample = read_fcs(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= 1.3 * ev.nbytes, f"peak {peak / ev.nbytes:.2f}x the event bytes"
        np.testing.assert_array_equal(sample.events, ev)


# ------------------------------------------------------------------------------ quirks


def _quirky(tmp_path: Path, name: str, content: bytes) -> tuple:
    path = write_bytes(tmp_path, name, content)
    with pytest.warns(FCSQuirkWarning, match=name) as record:
        sample = read_fcs(path)
    assert len(record) == 1
    return sample, str(record[0].message)


def test_off_by_one_data_end_is_read_with_a_warning(tmp_path) -> None:
    ev = _events()
    sample, message = _quirky(tmp_path, "obo.fcs", build_fcs(ev, data_end_shift=1))
    np.testing.assert_array_equal(sample.events, ev)
    assert "off by one" in message and sample.quirks


def test_several_data_sets_reads_the_first(tmp_path) -> None:
    ev = _events()
    second = build_fcs(_events(seed=1))
    content = build_fcs(ev, keywords={"$NEXTDATA": "99999"}, trailer=second)
    sample, message = _quirky(tmp_path, "multi.fcs", content)
    np.testing.assert_array_equal(sample.events, ev)
    assert "several data sets" in message


def test_missing_pns_is_empty(tmp_path) -> None:
    ev = _events(p=3)
    path = write_bytes(tmp_path, "pns.fcs", build_fcs(ev, pns=["CD3", None, ""]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = read_fcs(path)
    assert sample.pns == ["CD3", "", ""]


def test_zero_header_offsets_use_text(tmp_path) -> None:
    ev = _events()
    probe = build_fcs(ev)
    t1 = int(probe[18:26])
    content = build_fcs(ev, header_offsets=(256, t1, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = read_fcs(write_bytes(tmp_path, "big.fcs", content))
    np.testing.assert_array_equal(sample.events, ev)


def test_header_text_disagreement_uses_the_consistent_one(tmp_path) -> None:
    ev = _events()
    probe = build_fcs(ev)
    t1, d0, d1 = int(probe[18:26]), int(probe[26:34]), int(probe[34:42])
    content = build_fcs(ev, header_offsets=(256, t1, d0 + 8, d1 + 8))
    sample, message = _quirky(tmp_path, "disagree.fcs", content)
    np.testing.assert_array_equal(sample.events, ev)
    assert "disagree" in message


def test_doubled_delimiter_empty_values(tmp_path) -> None:
    ev = _events(p=2)
    content = build_fcs(ev, pns=["CD3", None], keywords={"$P2S": ""})
    content = content.replace(b"/$P2S//", b"/$P2S//")  # already an empty (doubled) value
    assert b"$P2S//" in content
    sample, message = _quirky(tmp_path, "empty.fcs", content)
    assert sample.pns == ["CD3", ""]
    assert "doubled delimiters" in message


def test_escaped_delimiter_in_a_value(tmp_path) -> None:
    ev = _events(p=2)
    sample = read_fcs(write_bytes(tmp_path, "esc.fcs", build_fcs(ev, pns=["CD3/CD28", "x"])))
    assert sample.pns == ["CD3/CD28", "x"]


def test_latin1_text_is_decoded(tmp_path) -> None:
    ev = _events(p=2)
    content = build_fcs(ev, pns=["CD3", "x"], keywords={"$COM": "50 µm"}, encoding="latin-1")
    sample, message = _quirky(tmp_path, "latin.fcs", content)
    assert sample.text["com"] == "50 µm" and "Latin-1" in message


@pytest.mark.parametrize("delim", ["|", "\\", "*", "\x0c"])
def test_other_delimiters(tmp_path, delim) -> None:
    ev = _events(p=2)
    sample = read_fcs(write_bytes(tmp_path, "d.fcs", build_fcs(ev, delim=delim)))
    np.testing.assert_array_equal(sample.events, ev)


# ------------------------------------------------------------------------------ hostile files


def _valid(p: int = 4, n: int = 50) -> bytes:
    return build_fcs(_events(n, p))


def _corrupt_text(content: bytes, old: bytes, new: bytes) -> bytes:
    assert old in content
    return content.replace(old, new, 1)


def _hostile_cases() -> dict[str, bytes]:
    ok = _valid()
    t1 = int(ok[18:26])
    rng = np.random.default_rng(7)
    garbage = rng.integers(128, 256, size=t1 - 255, dtype=np.uint8).tobytes()
    ascii_garbage = rng.integers(0, 32, size=t1 - 255, dtype=np.uint8).tobytes()
    return {
        "empty": b"",
        "short_header": ok[:30],
        "wrong_magic": b"XYZ3.0" + ok[6:],
        "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 200,
        "unknown_version": b"FCS9.9" + ok[6:],
        "header_not_numbers": ok[:10] + b"    abcd" + ok[18:],
        "truncated_in_text": ok[: t1 - 20],
        "truncated_in_data": ok[:-100],
        "offsets_past_end": build_fcs(_events(), header_data=(10**7, 10**7 + 799),
                                      text_offsets=False),
        "absurd_tot": build_fcs(_events(), keywords={"$TOT": "1000000000000"}),
        "negative_tot": build_fcs(_events(), keywords={"$TOT": "-5"}),
        "tot_mismatch_same_length": _corrupt_text(ok, b"$TOT/50/", b"$TOT/99/"),
        "garbage_text": ok[:256] + garbage + ok[t1 + 1 :],
        "control_char_text": ok[:256] + ascii_garbage + ok[t1 + 1 :],
        "unterminated_text": ok[:256] + ok[256:t1] + b"X" + ok[t1 + 1 :],
        "zero_events": build_fcs(np.zeros((0, 4), dtype=np.float32)),
        "missing_par": build_fcs(_events(), keywords={"$PAR": None}),
        "missing_datatype": build_fcs(_events(), keywords={"$DATATYPE": None}),
        "missing_tot": build_fcs(_events(), keywords={"$TOT": None}),
        "absurd_par": build_fcs(_events(), keywords={"$PAR": "100000000"}),
        "par_not_number": build_fcs(_events(), keywords={"$PAR": "four"}),
        "mode_histogram": build_fcs(_events(), keywords={"$MODE": "C"}),
        "ascii_data": build_fcs(_events(), keywords={"$DATATYPE": "A"}),
        "mixed_byteorder": build_fcs(_events(), keywords={"$BYTEORD": "3,4,1,2"}),
        "missing_pnb": build_fcs(_events(), keywords={"$P2B": None}),
        "float_with_16_bits": build_fcs(_events(), keywords={"$P2B": "16"}),
        "odd_integer_bits": build_fcs(_events(integer=True), datatype="I", bits=[16] * 4,
                                      keywords={"$P1B": "10"}),
        "data_segment_too_short": build_fcs(_events(), data_end_shift=-40),
        "no_data_offsets": build_fcs(_events(), header_data=(0, 0), text_offsets=False),
        "text_offsets_inverted": ok[:10] + f"{900:>8}{300:>8}".encode() + ok[26:],
    }


HOSTILE = _hostile_cases()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_raise_fcserror_naming_the_file(tmp_path, case) -> None:
    name = f"hostile_{case}.fcs"
    path = write_bytes(tmp_path, name, HOSTILE[case])
    tracemalloc.start()
    try:
        with pytest.raises(FCSError, match=name) as info:
            read_fcs(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * max(len(HOSTILE[case]), 10_000)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    with pytest.raises(FCSError, match=name):
        read_fcs_header(path)  # the header read catches the same problems (all before the data)


@pytest.mark.timeout(10)
def test_hostile_messages_say_what_is_wrong(tmp_path) -> None:
    expectations = {
        "absurd_tot": "truncated or \\$TOT is wrong",
        "zero_events": "has no events",
        "missing_par": "\\$PAR is missing",
        "missing_datatype": "\\$DATATYPE is missing",
        "mode_histogram": "only list mode",
        "wrong_magic": "not an FCS file",
        "truncated_in_data": "truncated",
        "garbage_text": "TEXT segment",
        "unterminated_text": "unterminated",
        "offsets_past_end": "file has",
    }
    for case, pattern in expectations.items():
        path = write_bytes(tmp_path, f"{case}.fcs", HOSTILE[case])
        with pytest.raises(FCSError, match=pattern):
            read_fcs(path)


def test_missing_file_and_folder(tmp_path) -> None:
    with pytest.raises(FCSError, match="not found"):
        read_fcs(tmp_path / "nope.fcs")
    with pytest.raises(FCSError, match="folder"):
        read_fcs(tmp_path)


@pytest.mark.skipif(not PBMC8_FILES, reason=f"PBMC8 files not found in {PBMC8}")
def test_pbmc8_subset_of_rows_matches_the_full_read() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSQuirkWarning)  # the known off-by-one offsets
        full = read_fcs(PBMC8_FILES[0]).events
        rows = np.sort(np.random.default_rng(0).choice(len(full), 300, replace=False))
        np.testing.assert_array_equal(read_fcs(PBMC8_FILES[0], rows=rows).events, full[rows])
        stretches = spread_rows(len(full), 2000, np.random.default_rng(0))
        np.testing.assert_array_equal(read_fcs(PBMC8_FILES[0], rows=stretches).events,
                                      full[stretches])


def test_will_need_asks_in_pieces_the_kernel_honours(monkeypatch):
    """One posix_fadvise call reads at most a few MiB ahead, so long ranges go in 4 MiB
    pieces; each range is covered exactly, in order."""
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    mib = 1 << 20
    will_need(7, [(100, 10 * mib), (0, 5), (3, 0)])
    w = os.POSIX_FADV_WILLNEED
    assert calls == [(7, 100, 4 * mib, w), (7, 100 + 4 * mib, 4 * mib, w),
                     (7, 100 + 8 * mib, 2 * mib, w), (7, 0, 5, w)]
    monkeypatch.delattr(os, "posix_fadvise")
    will_need(7, [(0, mib)])  # no such call (not Linux): nothing happens
