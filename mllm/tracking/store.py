"""The Store: one object per experiment config that owns everything MLflow holds for it.

    store = Store(cfg)                                   # pre-flight checks, an explicit MlflowClient
    with store.run("merge-ties", stage="merge") as run:  # a tracked run (mllm.tracking.runs)
        version = store.register("merged", run, folder, tags={...})
    store.model_uri("merged", version.version)           # models:/<experiment>-merged/<version>
    version, reused = store.find_or_run("merged", key, make)   # reuse by key, else make it

Names: `<experiment>-base` (the shared base classifier), `<experiment>-finetuned` (members),
`<experiment>-merged` (merges). A version is created only after its files are fully uploaded, so a crash
leaves no version pointing at a half-written folder. With `mllm.tracking.runs`, the only module that imports mlflow;
no code depends on a process-global tracking URI set elsewhere: the store sets mlflow's URIs itself, to its own
stores, right before each run it opens.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mllm.tracking import runs
from mllm.basics import first_line, redact, slug
from mllm.config.schema import ExperimentConfig
from mllm.errors import MllmError
from mllm.models.modeling import check_classifier
from mllm.tracking.preflight import preflight

if TYPE_CHECKING:
    import numpy as np

Role = Literal["base", "member", "merged", "ensemble", "tfidf", "bigger"]
SUFFIX: dict[str, str] = {"base": "base", "member": "finetuned", "merged": "merged", "ensemble": "ensemble",
                          "tfidf": "tfidf", "bigger": "bigger"}
KEY_TAG: dict[str, str] = {"base": "base_key", "member": "member_key", "merged": "merge_key",
                           "ensemble": "ensemble_key", "tfidf": "tfidf_key", "bigger": "member_key"}
ROLE_DESCRIPTION = {
    "base": "The shared base classifier of experiment `{e}`: pretrained body + one seeded head (mllm).",
    "member": "Members of experiment `{e}`, each fine-tuned from `{e}-base` (mllm finetune).",
    "merged": "Merges of `{e}-finetuned` members (mllm merge, search, promote); `@champion` is the promoted one.",
    "ensemble": "Logit-average ensembles of `{e}-finetuned` members: the cost-free baseline a merge must beat.",
    "bigger": "The bigger model of experiment `{e}`: `model.bigger_model` fine-tuned on all training rows with the "
              "members' recipe (mllm finetune), the single model a merge of small members is compared with.",
    "tfidf": "TF-IDF + logistic regression (class-balanced, C chosen on validation) on `{e}`'s training split: the "
             "bag-of-words baseline every language model here must beat.",
}
# Artifact stores `download` also accepts (checked when downloaded, inside the run that needs them).
ARTIFACT_SCHEMES = ("file://", "s3://", "gs://", "wasbs://", "abfss://", "hdfs://", "mlflow-artifacts:/", "dbfs:/",
                    "http://", "https://")
_URI_FORMS = "use models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>/<path> or a model folder"


class Store:
    """MLflow state of one experiment: runs, registered models, downloads, reuse by key."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from mlflow import MlflowClient

        preflight(cfg.tracking)  # seconds, not minutes of mlflow's retries, for a store that cannot be reached
        self.cfg, self.experiment = cfg, cfg.name
        self.tracking_uri = cfg.tracking.tracking_uri
        self.registry_uri = cfg.tracking.registry_uri or cfg.tracking.tracking_uri
        self.client = MlflowClient(self.tracking_uri, self.registry_uri)
        self.downloads = cfg.output_dir / "downloads"

    # --- names -------------------------------------------------------------------------------------------------
    def model_name(self, role: Role) -> str:
        return f"{self.experiment}-{SUFFIX[role]}"

    def model_uri(self, role: Role, version: str | int) -> str:
        return f"models:/{self.model_name(role)}/{version}"

    @staticmethod
    def model_id(version: Any) -> str | None:
        """The LoggedModel behind a version (`m-...`; the registry may not fill `model_id`, the source names it),
        None for versions registered as plain folders."""
        source = str(version.source or "")
        found = getattr(version, "model_id", None) or (source.removeprefix("models:/") if source.startswith(
            "models:/m-") else None)
        return found or None

    def role_of(self, name: str) -> str:
        """`member` for `<anything>-finetuned`, ... (`model` for names mllm did not make)."""
        return next((r for r, s in SUFFIX.items() if name.endswith(f"-{s}")), "model")

    # --- runs --------------------------------------------------------------------------------------------------
    @contextmanager
    def run(self, name: str, *, stage: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
            log_config: bool = True, system_metrics: bool = True,
            experiment: str | None = None) -> Iterator[runs.RunLog]:
        """A tracked run of this experiment (or of `experiment`), nested as `runs.tracked_run` says."""
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import: mlflow sets its level when imported
        mlflow.set_tracking_uri(self.tracking_uri)  # for the run's fluent parts (system metrics, dataset inputs)
        mlflow.set_registry_uri(self.registry_uri)
        cfg = self.cfg if experiment in (None, self.experiment) else self.cfg.model_copy(update={"name": experiment})
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

    def run_artifact(self, run_id: str, path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def terminate_run(self, run_id: str, status: str) -> None:
        """End another process's run (a killed worker's trial) with `status` if it is still RUNNING."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)

    # --- reuse -------------------------------------------------------------------------------------------------
    def find_or_run(self, kind: Literal["base", "member", "merged", "ensemble", "tfidf", "bigger", "evaluation"],
                    key: str,
                    fn: Callable[[], Any],
                    force: bool = False) -> tuple[Any, bool]:
        """(what carries `key`, True) when it exists: the newest registered version of that role tagged with the
        key, or for `evaluation` the newest finished run tagged `mllm.eval_key`. Otherwise (fn(), False): fn makes
        it (and registers or logs it with the key)."""
        if not force:
            if kind == "evaluation":
                found = self.find_runs({"mllm.eval_key": key})
            else:
                found = self.find_versions(self.model_name(kind), {KEY_TAG[kind]: key})
            if found:
                return found[0], True
        return fn(), False

    # --- registry ----------------------------------------------------------------------------------------------
    def register(self, role: Role, run: runs.RunLog, folder: Path | None, tags: dict[str, Any],
                 description: str = "", *, examples: list[str], members: list[str] | None = None,
                 labels: tuple[str, ...] | None = None, title: str = "") -> Any:
        """Log `folder` (a Hugging Face classifier, or for role `tfidf` a saved TF-IDF model) as the run's MLflow
        model, or with `members` the logit-average ensemble of those registered versions, then create a version of
        the role's model from it and wait until it is READY (a crash before that leaves no version). `title` tells
        logged models of one role apart in the UI (`tiny-merged ties`, `tiny-finetuned shard-0`); the version's
        tags, less its reuse key, are the logged model's parameters."""
        from mlflow.exceptions import MlflowException

        config = {"max_length": self.cfg.model.max_length, "batch_size": self.cfg.evaluate.batch_size,
                  **({"members": members} if members else {})}
        if labels is None and folder is not None:  # the classifier's own label names, in id order
            id2label = json.loads((folder / "config.json").read_text())["id2label"]
            labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        name = self.model_name(role)
        params = {k: v for k, v in tags.items() if k != KEY_TAG[role] and v is not None}
        model_uri, model_id = run.model(f"{name} {title}".strip().replace(" ", "-"), folder, labels or (), examples,
                                        config, params, kind="tfidf" if role == "tfidf" else "checkpoint")
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=ROLE_DESCRIPTION[role].format(e=self.experiment))
            except MlflowException:
                self.client.get_registered_model(name)  # created concurrently by another process: fine
        version = self.client.create_model_version(name, source=model_uri, run_id=run.id, model_id=model_id,
                                                   description=description,
                                                   tags={k: redact(str(v)) for k, v in tags.items()})
        # The link the UI shows from the logged model to its registered version (as mlflow.register_model sets it).
        self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
            [{"name": name, "version": str(version.version)}])})
        for _ in range(600):
            version = self.client.get_model_version(name, version.version)
            if version.status == "READY":
                return version
            if version.status == "FAILED_REGISTRATION":
                raise MllmError(f"registering {name} version {version.version} failed ({version.status_message})",
                                "check the registry server's logs and rerun")
            time.sleep(0.5)
        raise MllmError(f"{name} version {version.version} was not READY after 5 minutes", "check the registry server")

    def find_versions(self, name: str, tags: dict[str, str]) -> list[Any]:
        """Versions of `name` whose tags include `tags`, newest first (none if the model is not registered)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return []
        hits = [v for v in versions if all(v.tags.get(k) == str(val) for k, val in tags.items())]
        return sorted(hits, key=lambda v: int(v.version), reverse=True)

    def newest(self, role: Role, tags: dict[str, str] | None = None) -> Any | None:
        found = self.find_versions(self.model_name(role), tags or {})
        return found[0] if found else None

    def resolve(self, uri: str, field: str = "model URI") -> tuple[str, Any | None]:
        """(`models:/name/version`, the version) for a registered-model URI (aliases and `latest` resolved), or
        (uri, None) for anything else. Fails in one line, naming `field`, for an unknown name, version or alias."""
        from mlflow.exceptions import MlflowException

        if not uri.startswith("models:/"):
            return uri, None
        name, sep, ref = uri.removeprefix("models:/").partition("@")
        try:
            if sep:
                if not name or not ref:
                    raise MllmError(f"{field}: {uri} names no model or alias", "write models:/<name>@<alias>")
                version = self.client.get_model_version_by_alias(name, ref)
            else:
                name, _, ref = name.rstrip("/").rpartition("/")
                if not name:
                    raise MllmError(f"{field}: {uri} names no version", "write models:/<name>/<version> or @<alias>")
                found = self.find_versions(name, {}) if ref == "latest" else None
                if found == []:
                    raise MllmError(f"{field}: {uri}: no versions of {name}", "register a version first")
                version = found[0] if found else self.client.get_model_version(name, ref)
        except MlflowException as e:
            raise MllmError(f"{field}: cannot resolve {uri} ({first_line(e)})",
                            "check the model name, version or alias (mlflow models UI)") from None
        return f"models:/{version.name}/{version.version}", version

    def check_uri(self, uri: str, field: str, tokenizer: bool = True) -> None:
        """Refuse, before any run is opened, a model reference that cannot work: a malformed URI, an unknown
        registered name / version / alias, a run that does not exist or lacks the artifact, a folder that is not a
        usable classifier (`tokenizer`: it must hold one). `field` names where the reference came from."""
        from mlflow.exceptions import MlflowException

        if uri.startswith("models:/"):
            self.resolve(uri, field)
            return
        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            path = path.strip("/")
            if not run_id or not path:
                raise MllmError(f"{field}: {uri} is not a runs:/ URI", "write runs:/<run id>/<artifact path>, "
                                "e.g. runs:/<run id>/model")
            try:
                self.client.get_run(run_id)
            except MlflowException as e:
                raise MllmError(f"{field}: no run {run_id} in this tracking store ({first_line(e)})",
                                "check the run id (mlflow UI) and tracking.tracking_uri") from None
            if not self.client.list_artifacts(run_id, path):
                raise MllmError(f"{field}: run {run_id} has no artifact folder {path}",
                                "check the path (the run's artifacts in the mlflow UI), e.g. runs:/<run id>/model")
            return
        if uri.startswith(ARTIFACT_SCHEMES):
            return
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", uri):
            raise MllmError(f"{field}: {uri} has an unknown scheme", _URI_FORMS)
        path = Path(uri).expanduser()
        if not path.exists():
            raise MllmError(f"{field}: {uri} is neither an existing folder nor a models:/ or runs:/ URI", _URI_FORMS)
        check_classifier(path, field, tokenizer)

    def download(self, uri: str, dst: Path | None = None) -> Path:
        """A local folder with the files behind a `models:/`, `runs:/` or artifact URI (a local path stays put),
        under `output_dir/downloads/<slug>` unless `dst` is given. A complete earlier download of the same version
        (same source, same registry) is reused."""
        import mlflow
        from mlflow.exceptions import MlflowException

        local = Path(uri)
        if "://" not in uri and ":/" not in uri and local.exists():
            return local
        dst = dst or self.downloads / slug(uri)
        identity: dict[str, str] = {"uri": uri}
        if uri.startswith("models:/"):  # versions are immutable: same version, same source -> same files
            canonical, version = self.resolve(uri)
            identity = {"uri": canonical, "source": str(version.source), "run_id": str(version.run_id),
                        "registry": redact(self.registry_uri)}
        marker = dst.with_name(dst.name + ".mllm-download.json")
        if marker.is_file():  # a complete earlier download of the same thing
            saved = json.loads(marker.read_text())
            if saved.get("identity") == identity and (dst / saved["path"]).exists():
                return checkpoint_of(dst / saved["path"], uri)
        marker.unlink(missing_ok=True)
        shutil.rmtree(dst, ignore_errors=True)  # a partial or different download
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.set_registry_uri(self.registry_uri)  # models:/ URIs resolve through the fluent registry setting
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except MlflowException as e:
            raise MllmError(f"cannot download {uri} ({first_line(e)})",
                            "check the model name, version or alias (mlflow models UI) or the run id") from None
        # Written last: only a complete download is reused.
        folder = checkpoint_of(path, uri)  # before the marker: an incomplete model is never taken for complete
        marker.write_text(json.dumps({"identity": identity, "path": str(path.resolve().relative_to(dst.resolve()))}))
        return folder

    def predict_proba(self, uri: str, texts: list[str]) -> np.ndarray:
        """Class probabilities (rows: texts, columns: the model's labels in id order) from the MLflow model at
        `uri`, loaded the way users load it (`mlflow.pyfunc.load_model`)."""
        import mlflow
        import numpy as np

        mlflow.set_registry_uri(self.registry_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        model = mlflow.pyfunc.load_model(uri)
        answers = model.predict(texts)
        labels = list(model.model_config.get("labels") or answers[0].probabilities)
        probs = [[a.probabilities[n] for n in labels] for a in answers]
        return np.array(probs, dtype=np.float64).reshape(-1, len(labels))

    def alias_version(self, role: Role, alias: str) -> Any | None:
        """The version `<role's model>@alias` points at, or None (no such alias or model)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.model_name(role), alias)
        except MlflowException:
            return None

    def set_alias(self, role: Role, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.model_name(role), alias, version)

    def note_version(self, uri: str, what: str, text: str) -> None:
        """Put `- what: text` into a registered version's description (replacing an older line about `what`) and
        tag it (`what` as a tag key with underscores)."""
        _, version = self.resolve(uri)
        if version is None:
            return
        lines = [ln for ln in (version.description or "").splitlines() if not ln.startswith(f"- {what}:")]
        self.client.update_model_version(version.name, version.version, "\n".join([*lines, f"- {what}: {text}"]))
        self.client.set_model_version_tag(version.name, version.version,
                                          what.replace(" ", "_").replace("-", "_").lower(), redact(text))

    def tag_version(self, uri: str, tags: dict[str, Any]) -> None:
        """Tag the registered version behind `uri` (nothing for URIs that are not registered versions)."""
        _, version = self.resolve(uri)
        if version is not None:
            for k, v in tags.items():
                self.client.set_model_version_tag(version.name, version.version, k, redact(str(v)))


