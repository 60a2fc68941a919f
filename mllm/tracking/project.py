"""The run `mlflow run` opens for an MLflow Project entry point, adopted as the entry point's run.

`mlflow run . -e merge --experiment-name tiny` creates a run in experiment `tiny` of its tracking store
(MLFLOW_TRACKING_URI; default ./mlflow.db), then starts `python -m entrypoints.merge` with MLFLOW_RUN_ID,
MLFLOW_EXPERIMENT_ID and MLFLOW_TRACKING_URI naming it. MLflow cannot move a run to another experiment or store, so
when the config tracks elsewhere the entry point refuses in one line that names the `mlflow run` setting that fixes
it, and ends that run FAILED before anything else is created. Otherwise the run is renamed after the entry point,
the stage's top-level runs nest under it (`runs.tracked_run` finds it in `runs.PROJECT_RUN_ENV`), and it ends with
the stage's outcome: `mlflow run` finds it ended, and nothing stays RUNNING.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mllm.basics import redact
from mllm.errors import MllmError, Terminated
from mllm.tracking.runs import PROJECT_RUN_ENV, ensure_experiment, owner, provenance

Adopt = Callable[[str, str], None]  # adopt(tracking_uri, experiment) of the config the entry point runs


@contextmanager
def project_run(entry_point: str) -> Iterator[Adopt | None]:
    """Inside `mlflow run` (MLFLOW_RUN_ID set), hold the run it opened: yield `adopt(tracking_uri, experiment)`,
    which checks that the run is in that store and experiment (else MllmError) and names it after `entry_point`;
    end the run FINISHED, FAILED (an exception) or KILLED (SIGTERM, Ctrl-C). Outside `mlflow run`, yield None."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)  # mlflow.start_run would reattach to it
    if not run_id:
        yield None
        return
    from mlflow import MlflowClient

    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)  # `mlflow run`'s store
    status = "FAILED"
    try:
        yield functools.partial(_adopt, client, run_id, entry_point)
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        os.environ.pop(PROJECT_RUN_ENV, None)
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
        except Exception:  # noqa: BLE001 - the stage's own error is the one to show; `mlflow run` ends it anyway
            pass


def _adopt(client: Any, run_id: str, entry_point: str, tracking_uri: str, experiment: str) -> None:
    """Check that `mlflow run`'s run lives in `tracking_uri`'s experiment `experiment`; name it after the entry
    point, tag it like every mllm run, and hand it to `tracked_run` as the parent of the stage's runs."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    if store_key(client.tracking_uri) != store_key(tracking_uri):
        raise MllmError(f"mlflow run tracks in {redact(client.tracking_uri)}, the config in {redact(tracking_uri)} "
                        "(tracking.tracking_uri), and MLflow cannot move runs between stores",
                        f"run MLFLOW_TRACKING_URI={redact(store_key(tracking_uri))} mlflow run ...")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MllmError(f"MLFLOW_RUN_ID {run_id} is not a run of {redact(client.tracking_uri)}",
                        "start entry points with mlflow run from the project folder") from None
    found = client.get_experiment(run.info.experiment_id).name
    if found != experiment:
        raise MllmError(f"mlflow run opened its run in experiment {found!r}, the config's experiment is "
                        f"{experiment!r}, and MLflow cannot move runs between experiments",
                        f"pass --experiment-name {experiment} to mlflow run")
    ensure_experiment(client, experiment)  # marked as model training, as the stage's runs would mark it
    client.update_run(run_id, name=entry_point)
    tags = {**provenance(), "mllm.entry_point": entry_point, "mllm.owner": owner()}
    client.log_batch(run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()])
    os.environ[PROJECT_RUN_ENV] = run_id


def store_key(uri: str) -> str:
    """A tracking URI with a local path made absolute (`sqlite:///mlflow.db` run in /w is `sqlite:////w/mlflow.db`),
    so that two spellings of one store compare equal."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if uri.startswith("file:") or "://" not in uri:  # a local folder of runs (mlruns)
        return f"file://{Path(urlparse(uri).path if uri.startswith('file:') else uri).resolve()}"
    return uri.rstrip("/")
