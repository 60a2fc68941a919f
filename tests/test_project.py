"""MLproject, entrypoints/ and the CLI describe the same stages with the same parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import BaseModel

from mllm.cli import CONFIG_OPTIONS, app
from mllm.config import ExperimentConfig
from mllm.entry import COMMANDS, cli_argv, entry_parameters, run_entry

from .conftest import REPO


def mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def cli_commands() -> dict[str, object]:
    """Every CLI command path (e.g. 'data stats') mapped to its click command."""
    root = typer.main.get_command(app)
    found = {}

    def walk(group, prefix: list[str]) -> None:
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, [*prefix, name])
            else:
                found[" ".join([*prefix, name])] = cmd

    walk(root, [])
    return found


def entry_command(name: str):
    command = cli_commands().get(COMMANDS.get(name, name))
    assert command is not None, f"entry point {name} -> mllm {COMMANDS.get(name, name)} is not a CLI command"
    return command


def option_names(command) -> set[str]:
    """The command's options and arguments as MLproject names them: `--n-trials` -> n_trials, `--set` -> overrides."""
    names = set()
    for p in command.params:
        if p.param_type_name == "argument":
            names.add(p.name)
        else:
            long = next(o for o in p.opts if o.startswith("--"))
            names.add("overrides" if long == "--set" else long[2:].replace("-", "_"))
    return names


def test_entry_points_match_files_and_cli() -> None:
    project = mlproject()["entry_points"]
    files = {p.stem for p in (REPO / "entrypoints").glob("*.py") if not p.stem.startswith("_")}
    assert set(project) == files
    for name, spec in project.items():
        command = entry_command(name)
        params = set(spec["parameters"])
        assert params == option_names(command) == set(entry_parameters(name))
        assert {"config", "overrides"} <= params
        assert spec["command"].startswith(f"python -m entrypoints.{name} ")
        for param in params:
            assert f"--{param} {{{param}}}" in spec["command"], f"{name}: {param} is not passed on"
            assert spec["parameters"][param]["default"] == ("configs/default.yaml" if param == "config" else "")
        source = (REPO / "entrypoints" / f"{name}.py").read_text()
        assert "sys.path" not in source and f'run_entry("{name}")' in source


# A value MLflow may pass for a parameter, and what the click command makes of it (default: the string itself).
SAMPLES: dict[str, tuple[str, object]] = {
    "config": ("c.yaml", Path("c.yaml")), "overrides": ("a.b=1 c.d='x y'", ["a.b=1", "c.d=x y"]),
    "density": ("0.4", 0.4), "n_trials": ("5", 5), "workers": ("2", 2), "worker_index": ("1", 1),
    "split": ("validation", "validation"), "format": ("json", "json"), "sampler": ("random", "random"),
    "layer_groups": ("3", 3),
}


@pytest.mark.parametrize("name", sorted(mlproject()["entry_points"]))
def test_entry_arguments_reach_the_command(name: str) -> None:
    """Each entry point's MLflow parameters become the CLI arguments they name: typed by click, lists split,
    flags on or off, "" left out."""
    command = entry_command(name)
    params = entry_parameters(name)
    for flag in (True, False):
        argv = []
        for param, click_param in params.items():
            text = ("true" if flag else "false") if getattr(click_param, "is_bool_flag", False) else \
                "a, b" if click_param.multiple and param != "overrides" else SAMPLES.get(param, ("x y", None))[0]
            argv += [f"--{param}", text]
        args = cli_argv(name, argv)
        assert args[0] == command.name
        ctx = command.make_context(f"mllm {command.name}", args[1:])
        for param, click_param in params.items():
            value = ctx.params[click_param.name]
            if getattr(click_param, "is_bool_flag", False):
                assert value is flag, param
            elif click_param.multiple and param != "overrides":
                assert list(value) == ["a", "b"], param
            else:
                expected = SAMPLES.get(param, (None, "x y"))[1]
                assert (list(value) if isinstance(value, tuple) else value) == expected, param
    assert cli_argv(name, [a for p in params for a in (f"--{p}", "")]) == [command.name]  # "": not given


def test_entry_point_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = str(REPO / "configs" / "tiny.yaml")
    for argv, code, expected in (
        (["--config", tiny, "--overrides", "merge.method=linear"], 0, "merge linear"),
        (["--config", tiny, "--overrides", "merge.colour=red"], 2, "unknown key 'merge.colour'"),
        (["--config", tiny, "--colour", "red"], 2, "unexpected argument '--colour'"),
        (["--config", tiny, "--overrides"], 2, "--overrides has no value"),
    ):
        with pytest.raises(SystemExit) as info:
            run_entry("validate", argv)
        out, err = capsys.readouterr()
        assert (info.value.code or 0) == code
        if code:
            assert err.count("\n") == 1 and err.startswith("mllm: error: ") and expected in err
        else:
            assert expected in out
    with pytest.raises(SystemExit) as info:
        run_entry("evaluate", ["--config", tiny, "--baselines", "maybe"])
    assert info.value.code == 2 and "baselines='maybe' is not true or false" in capsys.readouterr().err


def test_python_m_entrypoints_from_the_project_root() -> None:
    """MLflow runs `python -m entrypoints.<name>` in the project folder: entrypoints/evaluate.py must not shadow
    the `evaluate` package (no sys.path workaround needed)."""
    proc = subprocess.run([sys.executable, "-m", "entrypoints.validate", "--config", "configs/tiny.yaml",
                           "--overrides", "merge.method=linear"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "merge linear" in proc.stdout
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('evaluate').origin); "
                            "print(u.find_spec('entrypoints.evaluate').origin)"],
                           capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    assert Path(found[0]).parent != REPO / "entrypoints" and Path(found[1]) == REPO / "entrypoints" / "evaluate.py"


