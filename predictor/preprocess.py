"""Arcsinh transform and the cleanup gates every CyTOF sample goes through before analysis.

Cleanup (:func:`cleanup`) removes, in this order and only when the panel has the channels:
normalisation beads, events that are not nucleated singlets (debris with little DNA, doublets
with too much DNA or too long an event), dead cells (cisplatin-high) and CD45-negative events.
Each threshold is found per file on the arcsinh scale — the density valley between two modes
when there are two, else a robust band around the main mode — or given by the user.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np
import pandas as pd

from predictor._density import find_peaks, main_mode, smooth_counts, valley_center
from predictor._kernels import sort
from predictor.io.panel import Panel, normalize_marker

__all__ = [
    "THRESHOLD_KEYS",
    "CleanupResult",
    "arcsinh",
    "transform",
    "cleanup",
    "cleanup_mask",
    "kept_cells",
    "qc_table",
]

THRESHOLD_KEYS = ("bead", "dna_low", "dna_high", "event_length_high", "viability", "cd45")
_UNTRANSFORMED = ("time", "event_length")

# Robust bands around the main mode, in units of the mode's half-width (a Gaussian's SD).
_DNA_LOW_K = 4.0
_DNA_HIGH_K = 3.0
_LENGTH_K = 3.0
_VIABILITY_K = 4.0
_CD45_K = 4.0
# Fallback distances (arcsinh units) when a channel shows one mode only.
_BEAD_MIN_GAP = 2.5
_VIABILITY_MIN_GAP = 1.5
_CD45_MIN_GAP = 2.0


# ------------------------------------------------------------------------------ transform


@overload
def arcsinh(x: pd.DataFrame, cofactor: float | Sequence[float] | Mapping[str, float] = ...
            ) -> pd.DataFrame: ...
@overload
def arcsinh(x: np.ndarray, cofactor: float | Sequence[float] | Mapping[str, float] = ...
            ) -> np.ndarray: ...


def arcsinh(
    x: np.ndarray | pd.DataFrame,
    cofactor: float | Sequence[float] | Mapping[str, float] = 5.0,
) -> np.ndarray | pd.DataFrame:
    """``arcsinh(x / cofactor)``, the standard cytometry transform.

    Parameters
    ----------
    x
        Raw intensities: an array (events × channels, or 1-D) or a frame. Not modified.
    cofactor
        One value for all channels (5 for CyTOF, 150 for flow), one per column (a sequence),
        or a mapping column → cofactor (frames only; every column must be in it).

    Returns
    -------
    numpy.ndarray or pandas.DataFrame
        Same shape and type as ``x``; float32 stays float32.
    """
    if isinstance(x, pd.DataFrame):
        if isinstance(cofactor, Mapping):
            missing = [c for c in x.columns if c not in cofactor]
            if missing:
                raise ValueError(
                    "The 'cofactor' parameter of arcsinh must give a cofactor for every column. "
                    f"Got none for {', '.join(map(str, missing[:5]))} instead."
                )
            cofactor = [cofactor[c] for c in x.columns]
        values = arcsinh(x.to_numpy(), cofactor)
        return pd.DataFrame(values, index=x.index, columns=x.columns, copy=False)
    if isinstance(cofactor, Mapping):
        raise ValueError(
            "The 'cofactor' parameter of arcsinh must be a float or a sequence for an array. "
            "Got a mapping instead (use a DataFrame to match cofactors by column)."
        )
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    cof = _check_cofactor(cofactor, arr)
    return np.arcsinh(arr / cof.astype(arr.dtype, copy=False))


def _check_cofactor(cofactor: object, arr: np.ndarray) -> np.ndarray:
    values = np.atleast_1d(np.asarray(cofactor, dtype=object))
    for v in values:
        ok = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        if not ok or not (math.isfinite(float(v)) and float(v) > 0):
            shown = v if ok else repr(v)
            raise ValueError(
                f"The 'cofactor' parameter of arcsinh must be a float > 0. Got {shown} instead."
            )
    cof = values.astype(np.float64)
    if cof.size > 1:
        n_cols = arr.shape[-1] if arr.ndim else 0
        if cof.ndim != 1 or cof.size != n_cols:
            raise ValueError(
                f"The 'cofactor' parameter of arcsinh must have one value per column "
                f"({n_cols}). Got {cof.size} values instead."
            )
    return cof if cof.size > 1 else cof[0:1].reshape(())


def transform(
    cells: pd.DataFrame, panel: Panel, *, method: Literal["arcsinh", "none"] = "arcsinh"
) -> pd.DataFrame:
    """Transform events with the panel's per-channel cofactors.

    Parameters
    ----------
    cells
        Raw events, one column per marker (as from :func:`~predictor.io.panel.apply_panel`).
    panel
        Gives each marker's cofactor and role. Time and event-length columns, and columns the
        panel does not know, are returned unchanged; all others (lineage, functional, DNA,
        viability, bead, barcode) are transformed.
    method
        ``'arcsinh'`` or ``'none'`` (a copy, untouched).

    Returns
    -------
    pandas.DataFrame
        A new float32 frame with the same columns and index.
    """
    if method not in ("arcsinh", "none"):
        raise ValueError(
            f"The 'method' parameter of transform must be 'arcsinh' or 'none'. Got {method!r} "
            "instead."
        )
    out = cells.astype(np.float32).copy()
    if method == "none":
        return out
    cof = panel.cofactors()
    roles = panel.roles()
    cols = [c for c in out.columns if c in cof and roles[c] not in _UNTRANSFORMED]
    if cols:
        out[cols] = arcsinh(out[cols], {c: cof[c] for c in cols})
    return out


# ------------------------------------------------------------------------------ cleanup


@dataclass
class CleanupResult:
    """What :func:`cleanup` kept, and why.

    Attributes
    ----------
    cells : pandas.DataFrame
        Kept events, arcsinh-transformed, lineage and functional marker columns only.
    mask : numpy.ndarray
        bool, one per input event: True where kept.
    qc : dict
        ``events_in, after_beads, after_singlets, after_live, after_cd45, kept,
        kept_fraction, flagged_low`` (kept < ``min_cells``).
    thresholds : dict[str, float]
        Thresholds used (arcsinh scale, event length raw), keys as in
        :data:`THRESHOLD_KEYS`; absent when the step did not run.
    """

    cells: pd.DataFrame
    mask: np.ndarray
    qc: dict[str, float | int | bool]
    thresholds: dict[str, float] = field(default_factory=dict)


def cleanup(
    cells: pd.DataFrame,
    panel: Panel,
    *,
    thresholds: Mapping[str, float] | None = None,
    min_cells: int = 0,
    transformed: bool = True,
) -> CleanupResult:
    """Remove beads, debris, doublets, dead and CD45-negative events from one sample.

    Parameters
    ----------
    cells
        Raw (untransformed) events of one file, one column per panel marker, including the
        dna, viability, bead, event_length and time roles (as from
        :func:`~predictor.io.panel.apply_panel`).
    panel
        Roles and cofactors. A step runs only when the panel has its channels: beads (role
        ``bead``), singlets (``dna`` and/or ``event_length``), live (``viability``), CD45+ (a
        marker named CD45).
    thresholds
        Fixed thresholds replacing the automatic ones, keys among ``bead`` (events above in
        the bead channels are beads), ``dna_low``, ``dna_high`` (band of mean DNA kept),
        ``event_length_high``, ``viability`` (events above are dead), ``cd45`` (events
        above are kept). Arcsinh scale except event length (raw).
    min_cells
        Samples keeping fewer events are flagged in ``qc['flagged_low']`` (not an error).
    transformed
        Return the kept cells arcsinh-transformed (default) or raw, for callers that only
        need order statistics and thresholds, which commute with the monotone transform.

    Returns
    -------
    CleanupResult
    """
    keep, qc, used = cleanup_mask(cells, panel, thresholds=thresholds, min_cells=min_cells)
    out = kept_cells(cells, panel, keep, transformed=transformed)
    return CleanupResult(cells=out, mask=keep, qc=qc, thresholds=used)


def cleanup_mask(
    cells: pd.DataFrame,
    panel: Panel,
    *,
    thresholds: Mapping[str, float] | None = None,
    min_cells: int = 0,
) -> tuple[np.ndarray, dict[str, float | int | bool], dict[str, float]]:
    """The cleanup gates of :func:`cleanup` without gathering the kept cells.

    Returns
    -------
    tuple
        ``(mask, qc, thresholds)`` as the fields of :class:`CleanupResult`; pass the mask (or
        a subset of it) to :func:`kept_cells`.
    """
    fixed = _check_thresholds(thresholds)
    if not isinstance(min_cells, int | np.integer) or min_cells < 0:
        raise ValueError(
            f"The 'min_cells' parameter of cleanup must be an int >= 0. Got {min_cells!r} "
            "instead."
        )
    n = len(cells)
    cof = panel.cofactors()
    roles = panel.roles()
    block, where = _channel_block(cells, None)  # columns compared in their own precision

    def cols(*wanted: str) -> list[str]:
        return [c for c in where if roles.get(c) in wanted]

    def scaled(columns: list[str]) -> np.ndarray:
        """Events × columns, arcsinh-transformed (column-major, as ``cells[columns]``)."""
        raw = block[[where[c] for c in columns]].T.astype(np.float32, copy=False)
        return arcsinh(raw, [cof.get(c, 5.0) for c in columns]) if columns else raw

    def above(column: str, thr: float) -> np.ndarray:
        """arcsinh(x / cofactor) > thr, compared on the raw scale (no transform). A threshold
        beyond float32's range (e.g. 100, to switch a gate off) becomes inf: nothing is above
        it, without numpy's overflow warning."""
        with np.errstate(over="ignore"):
            return block[where[column]] > cof.get(column, 5.0) * math.sinh(thr)

    keep = np.ones(n, dtype=bool)
    used: dict[str, float] = {}
    qc: dict[str, float | int | bool] = {"events_in": n}

    def pick(key: str, auto: Callable[[], float]) -> float:
        """The fixed threshold, else the automatic one (only fitted when needed)."""
        return fixed[key] if key in fixed else auto()

    beads = cols("bead")
    if beads and "bead" in fixed and n:  # a bead clears the threshold in all but _bead_rank channels
        used["bead"] = fixed["bead"]
        n_above = np.sum([above(c, fixed["bead"]) for c in beads], axis=0)
        keep &= n_above < len(beads) - _bead_rank(len(beads))
    elif beads and n:
        score = _bead_score(scaled(beads))
        thr = _auto_high(score[keep], min_gap=_BEAD_MIN_GAP, k=None)
        used["bead"] = thr
        keep &= ~(score > thr)
    qc["after_beads"] = int(keep.sum())

    dna, length = cols("dna"), cols("event_length")
    if (dna or length) and keep.any():
        if dna:
            level = scaled(dna).mean(axis=1)
            band = (lambda: (fixed["dna_low"], fixed["dna_high"])) if (
                "dna_low" in fixed and "dna_high" in fixed) else (lambda: _dna_band(level[keep]))
            lo, hi = band()
            used["dna_low"] = fixed.get("dna_low", lo)
            used["dna_high"] = fixed.get("dna_high", hi)
            keep &= (level >= used["dna_low"]) & (level <= used["dna_high"])
        if length and keep.any():
            ev_len = block[where[length[0]]].astype(np.float64)
            used["event_length_high"] = pick("event_length_high",
                                             lambda: _length_high(ev_len[keep]))
            keep &= ev_len <= used["event_length_high"]
    qc["after_singlets"] = int(keep.sum())

    viability = cols("viability")
    if len(viability) == 1 and "viability" in fixed and keep.any():
        used["viability"] = fixed["viability"]
        keep &= ~above(viability[0], fixed["viability"])
    elif viability and keep.any():
        score = scaled(viability).mean(axis=1)
        thr = pick("viability",
                   lambda: _auto_high(score[keep], min_gap=_VIABILITY_MIN_GAP, k=_VIABILITY_K))
        used["viability"] = thr
        keep &= score <= thr
    qc["after_live"] = int(keep.sum())

    cd45 = [c for c in where if normalize_marker(c) == "cd45" and c in roles]
    if cd45 and "cd45" in fixed and keep.any():
        used["cd45"] = fixed["cd45"]
        keep &= above(cd45[0], fixed["cd45"])
    elif cd45 and keep.any():
        level = scaled(cd45[:1])[:, 0]
        used["cd45"] = pick("cd45", lambda: _auto_low(level[keep]))
        keep &= level > used["cd45"]
    qc["after_cd45"] = int(keep.sum())

    kept = int(keep.sum())
    qc.update(kept=kept, kept_fraction=kept / n if n else 0.0, flagged_low=kept < min_cells)
    return keep, qc, {k: float(v) for k, v in used.items()}


