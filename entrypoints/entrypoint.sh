#!/usr/bin/env bash
# Container entrypoint. With no arguments (or --dry-run) it runs this node's ROLE under
# supervisord: entrypoints/render.py turns ROLE and the environment into a supervisord
# config and execs supervisord in the foreground (--dry-run prints the config instead).
# Any other arguments are run as a command, e.g. `docker compose run head tandem config check ...`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ "$#" -eq 0 ] || [ "$1" = "--dry-run" ]; then
    exec "${TANDEM_PYTHON:-python3}" "$here/render.py" "$@"
fi
exec "$@"
