"""MLproject, entrypoints/ and the CLI describe the same stages with the same parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import BaseModel

from mllm.cli import CONFIG_OPTIONS, app
from mllm.config import ExperimentConfig
from mllm.entry import COMMANDS, cli_argv, entry_parameters, run_entry
from mllm.errors import MllmError
from mllm.tracking.runs import PROJECT_RUN_ENV

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
    "layer_groups": ("3", 3), "method": ("dare_ties", "dare_ties"),
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


# --- `mlflow run`'s own run ------------------------------------------------------------------------------------
TINY = str(REPO / "configs" / "tiny.yaml")


def open_project_run(monkeypatch: pytest.MonkeyPatch, uri: str, experiment: str | None, entry_point: str) -> str:
    """What `mlflow run -e <entry_point> [--experiment-name <experiment>]` does before it starts the entry point: a
    run in that experiment (None: Default) of its store, handed over in MLFLOW_RUN_ID, _EXPERIMENT_ID, _TRACKING_URI."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment) if experiment else "0"
    run = client.create_run(experiment_id, tags={"mlflow.project.entryPoint": entry_point,
                                                 "mlflow.source.type": "PROJECT"})
    monkeypatch.delenv(PROJECT_RUN_ENV, raising=False)
    for var, value in (("MLFLOW_RUN_ID", run.info.run_id), ("MLFLOW_EXPERIMENT_ID", experiment_id),
                       ("MLFLOW_TRACKING_URI", uri)):
        monkeypatch.setenv(var, value)
    return run.info.run_id


def fake_merge(monkeypatch: pytest.MonkeyPatch, error: bool = False) -> list:
    """`mllm.merge.run` replaced by a stage that opens one real tracked run (and fails in it when `error`)."""
    calls: list = []

    def run(cfg, *args, **kwargs):
        from mllm.tracking.store import Store

        calls.append(cfg)
        with Store(cfg).run(f"merge-{cfg.merge.method}", stage="merge") as stage:
            if error:
                raise MllmError("the stage failed", "fix it")
        return types.SimpleNamespace(method=cfg.merge.method, parents=["a"], model_uri="models:/m/1", run_id=stage.id)

    module = types.ModuleType("mllm.merge")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mllm.merge", module)
    return calls


