"""Cell populations: gating templates (recipe), fitted gates, FlowSOM clusterings, tables.

Both kinds of frozen population definitions — a :class:`Gating` (template + thresholds) and a
:class:`Clustering` (FlowSOM codebook + annotated metaclusters) — have ``populations``,
``parent(name)``, ``markers``, ``apply(cells)`` and ``to_dict()``;
:func:`populations_from_dict` loads either. Plots are in :mod:`predictor.populations.plots`
(imported on demand: matplotlib).
"""

from predictor.populations.clustering import (
    Clustering,
    fit_clustering,
    map_to_nodes,
    populations_from_dict,
)
from predictor.populations.gating import (
    Gating,
    GatingTemplate,
    apply_gating,
    fit_gating,
    load_template,
    otsu_threshold,
    population_table,
    valley_threshold,
)

__all__ = [
    "Clustering",
    "Gating",
    "GatingTemplate",
    "apply_gating",
    "fit_clustering",
    "fit_gating",
    "load_template",
    "map_to_nodes",
    "otsu_threshold",
    "population_table",
    "populations_from_dict",
    "valley_threshold",
]
