"""Experiment files (TOML) → frozen dataclasses, validated once.

Relative paths in an experiment file are resolved against the file's own folder, so an
experiment can be run from anywhere. The dataclass defaults are the built-in demo's settings;
``experiments/il7_demo.toml`` spells them out.
"""

from __future__ import annotations

import dataclasses
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
    "CVConfig",
    "TrackingConfig",
    "ExperimentConfig",
    "load_experiment",
]

STATISTICS = ("count", "pct_parent", "pct_live", "median", "frac_pos")
FEATURE_MODES = ("on-treatment", "baseline")


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
    frac_pos_threshold: float = 2.0  # arcsinh units
    min_cells: int = 20
    n_jobs: int = 2

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
class ModelConfig:
    n_estimators: int = 150
    max_depth: int = 2
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_features: int = 200  # univariate filter inside each training fold; 0 = keep all


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
            if isinstance(v, tuple):
                return list(v)
            return v

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {k: conv(v) for k, v in dataclasses.asdict(value).items()}
            elif value is not None:
                out[f.name] = conv(value)
        return out


def _fail(where: str, name: str, must: str, got: Any) -> None:
    raise ConfigError(f"The '{name}' parameter of {where} must be {must}. Got {got!r} instead.")


def _validate(cfg: ExperimentConfig) -> None:
    f = cfg.features
    if f.mode not in FEATURE_MODES:
        _fail("[features]", "mode", f"one of {', '.join(FEATURE_MODES)}", f.mode)
    bad = [s for s in f.statistics if s not in STATISTICS]
    if bad or not f.statistics:
        _fail("[features]", "statistics", f"a non-empty list of {', '.join(STATISTICS)}", bad)
    if f.min_cells < 1:
        _fail("[features]", "min_cells", "an int >= 1", f.min_cells)
    if f.n_jobs < 1:
        _fail("[features]", "n_jobs", "an int >= 1", f.n_jobs)
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
        if isinstance(default, Path):
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
