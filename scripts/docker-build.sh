#!/usr/bin/env bash
# Builds the Tandem image (`make build` runs this).
#
#   scripts/docker-build.sh ENGINE [TAG]      ENGINE: cuda (default image) or cpu
#
# cpu: on a machine without GPUs and without an image registry. The Debian base is made
# locally (scripts/docker-base.sh: debootstrap + docker import, cached), and torch's CPU
# wheel comes from the folder PIP_FIND_LINKS names (or WHEELS_DIR), linked into .whl/ in
# the build context: nothing is fetched from a host other than PyPI and Debian.
# Set CPU_BASE_IMAGE to use an existing image (e.g. debian:bookworm-slim) instead.
#
# Environment: PIP_CERT or SSL_CERT_FILE (a CA bundle the build's pip trusts, for HTTPS
# through an intercepting proxy), DOCKER (the docker CLI, default docker; DOCKER_HOST picks the engine),
# DOCKER_BUILD_ARGS (extra `docker build` arguments). BuildKit is required; RUN steps
# use the host's network, which also works on an engine started with --bridge=none.
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${1:-cuda}
tag=${2:-tandem:latest}
docker=${DOCKER:-docker}
args=(--network host --build-arg "ENGINE=$engine" -t "$tag")

case "$engine" in
cuda) ;;
cpu)
    base=${CPU_BASE_IMAGE:-}
    if [ -z "$base" ]; then
        base=tandem-base:bookworm
        scripts/docker-base.sh "$base"
    fi
    args+=(--build-arg "CPU_BASE_IMAGE=$base")
    ;;
*)
    echo "docker-build: ENGINE must be cuda or cpu, not '$engine'" >&2
    exit 2
    ;;
esac

# The wheels the CPU build installs from (empty for cuda, whose stage never reads it).
# Hard links where the folder shares a filesystem with the checkout: no 190 MB copy.
rm -rf .whl
mkdir -p .whl
wheels=${WHEELS_DIR:-${PIP_FIND_LINKS:-}}
if [ "$engine" = cpu ]; then
    if [ -z "$wheels" ] || ! compgen -G "$wheels/torch-*.whl" >/dev/null; then
        echo "docker-build: no torch wheel in '${wheels}': set PIP_FIND_LINKS or WHEELS_DIR to the folder holding torch 2.13.0+cpu" >&2
        exit 2
    fi
    cp -l "$wheels"/*.whl .whl/ 2>/dev/null || cp "$wheels"/*.whl .whl/
fi

# HTTPS through an intercepting proxy: the build's pip trusts what the host's pip trusts.
cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$cert" ] && [ -s "$cert" ]; then
    args+=(--secret "id=pip-cert,src=$cert")
fi

# Docker 23+ without the buildx plugin has no BuildKit at all; older clients enable it
# with DOCKER_BUILDKIT=1.
if $docker buildx version >/dev/null 2>&1; then
    build=(buildx build --load)
else
    export DOCKER_BUILDKIT=1
    build=(build)
fi
# shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is a list of words on purpose
$docker "${build[@]}" "${args[@]}" ${DOCKER_BUILD_ARGS:-} .
