#!/usr/bin/env bash
# Docker HEALTHCHECK for every ROLE: healthy when each supervisord program of this node
# is RUNNING and each server it runs answers its own health endpoint. What to probe is
# read from the config the entrypoint generated, so it always matches the ROLE.
set -euo pipefail

run_dir="${TANDEM_RUN_DIR:-/tmp/tandem-supervisor}"
conf="$run_dir/supervisord.conf"
[ -f "$conf" ] || { echo "no $conf: the entrypoint has not started supervisord"; exit 1; }

# A program that keeps ending (a `tandem serve` whose service went FATAL, restarted again
# and again): RUNNING between two exits is not healthy. The restart listener leaves the mark
# until the program has stayed up for TANDEM_CRASH_LOOP_WINDOW_S (app/launch/restart_backoff.py);
# a `tandem serve` that ended on a FATAL service (one that could not start, or exited
# TANDEM_CRASH_LOOP_EXITS times in a row) leaves one naming it (app/sdk/supervisor.py).
for mark in "$run_dir"/crash-loop/*; do
    [ -f "$mark" ] && { echo "unhealthy: $(cat "$mark")"; exit 1; }
done

# The programs meant to keep running; one-shot steps (startsecs=0) exit by design, and
# what they leave behind is checked below.
long_running=$(awk '/^\[program:/ { name = substr($0, 10, length($0) - 10) } /^startsecs=[1-9]/ { print name }' "$conf")
# Exits non-zero when any of them is not RUNNING (STARTING, BACKOFF, EXITED while its
# restart waits, FATAL).
# shellcheck disable=SC2086  # one word per program name
supervisorctl -c "$conf" status $long_running

# http_ok URL [CA]: over https with the CA file given.
http_ok() {
    python3 -c 'import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
urllib.request.urlopen(sys.argv[1], timeout=5, context=context)' "$@" \
        || { echo "unhealthy: $1"; exit 1; }
}

runs() { grep -q "^\[program:$1\]" "$conf"; }

if runs nats; then
    http_ok "http://127.0.0.1:${NATS_MONITOR_PORT:-8222}/healthz?js-enabled-only=true"
fi
if runs etcd; then
    if grep -q '^command=.*etcd .*--cert-file' "$conf"; then
        # A secure fleet (entrypoints/render.py): TLS with the fleet's CA, and auth turned on.
        http_ok "https://127.0.0.1:${ETCD_PORT:-2379}/health" "${TANDEM_SECRETS_DIR:-/run/secrets}/ca.pem"
        [ -f "$run_dir/etcd-auth.done" ] || { echo "unhealthy: etcd-auth has not turned etcd's auth on"; exit 1; }
    else
        http_ok "http://127.0.0.1:${ETCD_PORT:-2379}/health"
    fi
fi
# The Frontend, where this node runs one (the head's graph, or a frontend node).
if runs tandem-graph || runs tandem-frontend; then
    http_ok "http://127.0.0.1:${TANDEM_HTTP_PORT:-8000}/health"
fi
