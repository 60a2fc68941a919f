"""MLproject, entrypoints/ and the CLI describe the same stages with the same parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from mllm.cli import app
from mllm.entry import ENTRY_POINTS, entry_argv

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


def test_entry_points_match_files_and_cli() -> None:
    project = mlproject()["entry_points"]
    files = {p.stem for p in (REPO / "entrypoints").glob("*.py") if not p.stem.startswith("_")}
    assert set(project) == set(ENTRY_POINTS) == files
    commands = cli_commands()
    for name, spec in project.items():
        entry = ENTRY_POINTS[name]
        assert set(spec["parameters"]) == {"config", "overrides", *entry.options}
        for param in spec["parameters"]:
            assert f"--{param} {{{param}}}" in spec["command"], f"{name}: {param} is not passed on"
        assert f"entrypoints/{name}.py" in spec["command"]
        command = commands.get(" ".join(entry.command))
        assert command is not None, f"{name} -> mllm {' '.join(entry.command)} is not a CLI command"
        options = {o for p in command.params for o in p.opts}
        arguments = {p.name for p in command.params if not p.opts[0].startswith("-")}
        assert {o for o in entry.options.values() if o} <= options and "--set" in options
        assert {p for p, o in entry.options.items() if not o} <= arguments
        assert ("--config" in options) == entry.config_option
        extra = [a for p in entry.options for a in (f"--{p}", "x,y")]
        argv = entry_argv(name, ["--config", "c.yaml", "--overrides", "a.b=1 c.d='x y'", *extra])
        assert argv[-4:] == ["--set", "a.b=1", "--set", "c.d=x y"]
        for param, option in entry.options.items():
            if option:
                assert argv.count(option) == (2 if param in entry.repeat else 1)
            else:  # positional: the value follows no option
                only = entry_argv(name, ["--config", "c.yaml", f"--{param}", "v"])
                assert only.count("v") == 1 and not only[only.index("v") - 1].startswith("-")


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
    assert sorted(v.tags["member"] for v in versions) == ["shard-0", "shard-1", "shard-2"]
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
    assert sorted(parents) == sorted(f"models:/tiny-finetuned/{v.version}" for v in versions)
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
    assert len(evaluations) == 6  # 3 members, their ensemble, the base, the merge
