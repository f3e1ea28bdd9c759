# heygen_ray: the two commands a newcomer needs are `make demo` and `make test`.
# Both create (or reuse) .venv and install the project with the pinned lock; nothing else is assumed
# but a Python >= 3.10 on PATH.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The full resolved lock: exact versions of everything, torch==2.13.0 (CPU wheel) included.
LOCK   := requirements/constraints.txt
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet --quiet

export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: help setup demo test test-fast bench clean

help:
	@echo "make demo   set up .venv and run the quickstart (generate data, run the pipelines)"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/ (results in benchmarks/results/)"
	@echo "make clean  remove generated data and the venv"

$(STAMP): pyproject.toml $(LOCK) requirements/base.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) -r requirements/base.txt
	$(PIP) install -c $(LOCK) --no-build-isolation -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/heygen-ray pipeline run --config configs/pipeline/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) data/quickstart .pytest_cache build *.egg-info
