"""Cell populations: gating templates (recipe), fitted gates, per-sample population tables."""

from predictor.populations.gating import (
    Gating,
    GatingTemplate,
    apply_gating,
    fit_gating,
    load_template,
    otsu_threshold,
    population_table,
)

__all__ = [
    "Gating",
    "GatingTemplate",
    "apply_gating",
    "fit_gating",
    "load_template",
    "otsu_threshold",
    "population_table",
]
