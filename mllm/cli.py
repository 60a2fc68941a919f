"""The `mllm` command line: a thin Typer layer over the library functions.

    mllm validate configs/default.yaml --set merge.method=ties
    mllm data stats --dataset drugscom-sample --format json

User errors (`MllmError`) print one line on stderr and exit with code 2; heavy libraries are imported
inside commands so that `mllm --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer

from mllm.errors import MllmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evaluate merged language models on text classification, tracked in MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the configured datasets.")
app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment config (default: built-in "
                                                "defaults, the same as configs/default.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override KEY=VALUE (dotted, e.g. "
                                                  "merge.method=ties); repeatable.")]


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (and overrides) without running anything."""
    from mllm.config import load_config

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
    from mllm.config import load_config
    from mllm.stats import collect_stats, render_table

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
    from mllm.config import load_config
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
    method: Annotated[str | None, typer.Option(help="mergekit method (sets merge.method).")] = None,
    weights: Annotated[str | None, typer.Option(help="Comma-separated member weights (sets merge.weights).")] = None,
    density: Annotated[float | None, typer.Option(help="Density (sets merge.density).")] = None,
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="Member model URI (models:/..., runs:/..., folder); repeatable. Default: the "
        "experiment's newest registered members.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model URI (default: the newest registered base).")] = None,
    force: Annotated[bool, typer.Option(help="Merge again even if the same merge is registered.")] = False,
) -> None:
    """Merge fine-tuned members with mergekit; log the recipe and register the merged classifier."""
    from mllm.config import load_config
    from mllm.merge import run

    sets = list(set_ or [])
    if method:
        sets.append(f"merge.method={method}")
    if weights:
        sets.append(f"merge.weights=[{weights}]")
    if density is not None:
        sets.append(f"merge.density={density}")
    cfg = load_config(config, sets)
    result = run(cfg, member or None, base, force=force)
    typer.echo(f"{result.method} merge of {', '.join(result.parents)} -> {result.model_uri} (run {result.run_id})")


class Split(str, Enum):
    train = "train"
    validation = "validation"
    test = "test"


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Model to score: models:/name/version, models:/name@alias, runs:/id/path or a folder; "
        "repeatable. Default: every merge of the experiment's newest base.")] = None,
    split: Annotated[Split | None, typer.Option(help="Split to score (default: evaluate.split).")] = None,
    baselines: Annotated[bool | None, typer.Option(
        "--baselines/--no-baselines", help="Also score members, their ensemble, the base (evaluate.baselines).",
        show_default=False)] = None,
) -> None:
    """Score models on a split (accuracy, macro-F1 with CIs, per-class P/R/F1, NLL, ECE) with baselines."""
    from mllm.config import load_config
    from mllm.evaluate import run

    cfg = load_config(config, set_ or [])
    result = run(cfg, model or None, split.value if split else None, baselines)
    typer.echo(f"{len(result.evaluations)} evaluations on {result.split} (run {result.run_id}); "
               f"compare them with: mllm report {cfg.name} --split {result.split}")


@app.command()
def report(
    experiment: Annotated[str | None, typer.Argument(help="Experiment name (default: the config's name).",
                                                     show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[Split | None, typer.Option(help="Split (default: evaluate.split).")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", "-f", help="table (markdown) or json.")] =
    OutputFormat.table,
) -> None:
    """Print (and log as report.md) the comparison table: each model's accuracy and macro-F1 with CIs, cost,
    and the paired test against the best member."""
    from mllm.config import load_config
    from mllm.report import run, to_json

    cfg = load_config(config, set_ or [])
    result = run(cfg, experiment, split.value if split else None)
    typer.echo(to_json(result) if output is OutputFormat.json else result.markdown)


@app.command()
def search(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    n_trials: Annotated[int | None, typer.Option(help="Finished trials the study should have (search.n_trials); "
                                                 "a rerun continues the study up to it.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local worker processes (search.workers).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL shared by all workers "
                                                "(search.storage).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (default <experiment>-search).")] = None,
    sampler: Annotated[str | None, typer.Option(help="tpe, cmaes, random or nsgaii (search.sampler).")] = None,
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="Member URI; repeatable (default: the experiment's registered members).")] = None,
    base: Annotated[str | None, typer.Option(help="Base URI (with --member).")] = None,
    parent_run_id: Annotated[str | None, typer.Option(help="Nest this worker's runs under this run.")] = None,
    create_only: Annotated[bool, typer.Option(help="Create the study (and its schema) and exit: run once before "
                                              "starting workers on several machines.")] = False,
    worker_index: Annotated[int | None, typer.Option(
        help="This process's index among independent workers of one study; seeds its sampler (default "
        "$SLURM_ARRAY_TASK_ID, else 0).")] = None,
) -> None:
    """Search merge recipes with Optuna: in-memory merges scored on the validation split."""
    import os

    from mllm.config import load_config
    from mllm.search import run

    sets = list(set_ or [])
    for key, value in (("n_trials", n_trials), ("workers", workers), ("storage", storage),
                       ("study_name", study_name), ("sampler", sampler)):
        if value is not None:
            sets.append(f"search.{key}={value}")
    cfg = load_config(config, sets)
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
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (search.storage).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (default <experiment>-search).")] = None,
) -> None:
    """Merge the search's best recipe with mergekit, evaluate it on test, set `challenger`, gate `champion`."""
    from mllm.config import load_config
    from mllm.promote import run

    sets = list(set_ or [])
    sets += [f"search.storage={storage}"] if storage else []
    sets += [f"search.study_name={study_name}"] if study_name else []
    run(load_config(config, sets))


@app.command()
def pipeline(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole flow: fine-tune, merge (linear, ties, dare_ties, dare_linear), evaluate, search, promote,
    report; finished stages are reused."""
    from mllm.config import load_config
    from mllm.pipeline import run

    cfg = load_config(config, set_ or [])
    result = run(cfg)
    typer.echo("")
    typer.echo(result.report_markdown)
    typer.echo(f"champion: {result.champion or 'none'}; stages: " +
               ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()))
    uri = _redacted(cfg.tracking.tracking_uri)
    typer.echo(f"Open the runs: {uri} in a browser" if uri.startswith(("http://", "https://"))
               else f"Open the runs: mlflow ui --backend-store-uri {uri}")


def _redacted(uri: str) -> str:
    from mllm.tracking import redact

    return redact(uri)


def quiet_libraries() -> None:
    """Keep the console for mllm's own progress: libraries log warnings and errors only."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines: no usage pings
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run on a server
    for name in ("alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 2."""
    quiet_libraries()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mllm", standalone_mode=False)
    except MllmError as e:
        print(f"mllm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("mllm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a storage failure from inside a library (an S3 upload) is the user's to fix
        from mllm.stores import storage_error

        problem = storage_error(e)
        if problem is None:
            raise
        print(f"mllm: error: {problem}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        from mllm.tracking import Terminated

        if isinstance(e, Terminated):
            print("mllm: terminated (SIGTERM); runs ended KILLED, rerun to resume", file=sys.stderr)
            sys.exit(143)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
