# balance-gate. A newcomer needs two commands: `make run` and `make test`.
# Both install what is missing: the Python virtualenv with the dev extras, and
# redis-server plus the PostgreSQL server binaries (apt-get, when root).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fmt proto deps venv clean bench

# Serve with a local Redis and Postgres kept under ./.run/ and a funded `demo`.
run: venv
	$(BIN)/balance-gate dev

# Lint, type-check, then every test against real servers the fixtures start;
# then the core suite again against a 3-master Redis Cluster.
CLUSTER_TESTS ?= tests/integration tests/property
test: venv lint
	$(BIN)/pytest
	BALANCE_GATE_TEST_REDIS=cluster $(BIN)/pytest -q $(CLUSTER_TESTS)

# The gate against a no-op gRPC server and redis-benchmark, in one run (a few
# minutes; never part of `make test`, which runs a 20-second smoke of it).
# Table on stdout; results.json and latency-vs-load.png in BENCH_OUT.
BENCH_OUT ?= bench/results
bench: venv
	$(BIN)/python bench/run.py --out $(BENCH_OUT)

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate src/balance_gate/v1 from proto/ (a test fails when it is stale).
proto: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/gen_proto.py

deps:
	@scripts/install-system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build src/*.egg-info
