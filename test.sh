#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, then
# the import contracts, the unit, integration, real-process and browser tests,
# and the chaos harness's CI sample (every scenario over a few seeds, a
# determinism sample and the canary proof).
# Extra arguments go to pytest (for example: ./test.sh tests/core -x).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
export PYTHONHASHSEED=0
mkdir -p artifacts
echo "== import contracts"
.venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  echo "== chaos CI sample"
  .venv/bin/python -m chaos ci
fi
