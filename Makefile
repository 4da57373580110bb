# dcache: `make run` starts a local cluster, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint typecheck unit bench fuzz install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)  ## install dcache and the test tools into .venv

run: $(STAMP)  ## start a local cluster on 127.0.0.1: 2 masters, 3 aux nodes, 2 replicas (Ctrl-C stops it)
	$(BIN)/dcache cluster --masters 2 --aux 3 --replicas 2 --data-dir ./data

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check dcache tests bin
	$(BIN)/ruff format --check dcache tests bin
	$(BIN)/mypy

test: lint  ## lint, type-check and run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks against local nodes, Redis and twemproxy (see docs/BENCHMARKS.md)
	@command -v redis-benchmark >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq redis-server redis-tools; } || echo "redis-benchmark unavailable: no Redis reference"
	@command -v nutcracker >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq nutcracker; } || echo "nutcracker unavailable: no twemproxy reference"
	$(BIN)/python bin/bench

FUZZ_SECONDS ?= 60

fuzz: $(STAMP)  ## fuzz every listener (aux node, master, HTTP shim) for FUZZ_SECONDS each (default 60; FUZZ_SEED picks the inputs)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m tests.faults.fuzz

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis
