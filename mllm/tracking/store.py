"""The Store: one object per experiment config that owns everything MLflow holds for it, in three parts.

    store = Store(cfg)                                   # pre-flight checks, an explicit MlflowClient
    with store.run("merge-ties", stage="merge") as run:  # runs (here; the run itself: mllm.tracking.runs)
        version = store.register("merged", run, folder, tags={...})    # the registry (mllm.tracking.registry)
    store.model_uri("merged", version.version)           # models:/<experiment>-merged/<version>
    version = store.find("merged", key)                  # reuse by key: a version, or None and the caller makes it
    folder = store.download(uri)                         # files (mllm.tracking.artifacts)

Names: `<experiment>-base` (the shared base classifier), `<experiment>-finetuned` (members),
`<experiment>-merged` (merges). Only the tracking package imports mlflow; no code depends on a process-global
tracking URI set elsewhere: the store sets mlflow's URIs itself, to its own stores, right before each run it opens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from mllm.config.schema import ExperimentConfig
from mllm.tracking import runs
from mllm.tracking.artifacts import ARTIFACT_SCHEMES, Artifacts, checkpoint_of
from mllm.tracking.preflight import preflight
from mllm.tracking.registry import KEY_TAG, ROLE_DESCRIPTION, SUFFIX, Registry, Role

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = ["ARTIFACT_SCHEMES", "KEY_TAG", "ROLE_DESCRIPTION", "SUFFIX", "Role", "Store", "checkpoint_of"]


class Store(Registry, Artifacts):
    """MLflow state of one experiment: runs (here), registered models (`Registry`), files (`Artifacts`)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from mlflow import MlflowClient

        preflight(cfg.tracking)  # seconds, not minutes of mlflow's retries, for a store that cannot be reached
        self.cfg, self.experiment = cfg, cfg.name
        self.tracking_uri = cfg.tracking.tracking_uri
        self.registry_uri = cfg.tracking.registry_uri or cfg.tracking.tracking_uri
        self.client = MlflowClient(self.tracking_uri, self.registry_uri)
        self.downloads = cfg.output_dir / "downloads"

    @contextmanager
    def run(self, name: str, *, stage: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
            log_config: bool = True, system_metrics: bool = True,
            experiment: str | None = None, config: ExperimentConfig | None = None) -> Iterator[runs.RunLog]:
        """A tracked run of this experiment (or of `experiment`), nested as `runs.tracked_run` says, logging `config`
        (by default the store's: a merge logs the config with its own recipe)."""
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import: mlflow sets its level when imported
        mlflow.set_tracking_uri(self.tracking_uri)  # for the run's fluent parts (system metrics, dataset inputs)
        mlflow.set_registry_uri(self.registry_uri)
        cfg = config or self.cfg
        cfg = cfg if experiment in (None, self.experiment) else cfg.model_copy(update={"name": experiment})
        with runs.tracked_run(self.client, cfg, name, stage=stage, parent_run_id=parent_run_id, tags=tags,
                                  log_config=log_config, system_metrics=system_metrics) as run:
            yield run

    def find_runs(self, tags: dict[str, str], status: str = "FINISHED", experiment: str | None = None) -> list[Any]:
        """Runs carrying all `tags` and ending in `status`, newest first."""
        found = self.client.get_experiment_by_name(experiment or self.experiment)
        if found is None:
            return []
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + [f"attributes.status = '{status}'"]
        return list(self.client.search_runs([found.experiment_id], " and ".join(clauses), max_results=5000,
                                            order_by=["attributes.start_time DESC"]))

    def terminate_run(self, run_id: str, status: str) -> None:
        """End another process's run (a killed worker's trial) with `status` if it is still RUNNING."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)

    def find_evaluation(self, key: str) -> Run | None:
        """The newest finished evaluation run tagged with reuse key `key`, or None: the caller scores the model."""
        found = self.find_runs({"mllm.eval_key": key})
        return found[0] if found else None

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def all_runs(self, family: str) -> Iterator[Run]:
        """Every run of the experiment `family` and of the experiments named `family-...`, page by page."""
        experiments = [e.experiment_id for e in self.client.search_experiments()
                       if e.name == family or e.name.startswith(f"{family}-")]
        token = None
        while experiments:
            page = self.client.search_runs(experiments, max_results=5000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def all_versions(self, family: str) -> Iterator[Any]:
        """Every version of every registered model named `family-...`."""
        for model in self.client.search_registered_models():
            if model.name.startswith(f"{family}-"):
                yield from self.client.search_model_versions(f"name = '{model.name}'")

    def untag_version(self, name: str, version: str, key: str, note: tuple[str, str] | None = None) -> None:
        """Delete one tag of a version (and set `note`, a (key, value) tag, in its place)."""
        self.client.delete_model_version_tag(name, version, key)
        if note:
            self.client.set_model_version_tag(name, version, *note)
