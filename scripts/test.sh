#!/usr/bin/env bash
# The whole test suite in its own virtual environment (.venv-test). Tests marked `gpu` skip without CUDA and
# tests marked `services` skip unless the service stack is up; pass pytest arguments through, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh .venv-test test
exec .venv-test/bin/python -m pytest "$@"
