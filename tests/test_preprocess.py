"""Arcsinh transform and cleanup gates: synthetic events, PBMC8, the simulated cohort."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from predictor.io.fcs import FCSQuirkWarning, read_fcs
from predictor.io.panel import apply_panel, draft_panel, panel_from_frame
from predictor.preprocess import (
    THRESHOLD_KEYS,
    arcsinh,
    cleanup,
    cleanup_mask,
    kept_cells,
    qc_table,
    transform,
)

PBMC8 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc8"
PBMC8_FILES = sorted(PBMC8.glob("*.fcs"))

# ------------------------------------------------------------------------------ arcsinh


def test_arcsinh_values_and_dtype() -> None:
    x = np.array([[0.0, 5.0], [-5.0, 500.0]], dtype=np.float32)
    out = arcsinh(x, 5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.arcsinh(x / 5), rtol=1e-6)
    np.testing.assert_allclose(arcsinh(x, [5, 150])[:, 1], np.arcsinh(x[:, 1] / 150), rtol=1e-6)
    assert arcsinh(np.array([1, 2]), 1.0).dtype == np.float64  # integers become floats
    np.testing.assert_allclose(arcsinh(np.array([np.sinh(1.0) * 5]), 5.0), [1.0])


def test_arcsinh_frames_per_column_and_read_only_input() -> None:
    values = np.array([[5.0, 150.0], [0.0, 0.0]])
    values.setflags(write=False)
    df = pd.DataFrame(values, columns=["CD3", "IFNg"], index=[10, 11])
    out = arcsinh(df, {"IFNg": 150.0, "CD3": 5.0})
    assert list(out.index) == [10, 11] and list(out.columns) == ["CD3", "IFNg"]
    np.testing.assert_allclose(out.to_numpy()[0], np.arcsinh([1.0, 1.0]))
    assert df.iloc[0, 0] == 5.0  # input untouched


@pytest.mark.parametrize(
    ("cofactor", "shown"), [(-5, "-5"), (0, "0"), (0.0, "0.0"), (float("nan"), "nan"),
                            ("5", "'5'"), (None, "None"), ([5, -1], "-1")],
)
def test_arcsinh_cofactor_validation(cofactor, shown) -> None:
    message = f"The 'cofactor' parameter of arcsinh must be a float > 0. Got {shown} instead."
    with pytest.raises(ValueError) as info:
        arcsinh(np.ones((2, 2)), cofactor)
    assert str(info.value) == message


def test_arcsinh_cofactor_shape_errors() -> None:
    with pytest.raises(ValueError, match="one value per column"):
        arcsinh(np.ones((2, 3)), [5, 5])
    with pytest.raises(ValueError, match="for every column"):
        arcsinh(pd.DataFrame({"a": [1.0], "b": [2.0]}), {"a": 5.0})


def _panel(rows: list[tuple[str, str, float]] | None = None):
    rows = rows or [
        ("Time", "time", 5), ("Event_length", "event_length", 5), ("CD45", "lineage", 5),
        ("CD3", "lineage", 5), ("CD19", "lineage", 5), ("IFNg", "functional", 150),
        ("DNA1", "dna", 5), ("DNA2", "dna", 5), ("Cisplatin", "viability", 5),
        ("Bead_Ce140", "bead", 5), ("Bead_Eu151", "bead", 5), ("Bead_Lu175", "bead", 5),
    ]
    return panel_from_frame(pd.DataFrame({
        "channel": [f"ch_{m}" for m, _, _ in rows], "marker": [m for m, _, _ in rows],
        "role": [r for _, r, _ in rows], "cofactor": [c for _, _, c in rows],
    }))


def test_transform_uses_panel_cofactors_and_leaves_time_alone() -> None:
    panel = _panel()
    raw = pd.DataFrame({"Time": [100.0], "Event_length": [20.0], "CD3": [5.0], "IFNg": [150.0],
                        "DNA1": [5.0], "extra": [7.0]})
    out = transform(raw, panel)
    assert out["Time"].iloc[0] == 100 and out["Event_length"].iloc[0] == 20
    assert out["extra"].iloc[0] == 7  # unknown to the panel: unchanged
    np.testing.assert_allclose(out[["CD3", "IFNg", "DNA1"]].iloc[0], np.arcsinh(1.0), rtol=1e-6)
    assert (out.dtypes == np.float32).all()
    pd.testing.assert_frame_equal(transform(raw, panel, method="none"), raw.astype(np.float32))
    with pytest.raises(ValueError, match="The 'method' parameter of transform"):
        transform(raw, panel, method="log")


# ------------------------------------------------------------------------------ cleanup


KINDS = ("cell", "bead", "debris", "doublet", "dead", "cd45neg")


def _synthetic(n: int = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw events with known identities: 85% cells, the rest non-cells of each kind."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(len(KINDS), size=n, p=[0.85, 0.03, 0.04, 0.03, 0.03, 0.02])
    level = {  # arcsinh-scale levels per kind
        "CD45": np.where(kind == 5, 0.3, 5.0), "CD3": rng.choice([0.5, 4.5], size=n),
        "CD19": rng.choice([0.3, 4.0], size=n), "IFNg": rng.choice([0.2, 2.0], size=n),
        "DNA1": np.full(n, 5.4), "Cisplatin": np.full(n, 1.3),
        "Bead_Ce140": np.full(n, 0.1), "Bead_Eu151": np.full(n, 0.1),
        "Bead_Lu175": np.full(n, 0.1),
    }
    for b in ("Bead_Ce140", "Bead_Eu151", "Bead_Lu175"):
        level[b] = np.where(kind == 1, 6.5, level[b])
    level["DNA1"] = np.select([kind == 1, kind == 2, kind == 3], [0.3, 2.0, 5.4 + np.log(2)],
                              level["DNA1"])
    level["Cisplatin"] = np.where(kind == 4, 5.0, level["Cisplatin"])
    frame = {}
    for name, lv in level.items():
        noise = 0.08 if name == "DNA1" else 0.3
        frame[name] = 5 * np.sinh(np.maximum(lv + rng.normal(0, noise, n), 0))
    frame["DNA2"] = frame["DNA1"] * 1.8
    frame["Event_length"] = np.rint(np.where(kind == 3, rng.normal(36, 5, n),
                                             rng.normal(19, 3, n)))
    frame["Time"] = np.arange(n, dtype=float)
    return pd.DataFrame(frame).astype(np.float32), kind


def _check_accuracy(mask: np.ndarray, is_cell: np.ndarray) -> tuple[float, float]:
    removed = float((~mask[~is_cell]).mean())
    kept = float(mask[is_cell].mean())
    assert removed >= 0.90, f"only {removed:.1%} of non-cells removed"
    assert kept >= 0.95, f"only {kept:.1%} of cells kept"
    return removed, kept


def test_cleanup_synthetic_removes_non_cells() -> None:
    cells, kind = _synthetic()
    res = cleanup(cells, _panel(), min_cells=100)
    _check_accuracy(res.mask, kind == 0)
    for k in range(1, len(KINDS)):
        assert (~res.mask[kind == k]).mean() >= 0.85, KINDS[k]
    qc = res.qc
    assert qc["events_in"] == len(cells) and qc["kept"] == res.mask.sum() == len(res.cells)
    steps = [qc[k] for k in ("events_in", "after_beads", "after_singlets", "after_live",
                             "after_cd45", "kept")]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 5
    assert qc["flagged_low"] is False and 0.8 < qc["kept_fraction"] < 0.9
    assert set(res.thresholds) == set(THRESHOLD_KEYS)
    assert list(res.cells.columns) == ["CD45", "CD3", "CD19", "IFNg"]
    np.testing.assert_allclose(res.cells["IFNg"].to_numpy(),
                               np.arcsinh(cells.loc[res.mask, "IFNg"].to_numpy() / 150),
                               rtol=1e-5)


def test_cleanup_fixed_thresholds_and_min_cells() -> None:
    cells, kind = _synthetic(5000)
    res = cleanup(cells, _panel(), thresholds={"viability": 100.0, "cd45": -1.0},
                  min_cells=10**6)
    assert res.thresholds["viability"] == 100.0 and res.thresholds["cd45"] == -1.0
    assert res.mask[kind == 4].mean() > 0.9  # dead cells kept: gate disabled
    assert res.mask[kind == 5].mean() > 0.9
    assert res.qc["flagged_low"] is True
    with pytest.raises(ValueError, match="Did you mean 'viability'"):
        cleanup(cells, _panel(), thresholds={"viabilty": 3.0})
    with pytest.raises(ValueError, match="finite number"):
        cleanup(cells, _panel(), thresholds={"bead": "high"})
    with pytest.raises(ValueError, match="'min_cells'"):
        cleanup(cells, _panel(), min_cells=-1)


def test_cleanup_skips_steps_without_channels() -> None:
    cells, _ = _synthetic(3000)
    panel = _panel([("CD3", "lineage", 5), ("CD19", "lineage", 5), ("IFNg", "functional", 5)])
    res = cleanup(cells[["CD3", "CD19", "IFNg"]], panel)
    assert res.mask.all() and res.thresholds == {}
    assert res.qc["kept_fraction"] == 1.0


def test_cleanup_tiny_and_empty_samples() -> None:
    cells, _ = _synthetic(5)
    res = cleanup(cells, _panel())
    assert res.mask.shape == (5,)
    res = cleanup(cells.iloc[:0], _panel())
    assert res.qc["kept"] == 0 and res.qc["kept_fraction"] == 0.0 and len(res.cells) == 0


def test_qc_table() -> None:
    cells, _ = _synthetic(4000)
    table = qc_table({"s1": cleanup(cells, _panel()), "s2": cleanup(cells.iloc[:2000], _panel())})
    assert list(table["sample_id"]) == ["s1", "s2"]
    assert table.loc[0, "events_in"] == 4000 and "threshold_dna_low" in table.columns


@pytest.mark.skipif(len(PBMC8_FILES) != 16, reason=f"PBMC8 files not found in {PBMC8}")
def test_cleanup_keeps_most_of_the_already_clean_pbmc8() -> None:
    results = {}
    for path in PBMC8_FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FCSQuirkWarning)
            sample = read_fcs(path)
        panel = draft_panel(sample)
        results[path.stem] = cleanup(apply_panel(sample, panel), panel)
    table = qc_table(results)
    assert (table["kept_fraction"] >= 0.90).all(), table[["sample_id", "kept_fraction"]]
    assert table["threshold_bead"].isna().all() and table["threshold_viability"].isna().all()
    assert table["threshold_cd45"].notna().all()


# ------------------------------------------------------------------------------ simulated


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    simulate = pytest.importorskip("predictor.simulate")
    out = tmp_path_factory.mktemp("sim") / "cohort"
    simulate.simulate_cohort(out, n_patients=4, seed=3, cells_per_sample=4000)
    return out


@pytest.mark.slow
def test_cleanup_on_the_simulated_cohort(simulated) -> None:
    from predictor.io.panel import read_panel
    from predictor.io.samplesheet import read_sample_sheet

    panel = read_panel(simulated / "panel.csv")
    sheet = read_sample_sheet(simulated / "samples.csv")
    truth = json.loads((simulated / "truth.json").read_text())
    non_cell = [p["code"] for p in truth["populations"] if p["major"] == "non-cell"]
    masks, labels = [], []
    for row in sheet.itertuples():
        res = cleanup(apply_panel(read_fcs(row.path), panel), panel)
        masks.append(res.mask)
        labels.append(np.load(simulated / "labels" / f"{row.sample_id}.npy"))
    mask, label = np.concatenate(masks), np.concatenate(labels)
    assert mask.shape == label.shape
    _check_accuracy(mask, ~np.isin(label, non_cell))


def test_cleanup_raw_cells_and_mask_agree_with_transformed() -> None:
    cells, _ = _synthetic(4000, seed=3)
    res = cleanup(cells, _panel())
    raw = cleanup(cells, _panel(), transformed=False)
    np.testing.assert_array_equal(raw.mask, res.mask)
    np.testing.assert_array_equal(raw.cells["IFNg"].to_numpy(),
                                  cells.loc[res.mask, "IFNg"].to_numpy())
    keep, qc, thresholds = cleanup_mask(cells, _panel())
    np.testing.assert_array_equal(keep, res.mask)
    assert qc == res.qc and thresholds == res.thresholds
    # Given its own thresholds back, cleanup keeps the same events (pass 2 of features).
    again = cleanup(cells, _panel(), thresholds=res.thresholds)
    np.testing.assert_array_equal(again.mask, res.mask)
    # kept_cells on a subset of the mask gathers just those rows.
    some = res.mask & (np.arange(len(cells)) % 3 == 0)
    sub = kept_cells(cells, _panel(), some)
    np.testing.assert_allclose(sub["CD3"].to_numpy(),
                               np.arcsinh(cells.loc[some, "CD3"].to_numpy() / 5), rtol=1e-6)
    # Transformed in place, it equals transform() of the raw rows, bit for bit.
    raw_sub = kept_cells(cells, _panel(), some, transformed=False)
    pd.testing.assert_frame_equal(sub, transform(raw_sub, _panel()))
    assert sub.dtypes.eq(np.float32).all() and list(sub.columns) == list(raw_sub.columns)


@pytest.mark.parametrize("seed", [0, 1])
def test_density_matches_numpy_quantile_and_histogram(seed) -> None:
    from predictor.preprocess import _density

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(1, 0.3, 5000), rng.normal(4, 0.5, 2000), [np.nan, np.inf]])
    x = x.astype(np.float32)
    d = _density(x, smooth=0.0 + 1e-9)
    finite = x[np.isfinite(x)]
    lo, hi = np.quantile(finite, [0.001, 0.999])
    counts, edges = np.histogram(finite, bins=np.linspace(lo, hi, 257))
    np.testing.assert_allclose(d.centers, (edges[:-1] + edges[1:]) / 2, rtol=1e-12)
    np.testing.assert_allclose(d.values, counts, atol=1e-6)  # smoothing ~off


@pytest.mark.parametrize("n_channels", [1, 2, 3, 5])
def test_bead_score_is_the_second_lowest_channel(n_channels) -> None:
    from predictor.preprocess import _bead_score

    values = np.random.default_rng(n_channels).normal(size=(500, n_channels)).astype(np.float32)
    k = 1 if n_channels >= 3 else 0
    np.testing.assert_array_equal(_bead_score(values), np.partition(values, k, axis=1)[:, k])
