"""``python -m predictor`` runs the command line."""

from predictor.cli import run

run()
