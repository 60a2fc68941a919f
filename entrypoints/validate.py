"""MLproject entry point `validate`: `mllm validate` with the entry point's parameters (see mllm/entry.py)."""

from mllm.entry import run_entry

if __name__ == "__main__":
    run_entry("validate")
