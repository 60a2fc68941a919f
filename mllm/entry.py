"""MLflow Project entry points: each `entrypoints/<name>.py` is `run_entry("<name>")`, which calls the CLI.

MLproject passes every entry point `--config PATH` and `--overrides "a.b=1 c.d=x"` (MLflow params are
strings), plus the entry point's own options; they become `mllm <command> ... --set a.b=1 --set c.d=x`, so
entry points, CLI and tests share one code path and one error behaviour (one line, exit 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EntryPoint:
    command: list[str]  # the mllm command it runs
    config_option: bool = True  # `--config PATH` (False: positional, as for validate)
    # MLproject parameter -> CLI option ("": a positional argument); parameters in `repeat` are comma-separated lists
    # that repeat the option once per item.
    options: dict[str, str] = field(default_factory=dict)
    repeat: frozenset[str] = frozenset({"members"})


ENTRY_POINTS: dict[str, EntryPoint] = {
    "main": EntryPoint(["pipeline"]),
    "validate": EntryPoint(["validate"], config_option=False),
    "finetune": EntryPoint(["finetune"], options={"members": "--member", "parent_run_id": "--parent-run-id"}),
    "merge": EntryPoint(["merge"], options={"method": "--method", "weights": "--weights", "density": "--density",
                                            "members": "--member"}),
    "evaluate": EntryPoint(["evaluate"], options={"model": "--model", "split": "--split"},
                           repeat=frozenset({"model"})),
    "search": EntryPoint(["search"], options={"n_trials": "--n-trials", "workers": "--workers",
                                              "storage": "--storage", "study_name": "--study-name",
                                              "parent_run_id": "--parent-run-id", "worker_index": "--worker-index"}),
    "promote": EntryPoint(["promote"], options={"storage": "--storage", "study_name": "--study-name"}),
    "report": EntryPoint(["report"], options={"experiment": "", "split": "--split"}),
}


def entry_argv(name: str, argv: list[str]) -> list[str]:
    """Translate an entry point's MLproject arguments into `mllm` CLI arguments."""
    entry = ENTRY_POINTS[name]
    parser = argparse.ArgumentParser(prog=f"entrypoints/{name}.py")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="")
    for param in entry.options:
        parser.add_argument(f"--{param}", default="")
    args = parser.parse_args(argv)
    out = [*entry.command, *(["--config"] if entry.config_option else []), args.config]
    for param, option in entry.options.items():
        value = getattr(args, param).strip()
        values = value.split(",") if param in entry.repeat else [value]
        out += [a for v in values if v.strip() for a in ((option, v.strip()) if option else (v.strip(),))]
    return out + [a for o in shlex.split(args.overrides) for a in ("--set", o)]


def run_entry(name: str, argv: list[str] | None = None) -> None:
    from mllm.cli import main

    main(entry_argv(name, sys.argv[1:] if argv is None else argv))
