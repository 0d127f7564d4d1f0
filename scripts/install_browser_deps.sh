#!/usr/bin/env bash
# Installs what the dashboard's real-browser tests need: Debian's `chromium` and the Python
# `playwright` driver (into the venv given as $1, default .venv).
# Playwright's own browser download (`playwright install`) is deliberately not used: the tests
# drive the distribution's chromium (/usr/bin/chromium), which apt can install offline-mirrored
# and which gets security updates with the system.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright>=1.45,<2}"

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "chromium is missing and neither root nor sudo is available" >&2; exit 1; }
    SUDO="sudo"
  fi
  echo "==> installing chromium (apt-get)" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
chromium --version >&2

if [ ! -x "$VENV/bin/python" ]; then
  echo "no virtualenv at $VENV (run ./dev once first, or pass its path)" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
  echo "==> installing $PLAYWRIGHT_SPEC into $VENV" >&2
  "$VENV/bin/python" -m pip install -q "$PLAYWRIGHT_SPEC"
fi
"$VENV/bin/python" -c "from importlib.metadata import version; print('playwright', version('playwright'))" >&2
