#!/usr/bin/env bash
# Build deploy/Dockerfile, run the image, and carry one simulated phone call through it.
# Exit 0 only if the container served /health, the call was answered by the agent, and a
# SIGTERM stopped it cleanly (drain, exit 0).
#
# The simulated Gemini Live (TLS) and the simulated Twilio caller run on the host, outside the
# container, as the real ones would be; the container uses host networking.
#
# Engines: podman (rootful) or docker. Where no image registry is reachable, a Python base
# image is made from Debian's packages with debootstrap and passed as PYTHON_IMAGE (the same
# build argument that picks python:3.x-slim elsewhere). Behind a TLS-inspecting proxy the
# build needs its CA: the bundle named by PIP_CERT (or SSL_CERT_FILE) is mounted read-only
# into the build and named by the PIP_CERT build argument.
#
#   deploy/container-smoke.sh              # build + run + call
#   PYTHON_IMAGE=python:3.12-slim deploy/container-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-$ROOT/.venv/bin/python}"
IMAGE="${SMOKE_IMAGE:-localhost/livecall:smoke}"
BASE_IMAGE_LOCAL="localhost/livecall-pybase:bookworm"
WORK=$(mktemp -d /tmp/livecall-smoke.XXXXXX)
NAME="livecall-smoke-$$"
say() { printf '==> %s\n' "$*" >&2; }

ENGINE="${CONTAINER_ENGINE:-}"
if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  else echo "container-smoke: neither podman nor a running docker found" >&2; exit 2
  fi
fi
RUN_ARGS=()
if [ "$ENGINE" = podman ]; then
  # runc (crun fails on some cgroup layouts) and no default rlimits (setting them is not
  # permitted in some sandboxes); a private containers.conf leaves the host's alone.
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' >"$WORK/containers.conf"
  export CONTAINERS_CONF="$WORK/containers.conf"
  # no systemd here to time the image's HEALTHCHECK: it is run once by hand below instead
  RUN_ARGS+=(--runtime runc --health-interval disable)
fi

fake_pid=""
cleanup() {
  "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- the base image
PYTHON_IMAGE="${PYTHON_IMAGE:-}"
if [ -z "$PYTHON_IMAGE" ]; then
  PYTHON_IMAGE=$BASE_IMAGE_LOCAL
  if ! "$ENGINE" image exists "$PYTHON_IMAGE" 2>/dev/null \
     && ! "$ENGINE" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null 2>&1 || { echo "container-smoke: debootstrap is needed to make a base image (or set PYTHON_IMAGE)" >&2; exit 2; }
    say "making $PYTHON_IMAGE with debootstrap (Debian bookworm, python3)"
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    # Like the python:3.x-slim images: `python` and `pip` on PATH, pip may install.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$ENGINE" import \
      --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' - "$PYTHON_IMAGE" >/dev/null
    rm -rf "$rootfs"
  fi
fi

# ---- the image
BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
CA="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [ -n "$CA" ] && [ -f "$CA" ]; then
  BUILD_ARGS+=(-v "$CA:$CA:ro" --build-arg "PIP_CERT=$CA")
fi
[ "$ENGINE" = podman ] && BUILD_ARGS+=(--format docker)
say "building $IMAGE from deploy/Dockerfile on $PYTHON_IMAGE"
"$ENGINE" build --network host -f deploy/Dockerfile "${BUILD_ARGS[@]}" -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; exit 1; }

# ---- the simulated Gemini Live, on the host
say "starting the simulated Gemini Live on the host"
"$PY" -m livecall.sim.gemini --port 0 --ca-file "$WORK/gemini-ca.pem" --log-level WARNING \
  >"$WORK/gemini.out" 2>&1 &
fake_pid=$!
for _ in $(seq 100); do grep -q '^GEMINI_BASE_URL=' "$WORK/gemini.out" && break; sleep 0.1; done
GEMINI_BASE_URL=$(sed -n 's/^GEMINI_BASE_URL=//p' "$WORK/gemini.out" | head -1)
[ -n "$GEMINI_BASE_URL" ] || { cat "$WORK/gemini.out" >&2; exit 1; }

# ---- the container
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN="smoke-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
say "running $IMAGE on 127.0.0.1:$PORT"
"$ENGINE" run -d --name "$NAME" --network host "${RUN_ARGS[@]}" \
  -v "$WORK/gemini-ca.pem:/run/livecall/gemini-ca.pem:ro" \
  -e "PORT=$PORT" -e "LIVECALL_HOST=127.0.0.1" \
  -e "PUBLIC_URL=http://127.0.0.1:$PORT" \
  -e "TWILIO_AUTH_TOKEN=$TOKEN" \
  -e "GEMINI_API_KEY=sim-key" -e "GEMINI_BASE_URL=$GEMINI_BASE_URL" \
  -e "GEMINI_CA_FILE=/run/livecall/gemini-ca.pem" \
  "$IMAGE" serve --host 127.0.0.1 --port "$PORT" >/dev/null 2>>"$WORK/engine.log"

up=""
for _ in $(seq 150); do
  if "$PY" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    up=1; break
  fi
  [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = "true" ] || break
  sleep 0.2
done
if [ -z "$up" ]; then
  echo "container-smoke: the container never answered /health" >&2
  "$ENGINE" logs "$NAME" 2>&1 | tail -30 >&2
  exit 1
fi

if [ "$ENGINE" = podman ]; then
  say "running the image's own HEALTHCHECK"
  "$ENGINE" healthcheck run "$NAME" || { echo "container-smoke: HEALTHCHECK failed" >&2; exit 1; }
fi

say "calling it"
if ! "$PY" -m livecall.sim.probe --url "http://127.0.0.1:$PORT" --auth-token "$TOKEN"; then
  "$ENGINE" logs "$NAME" 2>&1 | tail -30 >&2
  exit 1
fi

say "stopping it (SIGTERM: drain, then exit 0)"
"$ENGINE" stop -t 30 "$NAME" >/dev/null 2>>"$WORK/engine.log"
code=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$NAME")
if [ "$code" != 0 ]; then
  echo "container-smoke: the container exited $code after SIGTERM" >&2
  "$ENGINE" logs "$NAME" 2>&1 | tail -30 >&2
  exit 1
fi
echo "container-smoke: OK (image $IMAGE on $PYTHON_IMAGE, engine $ENGINE)"
