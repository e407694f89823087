"""Gating templates: the recipe (template), the fitted gates (thresholds), the result (table).

A :class:`GatingTemplate` is a hierarchy of populations with marker rules (see
``pbmc.yaml``). :func:`fit_gating` resolves it against a panel's markers and finds each rule
threshold on the *parent* population's cells pooled over samples (and, when batches are given,
once more per batch): the valley of the marker's smoothed density between two modes
(:func:`valley_threshold`; a batch takes the valley closest to the pooled one, and no gate
lies below :data:`MIN_GATE`). When the parent shows no valley the threshold falls back, in
order, to the valley on all live cells and to a fixed arcsinh default (``+``/``-`` terms), or
to the edge of the parent's main mode (relative levels such as ``bright``/``dim``). The
resulting :class:`Gating` is frozen (saved with a model, JSON only) and applied unchanged to
new samples by :func:`apply_gating`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from predictor._density import find_peaks, main_mode, smooth_counts, valley_center
from predictor._kernels import sort
from predictor.errors import GatingError
from predictor.io.panel import normalize_marker

__all__ = [
    "Term",
    "PopulationDef",
    "GatingTemplate",
    "Gating",
    "load_template",
    "fit_gating",
    "apply_gating",
    "gate_masks",
    "membership_masks",
    "population_table",
    "otsu_threshold",
    "valley_threshold",
]

ROOT = "root"
_POS = ("++", "+", "hi", "bright", "high", "pos")
_NEG = ("-", "lo", "dim", "low", "neg")
_RELATIVE = ("++", "hi", "bright", "high", "lo", "dim", "low")  # levels within the parent
DEFAULT_THRESHOLD = 1.5  # arcsinh(x/5) units: the last resort when no density has a valley
# No gate lies below this (arcsinh(x/5) units, ~2.6 counts): a dip there is the one between a
# marker's zeros and its dimmest cells, not a boundary between populations.
MIN_GATE = 0.5
_TERM = re.compile(r"^(?P<opt>\?)?(?P<body>.+)$")


@dataclass(frozen=True)
class Term:
    """One rule term: ``markers`` (any of them) above (``positive``) or below the threshold."""

    markers: tuple[str, ...]
    positive: bool
    optional: bool = False
    text: str = ""


@dataclass(frozen=True)
class PopulationDef:
    name: str
    parent: str
    rule: str
    terms: tuple[Term, ...]


def _parse_marker_level(token: str, where: str) -> tuple[str, bool]:
    for suffix in sorted(_POS + _NEG, key=len, reverse=True):
        if token.endswith(suffix) and len(token) > len(suffix):
            return token[: -len(suffix)], suffix in _POS
    raise GatingError(
        f"{where}: cannot read {token!r}; write a marker followed by +, -, hi, lo, bright or dim "
        "(e.g. CD3+, CD56bright)."
    )


def parse_rule(rule: str, *, where: str = "rule") -> tuple[Term, ...]:
    """Parse ``"CD3+ ?CD19- CD19+|CD20+"`` into terms."""
    terms = []
    for raw in rule.split():
        m = _TERM.match(raw)
        assert m is not None
        parts = m.group("body").split("|")
        parsed = [_parse_marker_level(p, where) for p in parts]
        signs = {s for _, s in parsed}
        if len(signs) != 1:
            raise GatingError(f"{where}: alternatives in {raw!r} must share one sign.")
        terms.append(
            Term(tuple(p for p, _ in parsed), signs.pop(), bool(m.group("opt")), raw)
        )
    if not terms:
        raise GatingError(f"{where}: empty rule.")
    return tuple(terms)


@dataclass(frozen=True)
class GatingTemplate:
    """A hierarchy of populations with marker rules, in parent-before-child order."""

    name: str
    populations: tuple[PopulationDef, ...]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    source: str = "<template>"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "<template>") -> GatingTemplate:
        if not isinstance(raw, Mapping) or "populations" not in raw:
            raise GatingError(f"{source}: a template needs a 'populations' list.")
        pops: list[PopulationDef] = []
        seen = {ROOT}
        for i, p in enumerate(raw["populations"]):
            where = f"{source}, population {i + 1}"
            if not isinstance(p, Mapping) or not {"name", "parent", "rule"} <= set(p):
                raise GatingError(f"{where}: needs name, parent and rule.")
            name, parent = str(p["name"]), str(p["parent"])
            if name in seen:
                raise GatingError(f"{where}: population {name!r} defined twice.")
            if parent not in seen:
                raise GatingError(
                    f"{where}: parent {parent!r} of {name!r} is not defined above it; "
                    "list parents before children (the top parent is 'root')."
                )
            seen.add(name)
            pops.append(PopulationDef(name, parent, str(p["rule"]), parse_rule(str(p["rule"]), where=where)))
        thresholds = {str(k): float(v) for k, v in (raw.get("thresholds") or {}).items()}
        return cls(str(raw.get("name", "template")), tuple(pops), thresholds, source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "populations": [
                {"name": p.name, "parent": p.parent, "rule": p.rule} for p in self.populations
            ],
            "thresholds": dict(self.thresholds),
        }


def load_template(template: str | os.PathLike = "default") -> GatingTemplate:
    """Load a gating template: ``"default"`` (the packaged PBMC template) or a YAML path."""
    if str(template) == "default":
        text = resources.files("predictor.populations").joinpath("pbmc.yaml").read_text("utf-8")
        source = "default PBMC template"
    else:
        path = Path(template)
        if not path.is_file():
            raise GatingError(f"{path}: gating template not found.")
        text, source = path.read_text("utf-8"), str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GatingError(f"{source}: not valid YAML ({exc}).") from None
    return GatingTemplate.from_dict(raw, source=source)


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of ``values`` and its effectiveness (between/total variance, 0–1).

    Effectiveness does not tell a bimodal marker from a unimodal one (a Gaussian scores
    2/π ≈ 0.64, a 90/10 mixture of two Gaussians 4 SD apart about the same); use
    :func:`valley_threshold` to decide whether there is anything to split.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 10 or np.ptp(v) == 0:
        return float("nan"), 0.0
    hist, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    total = v.var() * v.size * v.size
    eff = float(between[k] / total) if total > 0 else 0.0
    return float(edges[k + 1]), eff


# ------------------------------------------------------------------------------ densities

_MIN_VALUES = 50  # fewer values than this: no density, no valley
_PROMINENCE = 0.01  # of the peak of the square-root density: candidate modes (tested later)


@dataclass(frozen=True)
class _Density:
    centers: np.ndarray
    values: np.ndarray  # smoothed counts per bin
    counts: np.ndarray  # raw counts per bin
    step: float
    sigma: float  # smoothing SD, in bins


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite values, flat: float32 stays float32 (for :func:`_density`'s radix sort),
    anything else becomes float64."""
    v = np.asarray(values)
    v = v.ravel() if v.dtype == np.float32 else v.astype(np.float64).ravel()
    return v[np.isfinite(v)]


