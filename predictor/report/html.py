"""A self-contained HTML explanation report (images embedded; works offline, no external URL).

:func:`render_report` turns a bundle (and optionally scored patients) into one HTML string;
:func:`build_report` writes it atomically. The numbers come from
:func:`predictor.explain.explain_bundle` and :mod:`predictor.report.tables`; this module only
lays them out. Sections (ids in brackets): cohort and QC (``cohort``), performance
(``performance``), global SHAP (``drivers``), cell subsets with fold stability and, apart from
them, the clinical covariates the model adjusts for (``populations``), markers and contrasts
(``markers``), interactions (``interactions``),
dependence plots (``dependence``), patient cards (``patients``) and methods (``methods``).
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from predictor.covariates import COVARIATE_GROUP
from predictor.errors import OutputExistsError
from predictor.explain import (
    COVARIATE_LEVEL,
    SAME_READOUT_RHO,
    Explanations,
    aggregate_shap,
    describe_driver,
    explain_bundle,
    shap_values,
    to_explanation,
)
from predictor.model.bundle import Bundle, load_bundle
from predictor.report import plots, tables

__all__ = ["build_report", "render_report", "SECTIONS"]

#: Section ids of the report, in order (``patients`` only with scored patients).
SECTIONS = ("cohort", "performance", "drivers", "populations", "markers", "interactions",
            "dependence", "patients", "methods")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin:.2em 0 .4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em} td,th{border:1px solid #ddd;padding:.2em .55em;text-align:right}
th{background:#f4f6f8} td:first-child,th:first-child,td.t,th.t{text-align:left}
.muted{color:#666;font-size:.9em} .grid{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} figure{margin:0}
img{max-width:100%;height:auto} .card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.9em 0;break-inside:avoid}
.flag{font-weight:bold;color:#b3261e} .noflag{color:#1e6b3a} code{background:#f4f6f8;padding:0 .2em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.6em 0}
.glance{background:#f4f8fc;border:1px solid #d6e4f0;border-radius:6px;padding:.5em 1em}
nav{font-size:.9em;margin:.6em 0} nav a{margin-right:.9em;color:#3b75af;text-decoration:none}
details{margin:.4em 0} summary{cursor:pointer;color:#3b75af}
ul.drivers li{margin:.25em 0}
"""


# ------------------------------------------------------------------------------ helpers


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def _td(v: Any, floatfmt: str) -> str:
    text = isinstance(v, str)
    return f"<td class='t'>{_fmt(v, floatfmt)}</td>" if text else f"<td>{_fmt(v, floatfmt)}</td>"


def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, float | np.floating):
        return "–" if v != v else floatfmt.format(v)
    if isinstance(v, np.integer):
        return str(int(v))
    return html.escape(str(v))


