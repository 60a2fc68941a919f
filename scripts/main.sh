#!/usr/bin/env bash
# The main job on the embedded defaults (configs/default.yaml), in its own virtual environment (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh .venv
exec .venv/bin/mllm pipeline --config configs/default.yaml "$@"
