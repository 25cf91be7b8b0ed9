#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, then
# the import contracts, the unit/integration tests and the chaos sample.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
export PYTHONHASHSEED=0
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
