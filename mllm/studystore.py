"""A study's light store: its tracking and search databases plus the small artifacts of its experiments
(predictions, figures, JSON), without checkpoints, in one .tar.gz.

    export_store(study, Path("docs/results/drugs-study-store.tar.gz"))   # what RESULTS.md's run ids resolve in
    import_store(study, Path("docs/results/drugs-study-store.tar.gz"))   # e.g. on a fresh machine, then resume

The archive holds the SQLite files of the study's store and every artifact file of the study's experiments up to
`MAX_BYTES` that is neither model weights nor part of a logged model, under their absolute paths (the tracking
database records artifact locations as absolute paths). A finished cell needs nothing more to be reused or
reported; an unfinished one retrains what it misses. Only for SQLite stores: a tracking server keeps its own.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

from mllm.errors import MllmError
from mllm.store import KEY_TAG, Store
from mllm.studyconf import StudyConfig, cell_config

MAX_BYTES = 2_000_000
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".pkl")
LOGGED_MODEL = re.compile(r"/models/m-[0-9a-f]+/")  # a logged model's folder: unusable without its weights


def _databases(study: StudyConfig) -> list[Path]:
    if study.tracking_uri or study.search_storage:
        raise MllmError("study.tracking_uri / search_storage: a server-backed study has no store file to export",
                        "export from the server (pg_dump) instead")
    return [study.store.resolve() / "mlflow.db", study.store.resolve() / "optuna.db"]


def export_store(study: StudyConfig, out: Path) -> Path:
    """Write the light store to `out` (.tar.gz); return it."""
    files = [p for p in _databases(study) if p.is_file()]
    if not files:
        raise MllmError(f"study.store: {study.store} holds no mlflow.db yet", "run the study first")
    store = Store(cell_config(study, study.arms[0], 0))
    roots = {Path(e.artifact_location.removeprefix("file://")) for e in store.client.search_experiments()
             if e.name == study.study or e.name.startswith(f"{study.study}-")}
    for root in sorted(roots):
        files += sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size <= MAX_BYTES
                        and not p.name.endswith(WEIGHTS) and not LOGGED_MODEL.search(p.as_posix()))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.resolve()).lstrip("/"))
    partial.replace(out)  # never a half-written archive under the final name
    print(f"study {study.study}: exported {len(files)} files ({out.stat().st_size / 1e6:.1f} MB) to {out}")
    return out


def import_store(study: StudyConfig, archive: Path) -> None:
    """Unpack an exported light store where it was exported from; refuse to overwrite an existing store."""
    if not archive.is_file():
        raise MllmError(f"--import {archive}: no such file", "pass the .tar.gz that --export wrote")
    existing = [p for p in _databases(study) if p.exists()]
    if existing:
        raise MllmError(f"--import: {existing[0]} exists", f"move {study.store} away first (nothing was changed)")
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        db = str(study.store.resolve() / "mlflow.db").lstrip("/")
        if db not in names:
            raise MllmError(f"--import {archive}: it holds no {db}",
                            "export and import with the same study config (study.store)")
        allowed = [str(p.resolve()).lstrip("/") + "/" for p in (Path.cwd(), study.store)]
        outside = [n for n in names if not any(n.startswith(a) for a in allowed)]
        if outside:  # an archive writes only into this working directory and the study's store
            raise MllmError(f"--import {archive}: {outside[0]} lies outside {Path.cwd()} and {study.store}",
                            "import from the directory the study was exported from")
        tar.extractall("/", filter="data")
    print(f"study {study.study}: imported {len(names)} files into {study.store}")
    untag_missing_weights(study)


def untag_missing_weights(study: StudyConfig) -> list[str]:
    """Registered versions whose weights were not exported lose their reuse key (base_key, member_key, ...), so a
    resumed study rebuilds them instead of reusing a model it cannot load; finished cells need none of them."""
    store = Store(cell_config(study, study.arms[0], 0))
    check = study.store.resolve() / "downloads" / "check"
    untagged = []
    for model in store.client.search_registered_models():
        if not model.name.startswith(f"{study.study}-"):
            continue
        for v in store.client.search_model_versions(f"name = '{model.name}'"):
            uri = f"models:/{model.name}/{v.version}"
            role = store.role_of(model.name)
            key = KEY_TAG.get(role)
            if key is None or role == "ensemble" or key not in v.tags:  # an ensemble has no weights of its own
                continue
            try:
                store.download(uri, check / f"{model.name}-{v.version}")
            except MllmError:
                store.client.delete_model_version_tag(model.name, v.version, key)
                store.client.set_model_version_tag(model.name, v.version, "weights", "not in the light store")
                untagged.append(uri)
    shutil.rmtree(check, ignore_errors=True)
    print(f"study {study.study}: {len(untagged)} registered versions without weights will be rebuilt if needed")
    return untagged
