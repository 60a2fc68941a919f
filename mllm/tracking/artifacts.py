"""Files behind model references: check a `models:/`, `runs:/` or folder reference before a run opens, download
it once (a complete earlier download is reused, a partial one never is), and load it the way users do (pyfunc).

`Artifacts` is one of `Store`'s parts: it reads `self.client`, `self.resolve` (the `Registry`), the store's URIs and
`self.downloads`, which `Store.__init__` sets.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm.basics import atomic_file, first_line, redact, slug
from mllm.errors import MllmError
from mllm.models.modeling import check_classifier

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

# Artifact stores `download` also accepts (checked when downloaded, inside the run that needs them).
ARTIFACT_SCHEMES = ("file://", "s3://", "gs://", "wasbs://", "abfss://", "hdfs://", "mlflow-artifacts:/", "dbfs:/",
                    "http://", "https://")
_URI_FORMS = "use models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>/<path> or a model folder"




class Artifacts:
    """Model files: reference checks, downloads, pyfunc predictions, run artifacts."""

    client: MlflowClient
    tracking_uri: str
    registry_uri: str
    downloads: Path

    resolve: Callable[..., tuple[str, Any | None]]  # the Registry's: models:/ URIs to (canonical URI, version)

    def run_artifact(self, run_id: str, path: str, dst: Path) -> Path:
        """A run's artifact `path`, downloaded under `dst`."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

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
        with atomic_file(marker) as tmp:  # whole or absent (a full disk): a torn marker would not parse
            tmp.write_text(json.dumps({"identity": identity, "path": str(path.resolve().relative_to(dst.resolve()))}))
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
