# m2m-proxy developer commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
IDP    := deploy/dev-idp
STAMP  := $(VENV)/.installed

.PHONY: install system-deps run test lint typecheck unit functional bench bench-memory bench-instructions check-example clean

## install: system tools, virtualenv with the project and dev tools, the dev IdP's npm packages
install: system-deps $(STAMP) $(IDP)/node_modules/.package-lock.json

# curl is a test client; Node.js and npm run the dev IdP. Installed with apt when missing
# and running as root; otherwise the message says what to install.
system-deps:
	@command -v curl >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; } || \
		{ echo "install curl" >&2; exit 1; }
	@command -v npm >/dev/null || { echo "install Node.js 20+ with npm" >&2; exit 1; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

$(IDP)/node_modules/.package-lock.json: $(IDP)/package-lock.json
	npm ci --prefix $(IDP) --no-audit --no-fund --loglevel=error

## run: start the dev IdP, the demo API and the proxy on routes.example.yaml (Ctrl-C stops all)
run: install
	$(PY) deploy/dev_stack.py --proxy-config routes.example.yaml --python $(PY)

## test: lint, types and the whole suite (what CI runs)
test: install lint typecheck
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q tests/unit

functional: install
	$(PY) -m pytest -q tests/functional

## bench: req/s, latency at a fixed rate, CPU and memory: the upstream directly, a minimal aiohttp proxy, nginx, proxy.py (wrk), then HTTPS vs mitmproxy
bench: install
	$(PY) bench/run.py
	$(PY) bench/memory.py

## bench-memory: RSS while streaming 1 GiB each way and with 10,000 idle clients (~70 s)
bench-memory: install
	$(PY) bench/memory.py

## bench-instructions: instructions per request of each proxy, counted by callgrind (deterministic, ~3 min)
bench-instructions: install
	@command -v valgrind >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }
	$(PY) bench/run.py --instructions

check-example: install
	$(VENV)/bin/m2m-proxy check --config routes.example.yaml

clean:
	rm -rf $(VENV) $(IDP)/node_modules .mypy_cache .ruff_cache .pytest_cache
