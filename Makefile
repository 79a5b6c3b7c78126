# Tandem: every target works from a fresh clone (it bootstraps .venv first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
TANDEM := $(VENV)/bin/tandem
CONFIG ?= configs/cpu-tiny.yaml
GRAPH ?= graphs.agg_router:Frontend
TINY_MODEL ?= models/tiny-llama
PYTEST_ARGS ?=

.PHONY: setup run test test-fast model infra-up infra-down

setup:
	@scripts/bootstrap.sh

$(TINY_MODEL)/config.json: | setup
	$(TANDEM) model make-tiny $(TINY_MODEL)

model: $(TINY_MODEL)/config.json

## run: the agg_router graph on CPU with the small local model, NATS and etcd embedded
run: setup model
	@scripts/run-local.sh $(GRAPH) $(CONFIG)

## test: every test tier this machine can run
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## test-fast: unit + integration only (no vLLM engine start-ups)
test-fast: setup
	$(PY) -m pytest tests/unit tests/integration $(PYTEST_ARGS)

infra-up: setup
	$(TANDEM) infra up

infra-down: setup
	$(TANDEM) infra down
