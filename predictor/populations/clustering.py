"""Unsupervised populations: FlowSOM clusters of the lineage markers, annotated, frozen.

:func:`fit_clustering` trains a self-organising map (FlowSOM, the ``flowsom`` package) on a
subsample pooled over the samples with the same number of cells from each, groups its nodes
into metaclusters (consensus hierarchical clustering of the node codes), and names every
metacluster after the gating template's population that holds most of its cells (``CD8
T-like (MC03)``; ``MC07`` when none holds ``min_purity`` of them). The result, a
:class:`Clustering`, is frozen: the SOM codebook, the node → metacluster map and the names,
JSON only (never pickled). New cells go to their nearest codebook node (numpy, in chunks),
so new patients get the same populations whoever was clustered with whom.

A :class:`Clustering` quacks like a :class:`~predictor.populations.gating.Gating`:
``populations``, ``parent(name)`` (always ``"root"``), ``markers``, ``skipped``,
``apply(cells)`` → boolean cell × population frame, ``to_dict``/``from_dict``; so
:func:`~predictor.populations.gating.population_table` and the feature code use either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from predictor.errors import GatingError
from predictor.io.panel import Panel
from predictor.populations.gating import (
    ROOT,
    Gating,
    GatingTemplate,
    _subsample,
    apply_gating,
    fit_gating,
)

__all__ = ["Clustering", "fit_clustering", "populations_from_dict", "map_to_nodes"]

_BLOCK = 65536  # cells converted to float64 at once
_CHUNK = 512  # cells whose node distances are computed at once: stays in cache, and small
# enough that BLAS runs it on one thread (threaded gemm on tiny inner dimensions is slower)


def map_to_nodes(x: Any, codes: np.ndarray, *, chunk: int = _CHUNK) -> np.ndarray:
    """Index of the nearest codebook row (Euclidean) for every row of ``x``, in chunks.

    ``x`` is an array (or anything sliceable by rows into one). Memory stays bounded (a block
    of 65,536 cells and ``chunk × len(codes)`` distances) whatever the number of cells; the
    result does not depend on ``chunk`` (float64 throughout).
    """
    codes = np.asarray(codes, dtype=np.float64)
    minus2 = np.ascontiguousarray(-2.0 * codes.T)
    c2 = np.einsum("ij,ij->i", codes, codes)  # |x|² is the same for all nodes: not needed
    out = np.empty(len(x), dtype=np.int32)
    for start in range(0, len(x), _BLOCK):
        block = np.asarray(x[start : start + _BLOCK], dtype=np.float64)
        for s in range(0, len(block), chunk):
            d = block[s : s + chunk] @ minus2
            d += c2
            out[start + s : start + s + len(d)] = np.argmin(d, axis=1)
    return out


@dataclass(frozen=True, eq=False)
class Clustering:
    """A frozen FlowSOM clustering: codebook, metaclusters, names. JSON-serialisable.

    Attributes
    ----------
    markers : tuple of str
        Markers the map was trained on (columns of the codebook).
    codes : numpy.ndarray
        SOM codebook, nodes × markers (arcsinh units).
    node_metacluster : numpy.ndarray
        Metacluster index of every node.
    names : tuple of str
        Population name of every metacluster, e.g. ``"CD8 T-like (MC03)"`` or ``"MC07"``.
    annotation : tuple of dict
        Per metacluster: ``metacluster`` (MC01...), ``name``, ``population`` (the template
        population it was named after, or ``""``), ``purity`` (fraction of its cells in that
        population), ``best`` / ``best_fraction`` (the best-matching template population
        and its share, also when below ``min_purity``), ``n_cells`` (in the fit subsample).
    profiles : numpy.ndarray
        Median of every marker per metacluster on the fit subsample (at most 20,000 cells
        of each), metaclusters × markers.
    grid : tuple of int
        SOM grid (x, y).
    params : dict
        Fit parameters (n_clusters, rlen, random_state, ...), for the record.
    """

    markers: tuple[str, ...]
    codes: np.ndarray
    node_metacluster: np.ndarray
    names: tuple[str, ...]
    annotation: tuple[dict[str, Any], ...]
    profiles: np.ndarray
    grid: tuple[int, int]
    params: Mapping[str, Any] = field(default_factory=dict)

    kind = "clustering"

    @property
    def populations(self) -> list[str]:
        return list(self.names)

    @property
    def skipped(self) -> dict[str, str]:
        """Nothing is skipped by a clustering (same attribute as a gating's)."""
        return {}

    @property
    def n_clusters(self) -> int:
        return len(self.names)

    def parent(self, name: str) -> str:
        if name not in self.names:
            raise GatingError(f"No population {name!r} in this clustering.")
        return ROOT

    def nodes(self, cells: pd.DataFrame) -> np.ndarray:
        """Nearest SOM node of every cell."""
        self._check(cells)
        return map_to_nodes(_Rows(cells, self.markers), self.codes)

    def labels(self, cells: pd.DataFrame) -> np.ndarray:
        """Metacluster index (0-based, into ``names``) of every cell."""
        return self.node_metacluster[self.nodes(cells)]

    def apply(self, cells: pd.DataFrame, *, batch: str | None = None) -> pd.DataFrame:
        """Boolean membership, cells × metacluster populations (one True per row).

        ``batch`` is accepted for symmetry with :meth:`Gating.apply` and ignored: one map
        serves every batch.
        """
        lab = self.labels(cells)
        member = lab[:, None] == np.arange(len(self.names))[None, :]
        return pd.DataFrame(member, index=cells.index, columns=list(self.names))

    def annotation_table(self) -> pd.DataFrame:
        """One row per metacluster: its name, matched population, purity, size and profile."""
        table = pd.DataFrame(list(self.annotation))
        prof = pd.DataFrame(self.profiles, columns=list(self.markers))
        return pd.concat([table, prof], axis=1)

    def _check(self, cells: pd.DataFrame) -> None:
        missing = [m for m in self.markers if m not in cells.columns]
        if missing:
            raise GatingError(
                f"The cells lack marker(s) {', '.join(missing)} that the clustering uses; use "
                "the panel the clustering was fitted with."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "markers": list(self.markers),
            "codes": np.asarray(self.codes, dtype=np.float64).round(10).tolist(),
            "node_metacluster": [int(k) for k in self.node_metacluster],
            "names": list(self.names),
            "annotation": [dict(a) for a in self.annotation],
            "profiles": np.asarray(self.profiles, dtype=np.float64).round(10).tolist(),
            "grid": list(self.grid),
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Clustering:
        if raw.get("kind") != "clustering":
            raise GatingError(
                f"This is a {raw.get('kind', 'gating')!r} definition, not a clustering; load it "
                "with predictor.populations.populations_from_dict."
            )
        markers = tuple(str(m) for m in raw["markers"])
        codes = np.asarray(raw["codes"], dtype=np.float64).reshape(-1, len(markers))
        node_meta = np.asarray(raw["node_metacluster"], dtype=np.int64)
        names = tuple(str(n) for n in raw["names"])
        if len(node_meta) != len(codes) or (
            node_meta.size > 0 and (node_meta.min() < 0 or node_meta.max() >= len(names))
        ):
            raise GatingError("Corrupt clustering: node → metacluster map does not fit the codes.")
        profiles = np.asarray(raw.get("profiles") or np.zeros((len(names), len(markers))),
                              dtype=np.float64).reshape(len(names), len(markers))
        return cls(markers, codes, node_meta, names,
                   tuple(dict(a) for a in raw.get("annotation", [])), profiles,
                   (int(raw["grid"][0]), int(raw["grid"][1])), dict(raw.get("params") or {}))


class _Rows:
    """Row-sliceable view of the marker columns of a frame, converted chunk by chunk."""

    def __init__(self, cells: pd.DataFrame, markers: Sequence[str]):
        self.cols = [cells[m].to_numpy() for m in markers]
        self.n = len(cells)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.column_stack([c[s] for c in self.cols]).astype(np.float64, copy=False)


def populations_from_dict(raw: Mapping[str, Any]) -> Gating | Clustering:
    """A frozen gating or clustering from its ``to_dict()`` (dispatch on ``raw["kind"]``)."""
    kind = raw.get("kind", "gating")
    if kind == "clustering":
        return Clustering.from_dict(raw)
    if kind == "gating":
        return Gating.from_dict(raw)
    raise GatingError(f"Unknown population definition kind {kind!r}; expected gating or clustering.")


def _lineage_markers(cells: pd.DataFrame, panel_or_markers: Panel | Sequence[str]) -> list[str]:
    if isinstance(panel_or_markers, Panel):
        wanted = panel_or_markers.by_role("lineage")
        what = "the panel's lineage markers"
    elif isinstance(panel_or_markers, str):
        raise GatingError("fit_clustering needs a Panel or a list of marker names, not a string.")
    else:
        wanted = [str(m) for m in panel_or_markers]
        what = "the markers given"
    markers = [m for m in wanted if m in cells.columns]
    missing = [m for m in wanted if m not in cells.columns]
    if isinstance(panel_or_markers, Panel):
        missing = []  # lineage markers absent from the cleaned cells are simply not used
    if missing:
        raise GatingError(
            f"The cells lack marker(s) {', '.join(missing)} of {what}; cluster on markers the "
            "cleaned cells have."
        )
    if len(markers) < 2:
        raise GatingError(
            f"Clustering needs at least 2 of {what} in the cells; found {markers or 'none'}. Mark "
            "the panel's type markers with role 'lineage'."
        )
    return markers


def _annotate(
    membership: pd.DataFrame, gating: Gating, labels: np.ndarray, k: int, min_purity: float
) -> list[dict[str, Any]]:
    """Name each metacluster after the deepest template population holding ``min_purity`` of
    its cells (walking down from the root, taking the best child at each level)."""
    children: dict[str, list[str]] = {}
    for pop in gating.populations:
        children.setdefault(gating.parent(pop), []).append(pop)
    m = membership.to_numpy()
    col = {p: i for i, p in enumerate(membership.columns)}
    out = []
    for c in range(k):
        rows = m[labels == c]
        n = len(rows)
        frac = rows.mean(axis=0) if n else np.zeros(m.shape[1])
        node, purity = ROOT, 1.0
        best, best_frac = "", 0.0
        while children.get(node):
            f, pop = max((float(frac[col[p]]), p) for p in children[node])
            if node == ROOT:
                best, best_frac = pop, f
            if f < min_purity:
                break
            node, purity = pop, f
            best, best_frac = pop, f
        mc = f"MC{c + 1:02d}"
        named = node != ROOT
        out.append({
            "metacluster": mc,
            "name": f"{node}-like ({mc})" if named else mc,
            "population": node if named else "",
            "purity": round(purity if named else 0.0, 6),
            "best": best,
            "best_fraction": round(best_frac, 6),
            "n_cells": int(n),
        })
    return out


def _profiles(x: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator,
              max_cells: int = 20000) -> np.ndarray:
    """Median marker levels per metacluster (on at most ``max_cells`` of its cells)."""
    out = np.full((k, x.shape[1]), np.nan)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if idx.size > max_cells:
            idx = np.sort(rng.choice(idx, size=max_cells, replace=False))
        if idx.size:
            out[c] = np.median(x[idx], axis=0)
    return out


def fit_clustering(
    cells: Sequence[pd.DataFrame],
    panel_or_markers: Panel | Sequence[str],
    *,
    n_clusters: int = 20,
    grid: tuple[int, int] = (10, 10),
    max_cells_per_sample: int = 5000,
    random_state: int = 0,
    template: GatingTemplate | str | os.PathLike = "default",
    gating: Gating | None = None,
    rlen: int = 10,
    min_purity: float = 0.7,
    batch_som: bool | None = None,
    linkage: str = "average",
) -> Clustering:
    """FlowSOM clustering of cells pooled over samples, annotated against a gating template.

    Parameters
    ----------
    cells
        Cleaned, arcsinh-transformed events, one frame per sample.
    panel_or_markers
        A panel (its ``lineage`` markers are used) or the marker names to cluster on.
    n_clusters
        Metaclusters (populations).
    grid
        SOM grid; ``grid[0] * grid[1]`` nodes, at least ``n_clusters``.
    max_cells_per_sample
        Cells drawn from each sample for the fit (balanced across samples).
    random_state
        Seed of the subsampling and of the SOM.
    template, gating
        The gating that names metaclusters: ``gating`` if given (e.g. the model's), else
        ``template`` fitted on the same samples (at most 5,000 cells from each).
    rlen
        SOM training passes over the data.
    min_purity
        A metacluster is named after a template population holding at least this fraction
        of its cells; otherwise it keeps its number (``MC07``).
    linkage
        Linkage of the hierarchical metaclustering of the SOM nodes: ``average`` (FlowSOM's
        default) or ``ward`` (fewer tiny metaclusters of outlying nodes), ``complete``.
    batch_som
        Use flowsom's parallel batch SOM (faster on many cells, numba-parallel over the
        cores) instead of the classic one; default: when the subsample has > 200,000 cells.

    Returns
    -------
    Clustering
    """
    if not cells:
        raise GatingError("fit_clustering needs at least one sample.")
    markers = _lineage_markers(cells[0], panel_or_markers)
    for i, df in enumerate(cells):
        missing = [m for m in markers if m not in df.columns]
        if missing:
            raise GatingError(f"Sample {i + 1} lacks marker(s) {', '.join(missing)}.")
    gx, gy = (int(grid[0]), int(grid[1]))
    if gx < 1 or gy < 1 or not 2 <= int(n_clusters) <= gx * gy:
        raise GatingError(
            f"The 'n_clusters' parameter of fit_clustering must be an int in [2, {gx * gy}] "
            f"(the SOM grid's nodes). Got {n_clusters!r} instead."
        )
    rng = np.random.default_rng(random_state)
    columns = list(dict.fromkeys([*markers, *cells[0].columns]))
    parts = _subsample(cells, max_cells_per_sample, rng, columns)
    pooled = pd.concat(parts, ignore_index=True)
    if len(pooled) < gx * gy:
        raise GatingError(
            f"Only {len(pooled)} cells to train a {gx}×{gy} SOM; use a smaller grid or more cells."
        )
    x = np.empty((len(pooled), len(markers)), dtype=np.float64)
    for j, m in enumerate(markers):  # column by column: faster than pandas' interleave
        x[:, j] = pooled[m].to_numpy()
    use_batch = len(x) > 200_000 if batch_som is None else bool(batch_som)
    if linkage not in ("average", "ward", "complete"):
        raise GatingError(
            "The 'linkage' parameter of fit_clustering must be 'average', 'ward' or 'complete'. "
            f"Got {linkage!r} instead."
        )
    codes, node_meta, nodes = _flowsom(x, gx, gy, int(n_clusters), rlen, random_state,
                                       use_batch, linkage)
    # metaclusters numbered by size in the fit subsample (MC01 the largest), ties by index
    sizes = np.bincount(node_meta[nodes], minlength=int(n_clusters))
    order = sorted(range(int(n_clusters)), key=lambda c: (-sizes[c], c))
    renumber = np.empty(int(n_clusters), dtype=np.int64)
    renumber[order] = np.arange(int(n_clusters))
    node_meta = renumber[node_meta]
    labels = node_meta[nodes]
    if gating is None:  # thresholds need no more cells than fit_gating's default
        gating = fit_gating(parts, template, max_cells_per_sample=min(max_cells_per_sample, 5000),
                            random_state=random_state)
    membership = apply_gating(gating, pooled)
    annotation = _annotate(membership, gating, labels, int(n_clusters), min_purity)
    profiles = _profiles(x, labels, int(n_clusters), rng)
    params = {"n_clusters": int(n_clusters), "rlen": int(rlen), "random_state": int(random_state),
              "max_cells_per_sample": int(max_cells_per_sample), "batch_som": use_batch,
              "n_cells_fit": int(len(x)), "min_purity": float(min_purity), "linkage": linkage,
              "gating_template": gating.template.name}
    return Clustering(tuple(markers), codes, node_meta, tuple(a["name"] for a in annotation),
                      tuple(annotation), profiles, (gx, gy), params)


def _flowsom(x: np.ndarray, gx: int, gy: int, n_clusters: int, rlen: int, seed: int,
             use_batch: bool, linkage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train FlowSOM: (codebook, node → metacluster, node of each cell of ``x``). flowsom
    seeds numpy's global generator; its state is restored afterwards so callers' random
    streams are untouched."""
    try:
        from flowsom.models import BatchFlowSOMEstimator, FlowSOMEstimator
    except ImportError:  # pragma: no cover - depends on the environment
        raise GatingError(
            "Clustering needs the 'flowsom' package: pip install flowsom (>= 0.2)."
        ) from None
    cls = BatchFlowSOMEstimator if use_batch else FlowSOMEstimator
    state = np.random.get_state()  # noqa: NPY002 - flowsom reseeds the legacy global generator
    try:
        est = cls(xdim=gx, ydim=gy, rlen=rlen, n_clusters=n_clusters, seed=seed, linkage=linkage)
        est.fit(x)  # flowsom reads x, never writes it
        codes = np.array(est.codes, dtype=np.float64)
        node_meta = np.asarray(est.metacluster_model.fit_predict(codes), dtype=np.int64)
        nodes = getattr(est.cluster_model, "labels_", None)  # flowsom maps the fit data too
    finally:
        np.random.set_state(state)  # noqa: NPY002
    if nodes is None or len(nodes) != len(x):
        nodes = map_to_nodes(x, codes)
    return codes, node_meta, np.asarray(nodes, dtype=np.int64)
