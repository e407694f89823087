"""Experiment files (TOML) → frozen dataclasses, validated once.

Relative paths in an experiment file are resolved against the file's own folder, so an
experiment can be run from anywhere. The dataclass defaults are the built-in demo's settings
(``experiments/il7_demo.toml`` spells them out), except ``[model] covariates``: empty by default,
since not every clinical table has an arm; the demo adjusts for ``["arm"]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from predictor.errors import ConfigError

__all__ = [
    "DataConfig",
    "FeatureConfig",
    "OutcomeConfig",
    "ModelConfig",
    "SearchConfig",
    "CVConfig",
    "TrackingConfig",
    "ExperimentConfig",
    "load_experiment",
    "validate_features",
]

STATISTICS = ("count", "pct_parent", "pct_live", "median", "frac_pos")
SEARCHABLE = (
    "max_depth", "learning_rate", "n_estimators", "max_features", "colsample_bytree",
    "subsample", "min_child_weight", "reg_lambda",
)
SEARCH_METRICS = ("auto", "auroc", "logloss", "cindex")
PERMUTATION_TESTS = ("fixed", "nested")
MAX_GRID = 256
FEATURE_MODES = ("on-treatment", "baseline")
FRAC_POS_REFERENCES = ("fixed", "unstim")


@dataclass(frozen=True)
class DataConfig:
    samples: Path = Path("samples.csv")
    clinical: Path = Path("clinical.csv")
    panel: Path = Path("panel.csv")
    template: str = "default"  # "default" (packaged PBMC template) or a path to a YAML file


@dataclass(frozen=True)
class FeatureConfig:
    mode: str = "on-treatment"
    baseline: str = "baseline"
    on_treatment: str = "week6"
    unstim: str = "unstim"
    stim: str = "stim"
    statistics: tuple[str, ...] = ("pct_parent", "pct_live", "median", "frac_pos")
    frac_pos_threshold: float = 2.0  # arcsinh units, when frac_pos_reference = "fixed"
    # "fixed": frac_pos_threshold for every sample; "unstim": each population's
    # frac_pos_quantile in the same patient's unstimulated sample at that timepoint.
    frac_pos_reference: str = "fixed"
    frac_pos_quantile: float = 0.99
    min_cells: int = 20
    # Markers whose median per population is a feature: the panel's "functional" and/or
    # "lineage" markers, and/or marker names (Citrus's median columns). Fractions positive are
    # taken on the functional markers (the lineage ones when the panel has no functional).
    median_markers: tuple[str, ...] = ("functional",)
    n_jobs: int = 2  # local worker processes
    # Address of a Dask distributed scheduler (e.g. "tcp://host:8786") that runs the per-sample
    # work instead of the local pool; where the work runs never changes the features.
    scheduler: str | None = None

    @property
    def timepoints(self) -> tuple[str, ...]:
        if self.mode == "baseline":
            return (self.baseline,)
        return (self.baseline, self.on_treatment)

    @property
    def conditions(self) -> tuple[str, ...]:
        return (self.unstim, self.stim)


@dataclass(frozen=True)
class OutcomeConfig:
    kind: str = "binary"  # or "survival"
    column: str = "response"


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameter grid searched in the inner loop of the nested CV (``[model.search]``).

    Every list names values of the ``[model]`` parameter of the same name; parameters not
    listed stay at their ``[model]`` value. On each outer training fold an inner
    patient-grouped stratified CV (``inner_folds``) scores every setting by its pooled inner
    out-of-fold ``metric`` and the outer fold is predicted by a refit with the best one; the
    final model's settings are chosen the same way on all patients. Ties go to the earliest
    setting in grid order (parameters in the order above, values in the order listed), so list
    the simplest values first.

    ``permutation_test``: ``"fixed"`` (default) reruns, on each permuted outcome, the CV of the
    ``[model]`` settings without tuning and compares it with the same statistic on the real
    outcome: a valid test that the outcome is unrelated to the features, whose statistic is
    not the tuned headline AUROC. ``"nested"`` reruns the whole nested procedure, inner tuning
    included, so the statistic is the headline's own repeat 0; it costs (grid fits × inner
    folds + 1) times more per permutation.
    """

    max_depth: tuple[int, ...] = ()
    learning_rate: tuple[float, ...] = ()
    n_estimators: tuple[int, ...] = ()
    max_features: tuple[int, ...] = ()
    colsample_bytree: tuple[float, ...] = ()
    subsample: tuple[float, ...] = ()
    min_child_weight: tuple[float, ...] = ()
    reg_lambda: tuple[float, ...] = ()
    inner_folds: int = 3
    metric: str = "auto"  # auroc | logloss (binary), cindex (survival); auto picks the first
    permutation_test: str = "fixed"  # or "nested"

    @property
    def grid(self) -> dict[str, tuple]:
        """The searched parameters and their values, in grid order."""
        return {k: getattr(self, k) for k in SEARCHABLE if getattr(self, k)}

    @property
    def size(self) -> int:
        """Number of settings in the grid."""
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n


@dataclass(frozen=True)
class ModelConfig:
    n_estimators: int = 150
    max_depth: int = 2
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_features: int = 200  # univariate filter inside each training fold; 0 = keep all
    search: SearchConfig | None = None  # [model.search]: tuned in the inner CV loop
    # Clinical table columns given to the model as inputs (e.g. ["arm"]): encoded as numbers
    # (categorical → 0/1 per level), always kept by the feature filter, explained apart from
    # the cell populations; `predictor score --clinical` supplies them for new patients.
    covariates: tuple[str, ...] = ()


@dataclass(frozen=True)
class CVConfig:
    folds: int = 5
    repeats: int = 2
    permutations: int = 200
    bootstrap: int = 1000
    threshold_rule: str = "youden"  # or "sensitivity:0.8"


@dataclass(frozen=True)
class TrackingConfig:
    store: Path = Path("mlflow.db")  # SQLite file of the MLflow tracking store
    artifacts: Path = Path("mlruns")
    models: Path = Path("models")
    experiment: str = "predictor"
    registered_model: str | None = None  # defaults to the experiment's name


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "il7_demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    outcome: OutcomeConfig = field(default_factory=OutcomeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: Path | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def model_name(self) -> str:
        return self.tracking.registered_model or self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain, TOML/JSON-friendly dict (paths as strings)."""

        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple | list):
                return [conv(x) for x in v]
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {k: conv(v) for k, v in dataclasses.asdict(value).items()}
            elif value is not None:
                out[f.name] = conv(value)
        return out

    def to_toml(self) -> str:
        """The configuration as an experiment file (``None`` and empty lists left out)."""
        d = self.to_dict()
        d.pop("source", None)
        lines = [f"name = {_toml_value(d.pop('name'))}", f"seed = {_toml_value(d.pop('seed'))}"]

        def table(name: str, body: dict[str, Any]) -> None:
            lines.extend(["", f"[{name}]"])
            nested = []
            for k, v in body.items():
                if isinstance(v, dict):
                    nested.append((k, v))
                elif v is not None and v != []:
                    lines.append(f"{k} = {_toml_value(v)}")
            for k, v in nested:
                table(f"{name}.{k}", v)

        for section, body in d.items():
            table(section, body)
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON strings are TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _fail(where: str, name: str, must: str, got: Any) -> None:
    raise ConfigError(f"The '{name}' parameter of {where} must be {must}. Got {got!r} instead.")


def validate_features(f: FeatureConfig) -> None:
    """Refuse [features] settings out of range (ConfigError naming the key and the value)."""
    if f.mode not in FEATURE_MODES:
        _fail("[features]", "mode", f"one of {', '.join(FEATURE_MODES)}", f.mode)
    bad = [s for s in f.statistics if s not in STATISTICS]
    if bad or not f.statistics:
        _fail("[features]", "statistics", f"a non-empty list of {', '.join(STATISTICS)}", bad)
    if f.frac_pos_reference not in FRAC_POS_REFERENCES:
        _fail("[features]", "frac_pos_reference", f"one of {', '.join(FRAC_POS_REFERENCES)}",
              f.frac_pos_reference)
    if not 0 < f.frac_pos_quantile < 1:
        _fail("[features]", "frac_pos_quantile", "a number in (0, 1), e.g. 0.99",
              f.frac_pos_quantile)
    if f.min_cells < 1:
        _fail("[features]", "min_cells", "an int >= 1", f.min_cells)
    if not all(isinstance(m, str) and m.strip() for m in f.median_markers):
        _fail("[features]", "median_markers", 'a list of "functional", "lineage" and marker '
              "names of the panel", list(f.median_markers))
    if f.n_jobs < 1:
        _fail("[features]", "n_jobs", "an int >= 1", f.n_jobs)
    if f.scheduler is not None and (not isinstance(f.scheduler, str) or not f.scheduler
                                    or any(c.isspace() for c in f.scheduler)):
        _fail("[features]", "scheduler",
              "the address of a Dask scheduler, e.g. \"tcp://host:8786\" (leave it out to run "
              "on local processes)", f.scheduler)


def _validate(cfg: ExperimentConfig) -> None:
    validate_features(cfg.features)
    if cfg.outcome.kind not in ("binary", "survival"):
        _fail("[outcome]", "kind", "'binary' or 'survival'", cfg.outcome.kind)
    m = cfg.model
    if m.n_estimators < 1:
        _fail("[model]", "n_estimators", "an int >= 1", m.n_estimators)
    if m.max_depth < 1:
        _fail("[model]", "max_depth", "an int >= 1", m.max_depth)
    if m.max_features < 0:
        _fail("[model]", "max_features", "an int >= 0 (0 keeps all features)", m.max_features)
    if not 0 < m.learning_rate <= 1:
        _fail("[model]", "learning_rate", "a float in (0, 1]", m.learning_rate)
    for name in ("subsample", "colsample_bytree"):
        v = getattr(m, name)
        if not 0 < v <= 1:
            _fail("[model]", name, "a float in (0, 1]", v)
    if m.search is not None:
        _validate_search(m.search, cfg.outcome.kind)
    _validate_covariates(m.covariates, cfg.outcome)
    c = cfg.cv
    if c.folds < 2:
        _fail("[cv]", "folds", "an int >= 2", c.folds)
    if c.repeats < 1:
        _fail("[cv]", "repeats", "an int >= 1", c.repeats)
    if c.permutations < 0:
        _fail("[cv]", "permutations", "an int >= 0", c.permutations)
    if c.bootstrap < 0:
        _fail("[cv]", "bootstrap", "an int >= 0", c.bootstrap)
    if not (c.threshold_rule == "youden" or c.threshold_rule.startswith("sensitivity:")):
        _fail("[cv]", "threshold_rule", "'youden' or 'sensitivity:<0..1>'", c.threshold_rule)


def _validate_covariates(covariates: Any, outcome: OutcomeConfig) -> None:
    must = 'a list of clinical table column names without repeats, e.g. ["arm"]'
    if not isinstance(covariates, tuple) or not all(
        isinstance(c, str) and c.strip() and c == c.strip() for c in covariates
    ):
        _fail("[model]", "covariates", must, covariates)
    if len(set(covariates)) != len(covariates):
        _fail("[model]", "covariates", must, list(covariates))
    taken = {"patient_id"} | ({"time", "event"} if outcome.kind == "survival" else {outcome.column})
    clash = [c for c in covariates if c in taken]
    if clash:
        _fail("[model]", "covariates", "clinical columns other than patient_id and the outcome",
              clash)


# parameter → (type, check, description): the same ranges as the [model] values
_SEARCH_RULES: dict[str, tuple[type, Any, str]] = {
    "max_depth": (int, lambda v: v >= 1, "ints >= 1"),
    "n_estimators": (int, lambda v: v >= 1, "ints >= 1"),
    "max_features": (int, lambda v: v >= 0, "ints >= 0 (0 keeps all features)"),
    "learning_rate": (float, lambda v: 0 < v <= 1, "floats in (0, 1]"),
    "colsample_bytree": (float, lambda v: 0 < v <= 1, "floats in (0, 1]"),
    "subsample": (float, lambda v: 0 < v <= 1, "floats in (0, 1]"),
    "min_child_weight": (float, lambda v: v >= 0, "floats >= 0"),
    "reg_lambda": (float, lambda v: v >= 0, "floats >= 0"),
}


def _validate_search(s: SearchConfig, kind: str) -> None:
    where = "[model.search]"
    for name, (typ, ok, desc) in _SEARCH_RULES.items():
        values = getattr(s, name)
        if not isinstance(values, tuple):
            _fail(where, name, f"a non-empty list of {desc}", values)
        if not values:
            continue
        good_type = all(
            not isinstance(v, bool)
            and (isinstance(v, int) if typ is int else isinstance(v, int | float))
            and math.isfinite(v)
            for v in values
        )
        if not good_type or not all(ok(v) for v in values):
            _fail(where, name, f"a non-empty list of {desc}", list(values))
        if len(set(values)) != len(values):
            _fail(where, name, "a list without repeated values", list(values))
    if not s.grid:
        _fail(where, "search", f"a table listing values for at least one of {', '.join(SEARCHABLE)}",
              {})
    if s.size > MAX_GRID:
        _fail(where, "search", f"a grid of at most {MAX_GRID} settings (each costs a fit per "
              "inner fold per outer fold)", f"{s.size} settings")
    if isinstance(s.inner_folds, bool) or not isinstance(s.inner_folds, int) or s.inner_folds < 2:
        _fail(where, "inner_folds", "an int >= 2", s.inner_folds)
    allowed = ("auto", "auroc", "logloss") if kind == "binary" else ("auto", "cindex")
    if s.metric not in allowed:
        _fail(where, "metric", f"one of {', '.join(allowed)} for a {kind} outcome", s.metric)
    if s.permutation_test not in PERMUTATION_TESTS:
        _fail(where, "permutation_test", f"one of {', '.join(PERMUTATION_TESTS)}",
              s.permutation_test)


def _build_search(raw: Any, src: Path) -> SearchConfig:
    where = f"[model.search] of {src}"
    if not isinstance(raw, dict):
        _fail(f"[model] of {src}", "search", "a table ([model.search])", raw)
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{src}: unknown key(s) {', '.join(unknown)} in [model.search]; known keys: "
            f"{', '.join(sorted(known, key=list(SearchConfig.__dataclass_fields__).index))}."
        )
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SEARCH_RULES:
            typ, _, desc = _SEARCH_RULES[key]
            if not isinstance(value, list) or not value:
                _fail(where, key, f"a non-empty list of {desc}", value)
            if typ is float:
                bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int | float)]
                if bad:
                    _fail(where, key, f"a non-empty list of {desc}", value)
                value = [float(v) for v in value]
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return SearchConfig(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "features": FeatureConfig,
    "outcome": OutcomeConfig,
    "model": ModelConfig,
    "cv": CVConfig,
    "tracking": TrackingConfig,
}


def _build(section: str, cls: type, raw: dict[str, Any], base: Path, src: Path) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"{src}: unknown key(s) {', '.join(unknown)} in [{section}]; known keys: "
            f"{', '.join(known)}."
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        default = getattr(defaults, key)
        if section == "model" and key == "search":
            value = _build_search(value, src)
        elif isinstance(default, Path):
            value = Path(os.path.normpath(base / value))
        elif isinstance(default, tuple):
            if not isinstance(value, list):
                _fail(f"[{section}] of {src}", key, "a list", value)
            value = tuple(value)
        elif isinstance(default, bool) or default is None:
            pass
        elif isinstance(default, int) and not isinstance(value, int):
            _fail(f"[{section}] of {src}", key, "an int", value)
        elif isinstance(default, float):
            if not isinstance(value, int | float):
                _fail(f"[{section}] of {src}", key, "a number", value)
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            _fail(f"[{section}] of {src}", key, "a string", value)
        kwargs[key] = value
    # Paths left at their defaults are relative to the experiment file too.
    for name in known:
        if name not in kwargs and isinstance(getattr(defaults, name), Path):
            kwargs[name] = Path(os.path.normpath(base / getattr(defaults, name)))
    if section == "data" and "template" in kwargs and kwargs["template"] != "default":
        t = Path(kwargs["template"])
        kwargs["template"] = os.path.normpath(base / t)
    return cls(**kwargs)


def load_experiment(path: str | os.PathLike, **overrides: Any) -> ExperimentConfig:
    """Read an experiment TOML file into an :class:`ExperimentConfig`.

    Parameters
    ----------
    path
        The experiment file.
    **overrides
        Top-level fields to replace after loading (e.g. ``seed=1``).
    """
    src = Path(path)
    if not src.is_file():
        raise ConfigError(f"{src}: experiment file not found.")
    try:
        raw = tomllib.loads(src.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: not valid TOML ({exc}).") from None
    base = src.resolve().parent
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    unknown = sorted(set(top) - {"name", "seed"}) + sorted(
        k for k, v in raw.items() if isinstance(v, dict) and k not in _SECTIONS
    )
    if unknown:
        raise ConfigError(
            f"{src}: unknown key(s) {', '.join(unknown)}; top level takes name, seed and the "
            f"sections {', '.join('[' + s + ']' for s in _SECTIONS)}."
        )
    sections = {
        name: _build(name, cls, raw.get(name, {}), base, src) for name, cls in _SECTIONS.items()
    }
    name = top.get("name", src.stem)
    seed = top.get("seed", 0)
    if not isinstance(seed, int):
        _fail(str(src), "seed", "an int", seed)
    cfg = ExperimentConfig(name=str(name), seed=seed, source=src.resolve(), **sections)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
