"""Shared fixtures: synthetic PBMC-like cells with known labels, a panel, a gating, a model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from predictor.config import FeatureConfig
from predictor.features.matrix import META_COLUMNS, feature_name
from predictor.io.panel import Panel
from predictor.populations.gating import Gating, fit_gating

MARKERS = ["CD3", "CD4", "CD8a", "CD19", "CD14", "CD16", "CD56", "HLA-DR", "IFNg"]

# Cell type → (share of cells, mean arcsinh level of the markers it expresses; others at 0).
CELL_TYPES: dict[str, tuple[float, dict[str, float]]] = {
    "CD4 T": (0.28, {"CD3": 4.0, "CD4": 4.0}),
    "CD8 T": (0.20, {"CD3": 4.0, "CD8a": 4.0, "IFNg": 2.5}),
    "CD56bright NK": (0.02, {"CD56": 5.5}),
    "CD56dim NK": (0.10, {"CD56": 3.5, "CD16": 3.5}),
    "B cells": (0.15, {"CD19": 4.0, "HLA-DR": 4.0}),
    "Classical mono": (0.15, {"HLA-DR": 4.0, "CD14": 5.0}),
    "Intermediate mono": (0.02, {"HLA-DR": 4.0, "CD14": 5.0, "CD16": 3.5}),
    "Non-classical mono": (0.04, {"HLA-DR": 4.0, "CD14": 1.5, "CD16": 4.0}),
    "DC": (0.04, {"HLA-DR": 4.0}),
}


@pytest.fixture(scope="session")
def make_pbmc() -> Callable[..., tuple[pd.DataFrame, pd.Series]]:
    """Factory: ``make_pbmc(n, seed, sd=0.35)`` → (arcsinh cells, true cell type per cell)."""

    def make(n: int = 4000, seed: int = 0, sd: float = 0.35) -> tuple[pd.DataFrame, pd.Series]:
        rng = np.random.default_rng(seed)
        names = list(CELL_TYPES)
        shares = np.array([CELL_TYPES[t][0] for t in names])
        labels = rng.choice(len(names), size=n, p=shares / shares.sum())
        means = np.array([[CELL_TYPES[t][1].get(m, 0.0) for m in MARKERS] for t in names])
        x = means[labels] + rng.normal(0.0, sd, size=(n, len(MARKERS)))
        cells = pd.DataFrame(x.astype(np.float32), columns=MARKERS)
        return cells, pd.Series(np.array(names)[labels], name="cell_type")

    return make


@pytest.fixture(scope="session")
def panel() -> Panel:
    channels = ["Y89Di", "Nd142Di", "Nd146Di", "Nd143Di", "Gd160Di", "Bi209Di", "Yb176Di",
                "Yb174Di", "Er168Di"]
    return Panel(
        table=pd.DataFrame(
            {
                "channel": channels,
                "marker": MARKERS,
                "role": ["lineage"] * 8 + ["functional"],
                "cofactor": [5.0] * len(MARKERS),
            }
        )
    )


@pytest.fixture(scope="session")
def gating(make_pbmc) -> Gating:
    """The default PBMC template fitted on two synthetic samples."""
    return fit_gating([make_pbmc(3000, 1)[0], make_pbmc(3000, 2)[0]], "default")


@pytest.fixture(scope="session")
def model_parts(gating, panel) -> dict:
    """A small trained booster with its training matrix and metadata: save_bundle's inputs."""
    rng = np.random.default_rng(7)
    n = 60
    keys = [
        ("CD8 T", "", "pct_live", "unstim", "week6-baseline"),
        ("CD8 T", "IFNg", "frac_pos", "stim", "week6-baseline"),
        ("CD8 T", "IFNg", "median", "stim-unstim", "baseline"),
        ("NK", "", "pct_parent", "unstim", "baseline"),
        ("Monocytes", "CD14", "median", "unstim", "baseline"),
        ("B cells", "", "pct_live", "unstim", "baseline"),
    ]
    names = [feature_name(*k) for k in keys]
    meta = pd.DataFrame(keys, columns=META_COLUMNS, index=pd.Index(names, name="feature"))
    X = pd.DataFrame(
        rng.normal(size=(n, len(names))),
        columns=names,
        index=pd.Index([f"P{i:03d}" for i in range(n)], name="patient_id"),
    )
    X.iloc[::7, 3] = np.nan  # some missing values
    logit = 2.0 * X.iloc[:, 0] - 1.5 * X.iloc[:, 1]
    y = (logit + rng.normal(0, 0.5, n) > 0).astype(int)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 2, "eta": 0.3, "seed": 0, "nthread": 1},
        xgb.DMatrix(X.to_numpy(), label=y.to_numpy(), missing=np.nan, feature_names=names),
        num_boost_round=20,
    )
    oof = pd.DataFrame({"y": y, "probability": booster.predict(xgb.DMatrix(X, missing=np.nan))})
    return {
        "booster": booster,
        "features": X,
        "meta": meta,
        "gating": gating,
        "panel": panel,
        "feature_config": FeatureConfig(statistics=("pct_live", "median"), min_cells=5,
                                        median_markers=("functional", "CD3")),
        "info": {"threshold": 0.5, "calibration": {"method": "platt", "a": 1.0, "b": 0.0}},
        "oof": oof,
        "metrics": {"auroc": {"estimate": np.float64(0.8)}},
        "experiment": {"name": "tiny", "seed": 3},
    }
