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

.PHONY: help setup demo stop test test-fast bench clean cluster-up cluster-down

help:
	@echo "make demo   set up .venv and run the quickstart pipeline (data, train, tune, compress, serve) on a local cluster"
	@echo "make stop   stop the local cluster the demo started (and the Serve app on it)"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/ (results in benchmarks/results/, table in benchmarks/RESULTS.md)"
	@echo "make clean  remove generated data and the venv"
	@echo "make cluster-up / cluster-down  start / stop a local multi-process Ray cluster (token auth; see README)"

$(STAMP): pyproject.toml $(LOCK) requirements/base.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) -r requirements/base.txt
	$(PIP) install -c $(LOCK) --no-build-isolation -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# The quickstart runs as a driver of a local cluster (started if needed), so the Serve app it deploys
# keeps running after it ends; `make stop` stops that cluster (and Serve with it).
demo: $(STAMP)
	cluster/local/with_cluster.sh $(BIN)/heygen-ray pipeline run --config configs/pipeline/quickstart.yaml

stop:
	cluster/local/stop.sh

# Lint and import order first (seconds), then the suite; the wall time is printed at the end.
test: $(STAMP)
	$(BIN)/ruff check .
	@start=$$(date +%s); $(BIN)/python -m pytest tests; rc=$$?; \
	echo "make test: pytest wall time $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit

# Every benchmarks/*.py (each writes benchmarks/results/<name>.json with a "summary"), then the table
# benchmarks/RESULTS.md built from all of them.
BENCHMARKS := $(filter-out benchmarks/summary.py,$(sort $(wildcard benchmarks/*.py)))

bench: $(STAMP)
	@set -e; for b in $(BENCHMARKS); do echo "== $$b"; $(BIN)/python $$b; done
	$(BIN)/python benchmarks/summary.py

# A local head (0 CPUs) + worker node with token auth, under $(HEYGEN_RAY_LOCAL_DIR) or /tmp/hr-local-<uid>;
# stop ends only that cluster's processes.
cluster-up: $(STAMP)
	cluster/local/start.sh

cluster-down:
	cluster/local/stop.sh

clean:
	rm -rf $(VENV) data/quickstart .pytest_cache build *.egg-info