def _table(df: pd.DataFrame, *, floatfmt: str = "{:.3f}", formats: dict[str, str] | None = None) -> str:
    formats = formats or {}
    text_cols = {c for c in df.columns if len(df) and isinstance(df[c].iloc[0], str)}
    head = "".join(f"<th class='t'>{html.escape(str(c))}</th>" if c in text_cols else f"<th>{html.escape(str(c))}</th>"
                   for c in df.columns)
    body = "".join(
        "<tr>" + "".join(_td(v, formats.get(c, floatfmt)) for c, v in zip(df.columns, row, strict=True)) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _versions() -> str:
    pkgs = ["predictor", "xgboost", "shap", "scikit-learn", "pandas", "numpy", "mlflow", "flowio", "matplotlib"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p} {version(p)}")
        except Exception:
            continue
    return ", ".join(out) + f"; Python {platform.python_version()}"


def _read_csv(path: Path) -> pd.DataFrame | None:
    """A bundle table (ids stay strings: '007' is not 7), or None when it is missing."""
    ids = {"sample_id": str, "patient_id": str}
    return pd.read_csv(path, dtype=ids) if path.is_file() else None


def _e(x: Any) -> str:
    return html.escape(str(x))


_WORDS = {
    "binary": {"scale": "log-odds", "outcome": "the predicted chance of benefit",
               "push": "push on the log-odds of benefit", "yes": "likely to benefit",
               "no": "not flagged", "score": "probability", "up": "towards benefit",
               "down": "against"},
    "survival": {"scale": "log hazard ratio", "outcome": "the predicted risk of an event",
                 "push": "push on the log hazard (higher = earlier event)", "yes": "higher risk",
                 "no": "lower risk", "score": "hazard ratio", "up": "towards higher risk",
                 "down": "towards lower risk"},
}


def _words(kind: str) -> dict[str, str]:
    return _WORDS.get(kind, _WORDS["binary"])


# ------------------------------------------------------------------------------ sections


def _cohort(bundle: Bundle, oof: pd.DataFrame, m: dict, exp: dict) -> str:
    parts = ['<h2 id="cohort">Cohort and sample quality</h2>']
    y = oof["y"].to_numpy() if "y" in oof else np.array([])
    kind = bundle.meta.get("outcome", {}).get("kind", "binary")
    if kind == "binary" and y.size:
        who = f"{int(np.nansum(y))} responders ({100 * np.nanmean(y):.0f}%)"
    else:
        who = f"{int(np.nansum(y))} events" if y.size else ""
    covs = bundle.covariates
    n_cov = len(covs.features) if covs is not None else 0
    adjusted = (f", plus the clinical covariate(s) {_e(', '.join(covs.columns))}, always kept"
                if covs is not None else "")
    parts.append(
        f"<p>{len(oof)} patients, {who}. {m.get('n_features_total', '–')} features computed per "
        f"patient; the final model uses {len(bundle.features) - n_cov} of them{adjusted} (filtered "
        "inside each CV fold during evaluation, so the estimates below are not inflated by the "
        "filtering).</p>"
    )
    qc = _read_csv(bundle.path / "qc.csv")
    if qc is not None and not qc.empty:
        parts.append(f"<h3>Cleanup: events kept per step ({len(qc)} samples)</h3>")
        parts.append('<div class="grid">')
        parts.append(_table(tables.qc_steps(qc), formats={"median events": "{:,.0f}", "min events": "{:,.0f}",
                                                           "median % of input": "{:.1f}"}))
        if any(c in qc.columns for c in tables.QC_STEPS):
            parts.append(_img(plots.qc_plot(qc, tables.QC_STEPS), "Events kept after each cleanup step"))
        parts.append("</div>")
        low = tables.low_samples(qc)
        if len(low):
            parts.append(f"<p class='flag'>⚠ {len(low)} sample(s) with few cells after cleanup; their "
                         "population statistics are less reliable:</p>")
            parts.append(_table(low, formats={"events in file": "{:,.0f}", "kept": "{:,.0f}", "% kept": "{:.1f}"}))
        else:
            parts.append("<p class='noflag'>No sample was flagged for too few cells.</p>")
    else:
        parts.append("<p class='muted'>No cleanup QC table (qc.csv) in this bundle.</p>")
    pops = _read_csv(bundle.path / "populations.csv")
    if pops is not None and not pops.empty:
        min_cells = int(exp.get("features", {}).get("min_cells", 20))
        pc = tables.population_cells(pops, min_cells=min_cells)
        low_col = pc.columns[-1]
        n_low = int((pc[low_col] > 0).sum())
        parts.append(f"<h3>Cells per population ({pops['sample_id'].nunique() if 'sample_id' in pops else '–'} samples)</h3>")
        msg = (f"{n_low} population(s) fall under {min_cells} cells in some samples (their statistics are "
               "missing values there)." if n_low else f"Every population has ≥ {min_cells} cells in every sample.")
        parts.append(f"<p class='muted'>{msg}</p>")
        parts.append(f"<details><summary>Table of {len(pc)} populations</summary>"
                     + _table(pc, formats={"median cells": "{:,.0f}", "min cells": "{:,.0f}", "median % live": "{:.2f}"})
                     + "</details>")
    return "\n".join(parts)


def _performance(bundle: Bundle, oof: pd.DataFrame, m: dict, exp: dict) -> str:
    parts = ['<h2 id="performance">Performance (honest, out-of-fold)</h2>']
    perf = tables.performance(m)
    parts.append(_table(perf))
    head = next((k for k in ("auroc", "cindex") if k in m.get("metrics", {})), None)
    label = {"auroc": "AUROC", "cindex": "C-index"}.get(head or "", "metric")
    perm = m.get("permutation", {})
    cv = exp.get("cv", {})
    if perm:
        parts.append(
            f"<p>Permutation test of the {label}: p = {perm.get('p_value', float('nan')):.3g} "
            f"({perm.get('n_permutations', '–')} label permutations; null mean "
            f"{perm.get('null_mean', float('nan')):.2f}, 95th percentile {perm.get('null_q95', float('nan')):.2f}). "
            f"Evaluation: {cv.get('folds', '–')}-fold stratified CV grouped by patient, repeated "
            f"{cv.get('repeats', '–')}×.</p>"
        )
    fs = tables.fold_summary(m)
    if len(fs):
        r = fs.iloc[0]
        parts.append(f"<p class='muted'>Across the {r['folds']} CV folds the {label} ranged from "
                     f"{r['min']:.2f} to {r['max']:.2f} (median {r['median']:.2f}).</p>")
    kind = bundle.meta.get("outcome", {}).get("kind", "binary")
    if kind == "binary" and head == "auroc" and {"y", "probability"} <= set(oof.columns):
        y = oof["y"].to_numpy()
        curves = {"xgboost": oof["probability"].to_numpy()}
        aucs = {"xgboost": m["metrics"]["auroc"]["estimate"]}
        for b in ("elastic_net", "best_single_feature", "covariates_only"):
            if b in oof and b in m.get("baselines", {}):
                curves[b] = oof[b].to_numpy()
                aucs[b] = m["baselines"][b]["auroc"]["estimate"]
        parts.append('<div class="grid">')
        parts.append(_img(plots.roc_plot(y, curves, aucs), "ROC curves"))
        cal = m.get("calibration", {})
        if cal.get("curve_raw") and cal.get("curve_calibrated"):
            parts.append(_img(plots.calibration_plot(cal["curve_raw"], cal["curve_calibrated"]), "Calibration"))
        parts.append("</div>")
        parts.append(
            f"<p>Decision threshold {bundle.threshold:.3f} on the calibrated probability "
            f"(rule: {_e(bundle.meta.get('threshold_rule', ''))}, chosen on out-of-fold predictions).</p>"
        )
    return "\n".join(parts)


def _source_note(ex: Explanations, w: dict[str, str]) -> str:
    if ex.source == "out-of-fold":
        return ("<p class='muted'>SHAP values are <b>out-of-fold</b>: each patient is explained by the "
                f"CV models that did not see them, averaged over repeats ({w['scale']} scale). They "
                "show what the evaluated procedure relies on.</p>")
    return ("<p class='note'>This bundle stores no out-of-fold SHAP values (oof_shap.csv), so the "
            "explanations below are the <b>final model's in-sample SHAP values</b> on its own training "
            "patients. They describe the model, but may overstate features the model overfitted; retrain "
            "with a current version to get out-of-fold explanations.</p>")


def _drivers(ex: Explanations, w: dict[str, str]) -> str:
    parts = ['<h2 id="drivers">What drives the predictions</h2>', _source_note(ex, w)]
    top = list(ex.importance().index[:15])
    parts.append(_img(plots.beeswarm_plot(ex.explanation(features=top)), "SHAP beeswarm"))
    parts.append(f"<p class='muted'>Each dot is a patient; position = {w['push']}, colour = the "
                 "feature's value (red high, blue low, grey when the value is not stored in the "
                 "bundle).</p>")
    return "\n".join(parts)


def _populations(ex: Explanations, frame: pd.DataFrame, w: dict[str, str]) -> str:
    parts = ['<h2 id="populations">Which cell subsets drive predictions</h2>']
    pop = frame[frame["level"] == "population"]
    has_stab = pop["top_k_frequency"].notna().any()
    parts.append(
        "<p>A subset's importance is the mean over patients of |sum of its features' SHAP values| "
        "(signed sums are exact, so this is the subset's total push on a patient's prediction). "
        + (f"Stability: how often the subset ranks in the top {ex.k} of the fold models "
           "(importance per fold model = sum of its features' mean |SHAP|), and its mean rank ± SD."
           if has_stab else
           "<span class='note'>No per-fold importances in this bundle (fold_importance.csv), so the "
           "stability of this ranking across CV folds is not shown.</span>")
        + "</p>"
    )
    parts.append(_img(plots.importance_plot(pop, title="Cell subsets ranked by their push on predictions",
                                            k=ex.k, scale=w["scale"]), "Population importance"))
    cols = ["group", "rank", "n_features", "mean_abs_shap", "mean_shap"]
    if has_stab:
        cols += ["top_k_frequency", "mean_rank", "sd_rank"]
    nt = ex.null_test("population")
    if nt is not None:
        cols += ["null_p"]
        beat = pop[pop["null_p"] < 0.05]["group"].tolist()
        n_perm = int(nt["n_permutations"].iloc[0])
        parts.append(
            f"<p><b>Against chance:</b> {len(beat)} of {len(pop)} subsets carry more importance "
            f"than on permuted outcomes (p &lt; 0.05 over {n_perm} permutations, the permutation "
            "test's refits; importance of the first CV repeat, not adjusted for the "
            f"{len(pop)} subsets){': ' + ', '.join(_e(g) for g in beat) if beat else ''}. "
            "Below those, the order of the ranking may be noise.</p>")
    t = pop[cols].rename(columns={"group": "population", "n_features": "features",
                                  "mean_abs_shap": "mean |SHAP|", "mean_shap": "mean SHAP",
                                  "top_k_frequency": f"share of folds in top {ex.k}",
                                  "mean_rank": "mean fold rank", "sd_rank": "SD fold rank",
                                  "null_p": "p (permuted outcome)"})
    parts.append(f"<details><summary>Table of {len(t)} populations</summary>{_table(t)}</details>")
    parts.append(_same_readouts(ex))
    parts.append(_covariate_block(ex, frame, w))
    return "\n".join(parts)


def _same_readouts(ex: Explanations) -> str:
    """Which child-gate features count for a parent population (empty when none do)."""
    same = ex.same_readouts
    if same is None or same.empty:
        return ""
    pairs = (same.groupby(["credited_to", "population"], sort=False)
             .agg(features=("feature", "size"), rho=("rho", lambda r: r.abs().min()))
             .reset_index())
    listed = "; ".join(f"{_e(r.population)} → {_e(r.credited_to)} ({r.features} feature"
                       f"{'s' if r.features > 1 else ''}, |ρ| ≥ {r.rho:.2f})"
                       for r in pairs.itertuples())
    t = same.assign(rho=same["rho"].round(3)).rename(columns={
        "population": "gated in", "credited_to": "counted for", "rho": "Spearman ρ"})
    return (f"<p class='muted'>Same readout, counted once: {len(same)} feature(s) of a child gate "
            f"agree with the same readout of a parent population across patients (|Spearman ρ| ≥ "
            f"{SAME_READOUT_RHO}), so the data cannot tell the two gates apart there; they count "
            f"for the parent above: {listed}.</p>"
            f"<details><summary>Table of {len(same)} features counted for a parent</summary>"
            f"{_table(t)}</details>")


def _covariate_block(ex: Explanations, frame: pd.DataFrame, w: dict[str, str]) -> str:
    """The clinical covariates, shown apart from the cell subsets (empty without any)."""
    cov = frame[frame["level"] == COVARIATE_LEVEL]
    if cov.empty:
        return ""
    pop = frame[frame["level"] == "population"]
    top = float(pop["mean_abs_shap"].max()) if len(pop) else float("nan")
    parts = [f"<h3 id='covariates'>{COVARIATE_GROUP.capitalize()} (adjusted for, not cell subsets)</h3>",
             "<p>The model also takes " + ", ".join(f"<code>{_e(c)}</code>" for c in cov["group"])
             + " from the clinical table as input(s), fitted first, as a trial analysis adjusts for "
             "the arm: the cell subsets above explain what the covariates do not. Their importance "
             f"is the same measure (mean |sum of SHAP|, {w['scale']}); they are ranked apart and "
             "never counted as a population"
             + (f" (for comparison, the top cell subset's is {top:.3f})." if top == top else ".") + "</p>"]
    parts.append(_img(plots.importance_plot(cov, title="Clinical covariates (adjusted for)", k=ex.k,
                                            scale=w["scale"]), "Clinical covariate importance"))
    cols = ["group", "n_features", "mean_abs_shap", "mean_shap"]
    parts.append(_table(cov[cols].rename(columns={"group": "covariate", "n_features": "inputs",
                                                  "mean_abs_shap": "mean |SHAP|", "mean_shap": "mean SHAP"})))
    return "\n".join(parts)


def _markers(ex: Explanations, frame: pd.DataFrame) -> str:
    parts = ['<h2 id="markers">Markers, statistics and contrasts</h2>']
    panels = {}
    for level, title in (("marker", "per marker"), ("statistic", "per statistic"), ("contrast", "per contrast")):
        f = frame[frame["level"] == level]
        panels[title] = pd.Series(f["mean_abs_shap"].to_numpy(), index=f["group"].to_numpy())
    parts.append(_img(plots.group_panels(panels), "Importance per marker, statistic and contrast"))
    parts.append("<p class='muted'>Same measure as above, grouped by marker ((frequency) = abundance "
                 "features), statistic, and contrast (condition · timepoint; Δweek6 = on-treatment minus "
                 "baseline).</p>")
    t = frame[frame["level"].isin(["marker", "statistic", "contrast"])][
        ["level", "group", "rank", "n_features", "mean_abs_shap", "mean_shap", "top_k_frequency", "mean_rank"]]
    parts.append(f"<details><summary>Tables</summary>{_table(t)}</details>")
    return "\n".join(parts)


def _interactions(ex: Explanations) -> str:
    parts = ['<h2 id="interactions">Interactions</h2>']
    pairs = ex.interaction_frame(top=10)
    if pairs.empty:
        parts.append("<p class='muted'>The final model has no feature interactions.</p>")
        return "\n".join(parts)
    parts.append("<p class='muted'>Strongest feature pairs of the final model (SHAP interaction "
                 "values on the training patients: mean |interaction|, both halves summed). A pair "
                 "matters when the effect of one feature depends on the level of the other.</p>")
    cols = ["feature_a", "feature_b", "mean_abs_interaction"]
    parts.append(_table(pairs[cols].rename(columns={"mean_abs_interaction": "mean |interaction|"}), floatfmt="{:.4f}"))
    return "\n".join(parts)


def _dependence(ex: Explanations, n: int = 4) -> str:
    parts = ['<h2 id="dependence">How the top features act</h2>']
    known = ex.data.notna().any(axis=0)
    feats = [f for f in ex.importance().index if known.get(f, False)][:n]
    if not feats:
        parts.append("<p class='muted'>No feature values stored for the top features.</p>")
        return "\n".join(parts)
    partners: list[str | None] = []
    if ex.interactions is not None and ex.interaction_names:
        strength = np.abs(ex.interactions).mean(axis=0)
        np.fill_diagonal(strength, 0.0)
        pos = {f: i for i, f in enumerate(ex.interaction_names)}
        for f in feats:
            i = pos.get(f)
            j = int(np.argmax(strength[i])) if i is not None and strength[i].max() > 0 else None
            cand = ex.interaction_names[j] if j is not None else None
            partners.append(cand if cand in ex.values.columns and known.get(cand, False) else None)
    else:
        partners = [None] * len(feats)
    cols = list(dict.fromkeys(feats + [p for p in partners if p]))
    parts.append(_img(plots.dependence_grid(ex.explanation(features=cols), feats, partners), "Dependence plots"))
    parts.append("<p class='muted'>SHAP value of each top feature against its value (one dot per "
                 "patient), coloured by the feature it interacts with most in the final model.</p>")
    return "\n".join(parts)


def _patients(bundle: Bundle, ex: Explanations, scores: pd.DataFrame, score_features: pd.DataFrame,
              max_cards: int, kind: str) -> str:
    parts = ['<h2 id="patients">Scored patients</h2>']
    thr = float(bundle.meta.get("threshold", float("nan")))
    n_flag = int(scores["flag"].astype(bool).sum()) if "flag" in scores else 0
    w = _words(kind)
    rule = (f"calibrated probability ≥ {thr:.2f}" if kind == "binary" else f"{w['score']} above {thr:.3g}")
    parts.append(f"<p>{len(scores)} patient(s) scored; {n_flag} flagged as {w['yes']} ({rule}). "
                 "Each card lists the features that moved the patient's prediction most, compared "
                 "with the training patients, and a waterfall from the model's average (E[f(X)]) "
                 f"to the patient's score f(x), both on the {w['scale']} scale"
                 + (" before calibration" if kind == "binary" else "") + ".</p>")
    sX = score_features.reindex(columns=bundle.features).astype(float)
    sX.index = sX.index.astype(str)
    svals, sbase = shap_values(bundle.booster, sX)
    # the same population grouping as the ranking (child readouts counted for their parent)
    by_pop = aggregate_shap(svals, ex.group_meta, by="population")
    by_cov = aggregate_shap(svals, bundle.schema, by=COVARIATE_LEVEL)
    train = bundle.train_features()
    w = _words(kind)
    for row in scores.head(max_cards).to_dict("records"):
        pid = str(row["patient_id"])
        if pid not in svals.index:
            continue
        flag = bool(row.get("flag", False))
        cls, verdict = ("flag", w["yes"]) if flag else ("noflag", w["no"])
        v = svals.loc[pid]
        top = v.abs().sort_values(ascending=False, kind="stable").index[:4]
        items = []
        for f in top:
            meta = bundle.schema.loc[f].to_dict() if f in bundle.schema.index else None
            ref = train[f].to_numpy() if f in train.columns else None
            items.append(describe_driver(f, float(sX.at[pid, f]), float(v[f]), meta=meta, reference=ref,
                                         outcome=w["outcome"]))
        lis = "".join(f"<li>{_e(d)}</li>" for d in items)
        pops = by_pop.loc[pid].sort_values()
        ups = ", ".join(f"{_e(k)} ({x:+.2f})" for k, x in pops[::-1].head(5).items() if x > 0.05)
        downs = ", ".join(f"{_e(k)} ({x:+.2f})" for k, x in pops.head(5).items() if x < -0.05)
        summary = ""
        if ups or downs:
            summary = (f"<p class='muted'>By cell subset — {w['up']}: " + (ups or "none")
                       + f"; {w['down']}: " + (downs or "none") + ".</p>")
        if by_cov.shape[1]:
            summary += ("<p class='muted'>Clinical covariates (adjusted for): "
                        + ", ".join(f"{_e(k)} ({x:+.2f})" for k, x in by_cov.loc[pid].items()) + ".</p>")
        warn = row.get("warnings", "")
        warn = f"<p class='note'>⚠ {_e(warn)}</p>" if isinstance(warn, str) and warn else ""
        prob = row.get("probability", float("nan"))
        expl = to_explanation(svals.loc[[pid]], sbase, sX.loc[[pid]])[0]
        parts.append(
            f"<div class='card' id='patient-{_e(pid)}'><h3>{_e(pid)}: <span class='{cls}'>{verdict}</span> "
            f"({w['score']} {prob:.2f})</h3><ul class='drivers'>{lis}</ul>{summary}{warn}"
            + _img(plots.waterfall_plot(expl), f"waterfall {pid}") + "</div>"
        )
    if len(scores) > max_cards:
        parts.append(f"<p class='muted'>{len(scores) - max_cards} more patients in the scores table.</p>")
    return "\n".join(parts)


def _methods(bundle: Bundle, ex: Explanations, exp: dict, m: dict, w: dict[str, str]) -> str:
    kind = bundle.meta.get("outcome", {}).get("kind", "binary")
    names = {"elastic_net": "elastic-net regression", "best_single_feature": "best single feature",
             "covariates_only": "the clinical covariates alone"}
    baselines = ", ".join(names.get(b, b.replace("_", " ")) for b in m.get("baselines", {}))
    fc, mc, cv = exp.get("features", {}), exp.get("model", {}), exp.get("cv", {})
    data = exp.get("data", {})
    stats = ", ".join(fc.get("statistics", [])) or "–"
    params = ", ".join(f"{k} {v}" for k, v in mc.items()
                       if v is not None and not isinstance(v, dict | list)) or "defaults"
    covs = bundle.covariates
    cov_text = ""
    if covs is not None:
        within = m.get("permutation", {}).get("within_strata")
        cov_text = (f"Clinical covariates ({_e(', '.join(covs.columns))}; categorical ones as 0/1 "
                    "inputs per level) were model inputs, always kept by the feature filter and fitted "
                    "first: every booster starts with trees that may split on the covariates only. "
                    + ("The permutation test permuted the outcome within the covariates' strata. "
                       if within else "")
                    + "Their SHAP values are reported apart from the cell subsets. ")
    src = ("out-of-fold SHAP values of the CV models (each patient explained by models that did "
           "not see them), averaged over repeats" if ex.source == "out-of-fold" else
           "the final model's SHAP values on its training patients (in-sample; no out-of-fold "
           "values stored in this bundle)")
    stab = ("Ranking stability from each fold model's mean |SHAP| per feature, summed per group."
            if ex.fold_importance is not None else "No per-fold importances were stored.")
    null_text = (" Each population's importance (first CV repeat, summed per fold model and "
                 "averaged over the folds) was compared with the same quantity in the permutation "
                 "test's refits on permuted outcomes: p = (1 + permutations at least as high) / "
                 "(1 + permutations), per population, unadjusted."
                 if ex.null_importance is not None else "")
    return (
        '<h2 id="methods">Methods</h2>'
        "<p>FCS files were read with the panel frozen in the model bundle; beads, debris, doublets, "
        "dead and CD45<sup>−</sup> events were removed by automatic per-file gates; intensities were "
        "arcsinh-transformed (per-channel cofactors, 5 by default). Cell populations were gated with "
        f"the template <code>{_e(data.get('template', 'default'))}</code>, thresholds found on the "
        "parent population pooled over samples and frozen with the model. Per sample and population: "
        f"{_e(stats)} (fraction positive above arcsinh {_e(fc.get('frac_pos_threshold', '–'))}; "
        f"populations under {_e(fc.get('min_cells', '–'))} cells give missing values). Contrasts: "
        f"stimulated − unstimulated, and {_e(fc.get('on_treatment', 'on-treatment'))} − "
        f"{_e(fc.get('baseline', 'baseline'))} (log2 ratio for frequencies) in mode "
        f"<code>{_e(fc.get('mode', '–'))}</code>.</p>"
        f"<p>XGBoost{' Cox model (survival:cox)' if kind == 'survival' else ''} ({_e(params)}), "
        "features filtered by univariate association inside each training fold"
        + ("; hyperparameters chosen by an inner CV search within each training fold" if m.get("tuning") else "")
        + f"; evaluation by {_e(cv.get('folds', '–'))}-fold stratified patient-grouped CV repeated "
        f"{_e(cv.get('repeats', '–'))}×, with patient-bootstrap 95% CIs ({_e(cv.get('bootstrap', '–'))} "
        f"resamples) of the {'C-index' if kind == 'survival' else 'metrics'} and a permutation test "
        f"({_e(m.get('permutation', {}).get('n_permutations', cv.get('permutations', '–')))} permutations); "
        + (f"baselines ({_e(baselines)}) on the same folds; " if baselines else "")
        + ("Platt calibration and the decision threshold fitted on out-of-fold predictions; "
           if kind == "binary" else "")
        + "the final model refitted on all patients.</p>"
        f"<p>Explanations: TreeSHAP (XGBoost's native <code>pred_contribs</code>, identical to "
        f"shap.TreeExplainer) on the {w['scale']} scale; {src}. Group importances sum signed SHAP values "
        f"per patient within a population, marker, statistic or contrast; a child gate's feature "
        f"whose readout matches its parent population's (same marker, statistic and contrast, "
        f"|Spearman ρ| ≥ {SAME_READOUT_RHO} over the training patients) counts for the parent. "
        f"{cov_text}{stab}{null_text} Interactions: "
        "SHAP interaction values of the final model (<code>pred_interactions</code>). Patient cards "
        "use the final model.</p>"
        f"<p class='muted'>Seed {_e(exp.get('seed', '–'))}. Software: {_e(_versions())}.</p>"
    )


# ------------------------------------------------------------------------------ report


def render_report(bundle: Bundle, *, scores: pd.DataFrame | None = None,
                  score_features: pd.DataFrame | None = None, max_cards: int = 12,
                  explanations: Explanations | None = None) -> str:
    """The report of ``bundle`` as one self-contained HTML string.

    Parameters
    ----------
    bundle
        A loaded model bundle.
    scores, score_features
        Scored patients (as from :func:`predictor.score.score_features`) and their feature
        matrix: one card per patient (the first ``max_cards``).
    explanations
        Precomputed :func:`predictor.explain.explain_bundle` result (computed when omitted).
    """
    if scores is not None and "high_risk" in scores:  # survival scores: same card layout
        scores = scores.rename(columns={"hazard_ratio": "probability", "high_risk": "flag"})
    m = bundle.metrics()
    oof = bundle.oof()
    exp_path = bundle.path / "experiment.json"
    exp = json.loads(exp_path.read_text()) if exp_path.is_file() else {}
    ex = explanations if explanations is not None else explain_bundle(bundle)
    frame = ex.frame()
    kind = bundle.meta.get("outcome", {}).get("kind", "binary")
    mlf = bundle.meta.get("mlflow", {})
    head_metric = next((k for k in ("auroc", "cindex") if k in m.get("metrics", {})), None)

    parts: list[str] = []
    parts.append(f"<h1>Who benefits? — {_e(bundle.name)} v{bundle.version:03d}</h1>")
    parts.append(
        f'<p class="muted">Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · MLflow run '
        f'<code>{_e(mlf.get("run_id", "–"))}</code> · registered model '
        f'<code>{_e(mlf.get("registered_model", "–"))}</code> version '
        f'{_e(mlf.get("registered_version", "–"))}</p>'
    )
    has_cards = scores is not None and score_features is not None and len(scores) > 0
    nav = [s for s in SECTIONS if s != "patients" or has_cards]
    parts.append("<nav>" + "".join(f'<a href="#{s}">{s.capitalize()}</a>' for s in nav) + "</nav>")
    glance = []
    if head_metric:
        v = m["metrics"][head_metric]
        glance.append(f"{head_metric.upper() if head_metric == 'auroc' else 'C-index'} "
                      f"{v['estimate']:.2f} (95% CI {v['ci_low']:.2f}–{v['ci_high']:.2f}), "
                      f"permutation p = {m.get('permutation', {}).get('p_value', float('nan')):.3g}")
    pops = frame[frame["level"] == "population"]["group"].head(3).tolist()
    if pops:
        glance.append("subsets that move predictions most: " + ", ".join(map(_e, pops)))
    if ex.covariates:
        glance.append("adjusted for " + ", ".join(map(_e, ex.covariates)))
    glance.append(f"explanations: {ex.source}")
    parts.append("<div class='glance'><b>At a glance:</b> " + "; ".join(glance) + ".</div>")

    parts.append(_cohort(bundle, oof, m, exp))
    parts.append(_performance(bundle, oof, m, exp))
    w = _words(kind)
    parts.append(_drivers(ex, w))
    parts.append(_populations(ex, frame, w))
    parts.append(_markers(ex, frame))
    parts.append(_interactions(ex))
    parts.append(_dependence(ex))
    if has_cards:
        parts.append(_patients(bundle, ex, scores, score_features, max_cards, kind))
    parts.append(_methods(bundle, ex, exp, m, w))
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>predictor report — {_e(bundle.name)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def build_report(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scores: pd.DataFrame | None = None,
    score_features: pd.DataFrame | None = None,
    force: bool = False,
    max_cards: int = 12,
) -> Path:
    """Write the report of a bundle (``models/NAME``) to ``out``, atomically."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    bundle = load_bundle(model)
    text = render_report(bundle, scores=scores, score_features=score_features, max_cards=max_cards)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
