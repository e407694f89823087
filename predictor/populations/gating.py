"""Gating templates: the recipe (template), the fitted gates (thresholds), the result (table).

A :class:`GatingTemplate` is a hierarchy of populations with marker rules (see
``pbmc.yaml``). :func:`fit_gating` resolves it against a panel's markers and finds each rule
threshold on the *parent* population's cells pooled over samples; the resulting
:class:`Gating` is frozen (saved with a model) and applied unchanged to new samples by
:func:`apply_gating`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

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
    "population_table",
    "otsu_threshold",
]

ROOT = "root"
_POS = ("++", "+", "hi", "bright", "high", "pos")
_NEG = ("-", "lo", "dim", "low", "neg")
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
    """Otsu's threshold of ``values`` and its effectiveness (between/total variance, 0–1)."""
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


@dataclass(frozen=True)
class Gating:
    """A template resolved against a panel, with thresholds: frozen, JSON-serialisable."""

    template: GatingTemplate
    resolved: Mapping[str, tuple[tuple[tuple[str, ...], bool], ...]]  # pop -> ((markers), pos)
    thresholds: Mapping[str, Mapping[str, float]]  # pop -> marker -> threshold
    skipped: Mapping[str, str]  # pop -> reason
    markers: tuple[str, ...]  # panel marker names the gating reads

    @property
    def populations(self) -> list[str]:
        return [p.name for p in self.template.populations if p.name in self.resolved]

    def parent(self, name: str) -> str:
        return next(p.parent for p in self.template.populations if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template.to_dict(),
            "resolved": {
                k: [[list(ms), pos] for ms, pos in v] for k, v in self.resolved.items()
            },
            "thresholds": {k: dict(v) for k, v in self.thresholds.items()},
            "skipped": dict(self.skipped),
            "markers": list(self.markers),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Gating:
        return cls(
            GatingTemplate.from_dict(raw["template"], source="bundle"),
            {k: tuple((tuple(ms), bool(pos)) for ms, pos in v) for k, v in raw["resolved"].items()},
            {k: {m: float(t) for m, t in v.items()} for k, v in raw["thresholds"].items()},
            dict(raw["skipped"]),
            tuple(raw["markers"]),
        )


def _resolve(template: GatingTemplate, markers: Sequence[str]):
    lookup = {normalize_marker(m): m for m in markers}
    resolved: dict[str, tuple[tuple[tuple[str, ...], bool], ...]] = {}
    skipped: dict[str, str] = {}
    for pop in template.populations:
        if pop.parent != ROOT and pop.parent not in resolved:
            skipped[pop.name] = f"parent {pop.parent!r} skipped"
            continue
        terms = []
        missing = []
        for term in pop.terms:
            present = tuple(lookup[k] for k in map(normalize_marker, term.markers) if k in lookup)
            if present:
                terms.append((present, term.positive))
            elif not term.optional:
                missing.append("|".join(term.markers))
        if missing:
            skipped[pop.name] = f"panel lacks {', '.join(missing)}"
        else:
            resolved[pop.name] = tuple(terms)
    return resolved, skipped


def _term_mask(x: pd.DataFrame, markers, positive, thresholds) -> np.ndarray:
    """Cells meeting a term: any of its markers above (or below) its threshold."""
    mask = np.zeros(len(x), dtype=bool)
    for m in markers:
        col = x[m].to_numpy()
        mask |= (col > thresholds[m]) if positive else (col <= thresholds[m])
    return mask


def fit_gating(
    cells: Sequence[pd.DataFrame],
    template: GatingTemplate | str | os.PathLike = "default",
    *,
    thresholds: Mapping[str, float] | None = None,
    max_cells_per_sample: int = 5000,
    min_effectiveness: float = 0.5,
    random_state: int = 0,
) -> Gating:
    """Fit a gating template's thresholds on transformed cells of several samples.

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
        Below this Otsu effectiveness the marker is not bimodal within the parent; the
        threshold found on all cells is used instead.
    random_state
        Seed of the subsampling.
    """
    if not isinstance(template, GatingTemplate):
        template = load_template(template)
    if not cells:
        raise GatingError("fit_gating needs at least one sample.")
    markers = list(cells[0].columns)
    resolved, skipped = _resolve(template, markers)
    if not resolved:
        raise GatingError(
            f"No population of {template.source} can be gated with the panel's markers "
            f"({', '.join(markers)}); check the panel's marker names."
        )
    rng = np.random.default_rng(random_state)
    parts = []
    for df in cells:
        n = min(len(df), max_cells_per_sample)
        idx = rng.choice(len(df), size=n, replace=False) if n < len(df) else np.arange(len(df))
        parts.append(df.iloc[np.sort(idx)])
    pooled = pd.concat(parts, ignore_index=True)
    fixed = {normalize_marker(k): v for k, v in {**template.thresholds, **(thresholds or {})}.items()}
    global_t: dict[str, float] = {}

    def root_threshold(marker: str) -> float:
        if marker not in global_t:
            t, eff = otsu_threshold(pooled[marker].to_numpy())
            global_t[marker] = t if np.isfinite(t) and eff >= min_effectiveness else 1.5
        return global_t[marker]

    masks = {ROOT: np.ones(len(pooled), dtype=bool)}
    fitted: dict[str, dict[str, float]] = {}
    used: set[str] = set()
    for pop in template.populations:
        if pop.name not in resolved:
            continue
        parent_mask = masks[pop.parent]
        sub = pooled.loc[parent_mask]
        tdict: dict[str, float] = {}
        for ms, _pos in resolved[pop.name]:
            for m in ms:
                used.add(m)
                if normalize_marker(m) in fixed:
                    tdict[m] = fixed[normalize_marker(m)]
                    continue
                t, eff = otsu_threshold(sub[m].to_numpy()) if len(sub) >= 50 else (np.nan, 0.0)
                tdict[m] = t if np.isfinite(t) and eff >= min_effectiveness else root_threshold(m)
        fitted[pop.name] = tdict
        mask = parent_mask.copy()
        for ms, pos in resolved[pop.name]:
            mask &= _term_mask(pooled, ms, pos, tdict)
        masks[pop.name] = mask
    return Gating(template, resolved, fitted, skipped, tuple(sorted(used)))


def apply_gating(gating: Gating, cells: pd.DataFrame) -> pd.DataFrame:
    """Boolean membership of every cell in every gated population (columns in template order)."""
    missing = [m for m in gating.markers if m not in cells.columns]
    if missing:
        raise GatingError(
            f"The cells lack marker(s) {', '.join(missing)} that the gating uses; use the panel "
            "the gating was fitted with."
        )
    masks: dict[str, np.ndarray] = {ROOT: np.ones(len(cells), dtype=bool)}
    for name in gating.populations:
        mask = masks[gating.parent(name)].copy()
        for ms, pos in gating.resolved[name]:
            mask &= _term_mask(cells, ms, pos, gating.thresholds[name])
        masks[name] = mask
    del masks[ROOT]
    return pd.DataFrame(masks, index=cells.index)


def population_table(gating: Gating, membership: pd.DataFrame, *, sample_id: str) -> pd.DataFrame:
    """Tidy counts of one sample: sample_id, population, parent, count, pct_parent, pct_live."""
    n_live = len(membership)
    counts = membership.sum(axis=0).astype(int)
    rows = []
    for name in membership.columns:
        parent = gating.parent(name)
        n_parent = n_live if parent == ROOT else int(counts[parent])
        c = int(counts[name])
        rows.append(
            {
                "sample_id": sample_id,
                "population": name,
                "parent": parent,
                "count": c,
                "pct_parent": 100.0 * c / n_parent if n_parent else np.nan,
                "pct_live": 100.0 * c / n_live if n_live else np.nan,
            }
        )
    return pd.DataFrame(rows)
