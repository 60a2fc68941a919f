#!/usr/bin/env bash
# Create (or reuse) a virtual environment with mllm installed in editable mode.
#   bash scripts/venv.sh DIR [EXTRAS]      e.g. bash scripts/venv.sh .venv-test test
# torch is pinned to 2.13.0 in pyproject.toml (a CPU wheel on the reference machine).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/venv.sh DIR [EXTRAS]}
extras=${2:-}
python=${PYTHON:-python3}
if [ ! -x "$dir/bin/python" ]; then
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# Reinstall only when pyproject.toml changed since the last install into this venv.
stamp="$dir/.mllm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi
