"""Report figures, each returned as PNG bytes (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

__all__ = ["roc_plot", "calibration_plot", "beeswarm_plot", "bar_plot", "waterfall_plot"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_plot(y: np.ndarray, curves: dict[str, np.ndarray], aucs: dict[str, float]) -> bytes:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, p in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2 if name == "xgboost" else 1.2, label=f"{name} (AUROC {aucs[name]:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def calibration_plot(curve_raw: dict, curve_cal: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.plot(curve_raw["predicted"], curve_raw["observed"], "o-", label="raw OOF")
    ax.plot(curve_cal["predicted"], curve_cal["observed"], "s-", label="calibrated OOF")
    ax.set(xlabel="predicted probability", ylabel="observed response rate", title="Calibration",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    return _png(fig)


def beeswarm_plot(explanation, *, max_display: int = 15) -> bytes:
    import shap

    shap.plots.beeswarm(explanation, max_display=max_display, show=False, plot_size=(8, 5.5))
    fig = plt.gcf()
    return _png(fig)


def waterfall_plot(explanation_row, *, max_display: int = 8) -> bytes:
    import shap

    shap.plots.waterfall(explanation_row, max_display=max_display, show=False)
    fig = plt.gcf()
    fig.set_size_inches(7.5, 4)
    return _png(fig)


def bar_plot(values: pd.Series, *, title: str, xlabel: str) -> bytes:
    values = values.sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(values) + 1.2))
    ax.barh(values.index.astype(str), values.to_numpy(), color="#3b75af")
    ax.set(title=title, xlabel=xlabel)
    return _png(fig)
