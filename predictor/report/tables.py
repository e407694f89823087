"""The report's tables, computed from a bundle's files (no rendering here).

Each function takes plain tables (``qc.csv``, ``populations.csv``, ``metrics.json`` payloads)
and returns a tidy :class:`pandas.DataFrame`, so that the same numbers can be shown in the HTML
report, checked in a test or read in a notebook.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["qc_steps", "low_samples", "population_cells", "performance", "fold_summary"]

#: Cleanup steps of ``qc.csv`` in order, with readable labels.
QC_STEPS = {
    "events_in": "events in file",
    "after_beads": "beads removed",
    "after_singlets": "nucleated singlets",
    "after_live": "live (cisplatin-low)",
    "after_cd45": "CD45+ (no granulocytes)",
    "kept": "kept",
}


def qc_steps(qc: pd.DataFrame) -> pd.DataFrame:
    """Events kept after each cleanup step over samples: median, min, median % of input."""
    steps = [c for c in QC_STEPS if c in qc.columns]
    if not steps:
        return pd.DataFrame(columns=["step", "median events", "min events", "median % of input"])
    num = qc[steps].apply(pd.to_numeric, errors="coerce")
    first = num[steps[0]].replace(0, np.nan)
    return pd.DataFrame({
        "step": [QC_STEPS[s] for s in steps],
        "median events": num.median().to_numpy(),
        "min events": num.min().to_numpy(),
        "median % of input": [float((100 * num[s] / first).median()) for s in steps],
    })


def low_samples(qc: pd.DataFrame, *, min_fraction: float = 0.5) -> pd.DataFrame:
    """Samples flagged as low by the cleanup, or keeping under ``min_fraction`` of their events."""
    if qc.empty or "sample_id" not in qc.columns:
        return pd.DataFrame(columns=["sample_id", "events in file", "kept", "% kept", "why"])
    flagged = qc.get("flagged_low", pd.Series(False, index=qc.index))
    flagged = flagged.astype(str).str.lower().isin(["true", "1"])
    events = pd.to_numeric(qc.get("events_in", pd.Series(np.nan, index=qc.index)), errors="coerce")
    kept = pd.to_numeric(qc.get("kept", pd.Series(np.nan, index=qc.index)), errors="coerce")
    frac = kept / events.replace(0, np.nan)
    low_frac = frac < min_fraction
    mask = flagged | low_frac
    why = np.where(flagged, "too few cells after cleanup", f"kept < {100 * min_fraction:.0f}% of events")
    out = pd.DataFrame({
        "sample_id": qc["sample_id"].astype(str),
        "events in file": events,
        "kept": kept,
        "% kept": 100 * frac,
        "why": why,
    })[mask.to_numpy()]
    if "quirks" in qc.columns:
        out["quirks"] = qc.loc[mask, "quirks"].fillna("").astype(str).to_numpy()
    return out.reset_index(drop=True)


def population_cells(populations: pd.DataFrame, *, min_cells: int = 20) -> pd.DataFrame:
    """Cells per population over samples: median and min count, median % of live cells, and
    the number of samples under ``min_cells`` (whose statistics are missing values)."""
    cols = ["population", "parent", "median cells", "min cells", "median % live",
            f"samples < {min_cells} cells"]
    if populations.empty or "population" not in populations.columns:
        return pd.DataFrame(columns=cols)
    df = populations.copy()
    df["count"] = pd.to_numeric(df["count"], errors="coerce")
    order = list(dict.fromkeys(df["population"]))
    g = df.groupby("population", sort=False)
    out = pd.DataFrame({
        "population": order,
        "parent": g["parent"].first().reindex(order).to_numpy() if "parent" in df else "",
        "median cells": g["count"].median().reindex(order).to_numpy(),
        "min cells": g["count"].min().reindex(order).to_numpy(),
        "median % live": (g["pct_live"].median().reindex(order).to_numpy()
                          if "pct_live" in df else np.nan),
        f"samples < {min_cells} cells": g["count"].apply(lambda c: int((c < min_cells).sum()))
        .reindex(order).to_numpy(),
    })
    return out[cols]


def performance(metrics: dict[str, Any]) -> pd.DataFrame:
    """Model and baselines × metric: estimate and 95% CI (from ``metrics.json``)."""
    rows = []
    tables = {"XGBoost": metrics.get("metrics", {}),
              **{k.replace("_", " "): v for k, v in metrics.get("baselines", {}).items()}}
    for model, table in tables.items():
        for metric, v in table.items():
            if not isinstance(v, dict):
                continue
            rows.append({"model": model, "metric": metric, "estimate": v.get("estimate", np.nan),
                         "95% CI low": v.get("ci_low", np.nan), "95% CI high": v.get("ci_high", np.nan)})
    return pd.DataFrame(rows, columns=["model", "metric", "estimate", "95% CI low", "95% CI high"])


def fold_summary(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per-fold headline metric over the CV folds: median, min, max, number of folds."""
    folds = pd.DataFrame(metrics.get("folds", []))
    metric = next((m for m in ("auroc", "cindex") if m in folds.columns), None)
    if folds.empty or metric is None:
        return pd.DataFrame(columns=["metric", "folds", "median", "min", "max"])
    v = pd.to_numeric(folds[metric], errors="coerce").dropna()
    return pd.DataFrame([{"metric": metric, "folds": int(len(v)), "median": v.median(),
                          "min": v.min(), "max": v.max()}])
