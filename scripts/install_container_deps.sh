#!/usr/bin/env bash
# Installs what deploy/container-smoke.sh needs on a Debian host without a Docker engine:
# podman with runc, and debootstrap to make a Python base image from Debian's packages.
set -euo pipefail
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "${missing[*]} missing and neither root nor sudo is available" >&2; exit 1; }
  SUDO="sudo"
fi
echo "==> installing ${missing[*]} (apt-get)" >&2
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
