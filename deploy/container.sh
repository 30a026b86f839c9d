#!/usr/bin/env bash
# Build the container image with Podman where no registry serves python:3.11-slim-bookworm: a base of
# Debian bookworm made with debootstrap from Debian's own archive (Python 3.11 and pip, as the official
# image has them), then the Dockerfile on it, the knowledge index made while building (INDEX=1).
#
#   deploy/container.sh [TAG]      # as root; needs podman and debootstrap (Debian packages)
#
# With a registry, `docker build -t custom-llm .` (or `podman build`) needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-localhost/custom-llm:latest}"
base="localhost/debian-python:3.11-bookworm"

if ! podman image exists "$base"; then
    root="$(mktemp -d)"
    trap 'rm -rf --one-file-system "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >/dev/null
    # Updates and security updates too, as Debian's own images have them (debootstrap adds only main).
    cat >"$root/etc/apt/sources.list" <<'SOURCES'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
    rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED  # pip installs into the image's Python, as in python:3.11
    ln -sf python3 "$root/usr/bin/python"
    # The build's pip trusts what this machine trusts (a registry mirror's certificate, say).
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    # Imported under a name of its own and tagged once whole, so that a failed run leaves no base behind.
    tar -C "$root" -c . | podman import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$base-partial" >/dev/null
    podman tag "$base-partial" "$base"
    podman rmi "$base-partial" >/dev/null
fi
# --format docker keeps the HEALTHCHECK (OCI images have none); chroot isolation builds without cgroups.
podman build --quiet --format docker --isolation chroot --network host \
    --build-arg BASE="$base" --build-arg INDEX=1 -t "$tag" . >/dev/null
echo "$tag"
