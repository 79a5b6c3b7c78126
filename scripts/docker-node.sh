#!/usr/bin/env bash
# Starts one Tandem node role as a container on this machine (`make prefill`, `make decode`,
# `make ray-head`, `make ray-worker` run this); the head node uses compose (`make head`).
#
#   scripts/docker-node.sh ROLE
#
# It is `docker run` with what compose gives every node: host networking, the host's IPC
# namespace (compose/base.yml says why),
# the model volume, env/common.env then env/ROLE.env, and where the node has RDMA its
# devices with unlimited memlock. Each of
# NATS_SERVER, ETCD_ENDPOINTS, VLLM_HOST_IP, CONFIG, GRAPH, RAY_ADDRESS and
# VLLM_CPU_KVCACHE_SPACE set in this script's environment (or on make's command line) wins
# over the env files, so a node joins without editing them:
#
#   make prefill NATS_SERVER=nats://10.0.0.1:4222 ETCD_ENDPOINTS=http://10.0.0.1:2379
#
# VLLM_HOST_IP, when neither given nor edited in the env files, is this machine's source
# address towards the NATS server (a Ray worker: towards the Ray head).
#
# SECURE=1 (a fleet whose head runs with `make head SECURE=1`): TANDEM_SECRETS/node (default
# /etc/tandem/secrets/node, a copy of the head's) is mounted read-only at /run/secrets, and
# the node joins with the URLs `tandem infra secrets` printed (docs/security.md):
#
#   make prefill SECURE=1 NATS_SERVER=tls://tandem@10.0.0.1:4222 ETCD_ENDPOINTS=https://10.0.0.1:2379
#
# Environment: TANDEM_IMAGE (default tandem:latest), TANDEM_ENV_DIR (default env/),
# TANDEM_MODEL_CACHE (default /var/lib/tandem/models), GPUS (docker run --gpus value,
# default all; empty for none, as on a CPU build), DOCKER (the docker CLI).
set -euo pipefail
cd "$(dirname "$0")/.."

role=${1:?usage: scripts/docker-node.sh ROLE}
docker=${DOCKER:-docker}
image=${TANDEM_IMAGE:-tandem:latest}
env_dir=${TANDEM_ENV_DIR:-env}
name=tandem-$role

[ -f "$env_dir/$role.env" ] || { echo "docker-node: no $env_dir/$role.env (roles: $(cd "$env_dir" && ls ./*.env | sed 's|./||; s|\.env||' | grep -v common | xargs))" >&2; exit 2; }

# The value a variable ends up with: this environment first, then the role's env file,
# then common.env (docker's own order for several --env-file, last one wins).
value_of() {
    local name=$1
    if [ -n "${!name:-}" ]; then printf '%s' "${!name}"; return; fi
    local line
    line=$(grep -h "^$name=" "$env_dir/common.env" "$env_dir/$role.env" 2>/dev/null | tail -n 1 || true)
    printf '%s' "${line#*=}"
}

overrides=()
for var in NATS_SERVER ETCD_ENDPOINTS VLLM_HOST_IP CONFIG GRAPH RAY_ADDRESS VLLM_CPU_KVCACHE_SPACE \
    NATS_PASSWORD_FILE NATS_TLS_CA ETCD_USER ETCD_PASSWORD_FILE ETCD_TLS_CA; do
    if [ -n "${!var:-}" ]; then
        overrides+=(-e "$var=${!var}")
    fi
done

host_ip=$(value_of VLLM_HOST_IP)
if [ -z "$host_ip" ] || [ "$host_ip" = THIS_NODE_IP ]; then
    # The node this one must reach: the Ray head for a Ray worker, NATS for the others.
    if [ "$role" = ray-worker ]; then
        peer=$(value_of RAY_ADDRESS)
    else
        peer=$(value_of NATS_SERVER)
        peer=${peer#*://}
    fi
    peer=${peer%%:*}
    host_ip=$( (ip -4 route get "$peer" 2>/dev/null || true) | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
    [ -n "$host_ip" ] || { echo "docker-node: set VLLM_HOST_IP, this node's address (no route to '$peer' to guess it from)" >&2; exit 2; }
    echo "docker-node: VLLM_HOST_IP=$host_ip (this machine's address towards $peer)"
    overrides+=(-e "VLLM_HOST_IP=$host_ip")
fi

secrets=()
if [ -n "${SECURE:-}" ]; then
    # Checked here: docker would create a missing folder, and the node would join unsecured.
    bundle=${TANDEM_SECRETS:-/etc/tandem/secrets}/node
    [ -f "$bundle/ca.pem" ] || { echo "docker-node: SECURE is set but $bundle/ca.pem is missing: copy the head's node/ secrets there" >&2; exit 2; }
    secrets+=(-v "$bundle:/run/secrets:ro")
fi

devices=()
if [ -n "${GPUS-all}" ]; then
    devices+=(--gpus "${GPUS-all}")
fi
# RDMA for the NIXL/UCX KV transfer, where the node has it (compose: docker-compose.yml).
if [ -e /dev/infiniband ]; then
    devices+=(--device /dev/infiniband --cap-add IPC_LOCK --ulimit memlock=-1)
fi

exec $docker run -d --name "$name" --restart unless-stopped \
    --network host --ipc host --ulimit stack=67108864 \
    "${devices[@]}" \
    --env-file "$env_dir/common.env" --env-file "$env_dir/$role.env" "${overrides[@]}" \
    -v "${TANDEM_MODEL_CACHE:-/var/lib/tandem/models}:/models" "${secrets[@]}" \
    --stop-timeout 660 \
    "$image"
