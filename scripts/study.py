"""`python scripts/study.py ARGS` is `mllm study ARGS` (kept for old commands; see `mllm study --help`)."""

import sys

from mllm.cli import main

if __name__ == "__main__":
    main(["study", *sys.argv[1:]])
