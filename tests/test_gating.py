"""Gating templates, threshold fitting within parents, application and population tables."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from predictor.errors import GatingError
from predictor.populations.gating import (  # internals
    Gating,
    GatingTemplate,
    Term,
    _density,
    _finite,
    _shoulder_threshold,
    apply_gating,
    fit_gating,
    gate_masks,
    load_template,
    otsu_threshold,
    parse_rule,
    population_table,
    valley_threshold,
)

# Template populations → the synthetic cell types (conftest.CELL_TYPES) that belong to them.
EXPECTED = {
    "T cells": {"CD4 T", "CD8 T"},
    "CD4 T": {"CD4 T"},
    "CD8 T": {"CD8 T"},
    "NK": {"CD56bright NK", "CD56dim NK"},
    "CD56bright NK": {"CD56bright NK"},
    "CD56dim NK": {"CD56dim NK"},
    "B cells": {"B cells"},
    "Monocytes": {"Classical mono", "Intermediate mono", "Non-classical mono"},
    "Classical mono": {"Classical mono"},
    "Intermediate mono": {"Intermediate mono"},
    "Non-classical mono": {"Non-classical mono"},
    "DC": {"DC"},
}


def template(*pops: tuple[str, str, str], thresholds: dict | None = None) -> GatingTemplate:
    raw = {"name": "t", "populations": [{"name": n, "parent": p, "rule": r} for n, p, r in pops]}
    if thresholds is not None:
        raw["thresholds"] = thresholds
    return GatingTemplate.from_dict(raw)


# ------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("token", "marker", "positive"),
    [
        ("CD3+", "CD3", True),
        ("CD3-", "CD3", False),
        ("CD4++", "CD4", True),
        ("CD14hi", "CD14", True),
        ("CD14high", "CD14", True),
        ("CD56bright", "CD56", True),
        ("CD3pos", "CD3", True),
        ("CD127lo", "CD127", False),
        ("CD127low", "CD127", False),
        ("CD56dim", "CD56", False),
        ("CD3neg", "CD3", False),
        ("HLA-DR+", "HLA-DR", True),
        ("HLA-DR-", "HLA-DR", False),
    ],
)
def test_parse_rule_signs_and_aliases(token, marker, positive) -> None:
    assert parse_rule(token) == (Term((marker,), positive, False, token),)


def test_parse_rule_alternatives_optional_and_order() -> None:
    terms = parse_rule("CD3- ?CD19-|CD20- CD14+|CD16+  ?TCRgd-")
    assert terms == (
        Term(("CD3",), False, False, "CD3-"),
        Term(("CD19", "CD20"), False, True, "?CD19-|CD20-"),
        Term(("CD14", "CD16"), True, False, "CD14+|CD16+"),
        Term(("TCRgd",), False, True, "?TCRgd-"),
    )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("CD3", "cannot read 'CD3'"),
        ("CD3+ CD19", "cannot read 'CD19'"),
        ("+", "cannot read '+'"),
        ("?", "cannot read '?'"),
        ("CD3+|", "cannot read ''"),
        ("CD19+|CD20-", "must share one sign"),
        ("", "empty rule"),
        ("   ", "empty rule"),
    ],
)
def test_parse_rule_errors(rule, message) -> None:
    with pytest.raises(GatingError, match=re.escape(message)) as info:
        parse_rule(rule, where="my.yaml, population 2")
    assert str(info.value).startswith("my.yaml, population 2: ")


# ------------------------------------------------------------------------------ templates


def test_template_from_dict_errors() -> None:
    with pytest.raises(GatingError, match="is not defined above it"):
        template(("CD4 T", "T cells", "CD4+"), ("T cells", "root", "CD3+"))
    with pytest.raises(GatingError, match="'T cells' defined twice"):
        template(("T cells", "root", "CD3+"), ("T cells", "root", "CD3+ CD4+"))
    with pytest.raises(GatingError, match="'root' defined twice"):
        template(("root", "root", "CD3+"))
    with pytest.raises(GatingError, match="population 2: needs name, parent and rule"):
        GatingTemplate.from_dict({"populations": [
            {"name": "A", "parent": "root", "rule": "CD3+"}, {"name": "B", "parent": "A"}]})
    with pytest.raises(GatingError, match="needs a 'populations' list"):
        GatingTemplate.from_dict({"name": "x"}, source="x.yaml")
    with pytest.raises(GatingError, match="population 1: cannot read 'CD3'"):
        template(("T cells", "root", "CD3"))


def test_template_to_dict_round_trip() -> None:
    t = template(("A", "root", "CD3+ ?CD19-"), ("B", "A", "CD4hi"), thresholds={"CD3": 2})
    back = GatingTemplate.from_dict(t.to_dict())
    assert back.populations == t.populations
    assert back.thresholds == {"CD3": 2.0}


def test_load_default_template() -> None:
    t = load_template("default")
    names = [p.name for p in t.populations]
    assert len(names) == 20 and len(set(names)) == 20
    assert names[:4] == ["T cells", "gd T", "CD4 T", "CD8 T"]
    parents = {p.name: p.parent for p in t.populations}
    assert parents["Treg"] == "CD4 T" and parents["pDC"] == "DC" and parents["NK"] == "root"
    for p in t.populations:  # parents come first
        assert p.parent == "root" or names.index(p.parent) < names.index(p.name)
    b = next(p for p in t.populations if p.name == "B cells")
    assert b.terms[1].markers == ("CD19", "CD20") and b.terms[1].positive


def test_load_template_from_file_and_errors(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\npopulations:\n  - {name: T, parent: root, rule: CD3+}\n")
    t = load_template(path)
    assert t.name == "mine" and t.source == str(path) and t.populations[0].terms[0].markers == ("CD3",)
    with pytest.raises(GatingError, match="gating template not found"):
        load_template(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("populations: [unclosed\n")
    with pytest.raises(GatingError, match="not valid YAML"):
        load_template(bad)


# ------------------------------------------------------------------------------ Otsu


def test_otsu_bimodal_lands_between_modes() -> None:
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(0.5, 0.4, 3000), rng.normal(4.0, 0.4, 1000)]
    t, eff = otsu_threshold(v)
    assert 1.5 < t < 3.0
    assert eff > 0.85
    # the threshold separates the modes almost perfectly
    assert (v[:3000] <= t).mean() > 0.99 and (v[3000:] > t).mean() > 0.99


def test_otsu_unimodal_is_less_effective() -> None:
    rng = np.random.default_rng(1)
    _, eff_uni = otsu_threshold(rng.normal(2.0, 0.5, 4000))
    _, eff_bi = otsu_threshold(np.r_[rng.normal(0, 0.5, 2000), rng.normal(4, 0.5, 2000)])
    assert eff_uni < 0.7  # a Gaussian gives 2/π ≈ 0.64
    assert eff_bi > 0.9
    assert eff_uni < eff_bi - 0.2


def test_otsu_degenerate_input() -> None:
    assert otsu_threshold(np.full(100, 3.0))[1] == 0.0
    assert np.isnan(otsu_threshold(np.full(100, 3.0))[0])
    assert np.isnan(otsu_threshold(np.array([1.0, 5.0] * 4))[0])  # fewer than 10 values
    t, _ = otsu_threshold(np.r_[np.zeros(50), np.full(50, 4.0), [np.nan, np.inf]])
    assert 0.0 < t <= 4.0  # non-finite values ignored


# ------------------------------------------------------------------------------ valleys


def test_valley_tells_bimodal_from_unimodal_where_otsu_cannot() -> None:
    rng = np.random.default_rng(0)
    uni = rng.normal(0.0, 0.5, 20000)
    bi = np.r_[rng.normal(0.0, 0.5, 18000), rng.normal(2.0, 0.5, 2000)]  # 90/10, 4 SD apart
    # Otsu's effectiveness is the same for both ...
    assert otsu_threshold(uni)[1] == pytest.approx(otsu_threshold(bi)[1], abs=0.05)
    # ... the valley test is not
    assert np.isnan(valley_threshold(uni)[0])
    t, depth = valley_threshold(bi)
    assert 0.9 < t < 1.6 and 0.3 < depth < 0.8
    # the cut is where a cell is about as likely to be in either population (Bayes: ~1.27)
    assert abs(t - 1.27) < 0.2


@pytest.mark.parametrize(
    "kind", ["gaussian", "lognormal", "gamma", "student-t", "zero-inflated", "counts",
             "jittered counts"],
)
def test_valley_ignores_unimodal_shapes(kind) -> None:
    rng = np.random.default_rng(1)
    n = 20000
    values = {
        "gaussian": rng.normal(2.0, 0.5, n),
        "lognormal": np.log1p(rng.lognormal(0.0, 1.0, n)),
        "gamma": rng.gamma(2.0, 0.5, n),
        "student-t": rng.standard_t(3, n) * 0.4,
        "zero-inflated": np.r_[np.zeros(n // 3), np.abs(rng.normal(0, 0.4, n - n // 3))],
        "counts": np.arcsinh(rng.poisson(2.0, n) / 5),  # a comb of discrete values near 0
        "jittered counts": np.arcsinh(np.maximum(rng.poisson(3.0, n) - rng.uniform(0, 1, n), 0) / 5),
    }[kind]
    assert np.isnan(valley_threshold(values)[0])


def test_valley_separated_populations_and_small_ones() -> None:
    rng = np.random.default_rng(2)
    # an empty gap: the cut is in its middle, not at the edge of one population
    t, depth = valley_threshold(np.r_[rng.normal(0, 0.2, 5000), rng.normal(4, 0.2, 5000)])
    assert depth < 0.01 and 1.6 < t < 2.4
    # 1% positive cells, well apart, still make a valley
    t, _ = valley_threshold(np.r_[rng.normal(0, 0.4, 19800), rng.normal(3.5, 0.4, 200)])
    assert 1.2 < t < 2.6
    # three modes: the cut with the largest between-class variance (here 10 | 20 + 70 loses
    # to 10 + 20 | 70)
    v = np.r_[rng.normal(0, 0.3, 1000), rng.normal(2.5, 0.3, 2000), rng.normal(5, 0.3, 7000)]
    t, _ = valley_threshold(v)
    assert 3.2 < t < 4.3


def test_valley_with_a_diffuse_zero_inflated_low_population() -> None:
    # Treg-like CD127: 7% low cells, 30% of them exact zeros, the rest spread out — the low
    # population makes no peak of its own besides the zero spike, the valley is a long flat
    # stretch; the cut still lands near where the two populations are equally likely.
    rng = np.random.default_rng(3)
    low = np.abs(rng.normal(0.45, 0.45, 2100))
    low[:630] = 0.0
    v = np.r_[low, rng.normal(2.6, 0.48, 27900)]
    t, _ = valley_threshold(v)
    assert 1.0 < t < 1.6
    assert (low <= t).mean() > 0.9


def test_valley_degenerate_input() -> None:
    assert np.isnan(valley_threshold(np.r_[np.zeros(20), np.full(20, 4.0)])[0])  # < 50 values
    assert np.isnan(valley_threshold(np.full(500, 3.0))[0])
    rng = np.random.default_rng(4)
    v = np.r_[rng.normal(0, 0.3, 2000), rng.normal(4, 0.3, 2000), [np.nan, np.inf, -np.inf]]
    t, _ = valley_threshold(v)
    assert 1.0 < t < 3.0


def test_valley_of_float32_values_equals_that_of_the_same_values_widened() -> None:
    # float32 values (CyTOF's) are sorted by the radix sort, others by numpy: same cuts
    rng = np.random.default_rng(5)
    cases = [
        np.r_[rng.normal(0, 0.4, 9000), rng.normal(3, 0.4, 1000)],
        np.r_[np.zeros(3000), -np.zeros(500), np.abs(rng.normal(0.4, 0.4, 2000)),
              rng.normal(2.6, 0.5, 6000)],  # ±0 spike beside a diffuse low population
        np.arcsinh(np.r_[rng.poisson(2.0, 6000), rng.poisson(40.0, 3000)] / 5),  # combs
        np.r_[rng.normal(1, 0.3, 4000), rng.normal(4, 0.3, 4000), [np.nan, np.inf, -np.inf]],
    ]
    for values in cases:
        v32 = values.astype(np.float32)
        got, want = valley_threshold(v32), valley_threshold(v32.astype(np.float64))
        assert np.isfinite(got[0])
        assert got == want
        assert _shoulder_threshold(v32) == _shoulder_threshold(v32.astype(np.float64))
        d32, d64 = _density(_finite(v32), None), _density(_finite(v32.astype(np.float64)), None)
        assert (d32.step, d32.sigma) == (d64.step, d64.sigma)
        np.testing.assert_array_equal(d32.centers, d64.centers)
        np.testing.assert_array_equal(d32.counts, d64.counts)


# ------------------------------------------------------------------------------ fit + apply


def test_default_template_recovers_known_populations(make_pbmc, gating) -> None:
    cells, labels = make_pbmc(4000, seed=11)
    membership = apply_gating(gating, cells)
    assert list(membership.columns) == gating.populations
    assert set(gating.populations) == set(EXPECTED)
    for pop, types in EXPECTED.items():
        truth = labels.isin(types).to_numpy()
        got = membership[pop].to_numpy()
        recall = (got & truth).sum() / truth.sum()
        precision = (got & truth).sum() / max(got.sum(), 1)
        assert recall >= 0.95 and precision >= 0.95, (pop, recall, precision)
    # children are subsets of their parents
    for pop in gating.populations:
        parent = gating.parent(pop)
        if parent != "root":
            assert not (membership[pop] & ~membership[parent]).any()


def test_default_template_skips_populations_the_panel_cannot_gate(gating) -> None:
    assert gating.skipped["gd T"] == "panel lacks TCRgd"
    assert gating.skipped["Treg"] == "panel lacks CD25, CD127"
    assert gating.skipped["CD4 naive"] == "panel lacks CD45RA, CCR7"
    assert gating.skipped["mDC"] == "panel lacks CD11c"
    assert set(gating.skipped) == {
        "gd T", "Treg", "CD4 naive", "CD4 memory", "CD8 naive", "CD8 memory", "mDC", "pDC",
    }
    # optional terms whose marker is absent are dropped; present ones kept; A|B keeps present
    assert gating.resolved["T cells"] == ((("CD3",), True), (("CD19",), False), (("CD14",), False))
    assert gating.resolved["CD4 T"] == ((("CD4",), True), (("CD8a",), False))
    assert gating.resolved["B cells"] == ((("CD3",), False), (("CD19",), True))
    assert gating.resolved["Monocytes"][-1] == (("CD14", "CD16"), True)
    assert "IFNg" not in gating.markers
    assert set(gating.markers) == {"CD3", "CD4", "CD8a", "CD19", "CD14", "CD16", "CD56", "HLA-DR"}


def test_children_of_a_skipped_population_are_skipped(make_pbmc) -> None:
    cells = make_pbmc(2000, seed=3)[0].drop(columns=["CD56"])
    g = fit_gating([cells], "default")
    assert g.skipped["NK"] == "panel lacks CD56"
    assert g.skipped["CD56bright NK"] == "parent 'NK' skipped"
    assert g.skipped["CD56dim NK"] == "parent 'NK' skipped"
    assert "Monocytes" in g.populations  # ?CD56- is optional there
    assert (("CD56",), False) not in g.resolved["Monocytes"]
    assert "CD56" not in g.markers
    assert list(apply_gating(g, cells).columns) == g.populations


def test_marker_names_match_loosely(make_pbmc) -> None:
    cells = make_pbmc(2000, seed=3)[0].rename(columns={"HLA-DR": "HLADR", "CD8a": "cd8a"})
    g = fit_gating([cells], "default")
    assert g.resolved["DC"][3] == (("HLADR",), True)
    assert g.resolved["CD8 T"] == ((("cd8a",), True), (("CD4",), False))


def test_thresholds_are_fitted_within_the_parent() -> None:
    # Y is 0 outside A; inside A it is bimodal at 2 and 4. Within A the valley is at ~3, on all
    # cells it would be near 1: only the within-parent threshold separates A's two Y levels.
    rng = np.random.default_rng(5)
    n_out, n_lo, n_hi = 3000, 500, 500
    x = np.r_[np.zeros(n_out), np.full(n_lo + n_hi, 4.0)] + rng.normal(0, 0.3, 4000)
    y = np.r_[np.zeros(n_out), np.full(n_lo, 2.0), np.full(n_hi, 4.0)] + rng.normal(0, 0.3, 4000)
    cells = pd.DataFrame({"X": x, "Y": y})
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"), ("B", "root", "Y+"))
    g = fit_gating([cells], t)
    assert 2.6 < g.thresholds["A1"]["Y"] < 3.4
    assert g.thresholds["B"]["Y"] < 1.8  # the root-level valley
    m = apply_gating(g, cells)
    assert m["A1"].to_numpy()[n_out + n_lo:].mean() > 0.98
    assert m["A1"].to_numpy()[: n_out + n_lo].mean() < 0.01


def test_not_bimodal_within_parent_falls_back_to_the_root_threshold() -> None:
    rng = np.random.default_rng(6)
    x = np.r_[np.zeros(2000), np.full(2000, 4.0)] + rng.normal(0, 0.3, 4000)
    y = np.r_[np.zeros(2000), np.full(2000, 4.0)] + rng.normal(0, 0.3, 4000)
    cells = pd.DataFrame({"X": x, "Y": y})
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    # Y is unimodal (all high) within A: no valley there → the valley on all cells is used
    g = fit_gating([cells], t)
    root_t, _ = valley_threshold(y)
    assert 1.0 < root_t < 3.0
    assert g.thresholds["A1"]["Y"] == pytest.approx(root_t)
    assert g.methods == {"A": {"X": "root valley"}, "A1": {"Y": "root valley"}}
    assert apply_gating(g, cells)["A1"].sum() == apply_gating(g, cells)["A"].sum()
    # a parent with fewer than 50 cells also uses the root threshold
    tiny = pd.DataFrame({"X": np.r_[x[:2000], x[2000:2030]], "Y": np.r_[y[:2000], y[2000:2030]]})
    g2 = fit_gating([tiny], t)
    assert g2.thresholds["A1"]["Y"] == pytest.approx(valley_threshold(tiny["Y"].to_numpy())[0])
    assert g2.methods["A1"]["Y"] == "root valley"


def test_no_valley_anywhere_uses_the_default_threshold() -> None:
    rng = np.random.default_rng(7)
    x = np.r_[np.zeros(2000), np.full(2000, 4.0)] + rng.normal(0, 0.3, 4000)
    cells = pd.DataFrame({"X": x, "Y": rng.normal(2.0, 0.5, 4000)})  # Y unimodal everywhere
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    g = fit_gating([cells], t)
    assert g.thresholds["A1"] == {"Y": 1.5} and g.methods["A1"] == {"Y": "default"}
    g2 = fit_gating([cells], t, default_threshold=2.5)
    assert g2.thresholds["A1"] == {"Y": 2.5}


def test_min_effectiveness_can_veto_a_small_split() -> None:
    rng = np.random.default_rng(8)
    y = np.r_[rng.normal(0, 0.4, 3880), rng.normal(3, 0.4, 120)]  # 3% positive: effectiveness ≈ 0.6
    cells = pd.DataFrame({"Y": y})
    t = template(("P", "root", "Y+"))
    assert fit_gating([cells], t).methods["P"]["Y"] == "root valley"
    assert fit_gating([cells], t, min_effectiveness=0.7).methods["P"]["Y"] == "default"


def test_relative_level_without_valley_uses_the_edge_of_the_main_mode() -> None:
    # Within P, Z is one broad mode with a bright shoulder (no valley): CZbright takes the
    # shoulder, CZdim the rest — siblings still split P at one threshold.
    rng = np.random.default_rng(9)
    n = 6000
    x = np.r_[np.zeros(n), np.full(n, 4.0)] + rng.normal(0, 0.3, 2 * n)
    z = np.r_[rng.normal(0, 0.3, n), rng.normal(2.5, 0.4, n - 600), rng.normal(3.6, 0.3, 600)]
    cells = pd.DataFrame({"X": x, "Z": z})
    t = template(("P", "root", "X+"), ("bright", "P", "Zbright"), ("dim", "P", "Zdim"),
                 ("plus", "P", "Z+"))
    g = fit_gating([cells], t)
    assert g.methods["bright"]["Z"] == "shoulder" == g.methods["dim"]["Z"]
    assert g.thresholds["bright"]["Z"] == g.thresholds["dim"]["Z"]
    assert 2.9 < g.thresholds["bright"]["Z"] < 3.6
    m = apply_gating(g, cells)
    assert not (m["bright"] & m["dim"]).any() and (m["bright"] | m["dim"]).sum() == m["P"].sum()
    # an absolute term on the same marker falls back to the valley on all cells instead
    assert g.methods["plus"]["Z"] == "root valley" and g.thresholds["plus"]["Z"] < 2.0


def test_fixed_thresholds_override(make_pbmc) -> None:
    cells = make_pbmc(2000, seed=4)[0]
    t = template(("T", "root", "CD3+"), ("CD4 T", "T", "CD4+"), thresholds={"CD3": 1.0, "CD4": 0.5})
    g = fit_gating([cells], t)
    assert g.thresholds == {"T": {"CD3": 1.0}, "CD4 T": {"CD4": 0.5}}
    g2 = fit_gating([cells], t, thresholds={"cd-4": 3.5})  # the call's own win, names loose
    assert g2.thresholds == {"T": {"CD3": 1.0}, "CD4 T": {"CD4": 3.5}}
    m = apply_gating(g2, cells)
    expected = (cells["CD3"] > 1.0) & (cells["CD4"] > 3.5)
    assert (m["CD4 T"] == expected).all()


def test_fit_gating_errors(make_pbmc) -> None:
    cells = make_pbmc(500, seed=4)[0]
    with pytest.raises(GatingError, match="at least one sample"):
        fit_gating([], "default")
    with pytest.raises(GatingError, match="No population of .* can be gated"):
        fit_gating([cells[["IFNg"]]], "default")
    g = fit_gating([cells], template(("T", "root", "CD3+ CD4+")))
    with pytest.raises(GatingError, match="lack marker\\(s\\) CD4 that the gating uses"):
        apply_gating(g, cells.drop(columns=["CD4"]))


def test_gating_round_trip_gives_identical_membership(make_pbmc, gating) -> None:
    cells = make_pbmc(3000, seed=12)[0]
    back = Gating.from_dict(json.loads(json.dumps(gating.to_dict())))
    assert back.populations == gating.populations
    assert back.thresholds == gating.thresholds
    assert back.skipped == gating.skipped
    assert back.markers == gating.markers
    pd.testing.assert_frame_equal(apply_gating(back, cells), apply_gating(gating, cells))


def test_apply_gating_keeps_the_index_and_is_deterministic(make_pbmc, gating) -> None:
    cells = make_pbmc(500, seed=13)[0]
    cells.index = pd.RangeIndex(100, 600)
    m = apply_gating(gating, cells)
    assert list(m.index) == list(cells.index)
    assert m.dtypes.eq(bool).all()
    # same cells in another order → same membership per cell
    shuffled = cells.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(apply_gating(gating, shuffled).loc[cells.index], m)


def _shifted_batches(shift: float = 2.2, seed: int = 20) -> tuple[list[pd.DataFrame], list[str]]:
    """Two batches of two samples; batch B2 reads Y ``shift`` higher (acquisition drift)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(4):
        n = 3000
        x = np.r_[np.zeros(n // 2), np.full(n // 2, 4.0)] + rng.normal(0, 0.3, n)
        y = np.r_[np.zeros(n // 4), np.full(n // 4, 2.2), np.zeros(n // 4), np.full(n // 4, 2.2)]
        y = y + rng.normal(0, 0.3, n) + (shift if i >= 2 else 0.0)
        out.append(pd.DataFrame({"X": x, "Y": y}))
    return out, ["B1", "B1", "B2", "B2"]


def test_thresholds_per_batch_follow_each_batch() -> None:
    cells, batches = _shifted_batches()
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    g = fit_gating(cells, t, batches=batches)
    assert g.batches == ["B1", "B2"]
    t1, t2 = g.batch_thresholds["B1"]["A1"]["Y"], g.batch_thresholds["B2"]["A1"]["Y"]
    assert 0.7 < t1 < 1.6 and 2.8 < t2 < 3.8  # each batch's own valley
    assert g.batch_methods["B2"]["A1"]["Y"] == "valley"
    truth = np.r_[np.zeros(750), np.ones(750), np.zeros(750), np.ones(750)].astype(bool)
    for c, b in zip(cells, batches, strict=True):
        m = apply_gating(g, c, batch=b)
        assert (m["A1"].to_numpy() == (truth & (c["X"] > 2).to_numpy())).mean() > 0.99
    # the pooled thresholds serve no batch, or one the gating has not seen
    pd.testing.assert_frame_equal(apply_gating(g, cells[0], batch="B9"), apply_gating(g, cells[0]))
    assert g.thresholds_for("B9") is g.thresholds_for(None) is g.thresholds
    # without batches no threshold fits both: B2's negatives sit where B1's positives are
    pooled = fit_gating(cells, t)
    assert pooled.batch_thresholds == {}
    errors = [
        (apply_gating(pooled, c)["A1"].to_numpy() != (truth & (c["X"] > 2).to_numpy())).mean()
        for c in cells
    ]
    assert max(errors) > 0.2


def test_batch_without_a_valley_falls_back_to_the_pooled_threshold() -> None:
    cells, _ = _shifted_batches(shift=0.0)
    # B2's only sample has no Y-high cells within A: no valley in that batch's parent
    cells[3] = cells[3].assign(Y=np.random.default_rng(1).normal(0, 0.3, len(cells[3])))
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    g = fit_gating([cells[0], cells[3]], t, batches=["B1", "B2"])
    assert g.methods["A1"]["Y"] == "valley"
    assert g.batch_methods["B2"]["A1"]["Y"] == "pooled"
    assert g.batch_thresholds["B2"]["A1"]["Y"] == g.thresholds["A1"]["Y"]


def test_valley_floor_and_nearest_valley() -> None:
    """Three modes: exact zeros, dim cells (0.9) and bright ones (3.0): two valleys."""
    rng = np.random.default_rng(5)
    v = np.r_[np.zeros(3000), rng.normal(0.9, 0.15, 3000), rng.normal(3.0, 0.3, 2000)]
    assert valley_threshold(v, near=0.0)[0] < 0.6  # the zeros / dim dip
    assert 1.4 < valley_threshold(v, near=2.0)[0] < 2.4
    assert 1.4 < valley_threshold(v, near=0.0, floor=0.5)[0] < 2.4  # the dip is not a gate
    only_dip = np.r_[np.zeros(3000), rng.normal(0.9, 0.15, 3000)]
    assert valley_threshold(only_dip)[0] < 0.6
    assert np.isnan(valley_threshold(only_dip, floor=0.5)[0])


def test_batch_gate_is_never_the_dip_above_zeros() -> None:
    """A batch whose CD127lo-like parent shows only the dip between a marker's zeros and its
    dim cells keeps the pooled gate (it used to take the dip, ~0.2: most Tregs lost)."""
    rng = np.random.default_rng(8)

    def sample(n: int, with_bright: bool) -> pd.DataFrame:
        x = np.r_[np.zeros(n // 2), np.full(n // 2, 4.0)] + rng.normal(0, 0.3, n)
        k = n // 2
        y = np.where(rng.random(k) < 0.4, 0.0, rng.normal(0.9, 0.15, k))  # zeros + dim
        if with_bright:
            y[: k // 3] = rng.normal(3.0, 0.3, k // 3)
        return pd.DataFrame({"X": x, "Y": np.r_[rng.normal(0, 0.3, n - k), y]})

    cells = [sample(3000, True), sample(3000, True), sample(3000, False)]
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    g = fit_gating(cells, t, batches=["B1", "B1", "B2"])
    pooled = g.thresholds["A1"]["Y"]
    assert g.methods["A1"]["Y"] == "valley" and 1.4 < pooled < 2.4
    assert g.batch_thresholds["B2"]["A1"]["Y"] == pooled
    assert g.batch_methods["B2"]["A1"]["Y"] == "pooled"
    assert 1.4 < g.batch_thresholds["B1"]["A1"]["Y"] < 2.4


@pytest.mark.parametrize(
    ("batches", "message"),
    [(["B1"], "one batch label per sample \\(2\\). Got 1 labels"),
     ("B1", "Got a string"),
     (["B1", None], "no label for sample 2"),
     (["B1", float("nan")], "no label for sample 2"),
     (["B1", " "], "no label for sample 2")],
)
def test_batches_are_checked(make_pbmc, batches, message) -> None:
    cells = make_pbmc(500, seed=4)[0]
    with pytest.raises(GatingError, match=message):
        fit_gating([cells, cells], "default", batches=batches)


def test_gating_round_trip_with_batches_and_old_files() -> None:
    cells, batches = _shifted_batches()
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    g = fit_gating(cells, t, batches=batches)
    raw = json.loads(json.dumps(g.to_dict()))
    assert raw["kind"] == "gating"
    back = Gating.from_dict(raw)
    assert back.to_dict() == g.to_dict()
    assert back.batch_thresholds == g.batch_thresholds and back.methods == g.methods
    for c, b in zip(cells, batches, strict=True):
        pd.testing.assert_frame_equal(apply_gating(back, c, batch=b), apply_gating(g, c, batch=b))
    # files written before per-batch thresholds still load (pooled thresholds only)
    old = {k: raw[k] for k in ("template", "resolved", "thresholds", "skipped", "markers")}
    legacy = Gating.from_dict(old)
    assert legacy.batch_thresholds == {} and legacy.thresholds == g.thresholds
    with pytest.raises(GatingError, match="not a gating"):
        Gating.from_dict({**raw, "kind": "clustering"})


def test_threshold_table_lists_pooled_and_batch_thresholds() -> None:
    cells, batches = _shifted_batches()
    t = template(("A", "root", "X+"), ("A1", "A", "Y+"))
    table = fit_gating(cells, t, batches=batches).threshold_table()
    assert list(table.columns) == ["batch", "population", "parent", "marker", "threshold", "method"]
    assert len(table) == 6 and set(table["batch"]) == {"", "B1", "B2"}
    row = table[(table["batch"] == "B2") & (table["population"] == "A1")].iloc[0]
    assert row["parent"] == "A" and row["marker"] == "Y" and row["method"] == "valley"


# ------------------------------------------------------------------------------ tables


def test_population_table_by_hand() -> None:
    t = template(("T", "root", "CD3+"), ("CD4 T", "T", "CD4+"), ("B", "root", "CD19+"),
                 ("B sub", "B", "CD20+"))
    g = Gating(t, {p.name: () for p in t.populations}, {}, {}, ())
    membership = pd.DataFrame({
        "T":     [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        "CD4 T": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        "B":     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "B sub": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    }).astype(bool)
    table = population_table(g, membership, sample_id="S1")
    assert list(table.columns) == ["sample_id", "population", "parent", "count", "pct_parent", "pct_live"]
    assert table["sample_id"].eq("S1").all()
    assert list(table["population"]) == ["T", "CD4 T", "B", "B sub"]
    assert list(table["parent"]) == ["root", "T", "root", "B"]
    assert list(table["count"]) == [6, 3, 0, 0]
    np.testing.assert_allclose(table["pct_parent"], [60.0, 50.0, 0.0, np.nan])
    np.testing.assert_allclose(table["pct_live"], [60.0, 30.0, 0.0, 0.0])


def test_population_table_on_gated_cells_matches_labels(make_pbmc, gating) -> None:
    cells, labels = make_pbmc(3000, seed=14)
    table = population_table(gating, apply_gating(gating, cells), sample_id="S").set_index("population")
    n_t = labels.isin(EXPECTED["T cells"]).sum()
    assert table.at["T cells", "pct_live"] == pytest.approx(100 * n_t / 3000, abs=1.0)
    assert table.at["CD8 T", "pct_parent"] == pytest.approx(
        100 * (labels == "CD8 T").sum() / n_t, abs=1.5
    )


def test_gate_masks_are_the_membership_frame_and_give_the_same_table(make_pbmc, gating) -> None:
    """Per-sample work takes the masks (no frame): the same populations, order and cells,
    and the same population table; removed events (``live``) join no population."""
    cells, _ = make_pbmc(2000, seed=21)
    live = np.random.default_rng(0).random(len(cells)) > 0.2
    frame = apply_gating(gating, cells, live=live)
    masks = gate_masks(gating, cells, live=live)
    assert list(masks) == list(frame.columns) == gating.populations
    for name, mask in masks.items():
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, frame[name].to_numpy())
        assert not mask[~live].any()
    n_live = int(live.sum())
    pd.testing.assert_frame_equal(
        population_table(gating, masks, sample_id="S", n_live=n_live),
        population_table(gating, frame, sample_id="S", n_live=n_live))


def test_apply_gating_on_raw_cells_with_cofactors(make_pbmc, gating) -> None:
    """Raw events + cofactors give the membership of the transformed events: each threshold
    moves to the raw scale instead of every event to the arcsinh scale."""
    cells, _ = make_pbmc(3000, seed=5)
    cof = {m: (2.0 if i % 2 else 5.0) for i, m in enumerate(cells.columns)}
    raw = pd.DataFrame({m: (c * np.sinh(cells[m].to_numpy(np.float64))) for m, c in cof.items()})
    want = apply_gating(gating, cells)
    got = gating.apply(raw, cofactors=cof)
    # Only events within float rounding of a threshold may differ.
    assert (got != want).to_numpy().sum() <= 2
    assert got.sum().sum() > 0
