# One entry point for every developer task. `make run` and `make test` set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: run test setup lint generate check-generated buf-lint buf-breaking migrate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed node_modules/.installed

## Run the server on the embedded defaults (embedded PostgreSQL, built-in mock model).
run: $(VENV)/.installed
	$(BIN)/everything-server --migrate $(ARGS)

## Run the whole test suite (against $$DATABASE_URL when set, else the embedded PostgreSQL).
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

migrate: $(VENV)/.installed
	$(BIN)/everything-server migrate

## Regenerate the Python code from proto/ (committed; CI checks it does not drift).
generate: $(VENV)/.installed
	$(PY) proto/generate.py

check-generated: $(VENV)/.installed
	$(PY) proto/generate.py --check

buf-lint: node_modules/.installed $(VENV)/.installed
	$(PY) proto/generate.py --prepare-includes
	npx buf lint

buf-breaking: node_modules/.installed $(VENV)/.installed
	$(PY) proto/generate.py --prepare-includes
	bash .ci/buf-breaking.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) node_modules .build
