"""MLproject entry point `merge` (see MLproject and mllm/entry.py)."""

from mllm.entry import run_entry

if __name__ == "__main__":
    run_entry("merge")
