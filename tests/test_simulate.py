"""Tests of the synthetic IL-7 cohort simulator."""

from __future__ import annotations

import json

import flowio
import numpy as np
import pandas as pd
import pytest

from predictor.errors import ConfigError, OutputExistsError
from predictor.io.fcs import read_fcs
from predictor.simulate import FRAC_POS_THRESHOLD, SimulatedCohort, simulate_cohort

N_PATIENTS = 10
CELLS = 2000
SEED = 3
LEAVES = [
    "CD4 T naive", "CD4 T memory", "Treg", "CD8 T naive", "CD8 T memory", "gd T",
    "CD56bright NK", "CD56dim NK", "B cells", "Classical mono", "Intermediate mono",
    "Non-classical mono", "mDC", "pDC",
]
NON_CELLS = ["bead", "debris", "dead", "doublet"]
GROUPS = {
    "CD4 T": ["CD4 T naive", "CD4 T memory", "Treg"],
    "CD8 T": ["CD8 T naive", "CD8 T memory"],
    "gd T": ["gd T"],
    "NK": ["CD56bright NK", "CD56dim NK"],
    "Monocytes": ["Classical mono", "Intermediate mono", "Non-classical mono"],
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> SimulatedCohort:
    out = tmp_path_factory.mktemp("sim") / "cohort"
    return simulate_cohort(out, n_patients=N_PATIENTS, cells_per_sample=CELLS, seed=SEED)


@pytest.fixture(scope="module")
def truth(cohort) -> dict:
    return json.loads(cohort.truth.read_text())


@pytest.fixture(scope="module")
def codes(truth) -> dict[str, int]:
    return {p["name"]: p["code"] for p in truth["populations"]}


@pytest.fixture(scope="module")
def samples(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort.samples)


@pytest.fixture(scope="module")
def clinical(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort.clinical)


@pytest.fixture(scope="module")
def data(cohort, samples) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """sample_id -> (arcsinh events, labels, marker names from $PnS)."""
    out = {}
    for row in samples.itertuples():
        fcs = read_fcs(cohort.root / row.file)
        labels = np.load(cohort.root / "labels" / f"{row.sample_id}.npy")
        markers = [s.split("_", 1)[1] if "_" in s else n for s, n in zip(fcs.pns, fcs.pnn,
                                                                          strict=True)]
        out[row.sample_id] = (np.arcsinh(fcs.events / 5.0), labels, markers)
    return out


@pytest.fixture(scope="module")
def stats(data, samples, clinical, codes) -> pd.DataFrame:
    """Per-sample statistics computed from the true identities."""
    arm = dict(zip(clinical["patient_id"], clinical["arm"], strict=True))
    rows = []
    for row in samples.itertuples():
        x, lab, markers = data[row.sample_id]
        live = lab < 14
        rec = {"patient_id": row.patient_id, "arm": arm[row.patient_id],
               "timepoint": row.timepoint, "condition": row.condition}
        for group, names in GROUPS.items():
            sel = np.isin(lab, [codes[n] for n in names])
            rec[f"{group}|pct_live"] = 100.0 * sel.sum() / live.sum()
            for m in ("IL-2", "TNFa", "IFNg", "IL-6", "MIP-1b"):
                rec[f"{group}|{m}"] = float((x[sel, markers.index(m)] > FRAC_POS_THRESHOLD).mean())
        rows.append(rec)
    return pd.DataFrame(rows)


def _change(stats: pd.DataFrame, key, condition: str) -> pd.Series:
    """Mean week6 - baseline change of a statistic per arm."""
    s = stats[stats["condition"] == condition].pivot_table(
        index=["arm", "patient_id"], columns="timepoint", values=key)
    return (s["week6"] - s["baseline"]).groupby(level="arm").mean()


# --- files and tables -----------------------------------------------------------------------

def test_tables_have_exact_columns(cohort, samples, clinical):
    assert list(samples.columns) == ["sample_id", "patient_id", "file", "timepoint",
                                     "condition", "batch"]
    assert list(clinical.columns[:5]) == ["patient_id", "arm", "response", "time", "event"]
    assert {"age", "psa_baseline"} <= set(clinical.columns)
    panel = pd.read_csv(cohort.panel)
    assert list(panel.columns) == ["channel", "marker", "role", "cofactor"]
    assert len(panel) == 38
    assert samples["sample_id"].is_unique and samples["file"].is_unique
    assert len(samples) == 4 * N_PATIENTS
    assert samples.groupby("patient_id").size().eq(4).all()
    assert set(samples["timepoint"]) == {"baseline", "week6"}
    assert set(samples["condition"]) == {"unstim", "stim"}
    assert set(samples["batch"]) <= {"B1", "B2"}
    assert samples.groupby("patient_id")["batch"].nunique().eq(1).all()
    assert all((cohort.root / f).is_file() for f in samples["file"])
    assert list(clinical["patient_id"]) == [f"P{i:03d}" for i in range(1, N_PATIENTS + 1)]
    assert set(clinical["arm"]) == {"IL-7", "observation"}
    assert abs((clinical["arm"] == "IL-7").sum() - N_PATIENTS / 2) <= 1
    assert set(clinical["response"]) <= {0, 1} and set(clinical["event"]) <= {0, 1}
    assert (clinical["time"] > 0).all()


def test_panel_roles_and_markers(cohort):
    panel = pd.read_csv(cohort.panel)
    roles = panel.groupby("role")["marker"].apply(list).to_dict()
    assert len(roles["lineage"]) == 18 and len(roles["functional"]) == 10
    assert roles["dna"] == ["DNA1", "DNA2"] and roles["viability"] == ["Cisplatin"]
    assert sorted(panel.loc[panel["role"] == "bead", "channel"]) == [
        "Ce140Di", "Eu151Di", "Eu153Di", "Ho165Di", "Lu175Di"]
    assert set(panel["role"]) == {"lineage", "functional", "dna", "viability", "bead", "time",
                                  "event_length"}
    assert panel["channel"].is_unique and panel["marker"].is_unique
    assert (panel["cofactor"] == 5).all()
    assert dict(zip(panel["marker"], panel["channel"], strict=True))["DNA1"] == "Ir191Di"


def test_fcs_readers_agree_and_channels_match_panel(cohort, samples):
    panel = pd.read_csv(cohort.panel)
    for row in samples.head(3).itertuples():
        path = cohort.root / row.file
        ours = read_fcs(path)
        fd = flowio.FlowData(str(path))
        theirs = np.asarray(fd.events, dtype=np.float32).reshape(-1, fd.channel_count)
        np.testing.assert_array_equal(ours.events, theirs)
        assert ours.events.dtype == np.float32
        assert ours.pnn == list(panel["channel"])
        labels = np.load(cohort.root / "labels" / f"{row.sample_id}.npy")
        assert labels.dtype == np.int8 and len(labels) == ours.n_events
        pns = dict(zip(ours.pnn, ours.pns, strict=True))
        assert pns["Nd145Di"] == "145Nd_CD4" and pns["Ir191Di"] == "191Ir_DNA1"
        assert pns["Pt195Di"] == "195Pt_Cisplatin"
        time = ours.events[:, ours.pnn.index("Time")]
        assert np.all(np.diff(time) >= 0) and time[-1] > time[0]


def test_event_counts_vary_around_target(truth):
    n = np.array(list(truth["n_events"].values()))
    assert 0.75 * CELLS < n.mean() < 1.25 * CELLS
    assert n.std() > 0 and n.min() > 0.4 * CELLS and n.max() < 1.8 * CELLS


# --- determinism -----------------------------------------------------------------------------

def test_same_seed_same_bytes_whatever_n_jobs(cohort, tmp_path):
    again = simulate_cohort(tmp_path / "again", n_patients=N_PATIENTS, cells_per_sample=CELLS,
                            seed=SEED, n_jobs=2)
    for rel in ["samples.csv", "clinical.csv", "panel.csv", "truth.json"]:
        assert (cohort.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    for f in sorted((cohort.root / "fcs").iterdir()):
        assert f.read_bytes() == (again.root / "fcs" / f.name).read_bytes(), f.name
    for f in sorted((cohort.root / "labels").iterdir()):
        assert f.read_bytes() == (again.root / "labels" / f.name).read_bytes(), f.name


def test_different_seed_differs(cohort, tmp_path):
    other = simulate_cohort(tmp_path / "other", n_patients=N_PATIENTS, cells_per_sample=CELLS,
                            seed=SEED + 1)
    name = sorted((cohort.root / "fcs").iterdir())[0].name
    a = read_fcs(cohort.root / "fcs" / name).events
    b = read_fcs(other.root / "fcs" / name).events
    assert a.shape != b.shape or not np.array_equal(a, b)
    assert (cohort.root / "clinical.csv").read_bytes() != (other.root / "clinical.csv").read_bytes()


# --- cell-level realism ----------------------------------------------------------------------

def test_non_cells_plausible(data, codes):
    lab = np.concatenate([d[1] for d in data.values()])
    non_cell = np.isin(lab, [codes[n] for n in NON_CELLS]).mean()
    assert 0.08 < non_cell < 0.18
    for name in NON_CELLS:
        assert 0.01 < (lab == codes[name]).mean() < 0.07, name
    x, lab, markers = next(iter(data.values()))
    cells = lab < 14
    beads = [j for j, m in enumerate(markers) if m == "Beads"]
    assert len(beads) == 5
    bead = lab == codes["bead"]
    assert (x[bead][:, beads].min(axis=1) > 4.5).mean() > 0.95
    assert (x[cells][:, beads].max(axis=1) < 2.0).mean() > 0.95
    dna, cis, ev_len = markers.index("DNA1"), markers.index("Cisplatin"), markers.index("Event_length")
    assert np.median(x[bead, dna]) < 1.0 < 4.0 < np.median(x[cells, dna])
    assert np.median(x[lab == codes["debris"], dna]) < np.median(x[cells, dna]) - 1.0
    assert np.median(x[lab == codes["dead"], cis]) > np.median(x[cells, cis]) + 2.5
    doublet = lab == codes["doublet"]
    assert np.median(x[doublet, dna]) > np.median(x[cells, dna]) + 0.4
    length = np.sinh(x[:, ev_len]) * 5.0
    assert 10 <= np.median(length[cells]) <= 30
    assert np.median(length[doublet]) > np.median(length[cells]) + 8
    assert np.corrcoef(x[cells, dna], x[cells, markers.index("DNA2")])[0, 1] > 0.5


def test_lineage_profiles(data, codes):
    x = np.concatenate([d[0] for d in data.values()])
    lab = np.concatenate([d[1] for d in data.values()])
    markers = next(iter(data.values()))[2]

    def med(pop, marker):
        return float(np.median(x[lab == codes[pop], markers.index(marker)]))

    cells = lab < 14
    assert np.median(x[cells, markers.index("CD45")]) > 3.5
    for pop in ["CD4 T naive", "CD4 T memory", "CD8 T naive", "CD8 T memory", "gd T"]:
        assert med(pop, "CD3") > 3.0 > med("B cells", "CD3"), pop
    assert med("CD4 T naive", "CD4") > 2.5 > med("CD8 T naive", "CD4")
    assert med("CD8 T memory", "CD8a") > 3.5 > med("CD4 T memory", "CD8a")
    assert med("gd T", "TCRgd") > 3.0 > med("CD4 T naive", "TCRgd")
    assert med("Treg", "CD25") > med("CD4 T naive", "CD25") + 1.5
    assert med("Treg", "CD127") < med("CD4 T naive", "CD127") - 1.5
    assert med("CD4 T naive", "CD45RA") > med("CD4 T memory", "CD45RA") + 1.5
    assert med("CD56bright NK", "CD56") > med("CD56dim NK", "CD56") + 1.0
    assert med("CD56dim NK", "CD16") > med("CD56bright NK", "CD16") + 1.5
    assert med("CD56dim NK", "GzmB") > 3.0 > med("CD4 T naive", "GzmB")
    assert med("B cells", "CD20") > 3.5 and med("B cells", "HLA-DR") > 3.5
    assert med("Classical mono", "CD14") > med("Non-classical mono", "CD14") + 2.0
    assert med("Non-classical mono", "CD16") > med("Classical mono", "CD16") + 2.0
    assert med("pDC", "CD123") > 3.5 > med("mDC", "CD123")
    assert med("mDC", "CD11c") > 3.0 > med("pDC", "CD11c")


def test_frequencies_plausible(stats):
    base = stats[(stats["timepoint"] == "baseline")]
    assert 25 < base["CD4 T|pct_live"].mean() < 50
    assert 12 < base["CD8 T|pct_live"].mean() < 28
    assert 1 < base["gd T|pct_live"].mean() < 6
    assert 6 < base["NK|pct_live"].mean() < 18
    assert 8 < base["Monocytes|pct_live"].mean() < 22
    assert base["CD8 T|pct_live"].std() > 1.0  # patients differ


def test_stimulation_raises_cytokines(stats):
    unstim = stats[stats["condition"] == "unstim"]
    stim = stats[stats["condition"] == "stim"]
    for key in ["CD4 T|IL-2", "CD4 T|TNFa", "CD8 T|IFNg", "CD8 T|MIP-1b",
                "NK|IFNg", "Monocytes|TNFa", "Monocytes|IL-6"]:
        assert stim[key].mean() > unstim[key].mean() + 0.05, key
        assert unstim[key].mean() < 0.05, key


# --- planted IL-7 effects --------------------------------------------------------------------

def test_cd8_expand_and_monocytes_fall_with_il7(stats):
    cd8 = _change(stats, "CD8 T|pct_live", "unstim")
    assert cd8["IL-7"] > 5.0 and abs(cd8["observation"]) < 3.0
    mono = _change(stats, "Monocytes|pct_live", "unstim")
    assert mono["IL-7"] < -2.0 and mono["IL-7"] < mono["observation"] - 2.0


@pytest.mark.parametrize("key", ["CD4 T|IL-2", "CD4 T|TNFa", "CD4 T|IL-6",
                                 "CD8 T|IFNg", "NK|TNFa", "gd T|IL-2",
                                 "Monocytes|TNFa"])
def test_il7_raises_cytokines_after_stimulation(stats, key):
    change = _change(stats, key, "stim")
    assert change["IL-7"] > 0.04 and change["IL-7"] > change["observation"] + 0.04
    assert abs(_change(stats, key, "unstim")["IL-7"]) < 0.03  # not at rest


# --- ground truth ----------------------------------------------------------------------------

def test_truth_schema(truth, clinical):
    names = [p["name"] for p in truth["populations"]]
    assert names == LEAVES + NON_CELLS
    majors = {p["name"]: p["major"] for p in truth["populations"]}
    assert majors["Treg"] == "CD4 T" and majors["pDC"] == "DC" and majors["bead"] == "non-cell"
    assert truth["frac_pos_threshold"] == FRAC_POS_THRESHOLD
    assert truth["parameters"]["n_patients"] == N_PATIENTS
    assert truth["parameters"]["seed"] == SEED
    forms = [d["form"] for d in truth["drivers"]]
    assert "interaction" in forms and ({"hinge", "quadratic"} & set(forms))
    assert {d["arm"] for d in truth["drivers"]} == {"all", "IL-7"}
    vocab = {"CD4 T", "CD8 T", "gd T", "Treg", "NK", "CD56bright NK", "CD56dim NK", "B cells",
             "Monocytes", "Classical mono", "mDC", "pDC"}
    for d in truth["drivers"]:
        terms = [d] + ([d["with"]] if d["form"] == "interaction" else [])
        for t in terms:
            assert t["population"] in vocab
            assert t["statistic"] in {"pct_live", "pct_parent", "median", "frac_pos"}
            assert t["condition"] in {"unstim", "stim"}
            assert t["timepoint"] in {"baseline", "week6-baseline"}
            assert (t["marker"] is None) == (t["statistic"] in {"pct_live", "pct_parent"})
        assert isinstance(d["weight"], float) and d["weight"] != 0
    patients = truth["patients"]
    assert [p["patient_id"] for p in patients] == list(clinical["patient_id"])
    p = np.array([q["p"] for q in patients])
    assert np.all((p > 0) & (p < 1))
    assert [q["arm"] for q in patients] == list(clinical["arm"])
    assert 0.5 < truth["best_auroc"] < 1.0


def test_driver_values_match_cells(truth, data, codes, samples):
    """Recompute each driver from the events and labels; it must equal truth.json's value."""
    sid = samples.set_index(["patient_id", "timepoint", "condition"])["sample_id"]
    groups = {k: v for k, v in truth["statistics"]["groups"].items()}
    parents = {"Treg": groups["CD4 T"], "CD8 T": [0, 1, 2, 3, 4, 5]}

    def value(term, pid, tp):
        x, lab, markers = data[sid[(pid, tp, term["condition"])]]
        sel = np.isin(lab, groups[term["population"]])
        if term["statistic"] == "pct_live":
            return 100.0 * sel.sum() / (lab < 14).sum()
        if term["statistic"] == "pct_parent":
            return 100.0 * sel.sum() / np.isin(lab, parents[term["population"]]).sum()
        col = x[sel, markers.index(term["marker"])]
        if term["statistic"] == "frac_pos":
            return float((col > truth["frac_pos_threshold"]).mean())
        return float(np.median(col))

    for t, d in enumerate(truth["drivers"]):
        for p in truth["patients"][:3]:
            v = value(d, p["patient_id"], "baseline")
            if d["timepoint"] == "week6-baseline":  # the pipeline's contrasts (DESIGN §3)
                on = value(d, p["patient_id"], "week6")
                pseudo = {"pct_live": 0.01, "pct_parent": 0.1}.get(d["statistic"])
                v = on - v if pseudo is None else np.log2((on + pseudo) / (v + pseudo))
            assert v == pytest.approx(p["drivers"][f"driver{t}"], abs=1e-6)


def test_linear_predictor_follows_documented_formula(truth):
    """lp_systematic = intercept + treatment*[IL-7] + sum of the driver terms from truth.json."""
    out = truth["parameters"]["outcome"]
    for p in truth["patients"]:
        lp = out["intercept"] + out["treatment"] * (p["arm"] == "IL-7")
        for t, d in enumerate(truth["drivers"]):
            if d["arm"] == "IL-7" and p["arm"] != "IL-7":
                continue
            z = (p["drivers"][f"driver{t}"] - d["centre"]) / d["scale"]
            if d["form"] == "hinge":
                lp += d["weight"] * max(0.0, z - d["knot"])
            elif d["form"] == "interaction":
                lp += d["weight"] * z * (p["drivers"][f"driver{t}_with"] - d["with_centre"]) \
                    / d["with_scale"]
            else:
                lp += d["weight"] * z
        assert p["lp_systematic"] == pytest.approx(lp)
        assert p["p"] == pytest.approx(1.0 / (1.0 + np.exp(-p["lp"])))
    il7 = [d for d in truth["drivers"] if d["arm"] == "IL-7"]
    assert all(d["centre"] == 0.0 for d in il7)  # no on-treatment change, no benefit


def test_best_auroc_formula(truth):
    p = np.array([q["p"] for q in truth["patients"]])
    num = den = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j:
                w = p[i] * (1 - p[j])
                den += w
                num += w * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
    assert truth["best_auroc"] == pytest.approx(num / den)


# --- errors ----------------------------------------------------------------------------------

def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="overwrite"):
        simulate_cohort(out, n_patients=4, cells_per_sample=300)
    assert (out / "keep.txt").read_text() == "x"
    done = simulate_cohort(out, n_patients=4, cells_per_sample=300, overwrite=True)
    assert not (out / "keep.txt").exists() and done.samples.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temp folders left


def test_empty_output_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    done = simulate_cohort(tmp_path / "empty", n_patients=4, cells_per_sample=300)
    assert len(pd.read_csv(done.samples)) == 16


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_patients": 2}, r"The 'n_patients' parameter of simulate_cohort must be an int >= 4\. "
                        r"Got 2 instead\."),
    ({"n_patients": 4.0}, "'n_patients'"),
    ({"n_patients": True}, "'n_patients'"),
    ({"seed": -1}, "'seed'"),
    ({"cells_per_sample": 10}, "'cells_per_sample'"),
    ({"n_batches": 0}, "'n_batches'"),
    ({"n_batches": 9, "n_patients": 4}, "'n_batches'"),
    ({"n_jobs": 0}, "'n_jobs'"),
    ({"id_prefix": "P 1"}, "'id_prefix'"),
    ({"id_prefix": ""}, "'id_prefix'"),
    ({"overwrite": "yes"}, "'overwrite'"),
])
def test_bad_parameters(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        simulate_cohort(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