def kept_cells(cells: pd.DataFrame, panel: Panel, rows: np.ndarray, *, transformed: bool = True
               ) -> pd.DataFrame:
    """The lineage and functional marker columns of ``cells`` at ``rows`` (a boolean mask),
    arcsinh-transformed unless ``transformed=False``, with a fresh index."""
    roles = panel.roles()
    markers = [c for c in cells.columns if roles.get(c) in ("lineage", "functional")]
    block = _select_rows(cells, markers, rows)  # markers × kept cells, a fresh copy
    if transformed and markers:  # in place: arcsinh(x / cofactor), as transform() does
        cofactors = panel.cofactors()  # validated (> 0) when the panel was read
        np.divide(block, np.array([[cofactors[m]] for m in markers], dtype=np.float32), out=block)
        np.arcsinh(block, out=block)
    return pd.DataFrame(block.T, columns=markers, copy=False)


def _channel_block(cells: pd.DataFrame, dtype: type | None = np.float32
                   ) -> tuple[np.ndarray, dict[str, int]]:
    """The events as a channels × events array (``dtype``; None: the frame's common type), and
    each column's row in it.

    Frames from :func:`~predictor.io.panel.apply_panel` hold one channel-major float32 block:
    it is returned as it is (a view), so a column costs neither a copy nor pandas' indexing
    (which, with string column labels, costs more than the cleanup's arithmetic on 20k events).
    """
    block = cells.to_numpy(dtype=dtype).T  # a view for single-block float32 frames
    return block, {c: i for i, c in enumerate(cells.columns.tolist())}


