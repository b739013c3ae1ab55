#!/bin/sh
# A Debian bookworm base image made from Debian's own packages, for machines with no image
# registry (the Dockerfiles take it as --build-arg BASE=local/debian:bookworm). Needs root and
# debootstrap; about 30 s. Also builds local/redis:7 (Debian's redis-server) for the compose stack.
#   deploy/docker/make-base-image.sh [MIRROR]
set -eu
MIRROR=${1:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
tar -C "$ROOTFS" -c . | docker import - local/debian:bookworm
printf 'FROM local/debian:bookworm\nRUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools && rm -rf /var/lib/apt/lists/*\n' \
  | docker build --network host -t local/redis:7 -
