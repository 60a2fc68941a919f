"""MLflow runs: start and end them with a guaranteed final status, and log into them through a `RunLog`.
With `mllm.tracking.store`, the only module that imports mlflow.

`tracked_run` never leaves a run RUNNING: SIGTERM and SIGINT end it KILLED, an exception ends it FAILED
(both re-raised; a logged model whose upload they cut short ends FAILED, not PENDING), a normal exit FINISHED.
A process killed outright (SIGKILL, out of memory, power) cannot end its runs; every run carries its owner (host,
boot, pid) and a heartbeat (mllm.tracking.leases), and the next mllm process that opens a run in the experiment ends
as KILLED (their pending models FAILED) the runs of owners that are gone: a dead pid on its own host, or on any host
a heartbeat older than tracking.lease_s. Every run carries provenance tags (git SHA, package versions, platform);
credentials in URIs are masked before anything is logged. `RunLog` addresses its run by id through an explicit
`MlflowClient`, so logging never depends on which run happens to be active.
"""

from __future__ import annotations

import functools
import json
import os
import platform
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

from mllm.basics import redact
from mllm.config.schema import ExperimentConfig
from mllm.errors import MllmError, Terminated
from mllm.tracking.leases import expired, heartbeat_age, lease

PACKAGES = ("mllm", "torch", "transformers", "mergekit", "mlflow", "optuna", "datasets", "evaluate", "accelerate")


# The MLflow 3 UI opens an experiment in its GenAI view (traces, tokens) unless it is marked as model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # logged as "model from code", never imported here
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pydantic", "pyyaml")
TFIDF_REQUIREMENTS = ("scikit-learn", "scipy")  # what the TF-IDF baseline's features need besides
# The run `mlflow run` opened for this process (mllm.tracking.project adopts it): the parent of top-level runs.
PROJECT_RUN_ENV = "MLLM_PROJECT_RUN_ID"


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """Experiment id of `name`, creating it (tolerating a concurrent creator), marked as model training."""
    from mlflow.exceptions import MlflowException

    key, kind = EXPERIMENT_KIND
    try:
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location, tags={key: kind})
            except MlflowException:
                found = client.get_experiment_by_name(name)  # another process created it first
                if found is None:
                    raise
        if found.tags.get(key) != kind:
            client.set_experiment_tag(found.experiment_id, key, kind)
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


