#!/usr/bin/env bash
# A base image equivalent to python:3.11-slim, made from Debian's packages, for machines that
# cannot pull images (air-gapped, or behind a TLS-inspecting proxy that a pulled image would
# not trust). The Bento's image is then built FROM it: container/build_image.py --base-image.
#
#   sudo container/make-base-image.sh [IMAGE] [MIRROR]
#
# IMAGE defaults to localhost/debian-py311:bookworm, MIRROR to http://deb.debian.org/debian.
# Needs root, debootstrap and podman (or docker: IMGCLF_CONTAINER_ENGINE=docker). The host's
# CA bundle goes into the image, so that pip and uv inside a build trust what the host trusts.
# Does nothing when IMAGE exists already (IMGCLF_REBUILD_BASE=1 makes it again).
set -euo pipefail

image=${1:-localhost/debian-py311:bookworm}
mirror=${2:-http://deb.debian.org/debian}
engine=${IMGCLF_CONTAINER_ENGINE:-podman}
bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

if [ -z "${IMGCLF_REBUILD_BASE:-}" ] && "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi
for tool in debootstrap "$engine"; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
[ -r "$bundle" ] || { echo "error: no CA bundle at $bundle (set SSL_CERT_FILE)" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase \
  --include=python3.11,python3-pip,python3.11-venv,python3-distutils,python3-setuptools,ca-certificates,curl \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; echo "error: debootstrap failed (log: $rootfs.log)" >&2; exit 1; }
rm -f "$rootfs.log"
# python:3.11-slim lets pip install into the system Python; Debian's marker forbids it.
rm -f "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED
cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$image" >/dev/null
echo "$image made from Debian bookworm ($mirror)"