def runs_of(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


@pytest.mark.parametrize("error", [False, True], ids=["ok", "stage-fails"])
def test_entry_point_adopts_the_mlflow_run_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], error: bool) -> None:
    """`mlflow run . -e merge --experiment-name tiny`: one top-level run, named merge, in the config's experiment,
    the stage's run nested under it, both ended (FAILED when the stage fails); nothing in Default."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    project = open_project_run(monkeypatch, uri, "tiny", "merge")
    calls = fake_merge(monkeypatch, error)
    with pytest.raises(SystemExit) as info:
        run_entry("merge", ["--config", TINY, "--overrides", f"tracking.tracking_uri={uri} output_dir={tmp_path}/o",
                            "--method", "linear", "--force", ""])
    assert (info.value.code or 0) == (2 if error else 0), capsys.readouterr().err
    assert [c.merge.method for c in calls] == ["linear"]
    runs = {r.info.run_name: r for r in runs_of(uri, "tiny")}
    assert set(runs) == {"merge", "merge-linear"} and not runs_of(uri, "Default")
    top, stage = runs["merge"], runs["merge-linear"]
    assert top.info.run_id == project and "mlflow.parentRunId" not in top.data.tags
    assert top.data.tags["mllm.entry_point"] == "merge" and "mllm.git_sha" in top.data.tags
    assert stage.data.tags["mlflow.parentRunId"] == project
    assert {top.info.status, stage.info.status} == {"FAILED" if error else "FINISHED"}
    assert "MLFLOW_RUN_ID" not in os.environ and PROJECT_RUN_ENV not in os.environ


def test_entry_point_under_mlflow_run_as_a_process(tmp_path: Path) -> None:
    """`python -m entrypoints.validate` with the variables `mlflow run` sets: its run is named validate, FINISHED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("tiny"), tags={"mlflow.project.entryPoint": "validate"})
    env = {**os.environ, "MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_EXPERIMENT_ID": run.info.experiment_id,
           "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "entrypoints.validate", "--config", TINY, "--overrides",
                           f"tracking.tracking_uri={uri}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    done = client.get_run(run.info.run_id)
    assert (done.info.run_name, done.info.status) == ("validate", "FINISHED")
    assert len(runs_of(uri, "tiny")) == 1 and not runs_of(uri, "Default")


@pytest.mark.parametrize("where", ["experiment", "store"])
def test_entry_point_refuses_a_run_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], where: str) -> None:
    """`mlflow run` without --experiment-name (its run in Default) or on another store than the config's: MLflow
    cannot move runs, so one line naming the fix, exit 2, its run FAILED, nothing else created."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config_uri = uri if where == "experiment" else f"sqlite:///{tmp_path}/other.db"
    project = open_project_run(monkeypatch, uri, None if where == "experiment" else "tiny", "merge")
    calls = fake_merge(monkeypatch)
    with pytest.raises(SystemExit) as info:
        run_entry("merge", ["--config", TINY, "--overrides", f"tracking.tracking_uri={config_uri}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("mllm: error: mlflow run ")
    assert ("fix: pass --experiment-name tiny to mlflow run" if where == "experiment" else
            f"fix: run MLFLOW_TRACKING_URI={config_uri} mlflow run") in err
    client = MlflowClient(uri)
    every = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not calls and [(r.info.run_id, r.info.status) for r in every] == [(project, "FAILED")]
    if where == "experiment":
        assert client.get_experiment_by_name("tiny") is None
    else:
        assert not (tmp_path / "other.db").exists()


def test_stage_run_is_no_child_of_a_run_in_another_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A stage started inside `mlflow run` without an entry point (MLFLOW_RUN_ID in Default): its run is not
    parented across experiments, and mlflow does not reattach to that run."""
    from mllm.config import load_config
    from mllm.tracking.store import Store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    open_project_run(monkeypatch, uri, None, "merge")
    cfg = load_config(TINY, [f"tracking.tracking_uri={uri}", f"output_dir={tmp_path}/o"])
    with Store(cfg).run("merge-ties", stage="merge", log_config=False, system_metrics=False):
        pass
    [run] = runs_of(uri, "tiny")
    assert run.info.run_name == "merge-ties" and "mlflow.parentRunId" not in run.data.tags
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_run_entry_points(tmp_path: Path) -> None:
    """`MLFLOW_TRACKING_URI=<the config's> mlflow run . -e validate|main --experiment-name tiny --env-manager local`
    as a user runs it, in a scratch tracking store; main is the whole pipeline on the tiny config. Without
    --experiment-name, one line says to pass it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow-tiny.db"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    ok = subprocess.run([mlflow, "run", str(REPO), "-e", "validate", "--experiment-name", "tiny", "-P",
                         f"config={REPO}/configs/tiny.yaml", "-P", f"overrides=merge.method=linear "
                         f"tracking.tracking_uri={uri}", "--env-manager", "local"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "merge linear" in ok.stdout
    bad = subprocess.run([mlflow, "run", str(REPO), "-e", "validate", "--experiment-name", "tiny", "-P",
                          f"config={REPO}/configs/tiny.yaml", "-P", "overrides=merge.colour=red", "--env-manager",
                          "local"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown key 'merge.colour'" in bad.stderr
    elsewhere = subprocess.run([mlflow, "run", str(REPO), "-e", "validate", "-P", f"config={REPO}/configs/tiny.yaml",
                                "-P", f"overrides=tracking.tracking_uri={uri}", "--env-manager", "local"],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
    assert elsewhere.returncode != 0 and "fix: pass --experiment-name tiny to mlflow run" in elsewhere.stderr
    main = subprocess.run([mlflow, "run", str(REPO), "-e", "main", "--experiment-name", "tiny", "-P",
                           f"config={REPO}/configs/tiny.yaml", "-P", f"overrides=evaluate.bootstrap_samples=200 "
                           f"tracking.tracking_uri={uri} search.storage=sqlite:///{tmp_path}/optuna-tiny.db "
                           f"output_dir={tmp_path}/o", "--env-manager", "local"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert main.returncode == 0, main.stderr[-3000:]
    # The whole flow: members, standard merges, evaluation, >= 10 trials, a champion, the report table.
    assert "| models:/tiny-merged/5 | merged |" in main.stdout and "best member:" in main.stdout
    assert "champion: models:/tiny-merged@champion" in main.stdout and "mlflow ui --backend-store-uri" in main.stdout
    import optuna

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{tmp_path}/optuna-tiny.db")
    assert len([t for t in study.trials if t.state.is_finished()]) >= 10
    client = MlflowClient(tracking_uri=uri)
    champion = client.get_model_version_by_alias("tiny-merged", "champion")
    assert champion.tags["study"] == "tiny-search" and champion.tags["parents"].count("tiny-finetuned") == 3
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    # One top-level run per `mlflow run` (the one refused without --experiment-name is in Default, FAILED).
    top = sorted((r.info.run_name, r.info.status) for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert [t for t in top if t[0] in ("validate", "main")] == [("main", "FINISHED"), ("validate", "FINISHED")]
    assert [r.info.status for r in client.search_runs(["0"])] == ["FAILED"]


@pytest.mark.slow
def test_mlflow_run_finetune_then_merge_tiny(tmp_path: Path) -> None:
    """The acceptance commands: base + 3 tiny members trained and registered under the project run, merged,
    evaluated with baselines and reported, each through `mlflow run --experiment-name tiny`: one top-level run each,
    named after its entry point, in the config's experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow-tiny.db"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "finetune",
                           "--experiment-name", "tiny", "-P", f"config={REPO}/configs/tiny.yaml",
                           "-P", f"overrides=tracking.tracking_uri={uri}", "--env-manager", "local"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry an earlier test set
    versions = client.search_model_versions("name = 'tiny-finetuned'")
    assert sorted(v.tags["member"] for v in versions) == ["full", "shard-0", "shard-1", "shard-2"]
    assert len(client.search_model_versions("name = 'tiny-base'")) == 1
    all_runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    stage = next(r for r in all_runs if r.data.tags.get("mllm.stage") == "finetune")
    project_run = client.get_run(stage.data.tags["mlflow.parentRunId"])  # `mlflow run`'s run: the stage's parent
    assert project_run.data.tags.get("mlflow.project.entryPoint") == "finetune"
    assert project_run.info.run_name == "finetune" and "mlflow.parentRunId" not in project_run.data.tags

    merged = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "merge",
                             "--experiment-name", "tiny", "-P", f"config={REPO}/configs/tiny.yaml",
                             "-P", f"overrides=tracking.tracking_uri={uri}", "-P", "method=ties",
                             "--env-manager", "local"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    [version] = client.search_model_versions("name = 'tiny-merged'")
    parents = version.tags["parents"].split(",")
    assert sorted(parents) == sorted(f"models:/tiny-finetuned/{v.version}" for v in versions
                                     if v.tags["member"] != "full")
    assert version.tags["method"] == "ties"

    for entry, params in (("evaluate", ["-P", "split=validation"]), ("report", ["-P", "split=validation"])):
        done = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", entry,
                               "--experiment-name", "tiny", "-P", f"config={REPO}/configs/tiny.yaml", "-P",
                               f"overrides=tracking.tracking_uri={uri} evaluate.bootstrap_samples=200", *params,
                               "--env-manager", "local"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"| models:/tiny-merged/{version.version} | merged | ties |" in done.stdout
    evaluations = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.`mllm.stage` = 'evaluation'",
                                     output_format="list")
    assert len(evaluations) == 9  # 3 members, ensemble, full-data member, base, the merge, majority, TF-IDF
    all_runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    top = sorted(r.info.run_name for r in all_runs if "mlflow.parentRunId" not in r.data.tags)
    assert top == ["evaluate", "finetune", "merge", "report"] and {r.info.status for r in all_runs} == {"FINISHED"}
    assert not client.search_runs(["0"])  # nothing in Default
