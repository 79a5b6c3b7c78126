# Tandem: every target works from a fresh clone (it bootstraps .venv first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
TANDEM := $(VENV)/bin/tandem
CONFIG ?= configs/cpu-tiny.yaml
GRAPH ?= graphs.agg_router:Frontend
TINY_MODEL ?= models/tiny-llama
# The slowest tests in every run's log: where the suite's time goes, to keep it inside CI's budget.
PYTEST_ARGS ?= --durations=40 --durations-min=15

.PHONY: setup run lint test test-fast model infra-up infra-down build secrets head decode prefill ray-head ray-worker down logs

# --- the container appliance (docs/appliance.md) -------------------------------------------
# ENGINE=cuda (default, GPU nodes) or cpu (no GPU; also builds the Debian base locally).
ENGINE ?= cuda
IMAGE ?= tandem:latest
DOCKER ?= docker
# Compose v2 where the plugin exists, else Debian's docker-compose 1.29: the files suit both.
COMPOSE ?= $(shell if $(DOCKER) compose version >/dev/null 2>&1; then echo "$(DOCKER) compose"; else echo docker-compose; fi)
COMPOSE_FILE_OF_ENGINE := compose/docker-compose$(if $(filter cpu,$(ENGINE)),.cpu).yml
# On CPU: no --gpus, and the small model's config (as in compose/docker-compose.cpu.yml)
# unless CONFIG is given.
# SECURE=1: NATS and etcd with TLS and passwords (docs/security.md "The appliance, secure"):
# the folders `make secrets` wrote under TANDEM_SECRETS are mounted read-only at /run/secrets
# (head/ on the head, node/ elsewhere: compose/secure.yml, scripts/docker-node.sh).
SECURE ?=
TANDEM_SECRETS ?= /etc/tandem/secrets
# The image's user (the Dockerfile's TANDEM_UID), who must be able to read the secrets.
TANDEM_UID ?= 10001
APPLIANCE_ENV := TANDEM_IMAGE=$(IMAGE) DOCKER=$(DOCKER) SECURE=$(SECURE) TANDEM_SECRETS=$(abspath $(TANDEM_SECRETS)) $(if $(filter cpu,$(ENGINE)),GPUS= CONFIG=$${CONFIG:-configs/cpu-tiny-disagg.yaml})
COMPOSE_CMD := $(APPLIANCE_ENV) $(COMPOSE) -p tandem -f $(COMPOSE_FILE_OF_ENGINE) $(if $(SECURE),-f compose/secure.yml)
NODE_ROLES := decode prefill ray-head ray-worker
COMPOSE_PROFILES_ALL := infra head frontend $(NODE_ROLES) metrics
# Which node's logs `make logs` follows.
ROLE ?= head

setup:
	@scripts/bootstrap.sh

$(TINY_MODEL)/config.json: | setup
	$(TANDEM) model make-tiny $(TINY_MODEL)

model: $(TINY_MODEL)/config.json

## run: the agg_router graph on CPU with the small local model, NATS and etcd embedded
run: setup model
	@scripts/run-local.sh $(GRAPH) $(CONFIG)

## lint: ruff (lint, then formatting) and mypy, on the whole tree (tests included), configured in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## test: lint, then every test tier this machine can run
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

## test-fast: unit + integration only (no vLLM engine start-ups)
test-fast: setup
	$(PY) -m pytest tests/unit tests/integration $(PYTEST_ARGS)

infra-up: setup
	$(TANDEM) infra up

infra-down: setup
	$(TANDEM) infra down

## build: the image (ENGINE=cpu for machines without GPUs: Debian base made with debootstrap)
build:
	DOCKER=$(DOCKER) scripts/docker-build.sh $(ENGINE) $(IMAGE)

## secrets: once, on the head: a CA, certificates and passwords under TANDEM_SECRETS for SECURE=1
## (make secrets HEAD_IP=10.0.0.1), owned by the image's user; prints the exports. It runs
## `tandem infra secrets` in the image (as root there, to hand the files to TANDEM_UID).
secrets:
	$(if $(HEAD_IP),,$(error make secrets needs HEAD_IP=<the head node's address>))
	$(DOCKER) run --rm --network none --user 0 -v $(abspath $(TANDEM_SECRETS)):/secrets $(IMAGE) \
		tandem infra secrets /secrets --host $(HEAD_IP) --owner $(TANDEM_UID)

## head: NATS, etcd, Frontend (routing in process) + Processor and a decode worker (compose profile head);
## SECURE=1: with TLS and passwords, from the secrets of `make secrets`
head:
	$(if $(SECURE),@test -f $(TANDEM_SECRETS)/head/ca.pem || { echo "make head SECURE=1: no $(TANDEM_SECRETS)/head/ca.pem: run make secrets first"; exit 2; })
	$(COMPOSE_CMD) --profile head up -d

## decode, prefill, ray-head, ray-worker: this node's role in a container; on another node
## pass the head's addresses: make prefill NATS_SERVER=nats://HEAD:4222 ETCD_ENDPOINTS=http://HEAD:2379
## (a secure fleet: make prefill SECURE=1 NATS_SERVER=tls://tandem@HEAD:4222 ETCD_ENDPOINTS=https://HEAD:2379,
## with the head's node/ secrets copied to TANDEM_SECRETS/node)
$(NODE_ROLES):
	$(APPLIANCE_ENV) scripts/docker-node.sh $@

## down: stop (drain) and remove this machine's Tandem containers
down:
	$(COMPOSE_CMD) $(addprefix --profile ,$(COMPOSE_PROFILES_ALL)) down
	@for role in $(NODE_ROLES); do \
		if $(DOCKER) container inspect tandem-$$role >/dev/null 2>&1; then \
			$(DOCKER) stop -t 660 tandem-$$role && $(DOCKER) rm tandem-$$role; \
		fi; \
	done

## logs: follow a node's container (ROLE=head by default; ROLE=prefill, ...)
logs:
	$(DOCKER) logs -f --tail 200 tandem-$(ROLE)
