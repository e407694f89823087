"""Quality-control plots of populations: one PNG per gate, and a clustering heatmap.

Rendering only (the numbers come from :mod:`~predictor.populations.gating` and
:mod:`~predictor.populations.clustering`). Figures are drawn on matplotlib's Agg canvas
without pyplot, so nothing global changes and nothing needs a display; each plot comes back
as PNG bytes for the report to embed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from predictor.populations.gating import ROOT, Gating, apply_gating

__all__ = ["gate_plots", "clustering_heatmap"]


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _rule_markers(gating: Gating, name: str) -> list[str]:
    """Markers a population's rule reads, most informative first: required terms, then the
    first marker of each alternative, in rule order."""
    out: list[str] = []
    for ms, _pos in gating.resolved[name]:
        for m in ms:
            if m not in out:
                out.append(m)
    return out


def gate_plots(
    gating: Gating,
    cells: pd.DataFrame,
    *,
    max_populations: int = 24,
    populations: Sequence[str] | None = None,
    batch: str | None = None,
    max_cells: int = 20000,
    random_state: int = 0,
    size: tuple[float, float] = (3.2, 2.9),
    dpi: int = 90,
) -> dict[str, bytes]:
    """Biaxial density of each gate's parent cells, with the gate's thresholds.

    For every population (template order, at most ``max_populations``): a hexbin density
    (log counts) of its *parent's* cells on the first two markers of its rule, a dashed line
    at each threshold, the gated share in the title. Rules on one marker get a histogram.

    Parameters
    ----------
    gating : Gating
        A fitted gating.
    cells : pandas.DataFrame
        Arcsinh-transformed cells (one sample, or several pooled).
    max_populations : int
        At most this many plots.
    populations : sequence of str, optional
        Only these populations.
    batch : str, optional
        Use this batch's thresholds (see :func:`~predictor.populations.gating.apply_gating`).
    max_cells : int
        Parent cells drawn per plot (a random subsample above this), to bound the time.
    random_state : int
        Seed of that subsample.
    size, dpi
        Figure size (inches) and resolution.

    Returns
    -------
    dict of str to bytes
        Population name → PNG.
    """
    from matplotlib.figure import Figure

    membership = apply_gating(gating, cells, batch=batch)
    thresholds = gating.thresholds_for(batch)
    names = [p for p in gating.populations if populations is None or p in populations]
    rng = np.random.default_rng(random_state)
    out: dict[str, bytes] = {}
    for name in names[: max(int(max_populations), 0)]:
        parent = gating.parent(name)
        in_parent = (np.ones(len(cells), dtype=bool) if parent == ROOT
                     else membership[parent].to_numpy())
        idx = np.flatnonzero(in_parent)
        n_parent = idx.size
        n_gated = int(membership[name].to_numpy().sum())
        if idx.size > max_cells:
            idx = np.sort(rng.choice(idx, size=max_cells, replace=False))
        markers = _rule_markers(gating, name)
        fig = Figure(figsize=size, dpi=dpi)
        ax = fig.subplots()
        share = f"{100 * n_gated / n_parent:.1f}% of {parent}" if n_parent else "empty parent"
        ax.set_title(f"{name}: {share}", fontsize=8)
        x = cells[markers[0]].to_numpy()[idx]
        tx = thresholds[name][markers[0]]
        if len(markers) >= 2 and idx.size:
            y = cells[markers[1]].to_numpy()[idx]
            ax.hexbin(x, y, gridsize=50, bins="log", mincnt=1, cmap="viridis", linewidths=0)
            ax.axhline(thresholds[name][markers[1]], color="crimson", ls="--", lw=1)
            ax.set_ylabel(markers[1], fontsize=8)
        elif idx.size:
            ax.hist(x, bins=80, color="0.4")
            ax.set_ylabel("cells", fontsize=8)
        ax.axvline(tx, color="crimson", ls="--", lw=1)
        ax.set_xlabel(markers[0], fontsize=8)
        ax.tick_params(labelsize=7)
        if not idx.size:
            ax.text(0.5, 0.5, "no cells", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        out[name] = _png(fig)
    return out


def clustering_heatmap(clustering, *, size: tuple[float, float] | None = None,
                       dpi: int = 90) -> bytes:
    """Heatmap of the metaclusters' median marker levels (rows: metacluster names), PNG."""
    from matplotlib.figure import Figure

    prof = np.asarray(clustering.profiles, dtype=float)
    n, m = prof.shape
    fig = Figure(figsize=size or (1.2 + 0.32 * m, 0.8 + 0.26 * n), dpi=dpi)
    ax = fig.subplots()
    im = ax.imshow(prof, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(m), list(clustering.markers), rotation=90, fontsize=7)
    ax.set_yticks(range(n), list(clustering.names), fontsize=7)
    fig.colorbar(im, ax=ax, label="median (arcsinh)", shrink=0.8)
    fig.tight_layout()
    return _png(fig)
