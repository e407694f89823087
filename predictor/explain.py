"""SHAP explanations as tables: values, interactions, sums per population / marker / contrast.

``booster.predict(..., pred_contribs=True)`` gives exactly the TreeSHAP values of
``shap.TreeExplainer`` (log-odds scale) and is the fast path; ``pred_interactions=True`` gives
the SHAP interaction values, whose rows add up to the SHAP values. :func:`to_explanation`
wraps values in a ``shap.Explanation`` for shap's plots.

Everything here computes; nothing renders (the report lives in :mod:`predictor.report`).
:func:`explain_bundle` gathers a bundle's explanations in an :class:`Explanations` result,
whose ``frame()`` is a tidy table of importance per group with its stability across CV folds.

Clinical covariates among the model's inputs (``[model] covariates``, metadata column
``covariate``) are not cell populations: the per-population, -marker, -statistic and -contrast
sums leave them out, and the level ``"covariate"`` groups them per clinical column instead
(the report shows them as the group "clinical covariates").

Nested gates often read the same signal: a parent and its dominant child (NK and CD56dim NK,
Monocytes and Classical mono) give features that agree across patients, and the model credits
either one. At the population level, a child's feature whose readout matches its parent's
(same marker, statistic and contrast; |Spearman ρ| ≥ :data:`SAME_READOUT_RHO` across the
patients) counts for the parent, the coarser gate the data cannot tell apart from it; the
table of these is :attr:`Explanations.same_readouts`. Per-feature values never change.

Sources, best first:

- ``oof_shap.csv`` in the bundle (index patient_id, one column per feature): out-of-fold SHAP
  values, each patient explained by the fold models that did not see them, averaged over
  repeats. Honest: it shows what the evaluated procedure relies on.
- otherwise the final model's SHAP values on its own training patients (in-sample).
- ``fold_importance.csv`` (repeat, fold, feature, mean_abs_shap): one importance per fold
  model, for the stability of the rankings.
- ``null_importance.csv`` (permutation, feature, mean_abs_shap): each feature's importance in
  every permuted-outcome CV of the permutation test, so each group's importance gets a
  permutation p-value (:meth:`Explanations.null_test`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xgboost as xgb

from predictor.covariates import COVARIATE_PREFIX, covariate_mask
from predictor.features.matrix import FREQUENCY_STATISTICS, META_COLUMNS, STAT_LABELS

if TYPE_CHECKING:
    from predictor.model.bundle import Bundle

__all__ = [
    "COVARIATE_LEVEL",
    "LEVELS",
    "SAME_READOUT_RHO",
    "Explanations",
    "aggregate_shap",
    "describe_driver",
    "explain_bundle",
    "explain_model",
    "feature_meta",
    "fold_stability",
    "group_labels",
    "importance",
    "interaction_pairs",
    "interaction_values",
    "parse_feature_name",
    "same_readouts",
    "shap_values",
    "to_explanation",
    "top_drivers",
]

#: Grouping levels of :func:`group_labels` (``contrast`` = condition and timepoint together).
LEVELS = ("population", "marker", "statistic", "condition", "timepoint", "contrast")
#: The level that groups the clinical covariates per clinical column (not one of LEVELS).
COVARIATE_LEVEL = "covariate"
META = (*META_COLUMNS, "covariate")
#: A child gate's feature this correlated with its ancestor's same readout (|Spearman ρ| over
#: patients) is credited to the ancestor at the population level.
SAME_READOUT_RHO = 0.9
# Statistics that read the same in a population and its parent (pct_parent does not: each is
# a share of a different parent).
_SHARED_STATISTICS = ("count", "pct_live", "median", "frac_pos")
_MIN_PAIRS = 10  # patients with both values, for a correlation
_STAT_CODE = {label: code for code, label in STAT_LABELS.items()}  # label in names → code
_STAT_WORDS = {"count": "cell count", "pct_parent": "% of parent", "pct_live": "% of live cells",
               "median": "median level", "frac_pos": "fraction positive"}


# ------------------------------------------------------------------------------ SHAP values


def _dmatrix(booster: xgb.Booster, X: pd.DataFrame) -> tuple[xgb.DMatrix, list[str]]:
    names = list(booster.feature_names or X.columns)
    data = X.reindex(columns=names).to_numpy(dtype=np.float32)
    return xgb.DMatrix(data, missing=np.nan, feature_names=names, nthread=1), names


def shap_values(booster: xgb.Booster, X: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """SHAP values (patients × features, log-odds) and the base value.

    ``X`` must hold the booster's features (matched by name, extra columns ignored).
    """
    dm, names = _dmatrix(booster, X)
    contrib = booster.predict(dm, pred_contribs=True)
    values = pd.DataFrame(contrib[:, :-1], index=X.index, columns=names)
    return values, float(contrib[0, -1]) if len(contrib) else float("nan")


def interaction_values(booster: xgb.Booster, X: pd.DataFrame) -> tuple[np.ndarray, list[str], float]:
    """SHAP interaction values: array (patients × features × features), names, base value.

    Symmetric in the last two axes; the diagonal holds the main effects and each off-diagonal
    pair splits its interaction in two halves, so ``values.sum(axis=2)`` gives the SHAP values.
    """
    dm, names = _dmatrix(booster, X)
    inter = booster.predict(dm, pred_interactions=True)
    base = float(inter[0, -1, -1]) if len(inter) else float("nan")
    return np.ascontiguousarray(inter[:, :-1, :-1]), names, base


def interaction_pairs(inter: np.ndarray, names: Sequence[str], *, top: int = 15,
                      meta: pd.DataFrame | None = None) -> pd.DataFrame:
    """The strongest feature pairs: mean over patients of |interaction| (both halves summed)."""
    p = len(names)
    if inter.size == 0 or p < 2:
        return pd.DataFrame(columns=["feature_a", "feature_b", "mean_abs_interaction"])
    strength = 2.0 * np.abs(inter).mean(axis=0)
    iu = np.triu_indices(p, k=1)
    vals = strength[iu]
    order = np.argsort(-vals, kind="stable")[:top]
    out = pd.DataFrame({
        "feature_a": [names[iu[0][i]] for i in order],
        "feature_b": [names[iu[1][i]] for i in order],
        "mean_abs_interaction": vals[order],
    })
    if meta is not None:
        out["population_a"] = meta["population"].reindex(out["feature_a"]).to_numpy()
        out["population_b"] = meta["population"].reindex(out["feature_b"]).to_numpy()
    return out[out["mean_abs_interaction"] > 0].reset_index(drop=True)


def top_drivers(values: pd.DataFrame, k: int = 3) -> list[list[tuple[str, float]]]:
    """Per patient, the ``k`` features with the largest |SHAP|, with their signed values."""
    out = []
    arr = values.to_numpy()
    names = np.array(values.columns)
    for row in arr:
        idx = np.argsort(-np.abs(row), kind="stable")[:k]
        out.append([(str(names[i]), float(row[i])) for i in idx])
    return out


def to_explanation(values: pd.DataFrame, base_value: float, X: pd.DataFrame, *,
                   features: Sequence[str] | None = None):
    """A ``shap.Explanation`` for shap's plotting functions (missing data columns → NaN)."""
    import shap

    cols = list(features or values.columns)
    return shap.Explanation(
        values=values[cols].to_numpy(dtype=float),
        base_values=np.full(len(values), base_value, dtype=float),
        data=X.reindex(index=values.index, columns=cols).to_numpy(dtype=float),
        feature_names=cols,
    )


