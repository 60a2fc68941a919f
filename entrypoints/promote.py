"""MLproject entry point `promote` (see MLproject and mllm/entry.py)."""

import sys
from pathlib import Path

# Python puts this folder first on sys.path; entrypoints/evaluate.py would then shadow the `evaluate` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from mllm.entry import run_entry  # noqa: E402

if __name__ == "__main__":
    run_entry("promote")
