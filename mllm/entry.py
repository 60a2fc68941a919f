"""MLflow Project entry points: `python -m entrypoints.<name>` is `run_entry("<name>")`, which runs the CLI command.

An entry point's parameters are its command's, named as its options are (MLproject `n_trials` <-> `--n-trials`;
positional arguments by their name, e.g. report's `experiment`), plus two common to all: `config` (the
config file) and `overrides` (space-separated `KEY=VALUE` items, each a `--set`). Nothing here lists them:
`entry_parameters` reads them from the click command, and the tests check MLproject against it.

MLflow parameters are strings: "" means not given; a repeatable option (`--member`, `--model`) takes a
comma-separated list; a flag takes true/false. The values then go through click's own typing and mllm's error
handling, as on the command line (one line `mllm: error: ...`, exit 2).

Under `mlflow run` the entry point works in the run MLflow opened for it (mllm.tracking.project): renamed after the
entry point, the stage's runs nested under it, ended with the stage's outcome. MLflow opens that run before the
config is read, in the experiment `--experiment-name` names (default: `Default`) of MLFLOW_TRACKING_URI's store, so
the command names both as the config does:

    MLFLOW_TRACKING_URI=sqlite:///mlflow-tiny.db mlflow run . -e merge --experiment-name tiny \
        -P config=configs/tiny.yaml --env-manager local

Otherwise the entry point refuses in one line naming that fix (exit 2) and ends MLflow's run FAILED.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any, NoReturn

import typer

from mllm.cli import app, run_command, run_guarded
from mllm.config import load_config
from mllm.errors import ConfigError
from mllm.tracking.project import project_run

# Entry points named differently from their CLI command (all others share the name).
COMMANDS: dict[str, str] = {"main": "pipeline"}
OVERRIDES = "overrides"  # the entry-point parameter of the `--set` option (shell-split, not comma-split)
FALSE, TRUE = {"false", "0", "no", "off", "n"}, {"true", "1", "yes", "on", "y"}


def cli_command(name: str) -> Any:
    """The click command behind entry point `name`."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return commands[COMMANDS.get(name, name)]


def param_name(param: Any) -> str:
    """An entry point's name for a click parameter: its long option without dashes (`--n-trials` -> `n_trials`),
    a positional argument's name, `overrides` for `--set`."""
    if param.param_type_name == "argument":
        return param.name
    if "--set" in param.opts:
        return OVERRIDES
    long = next(o for o in param.opts if o.startswith("--"))
    return long[2:].replace("-", "_")


def entry_parameters(name: str) -> dict[str, Any]:
    """Entry point `name`'s parameters (in the command's order) -> the click parameters they set."""
    return {param_name(p): p for p in cli_command(name).params}


def parse_entry_args(name: str, argv: list[str]) -> dict[str, str]:
    """`--config c.yaml --n_trials 5 --workers ''` -> {"config": "c.yaml", "n_trials": "5", "workers": ""}."""
    known = entry_parameters(name)
    found: dict[str, str] = {}
    rest = iter(argv)
    for arg in rest:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in known:
            raise ConfigError(f"entry point {name}: unexpected argument {arg!r}",
                              f"pass -P NAME=VALUE with NAME one of {', '.join(known)}")
        if not eq:
            value = next(rest, None)  # type: ignore[assignment]
            if value is None:
                raise ConfigError(f"entry point {name}: {arg} has no value", f"pass {arg} VALUE")
        found[key] = value
    return found


def cli_argv(name: str, argv: list[str]) -> list[str]:
    """Translate an entry point's MLproject arguments into `mllm` CLI arguments."""
    params = entry_parameters(name)
    options: list[str] = []
    positional: list[str] = []
    for key, text in parse_entry_args(name, argv).items():
        param, text = params[key], text.strip()
        if not text:  # "" (every MLproject default): not given
            continue
        if param.param_type_name == "argument":
            positional.append(text)
        elif key == OVERRIDES:
            options += [a for item in shlex.split(text) for a in (param.opts[0], item)]
        elif param.is_bool_flag:
            flag = text.lower()
            if flag not in TRUE | FALSE:
                raise ConfigError(f"entry point {name}: {key}={text!r} is not true or false", f"pass {key}=true")
            chosen = param.opts[0] if flag in TRUE else (param.secondary_opts or [None])[0]
            options += [chosen] if chosen else []
        elif param.multiple:
            options += [a for item in text.split(",") if item.strip() for a in (param.opts[0], item.strip())]
        else:
            options += [param.opts[0], text]
    return [cli_command(name).name, *options, *(["--", *positional] if positional else [])]


def run_entry(name: str, argv: list[str] | None = None) -> NoReturn:
    """Run entry point `name` with its MLproject arguments (default: sys.argv[1:]), as `mllm` would."""
    args = sys.argv[1:] if argv is None else argv
    run_guarded(lambda: run_in_project(name, args))


def run_in_project(name: str, argv: list[str]) -> object:
    """Run entry point `name`'s command; under `mlflow run`, in the run it opened, once that run is found in the
    config's store and experiment (report's: its `experiment` parameter)."""
    with project_run(name) as adopt:
        command = cli_argv(name, argv)
        if adopt is not None:
            given = parse_entry_args(name, argv)
            cfg = load_config(given.get("config", "").strip() or None, shlex.split(given.get(OVERRIDES, "")))
            adopt(cfg.tracking.tracking_uri, given.get("experiment", "").strip() or cfg.name)
        code = run_command(command)
        if isinstance(code, int) and code:  # a failed command fails the run too
            raise typer.Exit(code)
    return code
