#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment with Skulk and its test
# dependencies. Safe to run repeatedly; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
stamp=.venv/.skulk-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing Skulk and its dependencies into .venv"
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

# The dashboard's browser test drives Debian's Chromium (never a downloaded
# browser). Installed only when missing, and only when we may (root).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] chromium missing: installing Debian's chromium for the dashboard test"
    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }
  else
    echo "[bootstrap] chromium missing: the dashboard browser test will be skipped (as root: apt-get install -y chromium)"
  fi
fi
