"""MLflow Project entry points: each `entrypoints/<name>.py` is `run_entry("<name>")`, which calls the CLI.

MLproject passes every entry point `--config PATH` and `--overrides "a.b=1 c.d=x"` (MLflow params are
strings); they become `mllm <command> ... --set a.b=1 --set c.d=x`, so entry points, CLI and tests share
one code path and one error behaviour (one line, exit 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys

# entry point -> the mllm command it runs; `config` is positional for validate, an option elsewhere.
ENTRY_POINTS: dict[str, list[str]] = {
    "main": ["data", "stats", "--config"],  # grows into the whole pipeline in later stages
    "validate": ["validate"],
}


def entry_argv(name: str, argv: list[str]) -> list[str]:
    """Translate an entry point's MLproject arguments into `mllm` CLI arguments."""
    parser = argparse.ArgumentParser(prog=f"entrypoints/{name}.py")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="")
    args = parser.parse_args(argv)
    sets = [a for o in shlex.split(args.overrides) for a in ("--set", o)]
    return [*ENTRY_POINTS[name], args.config, *sets]


def run_entry(name: str, argv: list[str] | None = None) -> None:
    from mllm.cli import main

    main(entry_argv(name, sys.argv[1:] if argv is None else argv))
