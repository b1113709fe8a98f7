# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
UV := $(shell ./scripts/ensure-uv.sh)
VENV := .venv
STAMP := $(VENV)/.synced
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
# llama-cpp-python (the `llama` extra) builds from source; the native build dies
# with an illegal instruction on CPUs unlike the build host, so build portable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# Every sync keeps the extras, or uv would remove them again.
SYNC := $(UV) sync --frozen --extra llama

.PHONY: help setup run up test lint typecheck check-protos protos unit bench clean model

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml uv.lock
	$(SYNC)
	@touch $@

setup: $(STAMP)  ## install the locked dependencies into .venv

run: $(STAMP)  ## start the default mesh (router + agents) on the offline model
	$(VENV)/bin/mesh up --config services/mesh.yaml

up: run

model: $(STAMP)  ## fetch the SmolLM2 GGUF into .models/ (for the llama_cpp provider)
	$(PY) scripts/fetch_smollm2.py

protos: $(STAMP)  ## regenerate mesh/v1 from protos/
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)  ## fail when mesh/v1 is stale
	$(PY) scripts/gen_protos.py --check

lint: $(STAMP)  ## ruff check + format check + buf lint of the contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$$(./scripts/ensure-buf.sh) lint

typecheck: $(STAMP)  ## mypy --strict
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck  ## lint, typecheck and the whole test suite
	./scripts/ensure-redis.sh
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

unit: $(STAMP)  ## the tests alone
	./scripts/ensure-redis.sh
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

bench: $(STAMP)  ## benchmarks (writes benchmarks/results/)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .mesh .pytest_cache .mypy_cache .ruff_cache
