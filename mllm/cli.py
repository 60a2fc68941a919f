"""The `mllm` command line: a thin Typer layer over the library functions.

    mllm validate configs/default.yaml --set merge.method=ties
    mllm data stats --dataset drugscom-sample --format json

User errors (`MllmError`) print one line on stderr and exit with code 2; heavy libraries are imported
inside commands so that `mllm --help` stays instant (`mllm.config`, `mllm.errors`, `mllm.basics` are light).

Options that set a config field (`merge --density 0.4`) are listed once, in `CONFIG_OPTIONS`; their help is the
field's description and their choices the field's Literal values (one source: the schema); their typed values
reach `load_config(..., values=...)` as they are, never re-written as `--set` strings. MLflow Project entry points
(`mllm.entry`) derive their parameters from these commands.
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mllm.basics import quiet_libraries, redact
from mllm.config import ExperimentConfig, load_config
from mllm.errors import ConfigError, MllmError, Terminated, disk_full

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evaluate merged language models on text classification, tracked in MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the configured datasets.")
app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment config (default: built-in "
                                                "defaults, the same as configs/default.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override KEY=VALUE (dotted, e.g. "
                                                  "merge.method=ties); repeatable.")]


# CLI options that set a config field: the option's parameter name (`n_trials` for `--n-trials`, also its MLflow
# Project parameter) -> the dotted field. Commands pass their values typed, as `load_config(values=...)`; the tests
# check that each field exists in ExperimentConfig and that each option's help and choices are its field's.
CONFIG_OPTIONS: dict[str, str] = {
    "method": "merge.method",
    "weights": "merge.weights",
    "density": "merge.density",
    "n_trials": "search.n_trials",
    "workers": "search.workers",
    "storage": "search.storage",
    "study_name": "search.study_name",
    "sampler": "search.sampler",
    "layer_groups": "search.layer_groups",
}


def config_field(dotted: str) -> Any:
    """The pydantic field of ExperimentConfig at `dotted` (`merge.density`: MergeConfig's `density`)."""
    *sections, leaf = dotted.split(".")
    model: Any = ExperimentConfig
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[leaf]


def field_option(name: str, **kwargs: Any) -> Any:
    """The typer option for parameter `name` of CONFIG_OPTIONS: the field's description, naming the field."""
    help = f"{config_field(CONFIG_OPTIONS[name]).description} Sets {CONFIG_OPTIONS[name]}."
    return typer.Option(help=help, **kwargs)


def field_choices(dotted: str) -> Any:
    """The Literal type of the field at `dotted` (typer turns it into the option's choices)."""
    annotation = config_field(dotted).annotation
    return next(t for t in (annotation, *typing.get_args(annotation)) if typing.get_origin(t) is typing.Literal)


# Choices read from the schema (typer makes a Literal a choice: a value outside it exits 2 in one line).
MergeMethodName = field_choices(CONFIG_OPTIONS["method"])
SamplerName = field_choices(CONFIG_OPTIONS["sampler"])
SplitName = field_choices("evaluate.split")


def config_values(**options: Any) -> dict[str, Any]:
    """Typed `load_config` values of config-field options, by dotted field (None: not given, skipped)."""
    return {CONFIG_OPTIONS[name]: value for name, value in options.items()}


def parse_floats(option: str, text: str | None) -> list[float] | None:
    """`"0.5,0.3,0.2"` -> `[0.5, 0.3, 0.2]` (None or "" -> None); anything else is a ConfigError."""
    if text is None or not text.strip():
        return None
    try:
        return [float(item) for item in text.strip().strip("[]").split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not comma-separated numbers",
                          f"write e.g. {option} 0.5,0.3,0.2") from None


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (and overrides) without running anything."""
    cfg = load_config(config, set_ or [])
    names = ", ".join(d.name for d in cfg.data.datasets)
    typer.echo(f"{config}: ok (experiment {cfg.name}; data {names}; label scheme {cfg.data.label_scheme}; "
               f"model {cfg.model.name_or_path}; {cfg.finetune.members} members; merge {cfg.merge.method})")


@data_app.command("stats")
def data_stats(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help="A configured dataset name, a preset (drugscom-sample, drugscom, druglib, "
        "lewtun/drug-reviews, yelp_review_full, app_reviews) or a local file; repeatable (default: all "
        "configured datasets).")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", "-f", help="table or json.")] = OutputFormat.table,
) -> None:
    """Rows, label distribution and words per review (mean / median / std) of each dataset, plus split sizes."""
    from mllm.data.stats import collect_stats, render_table

    cfg = load_config(config, set_ or [])
    report = collect_stats(cfg.data, dataset or [])
    if output is OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_table(report)


@app.command()
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="Train only these members (e.g. shard-1); repeatable. Default: all.")] = None,
    parent_run_id: Annotated[str | None, typer.Option(
        help="Nest member runs under this existing run (parallel members, e.g. Slurm arrays).")] = None,
    base_only: Annotated[bool, typer.Option(help="Build and register the base classifier only.")] = False,
    force: Annotated[bool, typer.Option(help="Retrain members even if the same one is registered.")] = False,
) -> None:
    """Build the shared base classifier and fine-tune the members from it; register each in MLflow."""
    from mllm.finetune import run

    cfg = load_config(config, set_ or [])
    result = run(cfg, member or None, parent_run_id=parent_run_id or None, base_only=base_only, force=force)
    typer.echo(f"base: {result.base_uri}")
    for m in result.members:
        state = "reused" if m.reused else f"{m.wall_s:.1f} s"
        typer.echo(f"{m.name}: {m.model_uri}  val macro-F1 {m.val_metrics.get('macro_f1', float('nan')):.4f}"
                   f"  accuracy {m.val_metrics.get('accuracy', float('nan')):.4f}  ({state})")
    if result.parent_run_id:
        typer.echo(f"parent run: {result.parent_run_id}")


@app.command()
def merge(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    method: Annotated[MergeMethodName | None, field_option("method")] = None,
    weights: Annotated[str | None, field_option("weights", metavar="W1,W2,...")] = None,
    density: Annotated[float | None, field_option("density")] = None,
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="Member model URI (models:/..., runs:/..., folder); repeatable. Default: the "
        "experiment's newest registered members.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model URI (default: the newest registered base).")] = None,
    force: Annotated[bool, typer.Option(help="Merge again even if the same merge is registered.")] = False,
) -> None:
    """Merge fine-tuned members with mergekit; log the recipe and register the merged classifier."""
    from mllm.merge import run

    cfg = load_config(config, set_ or [], values=config_values(
        method=method, weights=parse_floats("--weights", weights), density=density))
    result = run(cfg, member or None, base, force=force)
    typer.echo(f"{result.method} merge of {', '.join(result.parents)} -> {result.model_uri} (run {result.run_id})")


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Model to score: models:/name/version, models:/name@alias, runs:/id/path or a folder; "
        "repeatable. Default: every merge of the experiment's newest base.")] = None,
    split: Annotated[SplitName | None, typer.Option(help="Split to score (default: evaluate.split).")] = None,
    baselines: Annotated[bool | None, typer.Option(
        "--baselines/--no-baselines", help="Also score members, their ensemble, the base (evaluate.baselines).",
        show_default=False)] = None,
) -> None:
    """Score models on a split (accuracy, macro-F1 with CIs, per-class P/R/F1, NLL, ECE) with baselines."""
    from mllm.evaluate import run

    cfg = load_config(config, set_ or [])
    result = run(cfg, model or None, split, baselines)
    typer.echo(f"{len(result.evaluations)} evaluations on {result.split} (run {result.run_id}); "
               f"compare them with: mllm report {cfg.name} --split {result.split}")


@app.command()
def report(
    experiment: Annotated[str | None, typer.Argument(help="Experiment name (default: the config's name).",
                                                     show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[SplitName | None, typer.Option(help="Split (default: evaluate.split).")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", "-f", help="table (markdown) or json.")] =
    OutputFormat.table,
) -> None:
    """Print (and log as report.md) the comparison table: each model's accuracy and macro-F1 with CIs, cost,
    and the paired test against the best member."""
    from mllm.evaluation.report import run, to_json

    cfg = load_config(config, set_ or [])
    result = run(cfg, experiment, split)
    typer.echo(to_json(result) if output is OutputFormat.json else result.markdown)


@app.command()
def search(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    n_trials: Annotated[int | None, field_option("n_trials")] = None,
    workers: Annotated[int | None, field_option("workers")] = None,
    storage: Annotated[str | None, field_option("storage")] = None,
    study_name: Annotated[str | None, field_option("study_name")] = None,
    sampler: Annotated[SamplerName | None, field_option("sampler")] = None,
    layer_groups: Annotated[int | None, field_option("layer_groups")] = None,
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="Member URI; repeatable (default: the experiment's registered members).")] = None,
    base: Annotated[str | None, typer.Option(help="Base URI (with --member).")] = None,
    parent_run_id: Annotated[str | None, typer.Option(help="Nest this worker's runs under this run.")] = None,
    create_only: Annotated[bool, typer.Option(help="Create the study (and its schema) and exit: run once before "
                                              "starting workers on several machines.")] = False,
    worker_index: Annotated[int | None, typer.Option(
        help="This process's index among independent workers of one study; names it in the trials' runs (default "
        "$SLURM_ARRAY_TASK_ID, else 0). Proposals depend on each trial's index, never on the worker.")] = None,
) -> None:
    """Search merge recipes with Optuna: in-memory merges scored on the validation split."""
    import os

    from mllm.search import run

    cfg = load_config(config, set_ or [], values=config_values(
        n_trials=n_trials, workers=workers, storage=storage, study_name=study_name, sampler=sampler,
        layer_groups=layer_groups))
    if worker_index is None:
        worker_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    result = run(cfg, member or None, base, parent_run_id=parent_run_id, create_only=create_only,
                 worker_index=worker_index)
    if create_only:
        typer.echo(f"study {result.study_name} ready in {result.storage} ({result.trials} trials finished)")


@app.command()
def promote(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: Annotated[str | None, field_option("storage")] = None,
    study_name: Annotated[str | None, field_option("study_name")] = None,
) -> None:
    """Merge the search's chosen recipe (search.choice) with mergekit, set `challenger`, gate `champion` on the rows
    the search never optimised (promote.split), then score it on test for the report."""
    from mllm.promote import run

    run(load_config(config, set_ or [], values=config_values(storage=storage or None, study_name=study_name or None)))


@app.command()
def pipeline(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole flow: fine-tune, merge (linear, ties, dare_ties, dare_linear, greedy soup), score on validation,
    search, promote (decided on held-out validation rows), evaluate on test once, report; finished stages are
    reused."""
    from mllm.pipeline import run

    cfg = load_config(config, set_ or [])
    result = run(cfg)
    typer.echo("")
    typer.echo(result.report_markdown)
    typer.echo(f"champion: {result.champion or 'none'}; stages: " +
               ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()))
    uri = redact(cfg.tracking.tracking_uri)
    server = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"{server.rstrip('/')}/#/experiments/{result.experiment_id}/models?workflowType=machine_learning"
    typer.echo(f"Open the runs: {uri} in a browser" if uri.startswith(("http://", "https://"))
               else f"Open the runs: mlflow ui --backend-store-uri {uri}")
    typer.echo(f"Compare the models (Models tab): {page}")
    typer.echo(f"Use the champion: mlflow.pyfunc.load_model('{result.champion}'), or mlflow models serve -m "
               f"{result.champion} --env-manager local" if result.champion else
               f"No merge earned @champion: {result.promotion}")


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/studies/drugs.yaml.",
                                           show_default=False)],
    arm: Annotated[list[str] | None, typer.Option("--arm", help="Run only this arm; repeatable.")] = None,
    fold: Annotated[list[int] | None, typer.Option("--fold", help="Run only this fold; repeatable.")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Write RESULTS.md from the finished cells "
                                              "only.")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Run the cells, do not write RESULTS.md.")] = False,
    export: Annotated[Path | None, typer.Option("--export", metavar="TAR_GZ", help="Then write the light store "
                                                "(databases, small artifacts).")] = None,
    import_: Annotated[Path | None, typer.Option("--import", metavar="TAR_GZ", help="First unpack a light store "
                                                 "written by --export (into an empty study store).")] = None,
) -> None:
    """Run (or resume) a study, arms x folds cells each an MLflow experiment <study>-<arm>-f<fold>, and write its
    RESULTS.md from the study's MLflow runs. Finished cells are reused, registered members are not retrained."""
    from mllm.study.config import load_study
    from mllm.study.runner import run_study, write_report
    from mllm.study.store import export_store, import_store

    spec = load_study(config)
    bad = [f for f in fold or [] if not 0 <= f < spec.folds]
    if bad:
        raise ConfigError(f"--fold {bad[0]}: the study has folds 0..{spec.folds - 1}", "pass one of those")
    if import_:
        import_store(spec, import_)
    if not report_only:
        run_study(spec, arm or None, fold or None)
    if not no_report:
        write_report(spec, str(config))
    if export:
        export_store(spec, export)