class RunLog:
    """What a stage logs into one run: params, metrics, tags, text, figures, tables, folders, datasets."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.id = client, run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.id, params=items[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, redact(text), name)

    def json(self, data: dict[str, Any], name: str) -> None:
        self.text(json.dumps(data, indent=2, default=str), name)

    def table(self, frame: Any, name: str) -> None:
        """A pandas frame as a CSV artifact (floats written so that float32 values read back exactly)."""
        self.client.log_text(self.id, frame.to_csv(index=False, float_format="%.9g"), name)

    def mlflow_table(self, frame: Any, name: str) -> None:
        """A pandas frame as an MLflow table (`<name>.json`, shown in the UI's artifact view as a table)."""
        self.client.log_table(self.id, frame, name)

    def figure(self, figure: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.id, figure, name)
        plt.close(figure)

    def folder(self, local_dir: Path, artifact_path: str) -> str:
        """Upload a folder; return its artifact URI (`<run artifact root>/<artifact_path>`)."""
        self.client.log_artifacts(self.id, str(local_dir), artifact_path)
        return f"{self.client.get_run(self.id).info.artifact_uri.rstrip('/')}/{artifact_path}"

    def inputs(self, frames: dict[str, Any], name: str, fingerprint: str) -> None:
        """Each split as an MLflow dataset input (context = split name), tagged with the data fingerprint."""
        import mlflow

        for context, frame in frames.items():
            # (mlflow.log_input is the public way to turn a dataset into an input; it logs to the active run,
            # which tracked_run made this one.) Its schema inference warns that integer columns cannot hold NaN:
            # labels never do.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(frame, name=f"{name}-{context}", targets="label")
                mlflow.log_input(dataset, context=context, tags={"fingerprint": fingerprint})

    def model(self, name: str, checkpoint: Path | None, labels: tuple[str, ...], examples: list[str],
              config: dict[str, Any], params: dict[str, Any], kind: str = "checkpoint") -> tuple[str, str]:
        """Log an MLflow model (pyfunc, `mllm/tracking/pyfunc_model.py`) in this run: a classifier whose Hugging Face
        folder `checkpoint` becomes its one copy of the weights, a TF-IDF baseline folder (`kind="tfidf"`), or
        (checkpoint None) the ensemble that `config["members"]` lists.
        `name` is how the UI's Models tab lists it, `params` what it shows beside it
        (method, weights, parents, ...). Returns (model URI `models:/m-...`, model id)."""
        import mlflow

        # The signature comes from predict's type hints (list of review strings -> label + probabilities).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(MODEL_CODE), model_config={**config, "labels": list(labels)},
                params={k: redact(str(v))[:6000] for k, v in params.items()},
                artifacts={kind: str(checkpoint)} if checkpoint is not None else None,
                input_example=examples, pip_requirements=requirements(TFIDF_REQUIREMENTS if kind == "tfidf" else ()))
        return info.model_uri, info.model_id

    def model_metrics(self, metrics: dict[str, float], model_id: str, frame: Any, dataset: str) -> None:
        """Metrics of an evaluation, logged against the evaluated model and dataset too (the Models tab)."""
        import mlflow
        from mlflow.entities import Metric

        with warnings.catch_warnings():  # "integer columns cannot hold NaN": labels never do
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(frame, name=dataset, targets="label")
            digest = data.digest
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, 0, model_id=model_id, dataset_name=data.name,
                                                       dataset_digest=digest) for k, v in metrics.items()])

    def metric_logger(self, flush_every: int = 100) -> MetricLogger:
        return MetricLogger(self, flush_every)


class MetricLogger:
    """Buffers per-step metrics and sends them in batches (one round trip per ~100 values, not per value)."""

    def __init__(self, run: RunLog, flush_every: int = 100) -> None:
        self.run, self.flush_every = run, flush_every
        self.pending: list[Any] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.run.client.log_batch(self.run.id, metrics=self.pending)
            self.pending = []


def requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """The exact versions in use of what the served model imports (no torchvision, no mllm)."""
    return [f"{p}=={metadata.version(p)}" for p in (*MODEL_REQUIREMENTS, *extra)]


@contextmanager
def tracked_run(client: Any, cfg: ExperimentConfig, run_name: str, *, stage: str, parent_run_id: str | None = None,
                tags: dict[str, Any] | None = None, log_config: bool = True,
                system_metrics: bool = True) -> Iterator[RunLog]:
    """Start a run in the experiment `cfg.name` (nested under `parent_run_id`, else under the run this process
    has open, else under `mlflow run`'s project run when it is in this experiment) and always end it. The caller
    (`mllm.tracking.store.Store.run`) has pointed mlflow at `client`'s stores."""
    import mlflow

    if "MLFLOW_RUN_ID" in os.environ:  # inside `mlflow run`: mlflow.start_run would reattach to its run
        os.environ.setdefault(PROJECT_RUN_ENV, os.environ.pop("MLFLOW_RUN_ID"))
    experiment_id = ensure_experiment(client, cfg.name, cfg.tracking.artifact_location)
    end_orphaned_runs(client, experiment_id, cfg.tracking.lease_s)
    all_tags = {**provenance(), "mllm.stage": stage, "mllm.owner": owner(),
                **{k: redact(str(v)) for k, v in (tags or {}).items()}}
    if parent_run_id is None and mlflow.active_run() is None:
        parent_run_id = _project_run(client, experiment_id)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags,
                           nested=mlflow.active_run() is not None, log_system_metrics=system_metrics)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    status = "FAILED"
    log = RunLog(client, run.info.run_id)
    try:
        with lease(client, run.info.run_id, cfg.tracking.heartbeat_s):  # a run of a dead process expires
            if log_config:
                log.params(flatten(cfg.to_dict()))
                log.text(cfg.to_yaml(), "config.yaml")
            yield log
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if status != "FINISHED":  # a model upload the error or signal cut short must not stay PENDING either
            fail_pending_models(client, run.info.run_id, experiment_id)
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
    return f"{os.environ.get('MLLM_HOST') or platform.node()}/{boot}/"  # MLLM_HOST: containers sharing a name