# ------------------------------------------------------------------------------ metadata


def parse_feature_name(name: str, *, baseline: str | None = None) -> dict[str, str]:
    """Metadata of a readable feature name (``CD8 T | IFNg | frac+ | stim | Δweek6``).

    The inverse of :func:`predictor.features.matrix.feature_name`: ``Δweek6`` becomes
    ``week6-<baseline>`` when ``baseline`` is given, else stays ``Δweek6``.
    """
    if str(name).startswith(COVARIATE_PREFIX):  # a clinical covariate: no cytometry metadata
        return dict.fromkeys(META_COLUMNS, "")
    parts = [p.strip() for p in str(name).split(" | ")]
    if len(parts) < 4:
        return {"population": parts[0], "marker": "", "statistic": "", "condition": "", "timepoint": ""}
    population, stat, condition, timepoint = parts[0], parts[-3], parts[-2], parts[-1]
    marker = " | ".join(parts[1:-3])
    if timepoint.startswith("Δ") and baseline:
        timepoint = f"{timepoint[1:]}-{baseline}"
    return {"population": population, "marker": marker, "statistic": _STAT_CODE.get(stat, stat),
            "condition": condition, "timepoint": timepoint}


def _covariate_column(name: str) -> str:
    """``clinical: arm = IL-7`` → ``arm``; ``clinical: age`` → ``age``; else ``''``."""
    if not str(name).startswith(COVARIATE_PREFIX):
        return ""
    return str(name)[len(COVARIATE_PREFIX):].split(" = ", 1)[0]