def _density(v: np.ndarray, bandwidth: float | None) -> _Density | None:
    """Gaussian-smoothed histogram of the central 99.8% of ``v``, zero-padded at both ends.

    The bandwidth (arcsinh units) follows Silverman's rule on the robust spread, clipped to
    [0.06, 0.25]; it is never narrower than the spacing of discrete values (integer counts
    without jitter give a comb of values near zero that must not read as modes).
    """
    n = v.size
    if n < _MIN_VALUES:
        return None
    # One sort serves the quantiles (np.quantile of sorted values: the same numbers, about
    # twice as fast as its partition on CyTOF's tied values), the distinct values and the
    # histogram. float32 values (CyTOF's) by a radix sort (several times numpy's on CPUs
    # without its vectorised sort), then widened: the same numbers as sorting them widened.
    s = sort(v).astype(np.float64, copy=False)
    v = v.astype(np.float64, copy=False)
    lo, hi, q25, q75 = np.quantile(s, [0.001, 0.999, 0.25, 0.75])
    if not hi - lo > 1e-6:
        return None
    if bandwidth is None:
        spread = min(float(v.std()), float(q75 - q25) / 1.349) or float(v.std())
        bandwidth = float(np.clip(0.9 * spread * n ** -0.2, 0.06, 0.25))
        core = s[np.searchsorted(s, lo, side="left"):np.searchsorted(s, hi, side="right")]
        core = core[np.concatenate(([True], core[1:] != core[:-1]))]  # np.unique of sorted
        if core.size < n / 4 and core.size > 1:  # discrete values: smooth over their spacing
            bandwidth = max(bandwidth, 0.6 * float(np.diff(core).max(initial=0.0)))
            bandwidth = min(bandwidth, (hi - lo) / 4)
    step = bandwidth / 4
    pad = 4 * bandwidth
    n_bins = math.ceil((hi - lo + 2 * pad) / step)
    if n_bins > 2048:
        n_bins, step = 2048, (hi - lo + 2 * pad) / 2048
    edges = lo - pad + step * np.arange(n_bins + 1)
    # np.histogram's bins: [a, b) except the last, [a, b]
    at = np.searchsorted(s, edges, side="left")
    at[-1] = np.searchsorted(s, edges[-1], side="right")
    counts = np.diff(at)
    sigma = bandwidth / step
    values = smooth_counts(counts, sigma)
    return _Density((edges[:-1] + edges[1:]) / 2, values, counts, float(step), float(sigma))


