"""The MLflow model registry: register checkpoint folders as model versions, find them by tags, download them.

Names: `<experiment>-base` (the shared base classifier), `<experiment>-finetuned` (members),
`<experiment>-merged` (merges). A version is created only after its artifacts are fully uploaded, so a
crash leaves no version pointing at a half-written folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from mllm.errors import MllmError
from mllm.tracking import redact


def client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def ensure_registered_model(name: str, description: str = "") -> None:
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description=description)
        except MlflowException:
            c.get_registered_model(name)  # created concurrently by another process: fine


def register(name: str, artifact_uri: str, run_id: str, tags: dict[str, Any], description: str = "") -> Any:
    """Create a version of `name` from an uploaded artifact folder; wait until it is READY."""
    ensure_registered_model(name)
    c = client()
    version = c.create_model_version(name, source=artifact_uri, run_id=run_id,
                                     tags={k: redact(str(v)) for k, v in tags.items()}, description=description)
    for _ in range(600):
        version = c.get_model_version(name, version.version)
        if version.status == "READY":
            return version
        if version.status == "FAILED_REGISTRATION":
            raise MllmError(f"registering {name} version {version.version} failed ({version.status_message})",
                            "check the registry server's logs and rerun")
        time.sleep(0.5)
    raise MllmError(f"{name} version {version.version} was not READY after 5 minutes", "check the registry server")


def find_versions(name: str, tags: dict[str, str]) -> list[Any]:
    """Versions of `name` whose tags include `tags`, newest first (none if the model is not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    hits = [v for v in versions if all(v.tags.get(k) == str(val) for k, val in tags.items())]
    return sorted(hits, key=lambda v: int(v.version), reverse=True)


def resolve(uri: str, field: str = "model URI") -> tuple[str, Any | None]:
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
            version = client().get_model_version_by_alias(name, ref)
        else:
            name, _, ref = name.rstrip("/").rpartition("/")
            if not name:
                raise MllmError(f"{field}: {uri} names no version", "write models:/<name>/<version> or @<alias>")
            if ref == "latest":
                found = find_versions(name, {})
                if not found:
                    raise MllmError(f"{field}: {uri}: no versions of {name}", "register a version first")
                version = found[0]
            else:
                version = client().get_model_version(name, ref)
    except MlflowException as e:
        raise MllmError(f"{field}: cannot resolve {uri} ({_first_line(e)})",
                        "check the model name, version or alias (mlflow models UI)") from None
    return f"models:/{version.name}/{version.version}", version


def _first_line(e: BaseException) -> str:
    return (redact(str(e)).strip().splitlines() or [type(e).__name__])[0][:200]


# Artifact stores `download` also accepts (checked when downloaded, inside the run that needs them).
ARTIFACT_SCHEMES = ("file://", "s3://", "gs://", "wasbs://", "abfss://", "hdfs://", "mlflow-artifacts:/", "dbfs:/",
                    "http://", "https://")
_URI_FORMS = "use models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>/<path> or a model folder"


def check_uri(uri: str, field: str, tokenizer: bool = True) -> None:
    """Refuse, before any run is opened, a model reference that cannot work: a malformed URI, an unknown
    registered name / version / alias, a run that does not exist or lacks the artifact, a folder that is not a
    usable classifier (`tokenizer`: it must hold one). `field` names where the reference came from (`--model`,
    `model.bigger_model`, ...)."""
    import re

    from mlflow.exceptions import MlflowException

    from mllm.modeling import check_classifier

    if uri.startswith("models:/"):
        resolve(uri, field)
        return
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        path = path.strip("/")
        if not run_id or not path:
            raise MllmError(f"{field}: {uri} is not a runs:/ URI", "write runs:/<run id>/<artifact path>, "
                            "e.g. runs:/<run id>/model")
        try:
            client().get_run(run_id)
        except MlflowException as e:
            raise MllmError(f"{field}: no run {run_id} in this tracking store ({_first_line(e)})",
                            "check the run id (mlflow UI) and tracking.tracking_uri") from None
        if not client().list_artifacts(run_id, path):
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


def download(uri: str, dst: Path | None = None) -> Path:
    """A local folder with the files behind a `models:/`, `runs:/` or artifact URI (a local path stays put).
    With `dst`, a complete earlier download of the same version (same source, same registry) is reused."""
    import mlflow
    from mlflow.exceptions import MlflowException

    local = Path(uri)
    if "://" not in uri and ":/" not in uri and local.exists():
        return local
    identity: dict[str, str] = {"uri": uri}
    if uri.startswith("models:/"):  # versions are immutable: same version, same source -> same files
        canonical, version = resolve(uri)
        identity = {"uri": canonical, "source": str(version.source), "run_id": str(version.run_id),
                    "registry": redact(mlflow.get_registry_uri())}
    marker = dst.with_name(dst.name + ".mllm-download.json") if dst else None
    if marker is not None and dst is not None and marker.is_file():  # a complete earlier download of the same
        saved = json.loads(marker.read_text())
        if saved.get("identity") == identity and (dst / saved["path"]).exists():
            return dst / saved["path"]
    if marker is not None and dst is not None:
        marker.unlink(missing_ok=True)
        shutil.rmtree(dst, ignore_errors=True)  # a partial or different download
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
    except MlflowException as e:
        raise MllmError(f"cannot download {uri} ({_first_line(e)})",
                        "check the model name, version or alias (mlflow models UI) or the run id") from None
    if marker is not None and dst is not None:  # written last: only a complete download is reused
        marker.write_text(json.dumps({"identity": identity, "path": str(path.resolve().relative_to(dst.resolve()))}))
    return path


def alias_version(name: str, alias: str) -> Any | None:
    """The version `name@alias` points at, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, redact(str(v)))