def feature_meta(names: Sequence[str], schema: pd.DataFrame | None = None, *,
                 baseline: str | None = None) -> pd.DataFrame:
    """Metadata (``population, marker, statistic, condition, timepoint, covariate``) of every name.

    Taken from ``schema`` (a bundle's, index = feature names) where it has the feature, parsed
    from the name otherwise (out-of-fold tables cover features the final model dropped).
    ``covariate`` names the clinical column of a covariate input, and is empty for cytometry
    features.
    """
    rows = []
    for n in names:
        if schema is not None and n in schema.index:
            r = schema.loc[n]
            row = {c: ("" if pd.isna(r.get(c)) else str(r.get(c))) for c in META}
        else:
            row = parse_feature_name(n, baseline=baseline)
        row["covariate"] = row.get("covariate") or _covariate_column(n)
        rows.append(row)
    return pd.DataFrame(rows, index=pd.Index(list(names), name="feature"), columns=list(META))


def _covariates(meta: pd.DataFrame) -> pd.Series:
    """True for covariate rows: flagged in the metadata, or named ``clinical: ...``."""
    named = np.asarray(meta.index.astype(str).str.startswith(COVARIATE_PREFIX), dtype=bool)
    return pd.Series(covariate_mask(meta).to_numpy() | named, index=meta.index)


def _timepoint_label(tp: str) -> str:
    return f"Δ{tp.partition('-')[0]}" if "-" in tp else tp


def _condition_label(cond: str) -> str:
    return {"stim-unstim": "stim − unstim"}.get(cond, cond)


def group_labels(meta: pd.DataFrame, by: str) -> pd.Series:
    """The group of every feature at level ``by`` (one of :data:`LEVELS`, or ``"covariate"``).

    Only the features of that kind: the cytometry levels leave clinical covariates out, and
    ``"covariate"`` (the clinical column of each covariate input) leaves cytometry out.
    """
    if by not in (*LEVELS, COVARIATE_LEVEL):
        raise ValueError(f"The 'by' parameter must be one of {', '.join((*LEVELS, COVARIATE_LEVEL))}. "
                         f"Got {by!r} instead.")
    cov = _covariates(meta).to_numpy()
    if by == COVARIATE_LEVEL:
        m = meta[cov]
        col = m["covariate"].fillna("") if "covariate" in m.columns else pd.Series("", index=m.index)
        names = pd.Series(m.index.astype(str).map(_covariate_column), index=m.index)
        return col.astype(str).where(col.astype(str) != "", names).rename(COVARIATE_LEVEL)
    m = meta[~cov].fillna("")
    if by == "contrast":
        cond = m["condition"].astype(str).map(_condition_label)
        tp = m["timepoint"].astype(str).map(_timepoint_label)
        return (cond + " · " + tp).rename("contrast")
    col = m[by].astype(str)
    if by == "marker":
        return col.replace("", "(frequency)")
    if by == "timepoint":
        return col.map(_timepoint_label)
    if by == "condition":
        return col.map(_condition_label)
    return col.replace("", "-")


def aggregate_shap(values: pd.DataFrame, meta: pd.DataFrame, *, by: str = "population") -> pd.DataFrame:
    """Sum SHAP values per group of features (per patient), e.g. per population or marker.

    Sums of signed SHAP values are exact (additivity), so a population's value is its total push
    on the patient's log-odds. Clinical covariates are summed at ``by="covariate"`` only, so
    the groups of a cytometry level add up to the patient's SHAP total minus the covariates'.
    """
    groups = group_labels(meta.reindex(values.columns), by)
    if groups.empty:
        return pd.DataFrame(index=values.index)
    return values[list(groups.index)].T.groupby(groups.to_numpy()).sum().T


