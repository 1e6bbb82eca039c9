# Quick start: `make demo` (set up + run the demo), `make test` (set up + run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[plot]'
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml executors/tcp/pyproject.toml executors/dask/pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]' -e executors/tcp -e executors/dask
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/crowdgraph demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
