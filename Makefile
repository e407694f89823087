# predictor — two commands for a newcomer: `make demo` and `make test`.
# Both create .venv with a Python >= 3.12 found on this machine, install the package and run.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: help demo test bench lint venv clean

help:
	@echo "make demo   set up .venv and run the whole path on a simulated IL-7 cohort"
	@echo "make test   set up .venv (with test extras) and run the test suite"
	@echo "make bench  run the benchmarks (ratios against references measured in the same run)"
	@echo "make lint   ruff"

# Find a Python >= 3.12: python3.13, python3.12, python3 when new enough, then pyenv's.
$(VENV)/bin/python:
	@PYBIN=$$(scripts/find-python.sh) || exit 1; \
	echo "Using $$PYBIN ($$($$PYBIN --version))"; \
	"$$PYBIN" -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/predictor demo

test: $(STAMP)
	@scripts/ensure-chromium.sh
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(VENV)/bin/ruff check predictor tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
