"""One exception hierarchy for everything a user can get wrong.

Every error raised for bad input is a :class:`PredictorError`. Its message names the file,
row or column at fault and says how to fix it; the command line prints it on one line and
exits with code 2 (``PredictorError.exit_code``).
"""

from __future__ import annotations

__all__ = [
    "PredictorError",
    "FCSError",
    "PanelError",
    "SampleSheetError",
    "ClinicalError",
    "ConfigError",
    "GatingError",
    "FeatureError",
    "TrainingError",
    "BundleError",
    "ScoringError",
    "OutputExistsError",
]


class PredictorError(Exception):
    """Base class of all errors about user input; the CLI exits with ``exit_code``."""

    exit_code: int = 2


class FCSError(PredictorError):
    """An FCS file cannot be read (corrupt, truncated, unsupported)."""


class PanelError(PredictorError):
    """A panel file is malformed or does not fit an FCS file."""


class SampleSheetError(PredictorError):
    """The sample sheet is malformed or points to missing files."""


class ClinicalError(PredictorError):
    """The clinical table is malformed or does not match the sample sheet."""


class ConfigError(PredictorError):
    """An experiment file or a parameter is invalid."""


class GatingError(PredictorError):
    """A gating template is malformed or cannot be applied."""


class FeatureError(PredictorError):
    """Features cannot be computed from the given samples."""


class TrainingError(PredictorError):
    """A model cannot be trained on the given data (e.g. a single-class outcome)."""


class BundleError(PredictorError):
    """A model bundle is missing, incomplete or incompatible."""


class ScoringError(PredictorError):
    """New samples cannot be scored with a bundle."""


class OutputExistsError(PredictorError):
    """An output exists already and would be overwritten."""
