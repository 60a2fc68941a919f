"""MLflow runs: start/end with guaranteed final status, params, metrics, provenance, datasets. Only this module
and `registry` import mlflow.

`tracked_run` never leaves a run RUNNING: SIGTERM and SIGINT end it KILLED, an exception ends it FAILED
(both re-raised), a normal exit FINISHED. A process killed outright (SIGKILL, out of memory, power) cannot end
its runs; every run carries its owner (host, boot, pid), and the next mllm process on that host ends the runs
of owners that are gone as KILLED. Credentials in URIs are masked before anything is logged.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from mllm.config import ExperimentConfig, TrackingConfig
from mllm.errors import MllmError
from mllm.stores import preflight

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")
_SECRET_PARAMS = re.compile(r"(password|secret|token|access_key)=([^&\s]+)", re.IGNORECASE)
PACKAGES = ("mllm", "torch", "transformers", "mergekit", "mlflow", "optuna", "datasets", "evaluate", "accelerate")


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (Slurm preemption, `kill`, timeouts)."""


def redact(text: str) -> str:
    """Mask passwords in URIs (`postgresql://u:pw@h` -> `postgresql://u:***@h`) and secret query params."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m[1]}=***", text)


def configure(cfg: TrackingConfig) -> None:
    """Point mlflow at the configured tracking and registry stores."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import: mlflow sets its level when imported
    preflight(cfg)  # seconds, not minutes of mlflow's retries, for a store that cannot be reached
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri or cfg.tracking_uri)


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    """Experiment id of `name`, creating it (tolerating a concurrent creator)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            try:
                return mlflow.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:
                found = mlflow.get_experiment_by_name(name)  # another process created it first
                if found is None:
                    raise
        return found.experiment_id
    except MlflowException as e:
        raise MllmError(f"tracking.tracking_uri: cannot use the tracking store ({redact(str(e)).splitlines()[0]})",
                        "check the URI, that the server or database is reachable, and the credentials") from None


def git_sha() -> str:
    """The repository's commit (+'-dirty' with uncommitted changes), or 'unknown' outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """Tags every run carries: code version, package versions, interpreter, host."""
    tags = {"mllm.git_sha": git_sha(), "mllm.python": sys.version.split()[0], "mllm.platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            tags[f"mllm.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested dict (lists as JSON), credentials masked."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = redact(json.dumps(value) if isinstance(value, list | dict) else str(value))
    return out


@contextmanager
def tracked_run(cfg: ExperimentConfig, run_name: str, *, stage: str, parent_run_id: str | None = None,
                tags: dict[str, Any] | None = None, log_config: bool = True,
                system_metrics: bool = True) -> Iterator[Any]:
    """Start a run in the experiment `cfg.name` (nested under `parent_run_id` if given) and always end it."""
    import mlflow

    configure(cfg.tracking)
    experiment_id = ensure_experiment(cfg.name, cfg.tracking.artifact_location)
    end_orphaned_runs(experiment_id)
    all_tags = {**provenance(), "mllm.stage": stage, "mllm.owner": owner(),
                **{k: redact(str(v)) for k, v in (tags or {}).items()}}
    if parent_run_id is None and mlflow.active_run() is None:
        parent_run_id = _project_run(cfg.tracking.tracking_uri)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags,
                           nested=mlflow.active_run() is not None, log_system_metrics=system_metrics)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    status = "FAILED"
    try:
        if log_config:
            log_params(flatten(cfg.to_dict()))
            mlflow.log_text(redact(cfg.to_yaml()), "config.yaml")
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        mlflow.end_run(status=status)


def owner() -> str:
    """`host/boot-id/pid`: this process, as run tags (`mllm.owner`) and search trials record it."""
    return f"{_owner_prefix()}{os.getpid()}"


@functools.cache
def _owner_prefix() -> str:
    """`host/boot-id/`: a pid is only meaningful on one host during one boot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noboot"
    return f"{platform.node()}/{boot}/"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_swept: set[str] = set()


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of `experiment_id` whose owner process on this host is gone.

    Once per experiment and process. Runs of other hosts are left alone (their processes cannot be checked
    from here); a reused pid keeps a run RUNNING rather than ending a live one.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"{mlflow.get_tracking_uri()}#{experiment_id}"
    if store in _swept:
        return []
    _swept.add(store)
    prefix = _owner_prefix()
    client = MlflowClient()
    ended = []
    query = f"attributes.status = 'RUNNING' and tags.`mllm.owner` LIKE '{prefix}%'"
    runs = client.search_runs([experiment_id], query, max_results=1000)
    for run in runs:
        pid = run.data.tags["mllm.owner"].removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "mllm.ended_by", f"orphan sweep of {prefix}{os.getpid()}")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        print(f"tracking: ended {len(ended)} run(s) left RUNNING by killed mllm processes on this host as KILLED")
    return ended


def _project_run(tracking_uri: str) -> str | None:
    """The run `mlflow run` opened for this entry point (MLFLOW_RUN_ID), if it lives in our tracking store.

    mlflow.start_run would otherwise reattach to that id, which fails when the config points elsewhere; so the
    variable is consumed here and the project run becomes the parent of the stage's runs when stores match.
    """
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id and os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db") == tracking_uri:
        return run_id
    return None


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    items = {k: redact(str(v))[:6000] for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params({k: items[k] for k in keys[i : i + 100]})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: redact(str(v)) for k, v in tags.items()})


class MetricLogger:
    """Buffers metrics and sends them in batches (one SQL round trip per ~100 values, not per value)."""

    def __init__(self, flush_every: int = 100) -> None:
        self.flush_every = flush_every
        self.pending: list[Any] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        import mlflow

        if self.pending:
            run = mlflow.active_run()
            if run is not None:
                mlflow.tracking.MlflowClient().log_batch(run.info.run_id, metrics=self.pending)
            self.pending = []


def log_split_inputs(frames: dict[str, Any], name: str, fingerprint: str) -> None:
    """`mlflow.log_input` for each split (context = split name), tagged with the dataset fingerprint."""
    import mlflow

    for context, frame in frames.items():
        with warnings.catch_warnings():  # "integer columns cannot hold NaN": labels never do
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, name=f"{name}-{context}", targets="label")
            mlflow.log_input(dataset, context=context, tags={"fingerprint": fingerprint})


def log_artifacts(local_dir: Path, artifact_path: str) -> str:
    """Upload a folder to the active run; return its artifact URI."""
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)
    return mlflow.get_artifact_uri(artifact_path)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(redact(text), name)


def log_dict(data: dict[str, Any], name: str) -> None:
    import mlflow

    mlflow.log_text(redact(json.dumps(data, indent=2, default=str)), name)


def active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_figure(figure: Any, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(figure, name)
    plt.close(figure)


def find_runs(experiment: str, tags: dict[str, str], status: str = "FINISHED") -> list[Any]:
    """Runs of `experiment` carrying all `tags` and ending in `status`, newest first (as mlflow Run objects)."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + [f"attributes.status = '{status}'"]
    return mlflow.search_runs([found.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"],
                              output_format="list", max_results=5000)


def download_run_artifact(run_id: str, path: str, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def log_table(frame: Any, name: str) -> None:
    """A pandas frame as a CSV artifact (floats written so that float32 values read back exactly)."""
    import mlflow

    mlflow.log_text(frame.to_csv(index=False, float_format="%.9g"), name)


def terminate_run(run_id: str, status: str) -> None:
    """End another process's run (a killed worker's trial) with `status` if it is still RUNNING."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
