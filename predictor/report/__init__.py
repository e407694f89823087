"""Explanation reports: :mod:`.tables` computes, :mod:`.plots` draws, :mod:`.html` lays out.

Import :func:`predictor.report.html.build_report` explicitly; the package itself imports
nothing (the plotting module selects matplotlib's headless Agg backend when imported).
"""