def _select_rows(cells: pd.DataFrame, columns: list[str], keep: np.ndarray) -> np.ndarray:
    """``cells.loc[keep, columns]`` as a channel-major float32 array (columns × kept rows).

    Frames from :func:`~predictor.io.panel.apply_panel` hold one channel-major block, so each
    column is compressed straight from contiguous memory, with a single copy.
    """
    block, where = _channel_block(cells)
    n_kept = int(np.count_nonzero(keep))
    out = np.empty((len(columns), n_kept), dtype=np.float32)
    at = np.flatnonzero(keep) if n_kept < len(keep) // 8 else None  # a few rows: gather
    for r, c in enumerate(columns):
        if at is None:
            np.compress(keep, block[where[c]], out=out[r])
        else:
            np.take(block[where[c]], at, out=out[r])
    return out


def qc_table(results: Mapping[str, CleanupResult]) -> pd.DataFrame:
    """One row per sample: event counts after each cleanup step and the thresholds used.

    Parameters
    ----------
    results
        Sample id → :class:`CleanupResult`.

    Returns
    -------
    pandas.DataFrame
        Column ``sample_id``, the QC counts, then ``threshold_<key>`` columns (NaN where the
        step did not run).
    """
    rows = []
    for sample_id, res in results.items():
        row: dict[str, object] = {"sample_id": str(sample_id), **res.qc}
        for key in THRESHOLD_KEYS:
            row[f"threshold_{key}"] = res.thresholds.get(key, np.nan)
        rows.append(row)
    columns = ["sample_id", "events_in", "after_beads", "after_singlets", "after_live",
               "after_cd45", "kept", "kept_fraction", "flagged_low",
               *(f"threshold_{k}" for k in THRESHOLD_KEYS)]
    return pd.DataFrame(rows, columns=columns)


