#!/usr/bin/env bash
# `make run`: start embedded NATS + etcd unless NATS_SERVER/ETCD_ENDPOINTS point elsewhere,
# then serve the graph in the foreground. Ctrl-C stops the graph and the embedded servers.
set -euo pipefail
cd "$(dirname "$0")/.."
graph=$1
config=$2
started_infra=0
if [ -z "${NATS_SERVER:-}" ] || [ -z "${ETCD_ENDPOINTS:-}" ]; then
    eval "$(.venv/bin/tandem infra up --export)"
    started_infra=1
fi
cleanup() { [ "$started_infra" = 1 ] && .venv/bin/tandem infra down || true; }
trap cleanup EXIT
.venv/bin/tandem serve "$graph" -f "$config"
