"""predictor: which patients will an immunotherapy help, and why — from CyTOF profiles."""

from __future__ import annotations

__version__ = "0.1.0"