def checkpoint_of(path: Path, uri: str) -> Path:
    """The Hugging Face folder of a downloaded model: the `checkpoint` artifact of an mllm MLflow model, or the
    folder itself for versions registered as plain folders (mllm before MLflow models). Refuses, in one line
    naming the URI, a model whose files are missing or half-uploaded, and an ensemble (it has no weights)."""
    import yaml

    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        artifacts = (yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
                     .get("artifacts") or {})
        if "tfidf" in artifacts:
            folder = path / artifacts["tfidf"]["path"]
            if not (folder / "tfidf.json").is_file() or not (folder / "tfidf.safetensors").is_file():
                raise MllmError(f"{uri}: the TF-IDF model's files are missing or incomplete",
                                "delete that version (MLflow UI); the next mllm evaluate fits it again")
            return folder
        if "checkpoint" not in artifacts:
            raise MllmError(f"{uri} is an ensemble or not an mllm classifier: it holds no checkpoint to load",
                            "evaluate an ensemble through its members (mllm evaluate scores ensembles), or pass "
                            "a classifier")
        path = path / artifacts["checkpoint"]["path"]
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise MllmError(f"{uri}: the model's files are missing or incomplete (no config.json or safetensors in "
                        f"{path.name})", "re-register it: rerun the stage that made it with --force")
    return path
