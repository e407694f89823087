"""A self-contained HTML explanation report (images embedded; works offline)."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from predictor.errors import OutputExistsError
from predictor.explain import (
    aggregate_shap,
    describe_driver,
    importance,
    shap_values,
    to_explanation,
)
from predictor.model.bundle import Bundle, load_bundle
from predictor.report import plots

__all__ = ["build_report", "render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f6f8} td:first-child,th:first-child{text-align:left}
.muted{color:#666;font-size:.9em} .grid{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0}
img{max-width:100%} .card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.8em 0}
.flag{font-weight:bold;color:#b3261e} .noflag{color:#1e6b3a} code{background:#f4f6f8;padding:0 .2em}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def _table(df: pd.DataFrame, *, floatfmt: str = "{:.3f}") -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            return "–" if v != v else floatfmt.format(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _versions() -> str:
    pkgs = ["predictor", "xgboost", "shap", "scikit-learn", "pandas", "numpy", "mlflow", "flowio"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p} {version(p)}")
        except Exception:
            continue
    return ", ".join(out) + f"; Python {platform.python_version()}"


def render_report(bundle: Bundle, *, scores: pd.DataFrame | None = None, score_features: pd.DataFrame | None = None,
                  max_cards: int = 12) -> str:
    """The report as an HTML string."""
    m = bundle.metrics()
    oof = bundle.oof()
    exp = json.loads((bundle.path / "experiment.json").read_text())
    X = bundle.train_features()
    meta = bundle.schema
    y = oof["y"].to_numpy()
    parts: list[str] = []
    mlf = bundle.meta.get("mlflow", {})
    parts.append(f"<h1>Who benefits? — {html.escape(bundle.name)} v{bundle.version:03d}</h1>")
    parts.append(
        f'<p class="muted">Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · MLflow run '
        f'<code>{html.escape(str(mlf.get("run_id", "–")))}</code> · registered model '
        f'<code>{html.escape(str(mlf.get("registered_model", "–")))}</code> version '
        f'{mlf.get("registered_version", "–")}</p>'
    )
    # Cohort
    parts.append("<h2>Cohort</h2>")
    parts.append(
        f"<p>{len(oof)} patients, {int(y.sum())} responders ({100 * y.mean():.0f}%). "
        f"{m.get('n_features_total', '–')} features computed per patient; the final model uses "
        f"{len(bundle.features)} (selected by univariate AUROC, inside each CV fold during evaluation).</p>"
    )
    qc_path = bundle.path / "qc.csv"
    if qc_path.is_file():
        qc = pd.read_csv(qc_path)
        num = qc.select_dtypes("number")
        summary = pd.DataFrame({"step": num.columns, "median": num.median().to_numpy(), "min": num.min().to_numpy()})
        parts.append(f"<p>Cleanup QC over {len(qc)} samples (events kept after each step):</p>")
        parts.append(_table(summary, floatfmt="{:.3g}"))
        if "flagged_low" in qc and qc["flagged_low"].astype(bool).any():
            bad = qc.loc[qc["flagged_low"].astype(bool), "sample_id"].tolist()
            parts.append(f"<p class='flag'>Samples with too few cells: {html.escape(', '.join(bad))}</p>")
    # Performance
    parts.append("<h2>Performance (honest, out-of-fold)</h2>")
    rows = []
    for model_name, table in {"XGBoost": m["metrics"], **{k.replace("_", " "): v for k, v in m["baselines"].items()}}.items():
        for metric, v in table.items():
            rows.append({"model": model_name, "metric": metric, "estimate": v["estimate"],
                         "95% CI low": v["ci_low"], "95% CI high": v["ci_high"]})
    parts.append(_table(pd.DataFrame(rows)))
    perm = m["permutation"]
    folds_desc = exp["cv"]
    parts.append(
        f"<p>Permutation test of the AUROC: p = {perm['p_value']:.3g} "
        f"({perm['n_permutations']} label permutations; null mean {perm['null_mean']:.2f}, "
        f"95th percentile {perm['null_q95']:.2f}). Evaluation: {folds_desc['folds']}-fold "
        f"stratified CV grouped by patient, repeated {folds_desc['repeats']}×.</p>"
    )
    curves = {"xgboost": oof["probability"].to_numpy()}
    aucs = {"xgboost": m["metrics"]["auroc"]["estimate"]}
    for b in ("elastic_net", "best_single_feature"):
        if b in oof:
            curves[b] = oof[b].to_numpy()
            aucs[b] = m["baselines"][b]["auroc"]["estimate"]
    parts.append('<div class="grid">')
    parts.append(_img(plots.roc_plot(y, curves, aucs), "ROC curves"))
    cal = m["calibration"]
    parts.append(_img(plots.calibration_plot(cal["curve_raw"], cal["curve_calibrated"]), "Calibration"))
    parts.append("</div>")
    parts.append(
        f"<p>Decision threshold {bundle.threshold:.3f} on the calibrated probability "
        f"(rule: {html.escape(bundle.meta.get('threshold_rule', ''))}, chosen on out-of-fold predictions).</p>"
    )
    # Explanations
    values, base = shap_values(bundle.booster, X)
    parts.append("<h2>What drives the predictions</h2>")
    parts.append(
        "<p class='muted'>SHAP values of the final model on the training patients (log-odds). "
        "Population importance sums the mean |SHAP| of each population's features.</p>"
    )
    parts.append(_img(plots.beeswarm_plot(to_explanation(values, base, X)), "SHAP beeswarm"))
    pop_imp = importance(aggregate_shap(values, meta, by="population")).head(15)
    parts.append('<div class="grid">')
    parts.append(_img(plots.bar_plot(pop_imp, title="Which subsets drive predictions", xlabel="mean |SHAP| (summed per population)"), "Population importance"))
    mk_imp = importance(aggregate_shap(values, meta, by="marker")).head(15)
    parts.append(_img(plots.bar_plot(mk_imp, title="Which markers drive predictions", xlabel="mean |SHAP| (summed per marker)"), "Marker importance"))
    parts.append("</div>")
    # Patient cards
    if scores is not None and score_features is not None and len(scores):
        parts.append("<h2>Scored patients</h2>")
        sX = score_features.reindex(columns=bundle.features)
        svals, sbase = shap_values(bundle.booster, sX)
        expl = to_explanation(svals, sbase, sX)
        for i, row in enumerate(scores.head(max_cards).itertuples(index=False)):
            cls = "flag" if row.flag else "noflag"
            verdict = "likely to benefit" if row.flag else "not flagged"
            drivers = [
                describe_driver(getattr(row, f"driver_{k}"), getattr(row, f"driver_{k}_value"), getattr(row, f"driver_{k}_shap"))
                for k in (1, 2, 3) if hasattr(row, f"driver_{k}")
            ]
            lis = "".join(f"<li>{html.escape(d)}</li>" for d in drivers)
            warn = f"<p class='muted'>⚠ {html.escape(row.warnings)}</p>" if row.warnings else ""
            parts.append(
                f"<div class='card'><h3>{html.escape(str(row.patient_id))}: <span class='{cls}'>{verdict}</span> "
                f"(probability {row.probability:.2f})</h3><ul>{lis}</ul>{warn}"
                + _img(plots.waterfall_plot(expl[i]), f"waterfall {row.patient_id}") + "</div>"
            )
        if len(scores) > max_cards:
            parts.append(f"<p class='muted'>{len(scores) - max_cards} more patients in the scores table.</p>")
    # Methods
    fc = exp["features"]
    mc = exp["model"]
    parts.append("<h2>Methods</h2>")
    parts.append(
        "<p>FCS files were read with the panel frozen in the model bundle; beads, debris, doublets, "
        "dead and CD45<sup>−</sup> events were removed by automatic per-file gates; intensities were "
        "arcsinh-transformed (per-channel cofactors, 5 by default). Cell populations were gated with "
        f"the template <code>{html.escape(str(exp['data']['template']))}</code>, thresholds found on the "
        "parent population pooled over samples and frozen. Per sample and population: "
        f"{html.escape(', '.join(fc['statistics']))} (fraction positive above arcsinh "
        f"{fc['frac_pos_threshold']}; populations under {fc['min_cells']} cells give missing values). "
        f"Contrasts: stimulated − unstimulated, and {html.escape(fc['on_treatment'])} − "
        f"{html.escape(fc['baseline'])} (log2 ratio for frequencies) in mode "
        f"<code>{html.escape(fc['mode'])}</code>. XGBoost ({mc['n_estimators']} trees, depth "
        f"{mc['max_depth']}, learning rate {mc['learning_rate']}) on the top {mc['max_features']} "
        "features by univariate AUROC, selected inside each training fold; evaluation by repeated "
        "stratified patient-grouped k-fold CV with patient-bootstrap 95% CIs and a permutation test; "
        "baselines (elastic-net logistic regression, best single feature) on the same folds; "
        "Platt calibration and the threshold fitted on out-of-fold predictions. "
        f"Seed {exp['seed']}. Software: {html.escape(_versions())}.</p>"
    )
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>predictor report — {html.escape(bundle.name)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def build_report(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scores: pd.DataFrame | None = None,
    score_features: pd.DataFrame | None = None,
    force: bool = False,
) -> Path:
    """Write the report of a bundle (``models/NAME``) to ``out``, atomically."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    bundle = load_bundle(model)
    text = render_report(bundle, scores=scores, score_features=score_features)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
