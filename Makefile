# Quick start: `make demo` (set up + run the demo), `make test` (set up + run every test).
# README.md ("What `make test` installs") lists what each target installs and how big it is.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

WEB := executors/tcp/crowdgraph_tcp/web

.PHONY: demo test test-fast bench clean web chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[plot]'
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml executors/tcp/pyproject.toml executors/dask/pyproject.toml
	@echo "installing crowdgraph, its plug-ins and the test tools (torch CPU, transformers, dask...) into $(VENV) (about 1.4 GB)"
	$(BIN)/python -m pip install -q -e '.[test]' -e executors/tcp -e executors/dask
	touch $@

# onnxruntime-web for the browser worker page (pinned in package-lock.json); re-run only when the lock changes.
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then echo "installing onnxruntime-web into $(WEB)/node_modules (npm ci, about 148 MB)"; \
		cd $(WEB) && npm ci --no-audit --no-fund; \
	else echo "npm not found: the browser worker page cannot run models (install Node.js/npm, then make web)"; fi

web: $(WEB)/node_modules/.package-lock.json

# Headless Chromium for the browser-worker tests: installed when we can (root + apt-get), else they skip.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium with apt-get for the browser tests (about 25 packages; apt-get update if needed)"; \
		apt-get install -y --no-install-recommends chromium || \
		{ apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	else echo "chromium not found (and not root with apt-get): the browser-worker tests will be skipped"; fi

demo: $(VENV)/.demo-installed
	$(BIN)/crowdgraph demo

# The suite runs in JOBS pytest processes (pytest-xdist), one test file per process at a time,
# so a file's shared plans and clusters stay in one process; files start in the order collected,
# the longest first (conftest.py).  JOBS=1 runs it in this process.  Three on two cores: the
# network tests spend much of their time waiting for worker processes, heartbeats and pages.
JOBS ?= 3
PYTEST := $(BIN)/python -m pytest $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

test: $(VENV)/.test-installed web chromium
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(VENV)/.test-installed web
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
