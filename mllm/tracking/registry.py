"""The model registry of one experiment: its names (`<experiment>-base`, `-finetuned`, `-merged`, ...), versions
registered from logged MLflow models, lookup by reuse key, URIs resolved, aliases, notes and tags.

A version is created only after its files are fully uploaded, so a crash leaves no version pointing at a
half-written folder. `Registry` is one of `Store`'s parts (with `Artifacts` and the runs in `mllm.tracking.store`):
it reads `self.client`, `self.cfg` and `self.experiment`, which `Store.__init__` sets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mllm.basics import first_line, redact
from mllm.errors import MllmError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from mllm.config.schema import ExperimentConfig
    from mllm.tracking.runs import RunLog

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


class Registry:
    """Registered models of one experiment: names, versions, reuse by key, aliases."""

    client: MlflowClient
    cfg: ExperimentConfig
    experiment: str

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

    def find(self, role: Role, key: str) -> ModelVersion | None:
        """The newest registered version of `role` tagged with reuse key `key`, or None: the caller makes it."""
        found = self.find_versions(self.model_name(role), {KEY_TAG[role]: key})
        return found[0] if found else None

    def register(self, role: Role, run: RunLog, folder: Path | None, tags: dict[str, Any],
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
        key = what.replace(" ", "_").replace("-", "_").lower()
        if version is None or version.tags.get(key) == redact(text):  # written already (a rerun): nothing to do
            return
        lines = [ln for ln in (version.description or "").splitlines() if not ln.startswith(f"- {what}:")]
        self.client.update_model_version(version.name, version.version, "\n".join([*lines, f"- {what}: {text}"]))
        self.client.set_model_version_tag(version.name, version.version, key, redact(text))

    def tag_version(self, uri: str, tags: dict[str, Any]) -> None:
        """Tag the registered version behind `uri` (nothing for URIs that are not registered versions)."""
        _, version = self.resolve(uri)
        if version is not None:
            for k, value in ((k, redact(str(v))) for k, v in tags.items()):
                if version.tags.get(k) != value:  # unchanged tags are not rewritten
                    self.client.set_model_version_tag(version.name, version.version, k, value)


def note_scores(registry: Registry, uri: str, role: str, split: str, metrics: Mapping[str, float], rows: int) -> None:
    """An evaluation's figures where people look: the version's description and tags (for a merge or ensemble on
    validation also `val_macro_f1`, `val_nll`, what later choices read). Unchanged ones are not rewritten."""
    if not uri.startswith("models:/"):
        return
    registry.note_version(uri, f"{split} macro-F1", f"{metrics['macro_f1']:.4f} (CI {metrics['macro_f1_ci_low']:.3f}"
                          f"-{metrics['macro_f1_ci_high']:.3f}), accuracy {metrics['accuracy']:.4f}, {rows} reviews")
    if split == "validation" and role in ("merged", "ensemble"):
        registry.tag_version(uri, {"val_macro_f1": round(metrics["macro_f1"], 6),
                                   "val_nll": round(metrics["nll"], 6)})
