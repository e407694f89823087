"""Report figures, each returned as PNG bytes (matplotlib, headless Agg backend).

Figures are drawn at a modest resolution and stored with a 256-colour palette (Pillow), which
keeps a report with a dozen patient cards well under a few megabytes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

__all__ = [
    "roc_plot", "calibration_plot", "qc_plot", "beeswarm_plot", "bar_plot", "importance_plot",
    "group_panels", "dependence_grid", "waterfall_plot", "DPI",
]

DPI = 90
_BLUE, _RED, _GREY = "#3b75af", "#c0392b", "#8a8a8a"


def _png(fig, *, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    data = buf.getvalue()
    try:  # a palette PNG is ~3× smaller and looks the same for plots
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        if out.tell() < len(data):
            data = out.getvalue()
    except Exception:  # pragma: no cover - Pillow ships with matplotlib; keep the RGB PNG
        pass
    return data


def roc_plot(y: np.ndarray, curves: Mapping[str, np.ndarray], aucs: Mapping[str, float]) -> bytes:
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    for name, p in curves.items():
        ok = np.isfinite(p)
        fpr, tpr, _ = roc_curve(y[ok], p[ok])
        ax.plot(fpr, tpr, lw=2 if name == "xgboost" else 1.2, label=f"{name} (AUROC {aucs[name]:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def calibration_plot(curve_raw: Mapping, curve_cal: Mapping) -> bytes:
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.plot(curve_raw["predicted"], curve_raw["observed"], "o-", label="raw OOF")
    ax.plot(curve_cal["predicted"], curve_cal["observed"], "s-", label="calibrated OOF")
    ax.set(xlabel="predicted probability", ylabel="observed response rate", title="Calibration",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    return _png(fig)


def qc_plot(qc: pd.DataFrame, steps: Mapping[str, str]) -> bytes:
    """Per cleanup step, the % of each sample's events still there (one dot per sample)."""
    cols = [c for c in steps if c in qc.columns]
    num = qc[cols].apply(pd.to_numeric, errors="coerce")
    pct = 100 * num.div(num[cols[0]].replace(0, np.nan), axis=0)
    flagged = qc.get("flagged_low", pd.Series(False, index=qc.index)).astype(str).str.lower().isin(["true", "1"])
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    rng = np.random.default_rng(0)
    for i, c in enumerate(cols):
        v = pct[c].to_numpy()
        x = i + rng.uniform(-0.18, 0.18, len(v))
        ax.scatter(x[~flagged], v[~flagged], s=8, c=_BLUE, alpha=0.6, lw=0)
        ax.scatter(x[flagged], v[flagged], s=16, c=_RED, lw=0, label="flagged low" if i == 0 and flagged.any() else None)
        ax.hlines(np.nanmedian(v), i - 0.3, i + 0.3, colors="black", lw=1.2)
    ax.set_xticks(range(len(cols)), [steps[c] for c in cols], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="% of events in file", title="Events kept after each cleanup step (one dot per sample)")
    ax.title.set_fontsize(10)
    if flagged.any():
        ax.legend(fontsize=8)
    return _png(fig)


def beeswarm_plot(explanation, *, max_display: int = 15) -> bytes:
    import shap

    with warnings.catch_warnings():  # features whose values the bundle lacks are all-NaN (grey)
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        shap.plots.beeswarm(explanation, max_display=max_display, show=False, plot_size=(8, 5.2))
    return _png(plt.gcf())


def waterfall_plot(explanation_row, *, max_display: int = 8) -> bytes:
    import shap

    shap.plots.waterfall(explanation_row, max_display=max_display, show=False)
    fig = plt.gcf()
    fig.set_size_inches(7.2, 3.8)
    return _png(fig)


def bar_plot(values: pd.Series, *, title: str, xlabel: str) -> bytes:
    values = values.sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(values) + 1.2))
    ax.barh(values.index.astype(str), values.to_numpy(), color=_BLUE)
    ax.set(title=title, xlabel=xlabel)
    return _png(fig)


def importance_plot(table: pd.DataFrame, *, title: str, k: int | None = None, top: int = 15,
                    scale: str = "log-odds") -> bytes:
    """Bars of mean |sum of SHAP| per group, annotated with the fold stability when known.

    ``table`` is one level of :meth:`predictor.explain.Explanations.frame`.
    """
    t = table.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.6, 0.3 * len(t) + 1.3))
    ax.barh(t["group"].astype(str), t["mean_abs_shap"].to_numpy(), color=_BLUE)
    xmax = float(t["mean_abs_shap"].max() or 1.0)
    if "top_k_frequency" in t and t["top_k_frequency"].notna().any():
        for y, (f, r, s) in enumerate(zip(t["top_k_frequency"], t["mean_rank"], t["sd_rank"], strict=True)):
            if f == f:
                sd = f" ± {s:.1f}" if s == s else ""
                ax.text(t["mean_abs_shap"].iloc[y] + 0.01 * xmax, y, f"top-{k} in {100 * f:.0f}% of folds · rank {r:.1f}{sd}",
                        va="center", fontsize=7, color="#333")
        ax.set_xlim(0, xmax * 1.75)
    ax.set(title=title, xlabel=f"mean |sum of SHAP values| ({scale})")
    ax.title.set_fontsize(10)
    ax.tick_params(axis="y", labelsize=8)
    return _png(fig)


def group_panels(panels: Mapping[str, pd.Series], *, top: int = 10) -> bytes:
    """Side-by-side bars of importance per marker, statistic and contrast."""
    n = len(panels)
    height = 0.28 * max(min(len(s), top) for s in panels.values()) + 1.4
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, height))
    for ax, (title, s) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        s = s.head(top).iloc[::-1]
        ax.barh(s.index.astype(str), s.to_numpy(), color=_BLUE)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=7.5)
        ax.tick_params(axis="x", labelsize=7.5)
        ax.set_xlabel("mean |sum of SHAP|", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def dependence_grid(explanation, features: Sequence[str], color_by: Sequence[str | None]) -> bytes:
    """shap.plots.scatter of each feature (SHAP vs value), coloured by its strongest partner."""
    import shap

    n = len(features)
    cols = 2 if n > 1 else 1
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, feat, partner in zip(axes.ravel(), features, color_by, strict=False):
        color = explanation[:, partner] if partner else _BLUE
        shap.plots.scatter(explanation[:, feat], color=color, ax=ax, show=False, hist=False, dot_size=14)
        ax.set_xlabel(feat, fontsize=8)
        ax.set_ylabel("SHAP value", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for extra in fig.axes:  # colour bars shap adds
        extra.tick_params(labelsize=7)
        extra.yaxis.label.set_fontsize(7)
    fig.tight_layout()
    return _png(fig)
