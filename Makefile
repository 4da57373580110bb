# dcache: `make run` starts a local cluster, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# setup.py and the C source too: editing dcache/lru/_entry.c reinstalls, which rebuilds the extension.
BUILD_INPUTS := setup.cfg pyproject.toml setup.py dcache/lru/_entry.c
SETUP_SUM := $(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)
# What `make run` needs (dcache and the server extra), and what the tests need besides.
RUN_STAMP := $(VENV)/.installed-server-$(SETUP_SUM)
STAMP := $(VENV)/.installed-test-$(SETUP_SUM)

# `make run` ports and data folder: `make run PORT=7100 AUX_PORT=7201 HTTP_PORT=8180 DATA_DIR=/tmp/dc`.
# Plain `=`, not `?=`: a PORT variable in the environment does not move the cluster, the command line does.
PORT = 7000
AUX_PORT = 7101
HTTP_PORT = 8080
DATA_DIR = ./data

# The suite runs in TEST_WORKERS processes (pytest-xdist), each taking a whole test file at a time
# (module fixtures stay in one process): `make test TEST_WORKERS=0` runs it in this one process.
TEST_WORKERS = 2
PYTEST_ARGS = -n $(TEST_WORKERS) --dist loadfile

.PHONY: run test lint typecheck unit bench fuzz install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The distribution was called `dcache` before it became `dcache-cluster`: a venv
# holding the old one gets it removed first (both would own bin/dcache).
$(RUN_STAMP): $(BIN)/python $(BUILD_INPUTS)
	@if $(BIN)/python -m pip show --quiet dcache >/dev/null 2>&1; then $(BIN)/python -m pip uninstall --quiet -y dcache; fi
	$(BIN)/python -m pip install --quiet -e '.[server]'
	rm -f $(VENV)/.installed-server-*
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	rm -f $(VENV)/.installed-test-*
	touch $(STAMP)

install: $(STAMP)  ## install dcache, the server extra and the test tools into .venv

#: The first master's RESP port under `make run` (Redis clients; the second master's follows).
RESP_PORT = 7379

run: $(RUN_STAMP)  ## start a local cluster on 127.0.0.1: 2 masters, 3 aux nodes, 2 replicas, RESP on RESP_PORT (Ctrl-C stops it); PORT, AUX_PORT, HTTP_PORT, RESP_PORT, DATA_DIR move it
	$(BIN)/dcache cluster --masters 2 --aux 3 --replicas 2 --data-dir $(DATA_DIR) --port $(PORT) --aux-port $(AUX_PORT) --http-port $(HTTP_PORT) --resp-port $(RESP_PORT)

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
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis dcache/lru/*.so