def valley_threshold(
    values: np.ndarray,
    *,
    max_ratio: float = 0.8,
    min_z: float = 2.5,
    min_fraction: float = 0.005,
    min_separation: float = 0.5,
    min_effectiveness: float = 0.0,
    bandwidth: float | None = None,
    near: float | None = None,
    floor: float = -math.inf,
) -> tuple[float, float]:
    """Threshold at the density valley between two modes, or NaN when there is none.

    The values' histogram is smoothed with a Gaussian kernel; modes are the peaks of the
    square root of the density (so a population of 1% beside one of 90% still counts). A
    valley between two modes is real when all hold:

    - its density is at most ``max_ratio`` × the lower of the two peaks;
    - the drop from that peak to the valley is ``min_z`` standard errors of the smoothed
      counts (Poisson), so sampling noise in small parents does not make valleys;
    - the modes are ``min_separation`` apart (arcsinh units) and each side holds at least
      ``min_fraction`` of the values;
    - the split explains ``min_effectiveness`` of the variance (Otsu's criterion; 0: off).

    Among real valleys the one with the largest between-class variance (Otsu's criterion) is
    chosen, or with ``near`` the one closest to it (a batch refitting a pooled threshold).
    The cut is placed where a two-Gaussian fit of the two modes' cells makes a cell
    equally likely to belong to either — a diffuse small population (``CD127lo`` Tregs) leaves
    a long flat valley whose lowest point is arbitrary — as long as that point is still in
    the valley; otherwise at the valley's lowest point (the middle of an empty gap).
    Deterministic; a few milliseconds for 10^4–10^5 values (binned).

    Parameters
    ----------
    values : numpy.ndarray
        Marker values (arcsinh scale); non-finite values are ignored.
    max_ratio, min_z, min_fraction, min_separation, min_effectiveness : float
        The tests above.
    bandwidth : float, optional
        Smoothing SD in the values' units (default: Silverman's rule on the robust spread,
        clipped to 0.06–0.25).
    near : float, optional
        Choose the real valley closest to this value instead of the most separating one.
    floor : float, optional
        Valleys below this are not considered.

    Returns
    -------
    tuple of float
        ``(threshold, depth)``: the valley's location and its density relative to the lower
        peak (0: empty gap, 1: no dip); ``(nan, nan)`` without a real valley.
    """
    v = _finite(values)
    d = _density(v, bandwidth)
    if d is None:
        return float("nan"), float("nan")
    root = np.sqrt(d.values)
    peaks = find_peaks(root, prominence=_PROMINENCE * root.max())
    if len(peaks) < 2:
        return float("nan"), float("nan")
    per_unit = 2.0 * math.sqrt(math.pi) * d.sigma  # raw counts behind one smoothed count
    cum = np.cumsum(d.counts)
    first = np.cumsum(d.counts * d.centers)
    total, total_sum = float(cum[-1]), float(first[-1])
    var_total = float(np.sum(d.counts * (d.centers - total_sum / total) ** 2))
    best: tuple[float, float, float, int, int, int] | None = None
    for i, a in enumerate(peaks):
        for b in peaks[i + 1 :]:
            if (b - a) * d.step < min_separation:
                continue
            vi = valley_center(d.values, int(a), int(b))
            if d.centers[vi] < floor:
                continue
            low_peak = min(d.values[a], d.values[b])
            depth = d.values[vi] / low_peak
            z = (low_peak - d.values[vi]) / math.sqrt((low_peak + d.values[vi]) / per_unit)
            w0 = float(cum[vi])
            w1 = total - w0
            if depth > max_ratio or z < min_z or min(w0, w1) < min_fraction * total:
                continue
            between = w0 * w1 / total * (first[vi] / w0 - (total_sum - first[vi]) / w1) ** 2
            if var_total > 0 and between / var_total < min_effectiveness:
                continue
            score = between if near is None else -abs(float(d.centers[vi]) - near)
            if best is None or score > best[0]:
                best = (score, float(d.centers[vi]), float(depth), int(a), int(b), vi)
    if best is None:
        return float("nan"), float("nan")
    _, t, depth, a, b, vi = best
    # the two-Gaussian fit sees the cells between the neighbouring modes' midpoints
    ka, kb = int(np.searchsorted(peaks, a)), int(np.searchsorted(peaks, b))
    lo_edge = (peaks[ka - 1] + a) // 2 if ka > 0 else 0
    hi_edge = (b + peaks[kb + 1]) // 2 if kb + 1 < len(peaks) else len(d.values)
    cut = _mixture_boundary(d, lo_edge, hi_edge, a, b, vi)
    if cut is not None:
        low_peak = min(d.values[a], d.values[b])
        at = int(np.clip(np.searchsorted(d.centers, cut), 0, len(d.values) - 1))
        if d.values[at] <= d.values[vi] + 0.5 * (low_peak - d.values[vi]):
            t = cut
    return t, depth


def _mixture_boundary(d: _Density, lo: int, hi: int, a: int, b: int, vi: int) -> float | None:
    """Where the weighted densities of a two-Gaussian mixture cross between peaks ``a`` and
    ``b``: EM on the binned counts of bins ``lo:hi``, started from the split at ``vi``."""
    x, c = d.centers[lo:hi], d.counts[lo:hi].astype(np.float64)
    split = vi - lo
    if c[: split + 1].sum() < 2 or c[split + 1 :].sum() < 2:
        return None

    def stats(weights: np.ndarray) -> tuple[float, float, float]:
        total = weights.sum()
        mean = float((weights * x).sum() / total)
        sd = math.sqrt(float((weights * (x - mean) ** 2).sum() / total)) + d.step
        return float(total), mean, sd

    r = np.zeros_like(c)
    r[: split + 1] = 1.0
    for _ in range(50):
        n0, m0, s0 = stats(c * r)
        n1, m1, s1 = stats(c * (1 - r))
        log0 = math.log(n0 / s0) - 0.5 * ((x - m0) / s0) ** 2
        log1 = math.log(n1 / s1) - 0.5 * ((x - m1) / s1) ** 2
        new = 1.0 / (1.0 + np.exp(np.clip(log1 - log0, -50, 50)))
        if np.max(np.abs(new - r)) < 1e-6:
            break
        r = new
    if not m0 < m1:
        return None
    grid = np.linspace(d.centers[a], d.centers[b], 1024)
    diff = (math.log(n0 / s0) - 0.5 * ((grid - m0) / s0) ** 2) - (
        math.log(n1 / s1) - 0.5 * ((grid - m1) / s1) ** 2)
    cross = np.nonzero(np.diff(np.sign(diff)) < 0)[0]
    if cross.size == 0:
        return None
    best = cross[np.argmin(np.abs(grid[cross] - d.centers[vi]))]
    return float((grid[best] + grid[best + 1]) / 2)


def _shoulder_threshold(values: np.ndarray, *, k: float = 2.5) -> float:
    """Edge of the main mode toward the heavier tail: ``mode ± k`` half-width SDs.

    The fallback for a relative level (``CD56bright``) when the parent has no valley: cells
    clearly brighter (or dimmer) than the parent's bulk.
    """
    v = _finite(values)
    d = _density(v, None)
    if d is None:
        return float("nan")
    v = v.astype(np.float64, copy=False)
    center, sd_left, sd_right = main_mode(d)
    above = np.count_nonzero(v > center + 2 * sd_right)
    below = np.count_nonzero(v < center - 2 * sd_left)
    return center + k * sd_right if above >= below else center - k * sd_left


# ------------------------------------------------------------------------------ gating

Thresholds = Mapping[str, Mapping[str, float]]  # population -> marker -> threshold


