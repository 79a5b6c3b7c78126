#!/usr/bin/env bash
# `make run`: start embedded NATS + etcd unless NATS_SERVER/ETCD_ENDPOINTS point elsewhere,
# then serve the graph in the foreground. Ctrl-C stops the graph and the embedded servers.
set -euo pipefail
cd "$(dirname "$0")/.."
graph=$1
config=$2
started_infra=0
if [ -z "${NATS_SERVER:-}" ] || [ -z "${ETCD_ENDPOINTS:-}" ]; then
    # Its own line: `set -e` stops here if NATS or etcd cannot start (a port in use, say);
    # inside `eval "$(...)"` the failure would pass unnoticed.
    exports=$(.venv/bin/tandem infra up --export)
    eval "$exports"
    started_infra=1
fi
cleanup() { [ "$started_infra" = 1 ] && .venv/bin/tandem infra down || true; }
trap cleanup EXIT
.venv/bin/tandem serve "$graph" -f "$config"
