"""Per-sample statistics → tidy long table → patient × feature matrix."""

from predictor.features.cohort import FeatureSet, extract_features
from predictor.features.matrix import META_COLUMNS, build_matrix, feature_name
from predictor.features.stats import positivity_thresholds, reference_statistics, sample_statistics

__all__ = [
    "FeatureSet",
    "extract_features",
    "build_matrix",
    "feature_name",
    "sample_statistics",
    "positivity_thresholds",
    "reference_statistics",
    "META_COLUMNS",
]
