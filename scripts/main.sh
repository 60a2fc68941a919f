#!/usr/bin/env bash
# The main job on the embedded defaults (configs/default.yaml), in its own virtual environment (.venv).
# Today: the data stage, `mllm data stats` on the Drugs.com sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh .venv
exec .venv/bin/mllm data stats --config configs/default.yaml "$@"
