#!/usr/bin/env bash
# Makes the Debian bookworm base image of the CPU build on a machine that reaches no image
# registry (only Debian's mirror): `debootstrap --variant=minbase` into a folder, then
# `docker import`. The root filesystem tarball is cached, so a second engine (or a fresh
# Docker data root) imports it in seconds instead of bootstrapping again.
#
#   scripts/docker-base.sh [IMAGE]        (default tandem-base:bookworm)
#
# Environment: DOCKER (the docker CLI, default docker; DOCKER_HOST picks the engine),
# TANDEM_DOCKER_CACHE (where the tarball is kept, default ~/.cache/tandem-docker),
# DEBIAN_MIRROR (default http://deb.debian.org/debian). debootstrap needs root.
set -euo pipefail

image=${1:-tandem-base:bookworm}
docker=${DOCKER:-docker}
cache=${TANDEM_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball=$cache/debian-bookworm-minbase.tar

if $docker image inspect "$image" >/dev/null 2>&1; then
    echo "docker-base: $image already present"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "docker-base: debootstrap is missing (apt-get install -y debootstrap)" >&2; exit 1; }
    mkdir -p "$cache"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.partial"' EXIT
    echo "docker-base: debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # The image's apt must not keep the package lists or the downloaded .debs.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
fi

echo "docker-base: importing $tarball as $image"
$docker import "$tarball" "$image" >/dev/null
