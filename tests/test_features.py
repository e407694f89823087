"""Per-sample statistics, the patient × feature matrix with its contrasts, FeatureSet files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from predictor.config import FeatureConfig
from predictor.errors import OutputExistsError
from predictor.features import (
    FeatureSet,
    build_matrix,
    feature_name,
    positivity_thresholds,
    reference_statistics,
    sample_statistics,
)
from predictor.features.matrix import META_COLUMNS

# ------------------------------------------------------------------------------ statistics

CELLS = pd.DataFrame(
    {
        "IFNg": [0.0, 2.0, 3.0, 4.0, 2.5, 0.5],
        "TNFa": [5.0, 0.0, 0.0, 1.0, 3.0, 3.0],
        "CD3": [9.0] * 6,
    }
)
MEMBERSHIP = pd.DataFrame({"A": [1, 1, 1, 1, 0, 0], "B": [0, 0, 0, 0, 1, 1]}).astype(bool)
POPS = pd.DataFrame(
    {
        "sample_id": "S1",
        "population": ["A", "B"],
        "parent": ["root", "A"],
        "count": [4, 2],
        "pct_parent": [66.7, 50.0],
        "pct_live": [66.7, 33.3],
    }
)
ALL_STATS = ("count", "pct_parent", "pct_live", "median", "frac_pos")


def stats(**kw) -> pd.DataFrame:
    args = {"markers": ["IFNg", "TNFa"], "statistics": ALL_STATS, "frac_pos_threshold": 2.0,
            "min_cells": 2, **kw}
    out = sample_statistics(CELLS, MEMBERSHIP, POPS, **args)
    return out.set_index(["population", "marker", "statistic"])["value"]


def test_sample_statistics_by_hand() -> None:
    v = stats()
    assert len(v) == 2 * 3 + 2 * 2 * 2
    assert v[("A", "", "count")] == 4 and v[("B", "", "count")] == 2
    assert v[("A", "", "pct_parent")] == 66.7 and v[("B", "", "pct_live")] == 33.3
    # A: IFNg 0, 2, 3, 4 → median 2.5; TNFa 5, 0, 0, 1 → 0.5
    assert v[("A", "IFNg", "median")] == 2.5 and v[("A", "TNFa", "median")] == 0.5
    # strictly above 2.0: IFNg 3, 4 (2.0 itself is not positive); TNFa 5
    assert v[("A", "IFNg", "frac_pos")] == 0.5 and v[("A", "TNFa", "frac_pos")] == 0.25
    # B: IFNg 2.5, 0.5; TNFa 3, 3
    assert v[("B", "IFNg", "median")] == 1.5 and v[("B", "TNFa", "median")] == 3.0
    assert v[("B", "IFNg", "frac_pos")] == 0.5 and v[("B", "TNFa", "frac_pos")] == 1.0
    assert ("A", "CD3", "median") not in v.index  # only the markers asked for


def test_sample_statistics_from_masks_equal_those_from_the_frame() -> None:
    masks = {name: MEMBERSHIP[name].to_numpy() for name in MEMBERSHIP.columns}
    args = {"markers": ["IFNg", "TNFa"], "statistics": ALL_STATS, "frac_pos_threshold": 2.0,
            "min_cells": 2}
    pd.testing.assert_frame_equal(sample_statistics(CELLS, masks, POPS, **args),
                                  sample_statistics(CELLS, MEMBERSHIP, POPS, **args))
    ref = {"markers": ["IFNg"], "statistics": ALL_STATS, "quantile": 0.5, "min_cells": 2}
    got, want = (reference_statistics(CELLS, m, POPS, **ref) for m in (masks, MEMBERSHIP))
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1] == want[1] == {("A", "IFNg"): 2.5, ("B", "IFNg"): 1.5}


def test_sample_statistics_per_marker_thresholds() -> None:
    v = stats(frac_pos_threshold={"IFNg": 0.5, "TNFa": 4.0})
    assert v[("A", "IFNg", "frac_pos")] == 0.75  # 2, 3, 4 > 0.5
    assert v[("A", "TNFa", "frac_pos")] == 0.25  # 5 > 4
    assert v[("B", "IFNg", "frac_pos")] == 0.5  # 2.5 > 0.5, 0.5 is not
    # a marker without a threshold has no fraction, rather than a fraction of 0
    v = stats(frac_pos_threshold={"IFNg": 0.5})
    assert v[("A", "IFNg", "frac_pos")] == 0.75
    assert np.isnan(v[("A", "TNFa", "frac_pos")]) and np.isnan(v[("B", "TNFa", "frac_pos")])
    assert v[("A", "TNFa", "median")] == 0.5


def test_sample_statistics_min_cells() -> None:
    v = stats(min_cells=3)
    assert np.isnan(v[("B", "IFNg", "median")]) and np.isnan(v[("B", "TNFa", "frac_pos")])
    assert v[("B", "", "count")] == 2 and v[("B", "", "pct_parent")] == 50.0  # still reported
    assert v[("A", "IFNg", "median")] == 2.5  # 4 cells ≥ 3
    v = stats(min_cells=4)
    assert v[("A", "IFNg", "median")] == 2.5  # exactly min_cells is enough
    assert np.isnan(stats(min_cells=5)[("A", "IFNg", "median")])


def test_sample_statistics_selects_statistics() -> None:
    v = stats(statistics=("pct_live", "frac_pos"))
    assert set(v.index.get_level_values("statistic")) == {"pct_live", "frac_pos"}
    assert len(v) == 2 + 4


def test_sample_statistics_on_raw_cells_equal_the_transformed_ones() -> None:
    """Medians and fractions positive from raw cells + cofactors: the same numbers."""
    rng = np.random.default_rng(0)
    raw = pd.DataFrame({"IFNg": rng.gamma(1.0, 20.0, 301), "TNFa": rng.gamma(2.0, 5.0, 301),
                        "CD3": rng.gamma(3.0, 30.0, 301)}).astype(np.float32)
    cof = {"IFNg": 5.0, "TNFa": 2.0, "CD3": 5.0}
    asinh = pd.DataFrame({m: np.arcsinh(raw[m].to_numpy(np.float64) / c) for m, c in cof.items()})
    member = pd.DataFrame({"A": np.arange(301) < 200, "B": np.arange(301) % 2 == 0})
    pops = POPS.assign(population=["A", "B"], parent=["root", "root"])
    args = {"markers": ["IFNg", "TNFa"], "statistics": ALL_STATS, "frac_pos_threshold": 2.0,
            "min_cells": 5}
    want = sample_statistics(asinh, member, pops, **args)
    got = sample_statistics(raw, member, pops, cofactors=cof, **args)
    pd.testing.assert_frame_equal(got, want, rtol=1e-6)
    a = asinh.loc[member["A"], "IFNg"]
    assert want.query("population == 'A' and marker == 'IFNg' and statistic == 'median'")[
        "value"].item() == pytest.approx(np.median(a), rel=1e-6)  # float32 values
    assert want.query("population == 'B' and marker == 'TNFa' and statistic == 'frac_pos'")[
        "value"].item() == pytest.approx((asinh.loc[member["B"], "TNFa"] > 2.0).mean())


def test_medians_and_fractions_positive_of_their_own_markers() -> None:
    """Medians of CD3 and IFNg, fractions positive of IFNg and TNFa: each statistic only for
    its markers, the numbers as when every marker gets both."""
    v = stats(markers=["IFNg", "TNFa", "CD3"], median_markers=["CD3", "IFNg"],
              frac_pos_markers=["IFNg", "TNFa"])
    got = {(p, m, s) for p, m, s in v.index if m}
    assert got == {(p, m, "median") for p in "AB" for m in ("IFNg", "CD3")} | {
        (p, m, "frac_pos") for p in "AB" for m in ("IFNg", "TNFa")}
    assert v[("A", "CD3", "median")] == 9.0 and v[("B", "IFNg", "median")] == 1.5
    assert v[("A", "TNFa", "frac_pos")] == 0.25
    everything = stats(markers=["IFNg", "TNFa", "CD3"])
    pd.testing.assert_series_equal(v, everything.loc[v.index])
    # rows per population: medians then fractions positive, markers in the given order
    assert list(v.loc["A"].index)[3:] == [("IFNg", "median"), ("CD3", "median"),
                                          ("IFNg", "frac_pos"), ("TNFa", "frac_pos")]
    assert len(stats(median_markers=[])) == 6 + 4  # no medians at all
    _, gates = reference_statistics(CELLS, MEMBERSHIP, POPS, markers=["IFNg", "CD3"],
                                    statistics=ALL_STATS, quantile=0.5, min_cells=2,
                                    frac_pos_markers=["IFNg"])
    assert gates == {("A", "IFNg"): 2.5, ("B", "IFNg"): 1.5}  # no gate for a median-only marker


def test_feature_markers_from_the_config_and_the_panel(tmp_path) -> None:
    from predictor.errors import FeatureError
    from predictor.features.cohort import feature_markers
    from predictor.io.panel import read_panel

    (tmp_path / "panel.csv").write_text(
        "channel,marker,role\nIr191Di,DNA1,dna\nNd142Di,CD3,lineage\nNd143Di,IFNg,functional\n"
        "Nd144Di,CD8,lineage\nNd145Di,TNFa,functional\n")
    panel = read_panel(tmp_path / "panel.csv")

    def pick(*names):
        return feature_markers(panel, FeatureConfig(median_markers=names))

    assert pick("functional") == (["IFNg", "TNFa"], ["IFNg", "TNFa"])
    assert pick("lineage", "functional") == (["CD3", "IFNg", "CD8", "TNFa"], ["IFNg", "TNFa"])
    assert pick("CD8", "IFNg") == (["IFNg", "CD8"], ["IFNg", "TNFa"])  # panel order
    with pytest.raises(FeatureError, match=r"median_markers: 'CD4' is not a marker of the panel "
                                           r"\(.*panel.csv\).*CD3, IFNg, CD8, TNFa"):
        pick("functional", "CD4")
    with pytest.raises(FeatureError, match="'DNA1' is a dna channel"):
        pick("DNA1")


def test_positivity_thresholds_and_per_population_gates() -> None:
    """Unstimulated quantiles per (population, marker) gate the stimulated sample."""
    gates = positivity_thresholds(CELLS, MEMBERSHIP, markers=["IFNg", "TNFa"], quantile=0.5,
                                  min_cells=2)
    assert gates[("A", "IFNg")] == pytest.approx(2.5) and gates[("B", "TNFa")] == 3.0
    gates = positivity_thresholds(CELLS, MEMBERSHIP, markers=["IFNg"], quantile=0.75,
                                  min_cells=3)
    assert gates == {("A", "IFNg"): pytest.approx(np.quantile([0.0, 2.0, 3.0, 4.0], 0.75))}
    v = stats(frac_pos_threshold={("A", "IFNg"): 2.5, ("B", "TNFa"): 2.0})
    assert v[("A", "IFNg", "frac_pos")] == 0.5  # 3, 4 > 2.5
    assert v[("B", "TNFa", "frac_pos")] == 1.0
    assert np.isnan(v[("A", "TNFa", "frac_pos")])  # no gate for that pair


@pytest.mark.parametrize("raw", [False, True])
def test_reference_statistics_equal_thresholds_then_statistics(raw) -> None:
    """An unstimulated sample gated by its own quantiles: one sort gives exactly what the
    two-step path (quantiles, then statistics with them) gives, gates included."""
    rng = np.random.default_rng(3)
    n = 400
    values = {"IFNg": rng.gamma(0.6, 15.0, n), "TNFa": np.where(rng.random(n) < 0.5, 0.0,
                                                                 rng.gamma(2.0, 5.0, n))}
    cof = {"IFNg": 5.0, "TNFa": 5.0}
    cells = pd.DataFrame({m: (v if raw else np.arcsinh(v / cof[m])).astype(np.float32)
                          for m, v in values.items()})
    member = pd.DataFrame({"A": np.arange(n) < 300, "B": np.arange(n) % 3 == 0,
                           "C": np.arange(n) < 4})  # C is under min_cells
    pops = pd.DataFrame({"population": ["A", "B", "C"], "parent": "root", "count": [300, 134, 4],
                         "pct_parent": 1.0, "pct_live": 1.0})
    kw = {"markers": ["IFNg", "TNFa"], "min_cells": 5, "cofactors": cof if raw else None}
    gates = positivity_thresholds(cells, member, quantile=0.9, **kw)
    want = sample_statistics(cells, member, pops, statistics=ALL_STATS, frac_pos_threshold=gates,
                             **kw)
    got, got_gates = reference_statistics(cells, member, pops, statistics=ALL_STATS,
                                          quantile=0.9, **kw)
    assert got_gates == gates and ("C", "IFNg") not in gates
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    a = want.set_index(["population", "marker", "statistic"])["value"]
    assert 0.05 < a[("A", "IFNg", "frac_pos")] <= 0.1  # strictly above the 90th percentile


# ------------------------------------------------------------------------------ matrix

CFG = FeatureConfig()
TP = {"b": "baseline", "w": "week6"}


def long_table(values: dict, patients=("P1", "P2")) -> pd.DataFrame:
    """values: (population, marker, statistic) → {patient: {(tp, cond): value}}."""
    rows = []
    for (pop, marker, stat), per_patient in values.items():
        for pid in patients:
            for (tp, cond), value in per_patient.get(pid, {}).items():
                rows.append((pid, TP.get(tp, tp), cond, pop, marker, stat, value))
    return pd.DataFrame(
        rows, columns=["patient_id", "timepoint", "condition", "population", "marker",
                       "statistic", "value"],
    )


def four(bu, bs, wu, ws) -> dict:
    return {("b", "unstim"): bu, ("b", "stim"): bs, ("w", "unstim"): wu, ("w", "stim"): ws}


LONG = long_table(
    {
        ("CD8 T", "", "pct_live"): {"P1": four(10.0, 99.0, 30.0, 99.0), "P2": four(20.0, 99.0, 5.0, 99.0)},
        ("CD8 T", "IFNg", "median"): {"P1": four(1.0, 3.0, 1.5, 4.5), "P2": four(0.5, 0.7, 0.5, 2.0)},
        ("CD8 T", "IFNg", "frac_pos"): {"P1": four(0.1, 0.4, 0.2, 0.9), "P2": four(0.0, 0.1, 0.05, 0.3)},
        ("Rare", "", "count"): {"P1": four(0, 0, 3, 3), "P2": four(1, 1, 0, 0)},
        ("Rare", "", "pct_parent"): {"P1": four(0.0, 0.0, 0.3, 0.3), "P2": four(0.1, 0.1, 0.0, 0.0)},
        ("Rare", "", "pct_live"): {"P1": four(0.0, 0.0, 0.03, 0.03), "P2": four(0.01, 0.01, 0.0, 0.0)},
        ("Rare", "IFNg", "median"): {p: four(*[np.nan] * 4) for p in ("P1", "P2")},
    }
)


def col(X: pd.DataFrame, name: str) -> list[float]:
    return X[name].round(12).tolist()


def test_build_matrix_contrasts_by_hand() -> None:
    X, meta = build_matrix(LONG, CFG)
    assert list(X.index) == ["P1", "P2"] and X.index.name == "patient_id"
    # frequencies: from the unstimulated sample (stim rows hold 99 and are ignored)
    assert col(X, "CD8 T | % live | unstim | baseline") == [10.0, 20.0]
    np.testing.assert_allclose(
        X["CD8 T | % live | unstim | Δweek6"], np.log2([30.01 / 10.01, 5.01 / 20.01])
    )
    # pseudo-counts: count 1, % parent 0.1, % live 0.01 → 0 → 3, 0.3, 0.03 is log2(4) = 2
    for stat in ("count", "% parent", "% live"):
        np.testing.assert_allclose(X[f"Rare | {stat} | unstim | Δweek6"], [2.0, -1.0])
    # medians: stim − unstim and week6 − baseline are differences
    med = "CD8 T | IFNg | median"
    assert col(X, f"{med} | unstim | baseline") == [1.0, 0.5]
    assert col(X, f"{med} | stim | baseline") == [3.0, 0.7]
    assert col(X, f"{med} | stim-unstim | baseline") == [2.0, 0.2]
    assert col(X, f"{med} | unstim | Δweek6") == [0.5, 0.0]
    assert col(X, f"{med} | stim | Δweek6") == [1.5, 1.3]
    assert col(X, f"{med} | stim-unstim | Δweek6") == [1.0, 1.3]  # (4.5-1.5)-(3-1), (1.5)-(0.2)
    frac = "CD8 T | IFNg | frac+"
    assert col(X, f"{frac} | stim-unstim | baseline") == [0.3, 0.1]
    assert col(X, f"{frac} | stim | Δweek6") == [0.5, 0.2]
    assert col(X, f"{frac} | stim-unstim | Δweek6") == [0.4, 0.15]


def test_build_matrix_feature_set_and_metadata() -> None:
    X, meta = build_matrix(LONG, CFG)
    conds = ["unstim", "stim", "stim-unstim"]
    expected = {
        f"CD8 T | IFNg | {s} | {c} | {t}"
        for s in ("median", "frac+") for c in conds for t in ("baseline", "Δweek6")
    }
    expected |= {f"{p} | {s} | unstim | {t}" for p, s in [("CD8 T", "% live"), ("Rare", "count"),
                 ("Rare", "% parent"), ("Rare", "% live")] for t in ("baseline", "Δweek6")}
    assert set(X.columns) == expected  # Rare's all-NaN medians are dropped
    assert len(X.columns) == len(expected)
    assert list(meta.index) == list(X.columns) and list(meta.columns) == META_COLUMNS
    assert meta.loc["CD8 T | IFNg | frac+ | stim | Δweek6"].tolist() == [
        "CD8 T", "IFNg", "frac_pos", "stim", "week6-baseline"
    ]
    assert meta.loc["CD8 T | IFNg | median | stim-unstim | baseline"].tolist() == [
        "CD8 T", "IFNg", "median", "stim-unstim", "baseline"
    ]
    assert meta.loc["Rare | % live | unstim | Δweek6"].tolist() == [
        "Rare", "", "pct_live", "unstim", "week6-baseline"
    ]
    assert X.dtypes.eq(np.float64).all()


def test_build_matrix_baseline_mode() -> None:
    X, meta = build_matrix(LONG, FeatureConfig(mode="baseline"))
    full, _ = build_matrix(LONG, CFG)
    assert all(c.endswith("| baseline") for c in X.columns)
    assert set(meta["timepoint"]) == {"baseline"}
    assert len(X.columns) == 3 + 3 + 4  # median ×3, frac+ ×3, four frequencies
    pd.testing.assert_frame_equal(X, full[X.columns])


def test_build_matrix_missing_sample_gives_nan_not_a_dropped_patient() -> None:
    extra = LONG[LONG["patient_id"] == "P1"].copy()
    extra["patient_id"] = "P0"
    long = pd.concat([LONG, extra])
    long = long[~((long["patient_id"] == "P0") & (long["timepoint"] == "week6")
                  & (long["condition"] == "stim"))]
    X, _ = build_matrix(long, CFG)
    assert list(X.index) == ["P0", "P1", "P2"]
    assert np.isnan(X.at["P0", "CD8 T | IFNg | median | stim | Δweek6"])
    assert np.isnan(X.at["P0", "CD8 T | IFNg | median | stim-unstim | Δweek6"])
    assert X.at["P0", "CD8 T | IFNg | median | unstim | Δweek6"] == 0.5
    pd.testing.assert_series_equal(
        X.loc["P0", [c for c in X.columns if c.endswith("baseline")]],
        X.loc["P1", [c for c in X.columns if c.endswith("baseline")]],
        check_names=False,
    )


def test_build_matrix_with_custom_labels_containing_hyphens() -> None:
    long = LONG.replace({"timepoint": {"baseline": "day-0", "week6": "day-42"},
                         "condition": {"unstim": "no-stim", "stim": "PMA-iono"}})
    cfg = FeatureConfig(baseline="day-0", on_treatment="day-42", unstim="no-stim", stim="PMA-iono")
    X, meta = build_matrix(long, cfg)
    reference, _ = build_matrix(LONG, CFG)
    assert X.columns.is_unique and meta.index.is_unique
    assert X.shape == reference.shape
    assert col(X, "CD8 T | IFNg | median | PMA-iono | day-0") == [3.0, 0.7]
    assert col(X, "CD8 T | IFNg | median | PMA-iono | Δday-42") == [1.5, 1.3]
    assert col(X, "CD8 T | IFNg | median | PMA-iono-no-stim | day-0") == [2.0, 0.2]
    assert meta.loc["CD8 T | IFNg | median | PMA-iono | Δday-42", "timepoint"] == "day-42-day-0"


def test_feature_name() -> None:
    assert feature_name("CD8 T", "IFNg", "frac_pos", "stim", "week6-baseline") == (
        "CD8 T | IFNg | frac+ | stim | Δweek6"
    )
    assert feature_name("NK", "", "pct_live", "unstim", "baseline") == "NK | % live | unstim | baseline"
    assert feature_name("NK", "", "count", "unstim", "day-0", baseline="day-0") == (
        "NK | count | unstim | day-0"
    )
    assert feature_name("NK", "", "count", "unstim", "day-7-day-0", baseline="day-0") == (
        "NK | count | unstim | Δday-7"
    )


# ------------------------------------------------------------------------------ FeatureSet


@pytest.fixture
def feature_set(gating) -> FeatureSet:
    X, meta = build_matrix(LONG, CFG)
    return FeatureSet(
        X=X,
        meta=meta,
        long=LONG.reset_index(drop=True),
        populations=POPS,
        qc=pd.DataFrame({"sample_id": ["S1", "S2"], "events": [1000, 900], "kept": [800, 700]}),
        gating=gating,
    )


def test_feature_set_round_trip(tmp_path, feature_set) -> None:
    out = feature_set.save(tmp_path / "features")
    assert out == tmp_path / "features"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no temporary left
    back = FeatureSet.load(out)
    pd.testing.assert_frame_equal(back.X, feature_set.X)
    pd.testing.assert_frame_equal(back.meta, feature_set.meta)
    pd.testing.assert_frame_equal(back.long, feature_set.long)
    pd.testing.assert_frame_equal(back.populations, feature_set.populations)
    pd.testing.assert_frame_equal(back.qc, feature_set.qc)
    assert back.gating.to_dict() == feature_set.gating.to_dict()
    csv = pd.read_csv(out / "features.csv", index_col=0)
    np.testing.assert_allclose(csv.to_numpy(), feature_set.X.to_numpy())


def test_feature_set_refuses_to_overwrite(tmp_path, feature_set) -> None:
    out = tmp_path / "features"
    out.mkdir()  # an empty folder is fine
    feature_set.save(out)
    with pytest.raises(OutputExistsError, match="folder exists and is not empty"):
        feature_set.save(out)
    smaller = FeatureSet(feature_set.X.iloc[:1], feature_set.meta, feature_set.long,
                         feature_set.populations, feature_set.qc, feature_set.gating)
    smaller.save(out, overwrite=True)
    assert list(FeatureSet.load(out).X.index) == ["P1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]
    (tmp_path / "features.csv").write_text("a file\n")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is a file, not a folder"):
            feature_set.save(tmp_path / "features.csv", overwrite=overwrite)
    assert (tmp_path / "features.csv").read_text() == "a file\n"


def test_float32_cut_counts_like_the_float64_threshold() -> None:
    from predictor.features.stats import _float32_below

    rng = np.random.default_rng(1)
    x = np.sort(rng.normal(size=5000).astype(np.float32))
    t = np.concatenate([rng.normal(size=200), x[::50].astype(np.float64), [np.nan]])
    cut = _float32_below(t)
    assert cut.dtype == np.float32
    for ti, ci in zip(t[:-1], cut[:-1], strict=True):
        assert np.searchsorted(x, ci, side="right") == np.count_nonzero(x <= ti)
    assert np.isnan(cut[-1])


def test_fractions_positive_count_ties_and_nan_as_a_sort_does() -> None:
    # 0 and the threshold itself are not above it; NaN sorts last, so it counts as above
    cells = pd.DataFrame({"A": np.array([0, 0, 2.0, 5, 5, np.nan], dtype=np.float32)})
    membership = pd.DataFrame({"P": [True] * 6})
    pops = pd.DataFrame({"population": ["P"], "count": [6], "pct_parent": [100.0],
                         "pct_live": [100.0]})
    st = sample_statistics(cells, membership, pops, markers=["A"], statistics=["frac_pos"],
                           frac_pos_threshold=2.0, min_cells=1)
    assert st["value"].tolist() == [3 / 6]