def dead_here(holder: str) -> bool:
    """Whether `holder` (an `owner()` string) is a process of this host and boot that no longer exists."""
    prefix = _owner_prefix()
    pid = holder.removeprefix(prefix)
    return holder.startswith(prefix) and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_swept: set[str] = set()


def end_orphaned_runs(client: Any, experiment_id: str, lease_s: float | None = None) -> list[str]:
    """End as KILLED the RUNNING runs of `experiment_id` whose owner process is gone: on this host, a dead pid; on
    any host, a heartbeat older than `lease_s` (mllm.tracking.leases).

    Once per experiment and process. A run of another host with a fresh heartbeat, or with none (an older mllm),
    is left alone; a reused pid keeps a run RUNNING rather than ending a live one.
    """
    store = f"{client.tracking_uri}#{experiment_id}"
    if store in _swept:
        return []
    _swept.add(store)
    prefix, ended = _owner_prefix(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        if dead_here(run.data.tags.get("mllm.owner", "")):
            why = f"orphan sweep of {prefix}{os.getpid()}"
        elif lease_s is not None and expired(run, lease_s):
            why = (f"lease expired: heartbeat {heartbeat_age(run):.0f} s old > tracking.lease_s {lease_s:g} "
                   f"(swept by {prefix}{os.getpid()})")
        else:
            continue
        client.set_tag(run.info.run_id, "mllm.ended_by", why)
        client.set_terminated(run.info.run_id, "KILLED")
        fail_pending_models(client, run.info.run_id, experiment_id)
        ended.append(run.info.run_id)
    if ended:
        print(f"tracking: ended {len(ended)} run(s) left RUNNING by mllm processes that are gone as KILLED")
    return ended


def fail_pending_models(client: Any, run_id: str, experiment_id: str | None = None) -> list[str]:
    """Mark FAILED the logged models of `run_id` still PENDING: MLflow creates a LoggedModel before uploading its
    files and does not finalize it when the upload is cut short, so the UI's Models tab would list a model with
    no files as pending. Best effort: the error that cut the upload is the one the user must see."""
    from mlflow.entities import LoggedModelStatus

    failed = []
    try:
        experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
        # (a `status = 'PENDING'` clause matches nothing on a SQL store: the status is filtered here)
        for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                failed.append(model.model_id)
    except Exception as exc:  # noqa: BLE001 - a tracking outage here must not hide the original error
        print(f"tracking: could not mark the pending models of run {run_id} FAILED: {exc}", file=sys.stderr)
    return failed


def _project_run(client: Any, experiment_id: str) -> str | None:
    """The run `mlflow run` opened for this process (PROJECT_RUN_ENV), if it is in `client`'s store and in
    `experiment_id`: the parent of the stage's top-level runs. A parent in another experiment is not shown as one
    (the stage's run would look parentless there, the project run empty in its own), so it is none."""
    from mlflow.exceptions import MlflowException

    run_id = os.environ.get(PROJECT_RUN_ENV)
    if not run_id:
        return None
    try:
        found = client.get_run(run_id)
    except MlflowException:  # another store's run
        return None
    return run_id if found.info.experiment_id == experiment_id else None
