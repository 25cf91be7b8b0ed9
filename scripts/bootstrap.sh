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
