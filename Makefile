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
# `make run` needs only the base dependencies. The `llama` extra (a ~5 minute
# compile on 2 cores) is installed only by the targets that use it: `make model`
# and `make test`/`make unit` (so the real-model tests run; `LLAMA=0` skips the
# extra, and those tests then skip with the reason). SYNC is the full install (the
# Dockerfile test compares its flags with the image's); BASE_SYNC leaves the extra
# out, and --inexact keeps one installed earlier.
SYNC := $(UV) sync --frozen --extra llama
BASE_SYNC := $(UV) sync --frozen --inexact
LLAMA_STAMP := $(VENV)/.llama
LLAMA ?= 1
TEST_DEPS := $(STAMP) $(if $(filter 1,$(LLAMA)),$(LLAMA_STAMP))

.PHONY: help setup run up test lint typecheck check-protos protos unit bench clean model k8s check-k8s

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml uv.lock
	@echo "make: installing the locked dependencies into $(VENV) (uv: $(UV))"
	$(BASE_SYNC)
	@touch $@

$(LLAMA_STAMP): $(STAMP)
	@echo "make: building llama-cpp-python from source for the local model (about 5 minutes on 2 cores; only make model and make test need it)"
	$(SYNC)
	@touch $@

setup: $(STAMP)  ## install the locked dependencies into .venv

# --exit-with-parent: when make dies, even by kill -9, mesh up stops everything too.
run: $(STAMP)  ## start the default mesh (router + agents) on the offline model
	@echo "make: starting the mesh (mesh up): the token service, each agent, then the router"
	$(VENV)/bin/mesh up --config services/mesh.yaml --exit-with-parent

up: run

model: $(LLAMA_STAMP)  ## the llama extra + the SmolLM2 GGUF in .models/ (llama_cpp provider)
	@echo "make: fetching SmolLM2-135M-Instruct (about 100 MB) into .models/"
	$(PY) scripts/fetch_smollm2.py

protos: $(STAMP)  ## regenerate mesh/v1 from protos/
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)  ## fail when mesh/v1 is stale
	$(PY) scripts/gen_protos.py --check

k8s: $(STAMP)  ## deploy services/mesh.yaml: copy it to k8s/base/ and regenerate the agents' manifests
	$(VENV)/bin/mesh k8s --config services/mesh.yaml

check-k8s: $(STAMP)  ## fail when a generated manifest differs from what k8s/base/mesh.yaml makes
	$(VENV)/bin/mesh k8s --check

lint: $(STAMP)  ## ruff check + format check + buf lint + buf breaking (vs the last v* tag) of the contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$$(./scripts/ensure-buf.sh) lint
	./scripts/buf-breaking.sh

typecheck: $(STAMP)  ## mypy --strict
	$(VENV)/bin/mypy

test: $(TEST_DEPS) lint typecheck  ## lint, typecheck and the whole test suite (LLAMA=0: no llama build)
	./scripts/ensure-redis.sh
	./scripts/ensure-prometheus.sh
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

unit: $(TEST_DEPS)  ## the tests alone
	./scripts/ensure-redis.sh
	./scripts/ensure-prometheus.sh
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

bench: $(STAMP)  ## benchmarks (writes benchmarks/results/)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .mesh services/.mesh .pytest_cache .mypy_cache .ruff_cache
