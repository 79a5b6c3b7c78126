#!/usr/bin/env bash
# Docker HEALTHCHECK for every ROLE: healthy when each supervisord program of this node
# is RUNNING and each server it runs answers its own health endpoint. What to probe is
# read from the config the entrypoint generated, so it always matches the ROLE.
set -euo pipefail

conf="${TANDEM_RUN_DIR:-/tmp/tandem-supervisor}/supervisord.conf"
[ -f "$conf" ] || { echo "no $conf: the entrypoint has not started supervisord"; exit 1; }

# Exits non-zero when any program is not RUNNING (STARTING, BACKOFF, EXITED, FATAL).
supervisorctl -c "$conf" status

http_ok() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
        || { echo "unhealthy: $1"; exit 1; }
}

runs() { grep -q "^\[program:$1\]" "$conf"; }

if runs nats; then
    http_ok "http://127.0.0.1:${NATS_MONITOR_PORT:-8222}/healthz?js-enabled-only=true"
fi
if runs etcd; then
    http_ok "http://127.0.0.1:${ETCD_PORT:-2379}/health"
fi
# The Frontend, where this node runs one (the head's graph, or a frontend node).
if runs tandem-graph || runs tandem-frontend; then
    http_ok "http://127.0.0.1:${TANDEM_HTTP_PORT:-8000}/health"
fi