def config_field(dotted: str):
    """The pydantic field of ExperimentConfig at `dotted` (e.g. merge.density)."""
    model: object = ExperimentConfig
    field = None
    for part in dotted.split("."):
        assert isinstance(model, type) and issubclass(model, BaseModel), f"{dotted}: {part} is inside a value"
        assert part in model.model_fields, f"{dotted}: no field {part!r}"
        field = model.model_fields[part]
        ann = field.annotation
        model = next((c for c in (ann, *typing.get_args(ann)) if isinstance(c, type) and issubclass(c, BaseModel)),
                     None)
    return field


def test_config_options_set_real_fields() -> None:
    """CLI options that set config fields (passed typed to load_config) name real fields and say which."""
    used = set()
    for name, field in CONFIG_OPTIONS.items():
        assert config_field(field) is not None
        assert model_is_leaf(field), f"{name} -> {field} is a section, not a value"
    for path, command in cli_commands().items():
        for p in command.params:
            if p.name in CONFIG_OPTIONS:
                used.add(p.name)
                assert CONFIG_OPTIONS[p.name] in (p.help or ""), f"mllm {path} --{p.name}: help does not name its field"
    assert used == set(CONFIG_OPTIONS)


def model_is_leaf(dotted: str) -> bool:
    ann = config_field(dotted).annotation
    return not any(isinstance(c, type) and issubclass(c, BaseModel) for c in (ann, *typing.get_args(ann)))


def test_conda_env_installs_this_package() -> None:
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert pip == ["-e ."]


@pytest.mark.slow
def test_mlflow_run_entry_points(tmp_path: Path) -> None:
    """`mlflow run . -e validate|main --env-manager local` as a user runs it, in a scratch tracking store; main
    is the whole pipeline on the tiny config."""
    from mlflow import MlflowClient

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    ok = subprocess.run([mlflow, "run", str(REPO), "-e", "validate", "-P", f"config={REPO}/configs/tiny.yaml",
                         "-P", "overrides=merge.method=linear", "--env-manager", "local"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "merge linear" in ok.stdout
    bad = subprocess.run([mlflow, "run", str(REPO), "-e", "validate", "-P", f"config={REPO}/configs/tiny.yaml",
                          "-P", "overrides=merge.colour=red", "--env-manager", "local"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown key 'merge.colour'" in bad.stderr
    main = subprocess.run([mlflow, "run", str(REPO), "-e", "main", "-P", f"config={REPO}/configs/tiny.yaml",
                           "-P", f"overrides=evaluate.bootstrap_samples=200 tracking.tracking_uri=sqlite:///{tmp_path}"
                           f"/mlflow-tiny.db search.storage=sqlite:///{tmp_path}/optuna-tiny.db "
                           f"output_dir={tmp_path}/o",
                           "--env-manager", "local"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert main.returncode == 0, main.stderr[-3000:]
    # The whole flow: members, standard merges, evaluation, >= 10 trials, a champion, the report table.
    assert "| models:/tiny-merged/5 | merged |" in main.stdout and "best member:" in main.stdout
    assert "champion: models:/tiny-merged@champion" in main.stdout and "mlflow ui --backend-store-uri" in main.stdout
    import optuna

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{tmp_path}/optuna-tiny.db")
    assert len([t for t in study.trials if t.state.is_finished()]) >= 10
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow-tiny.db")
    champion = client.get_model_version_by_alias("tiny-merged", "champion")
    assert champion.tags["study"] == "tiny-search" and champion.tags["parents"].count("tiny-finetuned") == 3
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}


@pytest.mark.slow
def test_mlflow_run_finetune_then_merge_tiny(tmp_path: Path) -> None:
    """The acceptance commands: base + 3 tiny members trained and registered under the project run, merged,
    evaluated with baselines and reported, each through `mlflow run`."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow-tiny.db"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "finetune",
                           "-P", f"config={REPO}/configs/tiny.yaml", "-P", f"overrides=tracking.tracking_uri={uri}",
                           "--env-manager", "local"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry an earlier test set
    versions = client.search_model_versions("name = 'tiny-finetuned'")
    assert sorted(v.tags["member"] for v in versions) == ["full", "shard-0", "shard-1", "shard-2"]
    assert len(client.search_model_versions("name = 'tiny-base'")) == 1
    all_runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    stage = next(r for r in all_runs if r.info.run_name == "finetune")
    project_run = stage.data.tags["mlflow.parentRunId"]  # the run `mlflow run` opened is the stage's parent
    assert client.get_run(project_run).data.tags.get("mlflow.project.entryPoint") == "finetune"

    merged = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "merge",
                             "-P", f"config={REPO}/configs/tiny.yaml", "-P", f"overrides=tracking.tracking_uri={uri}",
                             "-P", "method=ties", "--env-manager", "local"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    [version] = client.search_model_versions("name = 'tiny-merged'")
    parents = version.tags["parents"].split(",")
    assert sorted(parents) == sorted(f"models:/tiny-finetuned/{v.version}" for v in versions
                                     if v.tags["member"] != "full")
    assert version.tags["method"] == "ties"

    for entry, params in (("evaluate", ["-P", "split=validation"]), ("report", ["-P", "split=validation"])):
        done = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", entry,
                               "-P", f"config={REPO}/configs/tiny.yaml", "-P",
                               f"overrides=tracking.tracking_uri={uri} evaluate.bootstrap_samples=200", *params,
                               "--env-manager", "local"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"| models:/tiny-merged/{version.version} | merged | ties |" in done.stdout
    evaluations = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.`mllm.stage` = 'evaluation'",
                                     output_format="list")
    assert len(evaluations) == 9  # 3 members, ensemble, full-data member, base, the merge, majority, TF-IDF