def _check_thresholds(thresholds: Mapping[str, float] | None) -> dict[str, float]:
    fixed: dict[str, float] = {}
    for key, value in (thresholds or {}).items():
        if key not in THRESHOLD_KEYS:
            close = difflib.get_close_matches(str(key), THRESHOLD_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"The 'thresholds' parameter of cleanup must have keys among "
                f"{', '.join(THRESHOLD_KEYS)}. Got {key!r} instead.{hint}"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            raise ValueError(
                f"The 'thresholds' parameter of cleanup must map {key!r} to a finite number. "
                f"Got {value!r} instead."
            )
        fixed[key] = number
    return fixed


# ------------------------------------------------------------------------------ thresholds


@dataclass(frozen=True)
class _Density:
    centers: np.ndarray
    values: np.ndarray  # smoothed counts
    step: float


def _density(x: np.ndarray, *, bins: int = 256, smooth: float = 2.0) -> _Density | None:
    """Smoothed histogram of the central 99.8% of ``x`` (integer bins for integer data)."""
    # One sort serves the quantiles and the histogram (as np.quantile and np.histogram would
    # give, several times faster on CyTOF-sized samples).
    x = sort(x[np.isfinite(x)])  # a radix sort for float32
    if x.size < 20:
        return None
    lo, hi = _sorted_quantiles(x, (0.001, 0.999))
    if hi - lo < 1e-6:
        return None
    if np.all(x == np.round(x)) and hi - lo < 2 * bins:  # integer-valued (event length)
        edges = np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.0)
        smooth = max(1.0, smooth * (len(edges) - 1) / bins)
    else:
        edges = np.linspace(lo, hi, bins + 1)
    # np.histogram's bins are [a, b) except the last, [a, b].
    at = np.searchsorted(x, edges, side="left")
    at[-1] = np.searchsorted(x, edges[-1], side="right")
    counts = np.diff(at)
    values = smooth_counts(counts, smooth)
    return _Density(centers=(edges[:-1] + edges[1:]) / 2, values=values,
                    step=float(edges[1] - edges[0]))


