# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
UV := $(shell ./scripts/ensure-uv.sh)
VENV := .venv
STAMP := $(VENV)/.synced
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: help setup run up test lint typecheck check-protos protos unit clean bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml uv.lock
	$(UV) sync --frozen
	@touch $@

setup: $(STAMP)  ## install the locked dependencies into .venv

run: $(STAMP)  ## start the default mesh on the offline model
	$(VENV)/bin/mesh up --config services/mesh.yaml

up: run

protos: $(STAMP)  ## regenerate mesh/v1 from protos/
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)  ## fail when mesh/v1 is stale
	$(PY) scripts/gen_protos.py --check

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck  ## lint, typecheck and the whole test suite
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

unit: $(STAMP)  ## the tests alone
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .mesh .pytest_cache .mypy_cache .ruff_cache
