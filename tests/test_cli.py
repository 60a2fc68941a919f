"""The `mllm` CLI as users run it: output, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typer

from mllm.cli import CONFIG_OPTIONS, app, config_field, main

from .conftest import REPO


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_data_stats_json_on_the_sample(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["data", "stats", "--dataset", "drugscom-sample", "--format", "json"], capsys)
    assert code == 0
    [ds] = json.loads(out)["datasets"]
    assert ds["rows"] == 979 and ds["name"] == "drugscom-sample"
    assert ds["words"]["mean"] == pytest.approx(85.6, abs=0.05) and ds["words"]["median"] == 86
    assert sum(ds["splits"].values()) == 978  # one duplicate review dropped


def test_data_stats_table_reproduces_the_study_columns(capsys: pytest.CaptureFixture[str], shared_data: Path) -> None:
    code, out, _ = run_cli(["data", "stats", "--config", str(REPO / "configs" / "domains.yaml")], capsys)
    assert code == 0
    for name, mean in (("drug", "85.6"), ("yelp", "131.0"), ("android", "12.0")):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert mean in line


def test_validate_ok_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["validate", str(REPO / "configs" / "tiny.yaml"), "--set", "merge.method=linear"], capsys)
    assert code == 0 and "ok" in out and "merge linear" in out


BAD = [
    (["validate", "{tmp}/unknown.yaml"], "merge:\n  colour: red\n", "unknown key 'merge.colour'"),
    (["validate", "{tmp}/malformed.yaml"], "merge: {method: ties\n", "malformed YAML"),
    (["validate", "{tmp}/type.yaml"], "finetune:\n  batch_size: big\n", "finetune.batch_size"),
    (["validate", "{tmp}/range.yaml"], "merge:\n  density: 1.2\n", "merge.density"),
    (["validate", "{tmp}/absent.yaml"], None, "not found"),
    (["data", "stats", "--dataset", "{tmp}/empty.csv"], "", "is empty"),
    (["data", "stats", "--dataset", "{tmp}/nolabel.csv"], "text,stars\nfine,3\n", "no column 'label'"),
    (["data", "stats", "--dataset", "{tmp}/nan.csv"], "text,label\nfine,3\nbad,\n", "missing label"),
    (["data", "stats", "--dataset", "nonexistent-set"], None, "not a configured dataset, preset or existing file"),
    (["data", "stats", "--set", "data.label_scheme=rating10", "--dataset", "drugscom-sample"], None,
     "has sentiment labels"),
    (["study", "{tmp}/absent.yaml"], None, "not found"),
    (["study", "{tmp}/bad-study.yaml"], "study: s\ncolour: red\n", "bad-study.yaml"),
    (["merge", "--method", "soup"], None, "'soup' is not one of 'linear'"),
    (["evaluate", "--split", "dev"], None, "'dev' is not one of 'train', 'validation', 'test'"),
    (["search", "--colour", "red"], None, "No such option: --colour; fix: see mllm search --help"),
]


@pytest.mark.parametrize(("args", "content", "expected"), BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         content: str | None, expected: str) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    if content is not None:
        Path(next(a for a in args if a.startswith(str(tmp_path)))).write_text(content)
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mllm: error: ") and expected in err
    assert "Traceback" not in err


def test_console_script_subprocess(tmp_path: Path) -> None:
    """The installed `mllm` script: exit 2, one stderr line, no traceback (as a shell user sees it)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  objective_split: test\n")
    exe = Path(sys.executable).with_name("mllm")
    proc = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "objective_split" in proc.stderr


def test_help_is_instant_and_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "validate" in out and "data" in out
    proc = subprocess.run([sys.executable, "-c", "import sys, mllm.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"  # heavy libraries load inside commands only


def fake_stage(monkeypatch: pytest.MonkeyPatch, stage: str, result: object) -> list:
    """Replace `mllm.<stage>` (its `run(cfg, ...)`) by a stand-in that records the config it gets."""
    seen: list = []
    module = types.ModuleType(f"mllm.{stage}")
    module.run = lambda cfg, *args, **kwargs: seen.append(cfg) or result  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"mllm.{stage}", module)
    return seen


def test_config_options_reach_load_config_typed(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--density 0.4 --weights 1,2,3` arrive as a float and a list of floats (no --set strings in between)."""
    merged = types.SimpleNamespace(method="ties", parents=["a"], model_uri="models:/m/1", run_id="r")
    seen = fake_stage(monkeypatch, "merge", merged)
    code, out, _ = run_cli(["merge", "--density", "0.4", "--weights", "1,2,3", "--method", "linear"], capsys)
    assert code == 0 and "models:/m/1" in out
    [cfg] = seen
    assert cfg.merge.density == 0.4 and cfg.merge.weights == [1.0, 2.0, 3.0] and cfg.merge.method == "linear"

    seen = fake_stage(monkeypatch, "search", types.SimpleNamespace())
    code, _, _ = run_cli(["search", "--set", "search.n_trials=3", "--n-trials", "7", "--sampler", "random",
                          "--study-name", "s: x", "--storage", "sqlite:///o.db"], capsys)
    assert code == 0
    [cfg] = seen
    assert (cfg.search.n_trials, cfg.search.sampler, cfg.search.study_name, cfg.search.storage) == \
        (7, "random", "s: x", "sqlite:///o.db")  # the option wins over --set; no YAML parsing of "s: x"

    code, _, err = run_cli(["merge", "--weights", "1,x"], capsys)
    assert code == 2 and err.startswith("mllm: error: --weights '1,x'") and err.count("\n") == 1


def cli_options() -> list[tuple[str, object]]:
    """(command name, click option) of every CLI option that sets a config field."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return [(name, p) for name, cmd in commands.items() if hasattr(cmd, "params") for p in cmd.params
            if p.name in CONFIG_OPTIONS]


@pytest.mark.parametrize(("command", "param"), cli_options(), ids=lambda x: getattr(x, "name", x))
def test_config_option_help_and_choices_come_from_the_schema(command: str, param, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """One source: an option that sets a field has the field's description as its help, and a Literal field's values
    as its choices (each accepted, anything else refused in one line, exit 2)."""
    field = CONFIG_OPTIONS[param.name]
    description = config_field(field).description
    assert description and param.help == f"{description} Sets {field}."
    annotation = config_field(field).annotation
    literal = next((t for t in (annotation, *typing.get_args(annotation)) if typing.get_origin(t) is typing.Literal),
                   None)
    if literal is None:
        return
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    option = next(o for o in param.opts if o.startswith("--"))
    for value in typing.get_args(literal):
        assert click_command.make_context(f"mllm {command}", [option, value]).params[param.name] == value
    code, _, err = run_cli([command, option, "not-a-choice"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"mllm: error: Invalid value for '{option}'")
    assert f"'not-a-choice' is not one of '{typing.get_args(literal)[0]}'" in err


def test_study_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["study", "--help"], capsys)
    assert code == 0
    for option in ("--arm", "--fold", "--report-only", "--no-report", "--export", "--import"):
        assert option in out, option
    assert "CONFIG" in out.upper()


def test_study_script_is_the_cli_command() -> None:
    """scripts/study.py is a shim: its errors are the CLI's (one line `mllm: error: ...`, exit 2)."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), "absent.yaml", "--fold", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("mllm: error: study config absent.yaml not found")
    assert proc.stderr.count("\n") == 1