def same_readouts(meta: pd.DataFrame, data: pd.DataFrame, parents: Mapping[str, str], *,
                  rho: float = SAME_READOUT_RHO) -> pd.DataFrame:
    """Child-gate features that read the same signal as an ancestor's feature.

    For each cytometry feature (statistics count, % live, median, fraction positive) of a
    population, its ancestors (``parents``: population → parent) are searched for the feature
    with the same marker, statistic, condition and timepoint; the highest ancestor whose feature
    correlates with it at |Spearman ρ| ≥ ``rho`` over the patients (at least 10 with both
    values) is credited with it.

    Returns
    -------
    DataFrame with one row per credited feature: ``feature, population, credited_to, rho``.
    """
    cols = ["feature", "population", "credited_to", "rho"]
    m = meta.reindex(data.columns)
    m = m[~_covariates(m).to_numpy()].fillna("")
    m = m[m["statistic"].isin(_SHARED_STATISTICS) & m["population"].isin(list(parents))]
    if m.empty:
        return pd.DataFrame(columns=cols)
    key = list(zip(m["marker"], m["statistic"], m["condition"], m["timepoint"], strict=True))
    by_readout = {(pop, k): f for f, pop, k in zip(m.index, m["population"], key, strict=True)}
    ranks = data[list(m.index)].rank()
    rows = []
    for f, pop, k in zip(m.index, m["population"], key, strict=True):
        credited, best, seen = None, np.nan, {pop}
        q = parents.get(pop)
        while q in parents and q not in seen:  # up the lineage, to the top gate
            seen.add(q)
            g = by_readout.get((q, k))
            if g is not None:
                a, b = ranks[f], ranks[g]
                ok = a.notna() & b.notna()
                if ok.sum() >= _MIN_PAIRS and a[ok].std() > 0 and b[ok].std() > 0:
                    r = float(np.corrcoef(a[ok], b[ok])[0, 1])
                    if abs(r) >= rho:
                        credited, best = q, r
            q = parents.get(q)
        if credited is not None:
            rows.append((f, pop, credited, best))
    return pd.DataFrame(rows, columns=cols)


def importance(values: pd.DataFrame) -> pd.Series:
    """Global importance: mean |SHAP| per column, largest first."""
    return values.abs().mean(axis=0).sort_values(ascending=False, kind="stable")


# ------------------------------------------------------------------------------ stability


