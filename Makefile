# pgrouter. Start here:   make demo    (a local primary + 2 replicas with pgrouter in front)
#                         make test    (the full test suite against real PostgreSQL)
#
# Variables: PYTHON (default python3, must be >= 3.11), VENV (default .venv),
#            CONFIG (for `make run`), PYTEST_ARGS, BENCH_ARGS.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/examples/topology.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Stamps keep repeated `make test` fast: pip runs again only when pyproject.toml changes,
# the PostgreSQL check only when deploy/bootstrap.sh changes (or `rm $(VENV)/.*-stamp`).
PY_STAMP := $(VENV)/.pgrouter-install-stamp
PG_STAMP := $(VENV)/.pgrouter-postgres-stamp

.PHONY: help install demo run test bench lint

help:
	@echo "make demo     start a throwaway primary + 2 replicas and pgrouter in front of them"
	@echo "make test     run the test suite (real PostgreSQL, started and stopped by the tests)"
	@echo "make run      run pgrouter with CONFIG=$(CONFIG)"
	@echo "make bench    compare pgrouter with direct connections and PgBouncer (pgbench)"
	@echo "make lint     ruff check, ruff format --check, mypy"
	@echo "make install  create $(VENV), install pgrouter + dev tools, make sure PostgreSQL is present"

install: $(PY_STAMP) $(PG_STAMP)

$(BIN)/python:
	@if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	    echo "error: $(PYTHON) not found. pgrouter needs Python >= 3.11" \
	         "(Debian/Ubuntu: apt-get install python3 python3-venv), or run make PYTHON=/path/to/python3.12" >&2; \
	    exit 1; \
	fi
	@if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	    echo "error: pgrouter needs Python >= 3.11, but $(PYTHON) is $$($(PYTHON) --version 2>&1)." \
	         "Install a newer Python and run make PYTHON=/path/to/python3.11 (or newer)" >&2; \
	    exit 1; \
	fi
	$(PYTHON) -m venv $(VENV) || { \
	    echo "error: '$(PYTHON) -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; \
	    exit 1; }

$(PY_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

$(PG_STAMP): deploy/bootstrap.sh | $(BIN)/python
	bash deploy/bootstrap.sh
	@touch $@

demo: install
	$(BIN)/pgrouter demo

run: $(PY_STAMP)
	$(BIN)/pgrouter --config $(CONFIG)

test: install
	$(BIN)/pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(PY_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