def _sorted_quantiles(xs: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles of sorted data, linearly interpolated (``np.quantile``'s default)."""
    out = []
    for q in qs:
        pos = q * (xs.size - 1)
        i = math.floor(pos)
        j = min(i + 1, xs.size - 1)
        out.append(float(xs[i]) + (pos - i) * (float(xs[j]) - float(xs[i])))
    return out


def _valleys(d: _Density, *, min_separation: float, max_ratio: float = 0.5,
             min_fraction: float = 0.003) -> list[tuple[float, int, int]]:
    """Valleys between two modes, deepest first: (depth ratio, valley index, left peak)."""
    vals = d.values
    # Peaks are found on the square root of the density, so a small population beside a huge
    # spike (beads beside the zeros of cells in bead channels) still counts as a mode.
    root = np.sqrt(np.concatenate([[0.0], vals, [0.0]]))
    peaks = find_peaks(root, prominence=0.05 * root.max())
    peaks = peaks - 1
    total = vals.sum()
    out = []
    for a_i, a in enumerate(peaks):
        for b in peaks[a_i + 1:]:
            if (b - a) * d.step < min_separation:
                continue
            v = valley_center(vals, a, b)
            ratio = vals[v] / min(vals[a], vals[b])
            frac_lo, frac_hi = vals[:v].sum() / total, vals[v + 1:].sum() / total
            if ratio <= max_ratio and min(frac_lo, frac_hi) >= min_fraction:
                out.append((ratio, v, int(a)))
    return sorted(out)


def _auto_high(x: np.ndarray, *, min_gap: float, k: float | None) -> float:
    """Threshold above which events form a separate, brighter population (beads, dead cells).

    The deepest density valley above the main mode when there is one; otherwise the main mode
    plus ``max(k × its right half-width, min_gap)``.
    """
    d = _density(x)
    if d is None:
        finite = x[np.isfinite(x)]
        return float(np.max(finite) + 1.0) if finite.size else 0.0
    center, _, sd_right = main_mode(d)
    for _, v, _ in _valleys(d, min_separation=min_gap / 2):
        if d.centers[v] > center:
            return float(d.centers[v])
    gap = max(min_gap, (k or 0.0) * sd_right)
    return center + gap


def _auto_low(x: np.ndarray) -> float:
    """Threshold below which events are negative (CD45): valley below the main mode, else a
    robust distance below it."""
    d = _density(x)
    if d is None:
        finite = x[np.isfinite(x)]
        return float(np.min(finite) - 1.0) if finite.size else 0.0
    center, sd_left, _ = main_mode(d)
    for _, v, _ in _valleys(d, min_separation=1.0):
        if d.centers[v] < center:
            return float(d.centers[v])
    return center - max(_CD45_K * sd_left, _CD45_MIN_GAP)


def _dna_band(level: np.ndarray) -> tuple[float, float]:
    """Band of the nucleated-singlet DNA mode: ``mode − 4·SD`` (or the valley above debris,
    when higher) to ``mode + 3·SD``, SDs from the mode's half-widths."""
    d = _density(level)
    if d is None:
        finite = level[np.isfinite(level)]
        return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    center, sd_left, sd_right = main_mode(d)
    low = center - _DNA_LOW_K * sd_left
    for _, v, _ in _valleys(d, min_separation=1.0):
        if d.centers[v] < center:
            low = max(low, float(d.centers[v]))
            break
    return low, center + _DNA_HIGH_K * sd_right


def _length_high(length: np.ndarray) -> float:
    d = _density(length)
    if d is None:
        finite = length[np.isfinite(length)]
        return float(finite.max()) if finite.size else 0.0
    center, _, sd_right = main_mode(d)
    return center + _LENGTH_K * sd_right


def _bead_rank(n_channels: int) -> int:
    """Which bead channel value (0 = lowest) must clear the bead threshold: the second-lowest
    when there are three or more channels, so one weak channel does not hide a bead."""
    return 1 if n_channels >= 3 else 0


def _bead_score(values: np.ndarray) -> np.ndarray:
    """Per event, the level a bead must exceed: the lowest of its bead channels (the
    second-lowest when there are three or more, so one weak channel does not hide a bead)."""
    n = values.shape[1]
    if n == 1:
        return values[:, 0]
    lowest = np.minimum.reduce([values[:, j] for j in range(n)])
    if _bead_rank(n) == 0:
        return lowest
    second = np.full(len(values), np.inf, dtype=values.dtype)
    first = np.full(len(values), np.inf, dtype=values.dtype)
    for j in range(n):  # running lowest and second-lowest, one column at a time
        col = values[:, j]
        np.minimum(second, np.maximum(first, col), out=second)
        np.minimum(first, col, out=first)
    return second
