# One entry point for every developer task. `make run` and `make test` set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: run test setup lint generate check-generated buf-lint buf-breaking migrate clean gateway lock security
.PHONY: web web-setup web-build web-generate web-check-generated chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

WEB := clients/web
WEB_API ?= http://127.0.0.1:8080

$(WEB)/node_modules/.installed: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed node_modules/.installed $(WEB)/node_modules/.installed

## Run the server on the embedded defaults (embedded PostgreSQL, built-in mock model).
run: $(VENV)/.installed
	$(BIN)/everything-server --migrate $(ARGS)

## Run the whole test suite (against $$DATABASE_URL when set, else the embedded PostgreSQL).
test: setup chromium
	$(BIN)/pytest $(PYTEST_ARGS)

## Benchmark (not a test): everything vs the mock model itself and the LiteLLM proxy, on this machine.
## Options in BENCH_ARGS (e.g. BENCH_ARGS=--quick); writes test-artifacts/bench/results.{json,md}.
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) -m tests.bench.run $(BENCH_ARGS)

## Run Envoy (gRPC-Web + JSON over HTTP) on :8080 in front of `make run` (:50051); admin on 127.0.0.1:9901.
gateway: $(VENV)/.installed
	$(BIN)/everything-gateway --listen 8080 --upstream 127.0.0.1:50051 $(ARGS)

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

## Re-pin every Python dependency (constraints.txt, used by every install) to what .venv has now.
lock: $(VENV)/.installed
	@{ echo "# Every Python dependency, pinned: installs use it as constraints (pip -c). Regenerate: make lock"; \
	   $(BIN)/pip list --format=freeze --exclude-editable --disable-pip-version-check | grep -v -E '^(pip|everything-backend)=='; } \
	   > constraints.txt

## Security: dependencies audited for known vulnerabilities (ruff's bandit rules run in `make lint`).
security: $(VENV)/.installed
	bash .ci/audit.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The web client (clients/web): `make web` builds it and serves dist/ on http://127.0.0.1:5173,
## talking to the gateway at $(WEB_API) (start one with the gateway command, see README).
web-setup: $(WEB)/node_modules/.installed

web-build: web-setup
	cd $(WEB) && npm run build

web: web-build
	node $(WEB)/scripts/serve.mjs --host 127.0.0.1 --port 5173 --api $(WEB_API)

## Regenerate / check the committed TypeScript code of clients/web/src/gen (buf + protoc-gen-es).
web-generate: web-setup node_modules/.installed $(VENV)/.installed
	$(PY) proto/generate.py --prepare-includes
	cd $(WEB) && npm run --silent generate

web-check-generated: web-setup node_modules/.installed $(VENV)/.installed
	$(PY) proto/generate.py --prepare-includes
	cd $(WEB) && npm run --silent check-gen

## Debian's chromium for the browser tests, when missing: apt-get as root (CI), else with sudo; without
## either the browser tests skip (outside CI).
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y --no-install-recommends chromium; \
	  elif command -v sudo >/dev/null; then sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium; \
	  else echo "chromium is missing and apt-get needs root: the browser tests will skip"; fi; }

clean:
	rm -rf $(VENV) node_modules .build $(WEB)/node_modules $(WEB)/dist