@dataclass(frozen=True)
class Gating:
    """A template resolved against a panel, with thresholds: frozen, JSON-serialisable.

    Attributes
    ----------
    template : GatingTemplate
        The recipe.
    resolved : dict
        Population → its terms as ``((markers...), positive)``, markers named as in the panel.
    thresholds : dict
        Population → marker → threshold (arcsinh units), fitted on all samples pooled; used
        for cells of a batch the gating has no thresholds of (or when no batch is given).
    skipped : dict
        Population → why it was skipped (markers the panel lacks).
    markers : tuple of str
        Panel markers the gating reads.
    batch_thresholds : dict
        Batch → population → marker → threshold, when fitted per batch.
    methods : dict
        Population → marker → how the pooled threshold was found: ``valley`` (within the
        parent), ``root valley`` (on all live cells), ``shoulder`` (edge of the parent's main
        mode), ``default`` (the fixed arcsinh default) or ``fixed`` (given).
    batch_methods : dict
        Batch → population → marker → method, as ``methods`` plus ``pooled`` (the pooled
        threshold was used).
    """

    template: GatingTemplate
    resolved: Mapping[str, tuple[tuple[tuple[str, ...], bool], ...]]  # pop -> ((markers), pos)
    thresholds: Thresholds
    skipped: Mapping[str, str]  # pop -> reason
    markers: tuple[str, ...]  # panel marker names the gating reads
    batch_thresholds: Mapping[str, Thresholds] = field(default_factory=dict)
    methods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    batch_methods: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)

    kind = "gating"

    @property
    def populations(self) -> list[str]:
        return [p.name for p in self.template.populations if p.name in self.resolved]

    @property
    def batches(self) -> list[str]:
        """Batches with their own thresholds (others get the pooled ones)."""
        return list(self.batch_thresholds)

    def parent(self, name: str) -> str:
        for p in self.template.populations:
            if p.name == name:
                return p.parent
        raise GatingError(f"No population {name!r} in gating template {self.template.name!r}.")

    def thresholds_for(self, batch: str | None = None) -> Thresholds:
        """Thresholds applied to cells of ``batch`` (the pooled ones for None or an unseen
        batch)."""
        if batch is not None and str(batch) in self.batch_thresholds:
            return self.batch_thresholds[str(batch)]
        return self.thresholds

    def apply(self, cells: pd.DataFrame, *, batch: str | None = None,
              cofactors: Mapping[str, float] | None = None,
              live: np.ndarray | None = None) -> pd.DataFrame:
        """Membership of ``cells`` (see :func:`apply_gating`)."""
        return apply_gating(self, cells, batch=batch, cofactors=cofactors, live=live)

    def threshold_table(self) -> pd.DataFrame:
        """Tidy thresholds: batch (``""`` = pooled), population, parent, marker, threshold,
        method."""
        rows = []
        sets = [("", self.thresholds, self.methods)] + [
            (b, t, self.batch_methods.get(b, {})) for b, t in self.batch_thresholds.items()
        ]
        for batch, thr, meth in sets:
            for pop, per_marker in thr.items():
                for marker, value in per_marker.items():
                    rows.append({
                        "batch": batch, "population": pop, "parent": self.parent(pop),
                        "marker": marker, "threshold": float(value),
                        "method": meth.get(pop, {}).get(marker, ""),
                    })
        columns = ["batch", "population", "parent", "marker", "threshold", "method"]
        return pd.DataFrame(rows, columns=columns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "template": self.template.to_dict(),
            "resolved": {
                k: [[list(ms), pos] for ms, pos in v] for k, v in self.resolved.items()
            },
            "thresholds": {k: dict(v) for k, v in self.thresholds.items()},
            "skipped": dict(self.skipped),
            "markers": list(self.markers),
            "batch_thresholds": {
                b: {k: dict(v) for k, v in t.items()} for b, t in self.batch_thresholds.items()
            },
            "methods": {k: dict(v) for k, v in self.methods.items()},
            "batch_methods": {
                b: {k: dict(v) for k, v in m.items()} for b, m in self.batch_methods.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Gating:
        if raw.get("kind", "gating") != "gating":
            raise GatingError(
                f"This is a {raw.get('kind')!r} definition, not a gating; load it with "
                "predictor.populations.populations_from_dict."
            )

        def thr(t: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
            return {k: {m: float(x) for m, x in v.items()} for k, v in t.items()}

        return cls(
            GatingTemplate.from_dict(raw["template"], source="bundle"),
            {k: tuple((tuple(ms), bool(pos)) for ms, pos in v) for k, v in raw["resolved"].items()},
            thr(raw["thresholds"]),
            dict(raw["skipped"]),
            tuple(raw["markers"]),
            {str(b): thr(t) for b, t in (raw.get("batch_thresholds") or {}).items()},
            {k: dict(v) for k, v in (raw.get("methods") or {}).items()},
            {str(b): {k: dict(v) for k, v in m.items()}
             for b, m in (raw.get("batch_methods") or {}).items()},
        )


def _level_suffix(token: str) -> str:
    for suffix in sorted(_POS + _NEG, key=len, reverse=True):
        if token.endswith(suffix) and len(token) > len(suffix):
            return suffix
    return ""


def _is_relative(term: Term) -> bool:
    """True for levels relative to the parent (``CD56bright``, ``CD127lo``, ``CD4++``)."""
    body = term.text.lstrip("?") if term.text else ""
    return any(_level_suffix(part) in _RELATIVE for part in body.split("|") if part)


def _resolve(template: GatingTemplate, markers: Sequence[str]):
    """Template populations → their terms on the panel's markers; the others → why skipped."""
    lookup = {normalize_marker(m): m for m in markers}
    resolved: dict[str, tuple[tuple[tuple[str, ...], bool], ...]] = {}
    relative: dict[str, set[str]] = {}  # pop -> markers read at a relative level
    skipped: dict[str, str] = {}
    for pop in template.populations:
        if pop.parent != ROOT and pop.parent not in resolved:
            skipped[pop.name] = f"parent {pop.parent!r} skipped"
            continue
        terms = []
        missing = []
        rel: set[str] = set()
        for term in pop.terms:
            present = tuple(lookup[k] for k in map(normalize_marker, term.markers) if k in lookup)
            if present:
                terms.append((present, term.positive))
                if _is_relative(term):
                    rel.update(present)
            elif not term.optional:
                missing.append("|".join(term.markers))
        if missing:
            skipped[pop.name] = f"panel lacks {', '.join(missing)}"
        else:
            resolved[pop.name] = tuple(terms)
            relative[pop.name] = rel
    return resolved, skipped, relative


class _Columns:
    """Marker columns of a frame as numpy arrays, and term masks, each computed once."""

    def __init__(self, x: pd.DataFrame):
        self.x = x
        self.cols: dict[str, np.ndarray] = {}
        self.cache: dict[tuple[str, float, bool], np.ndarray] = {}

    def col(self, m: str) -> np.ndarray:
        if m not in self.cols:
            self.cols[m] = self.x[m].to_numpy()
        return self.cols[m]

    def above(self, m: str, t: float, positive: bool) -> np.ndarray:
        key = (m, float(t), positive)
        if key not in self.cache:
            self.cache[key] = (self.col(m) > t) if positive else (self.col(m) <= t)
        return self.cache[key]

    def term(self, markers: Sequence[str], positive: bool, thresholds: Mapping[str, float]):
        """Cells meeting a term: any of its markers above (or below) its threshold."""
        mask = self.above(markers[0], thresholds[markers[0]], positive)
        for m in markers[1:]:
            mask = mask | self.above(m, thresholds[m], positive)
        return mask


def _gate(resolved, order: Sequence[PopulationDef], cols: _Columns, thresholds: Thresholds,
          n: int, live: np.ndarray | None = None) -> dict[str, np.ndarray]:
    root = np.ones(n, dtype=bool) if live is None else np.asarray(live, dtype=bool)
    masks: dict[str, np.ndarray] = {ROOT: root}
    for pop in order:
        if pop.name not in resolved:
            continue
        mask = masks[pop.parent]
        for ms, pos in resolved[pop.name]:
            mask = mask & cols.term(ms, pos, thresholds[pop.name])
        masks[pop.name] = mask
    return masks


def _fit_thresholds(
    x: pd.DataFrame,
    template: GatingTemplate,
    resolved,
    relative: Mapping[str, set[str]],
    fixed: Mapping[str, float],
    *,
    min_cells: int,
    min_effectiveness: float,
    default_threshold: float,
    pooled: Thresholds | None = None,
    pooled_methods: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Walk the hierarchy over ``x``: each population's thresholds within its parent.

    Without ``pooled`` (the pooled fit): valley → (relative level) shoulder → valley on all
    cells → default. With ``pooled`` (a batch fit): valley → the pooled threshold when it is
    a valley too → (``+``/``-``) valley on all cells of the batch → the pooled threshold.
    """
    cols = _Columns(x)
    root_cache: dict[tuple[str, float | None], float] = {}
    found_cache: dict[tuple, tuple[float, str]] = {}

    def valley(values: np.ndarray, near: float | None = None) -> float:
        # a batch's valley is the pooled one moved by the batch's drift: the closest one
        return valley_threshold(values, min_effectiveness=min_effectiveness, near=near,
                                floor=MIN_GATE)[0]

    def root_valley(m: str, near: float | None = None) -> float:
        if (m, near) not in root_cache:
            root_cache[m, near] = valley(cols.col(m), near)
        return root_cache[m, near]

    def find(pop: str, m: str, rel: bool, mask: np.ndarray, is_root: bool, key: tuple):
        if key in found_cache:
            return found_cache[key]
        values = cols.col(m) if is_root else cols.col(m)[mask]
        enough = values.size >= min_cells
        near = pooled[pop][m] if pooled is not None else None
        t = (root_valley(m, near) if is_root else valley(values, near)) if enough else float("nan")
        if np.isfinite(t):
            found = (t, "root valley" if is_root else "valley")
        elif pooled is not None:
            p_method = (pooled_methods or {}).get(pop, {}).get(m, "")
            if enough and not rel and p_method != "valley" and np.isfinite(root_valley(m, near)):
                found = (root_valley(m, near), "root valley")
            else:
                found = (pooled[pop][m], "pooled")
        elif rel and enough and np.isfinite(s := _shoulder_threshold(values)):
            found = (s, "shoulder")
        elif np.isfinite(root_valley(m)):
            found = (root_valley(m), "root valley")
        else:
            found = (default_threshold, "default")
        found_cache[key] = found
        return found

    masks: dict[str, np.ndarray] = {ROOT: np.ones(len(x), dtype=bool)}
    fitted: dict[str, dict[str, float]] = {}
    methods: dict[str, dict[str, str]] = {}
    for pop in template.populations:
        if pop.name not in resolved:
            continue
        parent_mask = masks[pop.parent]
        is_root = pop.parent == ROOT
        tdict: dict[str, float] = {}
        mdict: dict[str, str] = {}
        for ms, _pos in resolved[pop.name]:
            for m in ms:
                if normalize_marker(m) in fixed:
                    tdict[m], mdict[m] = fixed[normalize_marker(m)], "fixed"
                else:
                    rel = m in relative[pop.name]
                    t, how = find(pop.name, m, rel, parent_mask, is_root, (pop.parent, m, rel))
                    tdict[m], mdict[m] = float(t), how
        fitted[pop.name], methods[pop.name] = tdict, mdict
        mask = parent_mask
        for ms, pos in resolved[pop.name]:
            mask = mask & cols.term(ms, pos, tdict)
        masks[pop.name] = mask
    return fitted, methods


def _subsample(cells: Sequence[pd.DataFrame], max_cells: int, rng: np.random.Generator,
               columns: Sequence[str]) -> list[pd.DataFrame]:
    parts = []
    for df in cells:
        n = min(len(df), max_cells)
        idx = rng.choice(len(df), size=n, replace=False) if n < len(df) else np.arange(len(df))
        parts.append(df.iloc[np.sort(idx)][list(columns)])
    return parts


def _check_batches(batches: Sequence[Any] | None, n: int, where: str) -> list[str] | None:
    if batches is None:
        return None
    if isinstance(batches, str) or len(batches) != n:
        got = "a string" if isinstance(batches, str) else f"{len(batches)} labels"
        raise GatingError(
            f"The 'batches' parameter of {where} must hold one batch label per sample "
            f"({n}). Got {got} instead."
        )
    out = []
    for i, b in enumerate(batches):
        if b is None or (isinstance(b, float) and math.isnan(b)) or str(b).strip() == "":
            raise GatingError(
                f"The 'batches' parameter of {where} has no label for sample {i + 1}; give "
                "every sample a batch (or pass batches=None)."
            )
        out.append(str(b))
    return out


def fit_gating(
    cells: Sequence[pd.DataFrame],
    template: GatingTemplate | str | os.PathLike = "default",
    *,
    thresholds: Mapping[str, float] | None = None,
    max_cells_per_sample: int = 5000,
    min_effectiveness: float = 0.0,
    random_state: int = 0,
    batches: Sequence[str] | None = None,
    min_cells: int = 50,
    default_threshold: float = DEFAULT_THRESHOLD,
) -> Gating:
    """Fit a gating template's thresholds on transformed cells of several samples.

    Each automatic threshold is the density valley of the marker within the parent
    population (:func:`valley_threshold`), found on a subsample pooled over the samples
    (the same number of cells from each). When the parent has no valley (or fewer than
    ``min_cells`` cells): relative levels (``bright``, ``dim``, ``hi``, ``lo``, ``++``) use
    the edge of the parent's main mode; ``+``/``-`` terms use the valley on all cells, and
    ``default_threshold`` when that has none either. ``Gating.methods`` records which.

    Parameters
    ----------
    cells
        Cleaned, arcsinh-transformed events, one frame per sample (columns: markers).
    template
        A template, ``"default"`` or a YAML path.
    thresholds
        Fixed thresholds per marker (arcsinh units), over the template's own.
    max_cells_per_sample
        Cells drawn from each sample for the pooled fit (balanced across samples).
    min_effectiveness
        A valley must also split off this fraction of the variance (Otsu's effectiveness,
        0–1); 0 (default) relies on the valley tests alone.
    random_state
        Seed of the subsampling.
    batches
        One batch label per sample. Thresholds are then also fitted per batch (parents
        within the batch), falling back to the pooled threshold where a batch shows no
        valley; :func:`apply_gating` uses a batch's thresholds when given its label and the
        pooled ones for batches it has not seen.
    min_cells
        Parents with fewer cells (in the pooled subsample, or in a batch) get a fallback.
    default_threshold
        Last-resort threshold (arcsinh units) for a marker with no valley anywhere.
    """
    if not isinstance(template, GatingTemplate):
        template = load_template(template)
    if not cells:
        raise GatingError("fit_gating needs at least one sample.")
    labels = _check_batches(batches, len(cells), "fit_gating")
    markers = list(cells[0].columns)
    resolved, skipped, relative = _resolve(template, markers)
    if not resolved:
        raise GatingError(
            f"No population of {template.source} can be gated with the panel's markers "
            f"({', '.join(markers)}); check the panel's marker names."
        )
    used = sorted({m for terms in resolved.values() for ms, _ in terms for m in ms})
    rng = np.random.default_rng(random_state)
    parts = _subsample(cells, max_cells_per_sample, rng, used)
    fixed = {normalize_marker(k): v for k, v in {**template.thresholds, **(thresholds or {})}.items()}
    options = dict(min_cells=min_cells, min_effectiveness=min_effectiveness,
                   default_threshold=default_threshold)
    pooled = pd.concat(parts, ignore_index=True)
    fitted, methods = _fit_thresholds(pooled, template, resolved, relative, fixed, **options)
    per_batch: dict[str, dict[str, dict[str, float]]] = {}
    per_batch_methods: dict[str, dict[str, dict[str, str]]] = {}
    if labels is not None:
        def refit(b: str):
            x = pd.concat([p for p, lab in zip(parts, labels, strict=True) if lab == b],
                          ignore_index=True)
            return _fit_thresholds(x, template, resolved, relative, fixed, pooled=fitted,
                                   pooled_methods=methods, **options)

        # Batches are independent; threads overlap their sorts (numpy releases the GIL).
        names = list(dict.fromkeys(labels))
        with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
            for b, (fit, how) in zip(names, pool.map(refit, names), strict=True):
                per_batch[b], per_batch_methods[b] = fit, how
    return Gating(template, resolved, fitted, skipped, tuple(used), per_batch, methods,
                  per_batch_methods)


def apply_gating(gating: Gating, cells: pd.DataFrame, *, batch: str | None = None,
                 cofactors: Mapping[str, float] | None = None,
                 live: np.ndarray | None = None) -> pd.DataFrame:
    """Boolean membership of every cell in every gated population (columns in template order).

    The same as :func:`gate_masks` as a frame.
    """
    masks = gate_masks(gating, cells, batch=batch, cofactors=cofactors, live=live)
    return pd.DataFrame(masks, index=cells.index)


def gate_masks(gating: Gating, cells: pd.DataFrame, *, batch: str | None = None,
               cofactors: Mapping[str, float] | None = None,
               live: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Population → boolean mask of the cells in it (populations in template order).

    A frame of the masks would copy them into one block: per-sample work takes the masks.

    Parameters
    ----------
    gating
        A fitted (frozen) gating.
    cells
        Arcsinh-transformed events with the gating's markers as columns (raw events when
        ``cofactors`` is given).
    batch
        The cells' batch: its own thresholds when the gating was fitted per batch and knows
        it, the pooled thresholds otherwise.
    cofactors
        Marker → cofactor for raw ``cells``: each threshold t is moved to the raw scale as
        ``cofactor · sinh(t)``, the same cut without transforming every event.
    live
        Boolean mask of the events that are live cells (e.g. the cleanup mask) when ``cells``
        has every event: the others belong to no population.
    """
    missing = [m for m in gating.markers if m not in cells.columns]
    if missing:
        raise GatingError(
            f"The cells lack marker(s) {', '.join(missing)} that the gating uses; use the panel "
            "the gating was fitted with."
        )
    thresholds = gating.thresholds_for(batch)
    if cofactors is not None:
        # Only populations the gating resolves are gated (and need their markers' cofactors).
        thresholds = {pop: {m: float(cofactors[m] * np.sinh(t)) for m, t in thr.items()}
                      for pop, thr in thresholds.items() if pop in gating.resolved}
    masks = _gate(gating.resolved, gating.template.populations, _Columns(cells), thresholds,
                  len(cells), live)
    del masks[ROOT]
    return masks


Membership = pd.DataFrame | Mapping[str, np.ndarray]


def membership_masks(membership: Membership) -> dict[str, np.ndarray]:
    """Population → boolean mask, from a membership frame (:func:`apply_gating`) or the
    masks themselves (:func:`gate_masks`)."""
    if isinstance(membership, pd.DataFrame):
        return {name: membership[name].to_numpy(dtype=bool) for name in membership.columns}
    return {name: np.asarray(mask, dtype=bool) for name, mask in membership.items()}


def population_table(gating: Any, membership: Membership, *, sample_id: str,
                     n_live: int | None = None) -> pd.DataFrame:
    """Tidy counts of one sample: sample_id, population, parent, count, pct_parent, pct_live.

    ``gating`` is anything with ``parent(name)``: a :class:`Gating` or a
    :class:`~predictor.populations.clustering.Clustering`. ``membership`` is a membership
    frame or population → mask. ``n_live`` is the number of live cells when ``membership``
    also has rows of removed events (in no population); by default every row is a live cell.
    """
    masks = membership_masks(membership)
    names = list(masks)
    n_live = len(next(iter(masks.values()), ())) if n_live is None else int(n_live)
    counts = {name: int(np.count_nonzero(mask)) for name, mask in masks.items()}
    parents = [gating.parent(name) for name in names]
    count = np.array([counts[name] for name in names], dtype=np.int64)
    n_parent = np.array([n_live if q == ROOT else counts[q] for q in parents], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct_parent = np.where(n_parent > 0, 100.0 * count / n_parent, np.nan)
        pct_live = 100.0 * count / n_live if n_live else np.full(len(names), np.nan)
    return pd.DataFrame({"sample_id": sample_id, "population": names, "parent": parents,
                         "count": count, "pct_parent": pct_parent, "pct_live": pct_live})
