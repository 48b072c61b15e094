# The two commands that matter: `make up` (the whole local stack) and `make test` (what CI runs).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= synthetic

.PHONY: help venv system-deps test lint typecheck pytest unit up export bench loadtest clean

help:
	@echo "make up       start the whole local stack (Redis, Triton, orchestrator on :8080); DATASET=synthetic|synthetic-1m|"
	@echo "              movielens|movielens-small, or the NAME of an own data set (python -m export all --interactions FILE --name NAME)"
	@echo "make test     install, then ruff + import contracts + mypy + pytest (what CI runs)"
	@echo "make export   train + export + FAISS index (DATASET=synthetic|synthetic-1m|movielens|movielens-small)"
	@echo "make bench    run the benchmarks and rewrite docs/BENCHMARKS.md"
	@echo "make loadtest side-by-side locust load runs (naive, full, ablations, ceiling) + plots"

venv: $(STAMP)

# Reinstall only when the dependency spec changes.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[export,triton,loadtest,dev,telemetry]"
	@touch $(STAMP)

# redis-server is a system package: the tests start their own servers on free ports. promtool, from Debian's
# prometheus package, unit-tests the alert rules (tests/k8s); the tests start no Prometheus. On a systemd
# host either package also enables its service (`systemctl disable --now prometheus redis-server`).
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "could not install redis-server: install it with your package manager"; exit 1; }; }
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (apt-get: prometheus)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null) \
	  || { echo "could not install promtool: install the prometheus package, or promtool from a Prometheus release"; exit 1; }; }

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy export orchestrator stack bench loadtest tests

pytest: venv system-deps
	$(VENV)/bin/pytest -q -ra

test: lint typecheck pytest

unit: venv
	$(VENV)/bin/pytest -q -m "not integration"

export: venv
	$(PY) -m export all --dataset $(DATASET)

bench: venv system-deps
	$(PY) -m bench

# ~25 min on 2 cores: starts its own Redis + Tritons; results under build/loadtest/, figures in docs/.
loadtest: venv system-deps
	$(PY) -m loadtest

# DATASET: a built-in set (trained on first use) or an own one, built before by `python -m export all
# --interactions FILE --name NAME` (docs/DATA.md).
up: venv system-deps
	$(PY) -m stack up --dataset $(DATASET)

clean:
	rm -rf build model_repository/*/[0-9]*/