def fold_stability(fold_importance: pd.DataFrame, meta: pd.DataFrame, *, by: str = "population",
                   k: int = 5, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """How stable a group's rank is over the CV fold models.

    Parameters
    ----------
    fold_importance
        Columns ``repeat, fold, feature, mean_abs_shap`` (one row per feature and fold model).
    meta
        Metadata of (at least) the features it names, see :func:`feature_meta`.
    by
        Grouping level; a group's score in a fold is the sum of its features' mean |SHAP|.
    k
        Top-k for the frequency column.
    groups
        Groups to rank besides those in the folds (absent from a fold = score 0).

    Returns
    -------
    DataFrame indexed by group: ``top_k_frequency`` (share of folds where the group ranks
    ≤ k), ``mean_rank``, ``sd_rank`` (1 = most important; ties share their average rank),
    ``n_folds``.
    """
    fi = fold_importance.reset_index(drop=True)
    fmeta = meta.reindex(fi["feature"].astype(str))
    inside = ~_covariates(fmeta).to_numpy() if by != COVARIATE_LEVEL else _covariates(fmeta).to_numpy()
    fi, fmeta = fi[inside].copy(), fmeta[inside]
    fi["group"] = group_labels(fmeta, by).to_numpy()
    fi["model"] = fi["repeat"].astype(str) + "/" + fi["fold"].astype(str)
    wide = fi.pivot_table(index="model", columns="group", values="mean_abs_shap", aggfunc="sum",
                          fill_value=0.0)
    for g in groups or ():
        if g not in wide.columns:
            wide[g] = 0.0
    ranks = wide.rank(axis=1, ascending=False, method="average")
    return pd.DataFrame({
        "top_k_frequency": (ranks <= k).mean(axis=0),
        "mean_rank": ranks.mean(axis=0),
        "sd_rank": ranks.std(axis=0, ddof=1) if len(ranks) > 1 else np.nan,
        "n_folds": len(ranks),
    }).rename_axis(by)


# ------------------------------------------------------------------------------ the result


@dataclass
class Explanations:
    """A model's explanations, computed once; tables via :meth:`frame` and friends.

    Attributes
    ----------
    values
        SHAP values, patients × features (log-odds).
    base_value
        The model's expected log-odds (the final model's when ``values`` are out-of-fold).
    data
        Feature values aligned to ``values`` (NaN where the bundle does not store them).
    meta
        Feature metadata, index = ``values.columns``.
    source
        ``"out-of-fold"`` or ``"in-sample"`` (final model on its training patients).
    interactions
        Final model's SHAP interaction values on the training patients, with ``interaction_names``.
    fold_importance
        Per-fold mean |SHAP| (``repeat, fold, feature, mean_abs_shap``) or None.
    k
        Top-k of the stability frequency.
    same_readouts
        Child-gate features credited to an ancestor at the population level
        (:func:`same_readouts`), or None.
    null_importance
        Feature importances in the permutation test's permuted-outcome CVs
        (``permutation, feature, mean_abs_shap``), or None.
    """

    values: pd.DataFrame
    base_value: float
    data: pd.DataFrame
    meta: pd.DataFrame
    source: str
    interactions: np.ndarray | None = None
    interaction_names: list[str] = field(default_factory=list)
    fold_importance: pd.DataFrame | None = None
    k: int = 5
    same_readouts: pd.DataFrame | None = None
    null_importance: pd.DataFrame | None = None

    @property
    def group_meta(self) -> pd.DataFrame:
        """The metadata features are grouped by: each feature in :attr:`same_readouts` belongs
        to the population credited with it."""
        if self.same_readouts is None or self.same_readouts.empty:
            return self.meta
        meta = self.meta.copy()
        credited = self.same_readouts.set_index("feature")["credited_to"]
        meta.loc[credited.index, "population"] = credited.to_numpy()
        return meta

    def _meta_with(self, features) -> pd.DataFrame:
        """:attr:`group_meta`, plus metadata parsed from the names of ``features`` it lacks
        (fold models' features that are not among the values)."""
        own = self.group_meta
        extra = [f for f in features if f not in own.index]
        return pd.concat([own, feature_meta(extra)]) if extra else own

    def by(self, level: str = "population") -> pd.DataFrame:
        """Signed SHAP sums per patient and group (patients × groups)."""
        return aggregate_shap(self.values, self.group_meta, by=level)

    def importance(self, level: str | None = None) -> pd.Series:
        """Global mean |sum of SHAP| per group (per feature when ``level`` is None)."""
        return importance(self.values if level is None else self.by(level))

    def stability(self, level: str = "population") -> pd.DataFrame | None:
        """Rank stability over the fold models (None without fold importances)."""
        if self.fold_importance is None or self.fold_importance.empty:
            return None
        meta = self._meta_with(self.fold_importance["feature"].astype(str).unique())
        groups = list(group_labels(self.group_meta, level).unique())
        return fold_stability(self.fold_importance, meta, by=level, k=self.k, groups=groups)

    def null_test(self, level: str = "population") -> pd.DataFrame | None:
        """Each group's importance against the permuted-outcome null (None without the tables).

        The statistic is the one the permutation test can redo on every permuted outcome: the
        first CV repeat's importance per fold model (mean |SHAP| on the fold's test patients,
        summed over the group's features), averaged over its folds. ``null_p`` = (1 + number
        of permutations scoring at least as high) / (1 + permutations), per group, not
        adjusted for the number of groups.
        """
        fi, null = self.fold_importance, self.null_importance
        if fi is None or fi.empty or null is None or null.empty:
            return None
        first = fi[fi["repeat"] == fi["repeat"].min()]
        observed = first.groupby("feature")["mean_abs_shap"].sum() / first["fold"].nunique()
        feats = pd.Index(observed.index.astype(str)).union(null["feature"].astype(str).unique())
        labels = group_labels(self._meta_with(feats).reindex(feats), level)
        obs = observed.groupby(labels.reindex(observed.index).to_numpy()).sum()
        inside = null[null["feature"].isin(labels.index)]
        n_perm = int(null["permutation"].max()) + 1
        wide = (inside.assign(group=labels.reindex(inside["feature"]).to_numpy())
                .pivot_table(index="permutation", columns="group", values="mean_abs_shap",
                             aggfunc="sum", fill_value=0.0)
                .reindex(index=range(n_perm), columns=labels.unique(), fill_value=0.0))
        obs = obs.reindex(wide.columns, fill_value=0.0)
        return pd.DataFrame({
            "null_score": obs,
            "null_mean": wide.mean(axis=0),
            "null_q95": wide.quantile(0.95, axis=0),
            "null_p": (1 + (wide >= obs).sum(axis=0)) / (1 + n_perm),
            "n_permutations": n_perm,
        }).rename_axis(level)

    @property
    def covariates(self) -> list[str]:
        """The clinical covariates among the model's inputs (their clinical columns)."""
        return list(dict.fromkeys(group_labels(self.meta, COVARIATE_LEVEL)))

    def frame(self, level: str | None = None) -> pd.DataFrame:
        """Tidy importance table: one row per (level, group), ranked, with fold stability.

        Columns: ``level, group, rank, n_features, mean_abs_shap, mean_shap,
        top_k_frequency, mean_rank, sd_rank, n_folds`` (stability NaN without fold data) and
        ``null_p`` (:meth:`null_test`; NaN without the permutation tables).
        All of :data:`LEVELS` when ``level`` is None, and ``"covariate"`` too when the model
        has clinical covariates; they are ranked among themselves, never among populations.
        """
        if level is None:
            levels = LEVELS + ((COVARIATE_LEVEL,) if self.covariates else ())
        else:
            levels = (level,)
        out = []
        for lv in levels:
            sums = self.by(lv)
            labels = group_labels(self.group_meta, lv)
            imp = sums.abs().mean(axis=0)
            t = pd.DataFrame({
                "level": lv,
                "group": imp.index,
                "n_features": labels.value_counts().reindex(imp.index).to_numpy(),
                "mean_abs_shap": imp.to_numpy(),
                "mean_shap": sums.mean(axis=0).reindex(imp.index).to_numpy(),
            })
            t = t.sort_values(["mean_abs_shap", "group"], ascending=[False, True], kind="stable")
            t.insert(2, "rank", np.arange(1, len(t) + 1))
            st = self.stability(lv)
            cols = ["top_k_frequency", "mean_rank", "sd_rank", "n_folds"]
            if st is not None:
                t = t.join(st[cols], on="group")
            else:
                t = t.assign(**dict.fromkeys(cols, np.nan))
            nt = self.null_test(lv) if lv != COVARIATE_LEVEL else None
            if nt is not None:
                t = t.join(nt[["null_p"]], on="group")
            else:
                t = t.assign(null_p=np.nan)
            out.append(t)
        return pd.concat(out, ignore_index=True)

    def patient_frame(self, level: str = "population") -> pd.DataFrame:
        """Tidy per-patient table: ``patient_id, level, group, shap`` (signed sums)."""
        sums = self.by(level)
        long = sums.rename_axis(index="patient_id", columns="group").stack().rename("shap")
        return long.reset_index().assign(level=level)[["patient_id", "level", "group", "shap"]]

    def interaction_frame(self, top: int = 15) -> pd.DataFrame:
        """The strongest feature pairs of the final model (empty without interactions)."""
        if self.interactions is None:
            return pd.DataFrame(columns=["feature_a", "feature_b", "mean_abs_interaction"])
        meta = feature_meta(self.interaction_names, self.meta)
        return interaction_pairs(self.interactions, self.interaction_names, top=top, meta=meta)

    def plot(self, level: str = "population", *, top: int = 15) -> bytes:
        """PNG of the importance per group at ``level``, with fold stability when known."""
        from predictor.report.plots import importance_plot

        return importance_plot(self.frame(level), title=f"Importance per {level}", k=self.k, top=top)

    def explanation(self, features: Sequence[str] | None = None):
        """The values as a ``shap.Explanation`` (for shap's plots)."""
        return to_explanation(self.values, self.base_value, self.data, features=features)


def explain_model(booster: xgb.Booster, X: pd.DataFrame, meta: pd.DataFrame | None = None, *,
                  oof_shap: pd.DataFrame | None = None, fold_importance: pd.DataFrame | None = None,
                  interactions: bool = True, k: int = 5, baseline: str | None = None,
                  parents: Mapping[str, str] | None = None,
                  same_readout_rho: float | None = SAME_READOUT_RHO,
                  null_importance: pd.DataFrame | None = None) -> Explanations:
    """Explanations of a model on its training patients ``X``.

    ``oof_shap`` (patients × features, out-of-fold; an optional ``base_value`` column holds the
    fold models' expected values) replaces the final model's in-sample SHAP values when given;
    interaction values always come from the final model. With ``parents`` (population →
    parent, from the gating), child-gate features that read the same as an ancestor's are
    credited to it at the population level (:func:`same_readouts`; ``same_readout_rho=None``
    credits every feature to its own population).
    """
    names = list(booster.feature_names or X.columns)
    final, base = shap_values(booster, X)
    if oof_shap is not None and not oof_shap.empty:
        values = oof_shap.drop(columns=["base_value"], errors="ignore").astype(float).fillna(0.0)
        if "base_value" in oof_shap.columns:
            base = float(pd.to_numeric(oof_shap["base_value"], errors="coerce").mean())
        source = "out-of-fold"
    else:
        values, source = final, "in-sample"
    all_meta = feature_meta(list(values.columns), meta, baseline=baseline)
    inter, inames = (None, [])
    if interactions:
        inter, inames, _ = interaction_values(booster, X[names])
    data = X.reindex(index=values.index, columns=values.columns).astype(float)
    same = None
    if parents and same_readout_rho is not None:
        same = same_readouts(all_meta, data, parents, rho=same_readout_rho)
    return Explanations(values, base, data, all_meta, source, inter, inames, fold_importance, k,
                        same, null_importance)


def explain_bundle(bundle: Bundle, *, k: int = 5, interactions: bool = True,
                   same_readout_rho: float | None = SAME_READOUT_RHO) -> Explanations:
    """Explanations of a bundle's model (out-of-fold SHAP and fold importances when stored);
    the population lineage comes from the bundle's gating."""
    X = bundle.train_features()
    more = _read_table(bundle.path / "features_oof.csv", indexed=True)  # features of fold models
    if more is not None:
        X = X.copy()
        X.index, more.index = X.index.astype(str), more.index.astype(str)
        X = X.join(more[[c for c in more.columns if c not in X.columns]])
    oof = _read_table(bundle.path / "oof_shap.csv", indexed=True)
    if oof is not None:
        oof.index = oof.index.astype(str)
        X = X.copy()
        X.index = X.index.astype(str)
    fi = _read_table(bundle.path / "fold_importance.csv")
    if fi is not None and not {"repeat", "fold", "feature", "mean_abs_shap"} <= set(fi.columns):
        fi = None
    baseline = getattr(bundle.feature_config, "baseline", None)
    null = _read_table(bundle.path / "null_importance.csv")
    if null is not None and not {"permutation", "feature", "mean_abs_shap"} <= set(null.columns):
        null = None
    parents = {p: bundle.gating.parent(p) for p in bundle.gating.populations}
    return explain_model(bundle.booster, X, bundle.schema, oof_shap=oof, fold_importance=fi,
                         interactions=interactions, k=k, baseline=baseline, parents=parents,
                         same_readout_rho=same_readout_rho, null_importance=null)


def _read_table(path: Path, *, indexed: bool = False) -> pd.DataFrame | None:
    """A bundle table, or None when the bundle lacks it; ``indexed`` tables have patient ids
    as their index (kept as strings)."""
    from predictor.model.bundle import read_indexed_csv

    if not path.is_file():
        return None
    return read_indexed_csv(path) if indexed else pd.read_csv(path)


# ------------------------------------------------------------------------------ words


def _cells(pop: str) -> str:
    """'CD8 T' → 'CD8 T cells'; 'B cells', 'Monocytes' stay as they are."""
    return pop if pop.endswith("s") else f"{pop} cells"


def _subject(m: Mapping[str, str], *, delta: bool) -> str:
    pop, marker, stat = m.get("population", ""), m.get("marker", ""), m.get("statistic", "")
    cond = m.get("condition", "")
    if stat == "frac_pos":
        what = f"the share of {_cells(pop)} positive for {marker}"
    elif stat == "median":
        what = f"the {marker} level on {_cells(pop)}"
    elif stat in FREQUENCY_STATISTICS and delta:
        what = _cells(pop)
    elif stat == "pct_live":
        what = f"the {pop} share of live cells"
    elif stat == "pct_parent":
        what = f"the {pop} share of its parent population"
    elif stat == "count":
        what = f"the {pop} cell count"
    else:
        what = " ".join(x for x in (pop, marker, stat) if x)
    if cond == "stim":
        what += " after stimulation"
    elif cond == "stim-unstim":
        what += " (stimulated minus unstimulated)"
    return what


def _quantity(m: Mapping[str, str], value: float) -> str:
    stat, tp = m.get("statistic", ""), m.get("timepoint", "")
    words = _STAT_WORDS.get(stat, stat)
    if "-" in tp:
        on, _, base = tp.partition("-")
        if stat in FREQUENCY_STATISTICS:
            return f"{words} ×{2.0 ** value:.2f} from {base} to {on}"
        if stat == "frac_pos":
            return f"{100 * value:+.1f} percentage points"
        return f"Δ {words} = {value:+.3g}"
    if stat in ("pct_live", "pct_parent"):
        return f"{value:.3g}{words}"
    if stat == "frac_pos":
        return f"{100 * value:.1f}% positive"
    if stat == "median":
        return f"median arcsinh intensity {value:.3g}"
    return f"{words} = {value:.3g}"


def _ordinal(p: float) -> str:
    n = min(max(int(round(100 * p)), 1), 99)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe_covariate(feature: str, value: float, column: str,
                        reference: Sequence[float] | np.ndarray | None, tail: str) -> str:
    """A clinical covariate in words: 'Clinical covariate: arm is IL-7, which raised ...'."""
    if value != value:
        return f"Clinical covariate: {column} is missing, {tail}"
    if " = " in feature:  # a 0/1 input for one level of a categorical column
        level = feature.split(" = ", 1)[1]
        return f"Clinical covariate: {column} {'is' if value >= 0.5 else 'is not'} {level}, {tail}"
    ref = np.asarray(reference if reference is not None else [], dtype=float)
    ref = ref[np.isfinite(ref)]
    where = ""
    if ref.size:
        pct = float((ref < value).mean() + 0.5 * (ref == value).mean())
        where = f" ({_ordinal(pct)} percentile of training patients)"
    return f"Clinical covariate: {column} = {value:.3g}{where}, {tail}"


def describe_driver(feature: str, value: float, shap: float, *, meta: Mapping[str, str] | None = None,
                    reference: Sequence[float] | np.ndarray | None = None,
                    outcome: str = "the predicted chance of benefit") -> str:
    """A driver in plain words.

    With the feature's metadata and the training patients' values (``reference``): "CD8 T
    cells expanded from baseline to week6 more than in most training patients (% of live cells
    ×1.74 from baseline to week6; 88th percentile of training patients), which raised the
    predicted chance of benefit (SHAP +0.42)." Without: "<feature> = 1.2 raised the ...".
    ``outcome`` names what the model predicts (e.g. "the predicted risk of progression").
    """
    verb = "raised" if shap > 0 else "lowered"
    tail = f"which {verb} {outcome} (SHAP {shap:+.2f})."
    column = (meta or {}).get("covariate") or _covariate_column(feature)
    if column:
        return _describe_covariate(feature, value, str(column), reference, tail)
    if meta is None or not meta.get("population") or not meta.get("statistic"):
        shown = "missing" if value != value else f"{value:.3g}"
        return f"{feature} = {shown} {verb} {outcome} (SHAP {shap:+.2f})"
    tp = str(meta.get("timepoint", ""))
    delta = "-" in tp
    subject = _subject(meta, delta=delta)
    if subject.startswith("the "):
        subject = "The " + subject[4:]
    if value != value:
        return f"{subject} could not be measured (missing value), {tail}"
    ref = np.asarray(reference if reference is not None else [], dtype=float)
    ref = ref[np.isfinite(ref)]
    pct = float((ref < value).mean() + 0.5 * (ref == value).mean()) if ref.size else float("nan")
    high, low = pct >= 0.75, pct <= 0.25
    if delta:
        on, _, base = tp.partition("-")
        up, down = ("expanded", "contracted") if meta.get("statistic") in FREQUENCY_STATISTICS else ("rose", "fell")
        moved = up if value > 0 else down if value < 0 else "did not change"
        body = f"{subject} {moved} from {base} to {on}"
        if pct == pct and value != 0:
            if (value > 0 and high) or (value < 0 and low):
                body += " more than in most training patients"
            elif (value > 0 and low) or (value < 0 and high):
                body += ", less than in most training patients"
            else:
                body += ", about as much as in typical training patients"
    else:
        body = f"{subject}" + (f" at {tp}" if tp else "")
        if pct == pct:
            rel = ("higher than in most training patients" if high else
                   "lower than in most training patients" if low else "typical of the training patients")
            body += f" was {rel}"
    where = _quantity(meta, value)
    if pct == pct:
        where += f"; {_ordinal(pct)} percentile of training patients"
    return f"{body} ({where}), {tail}"