# typer >= 0.24 bundles its own click: its exceptions are not the `click` package's, so take them from typer.
_CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def usage_line(error: Exception) -> str | None:
    """A usage error (a value outside an option's choices, an unknown option) as one line naming `--help`; None
    for what click shows in full (the help of a group called without a command)."""
    if not isinstance(error, _USAGE_ERROR) or type(error).__name__ == "NoArgsIsHelpError":
        return None
    ctx = getattr(error, "ctx", None)
    what = " ".join(error.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    field = CONFIG_OPTIONS.get(getattr(getattr(error, "param", None), "name", None) or "")
    what = what.replace(":", f" ({field}):", 1) if field else what  # the config field the option sets
    return f"mllm: error: {what}; fix: see {ctx.command_path if ctx else 'mllm'} --help"


def run_guarded(call: Callable[[], object]) -> NoReturn:
    """Run `call` (a click command's `main`) with the CLI's error behaviour and exit with its code: a user error
    (`MllmError`, a storage failure from inside a library) is one line `mllm: error: ...` and exit 2; a usage
    error is click's message and exit 2; SIGTERM exits 143. Anything else is a bug and keeps its traceback."""
    quiet_libraries()
    try:
        code = call()
    except MllmError as e:
        print(f"mllm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:
        line = usage_line(e)
        if line is None:
            e.show()  # type: ignore[attr-defined]
        else:
            print(line, file=sys.stderr)
        sys.exit(e.exit_code)  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        print("mllm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a storage failure from inside a library (an S3 upload, a full disk) is the user's to fix
        from mllm.tracking.preflight import storage_error

        problem = storage_error(e) or disk_full(e)
        if problem is None:
            raise
        print(f"mllm: error: {problem}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("mllm: terminated (SIGTERM); runs ended KILLED, rerun to resume", file=sys.stderr)
        sys.exit(143)
    sys.exit(code if isinstance(code, int) else 0)


def run_command(argv: list[str] | None = None) -> object:
    """Run the `mllm` click command on `argv` (default: sys.argv[1:]), raising errors instead of exiting."""
    return typer.main.get_command(app).main(args=argv, prog_name="mllm", standalone_mode=False)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry: run the app, turning user errors into one line and exit code 2."""
    run_guarded(lambda: run_command(argv))


if __name__ == "__main__":
    main()
