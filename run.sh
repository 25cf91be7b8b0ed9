#!/usr/bin/env bash
# Starts a Skulk node on a fresh machine: installs what is missing, then runs a
# node that serves the embedded default model (generated locally on first use)
# with the OpenAI-compatible API and the dashboard on http://localhost:52415/.
# Extra arguments go to `skulk` (for example: ./run.sh --api-port 8000).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
exec .venv/bin/skulk "$@"
