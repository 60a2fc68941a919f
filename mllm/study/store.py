"""A study's light store: its tracking and search databases plus the small artifacts of its experiments
(predictions, figures, JSON), without checkpoints, in one .tar.gz.

    export_store(study, Path("docs/results/drugs-study-store.tar.gz"))   # what RESULTS.md's run ids resolve in
    import_store(study, Path("docs/results/drugs-study-store.tar.gz"))   # e.g. on a fresh machine, then resume

The archive holds the SQLite files of the study's store and every artifact file of the study's experiments up to
`MAX_BYTES` that is neither model weights nor part of a logged model, under their paths relative to the directory
it was exported from, and a manifest naming that directory. MLflow records artifact locations as absolute paths,
so an import into another directory rewrites the old directory to the new one in the databases' text columns:
the store works wherever the repository is cloned. A finished cell needs nothing more to be reused or reported;
an unfinished one retrains what it misses. Only for SQLite stores: a tracking server keeps its own.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
import tarfile
from pathlib import Path

from mllm.errors import MllmError
from mllm.study.config import StudyConfig, cell_config
from mllm.tracking.store import KEY_TAG, Store

MAX_BYTES = 2_000_000
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".pkl")
LOGGED_MODEL = re.compile(r"/models/m-[0-9a-f]+/")  # a logged model's folder: unusable without its weights
MANIFEST = "mllm-light-store.json"


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
    # each run's own folder: an experiment's root may hold other stores' runs too
    roots = {Path(r.info.artifact_uri.removeprefix("file://")) for r in store.all_runs(study.study)}
    for folder in sorted(roots):
        files += sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size <= MAX_BYTES
                        and not p.name.endswith(WEIGHTS) and not LOGGED_MODEL.search(p.as_posix()))
    root = Path.cwd().resolve()
    outside = [f for f in files if not f.resolve().is_relative_to(root)]
    if outside:
        raise MllmError(f"--export: {outside[0]} lies outside the working directory {root}",
                        "export from a directory that holds the study's store (the repository root)")
    manifest = json.dumps({"root": str(root), "study": study.study, "store": str(study.store)}).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for f in files:
            tar.add(f, arcname=f.resolve().relative_to(root).as_posix())
    partial.replace(out)  # never a half-written archive under the final name
    print(f"study {study.study}: exported {len(files)} files ({out.stat().st_size / 1e6:.1f} MB) to {out}")
    return out


def import_store(study: StudyConfig, archive: Path) -> None:
    """Unpack an exported light store into the working directory, pointing its databases at where it now lies;
    refuse to overwrite an existing store."""
    if not archive.is_file():
        raise MllmError(f"--import {archive}: no such file", "pass the .tar.gz that --export wrote")
    existing = [p for p in _databases(study) if p.exists()]
    if existing:
        raise MllmError(f"--import: {existing[0]} exists", f"move {study.store} away first (nothing was changed)")
    root = Path.cwd().resolve()
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        escaping = [n for n in names if n.startswith("/") or ".." in Path(n).parts]
        if escaping:
            raise MllmError(f"--import {archive}: {escaping[0]} would land outside {root}",
                            "import an archive that --export wrote (nothing was changed)")
        if MANIFEST not in names:
            raise MllmError(f"--import {archive}: no {MANIFEST} in it", "export it again with this version of mllm")
        old_root = json.loads(tar.extractfile(MANIFEST).read())["root"]  # type: ignore[union-attr]
        db = (study.store.resolve() / "mlflow.db")
        if not db.is_relative_to(root) or db.relative_to(root).as_posix() not in names:
            raise MllmError(f"--import {archive}: it holds no {db}",
                            "import from the repository root with the study config it was exported with")
        tar.extractall(root, members=[m for m in tar.getmembers() if m.name != MANIFEST], filter="data")
    if old_root != str(root):
        for path in _databases(study):
            relocate(path, old_root, str(root))
    print(f"study {study.study}: imported {len(names) - 1} files into {study.store}")
    untag_missing_weights(study)


def relocate(database: Path, old_root: str, new_root: str) -> int:
    """Rewrite `old_root/` to `new_root/` in every text column of a SQLite database (artifact locations, sources,
    URIs, output folders); return the number of values changed."""
    if not database.is_file():
        return 0
    old, new = old_root.rstrip("/") + "/", new_root.rstrip("/") + "/"
    changed = 0
    with sqlite3.connect(database) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(t in (kind or "").upper() for t in ("CHAR", "TEXT", "CLOB")):
                    cur = con.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                                      f'WHERE instr("{column}", ?) > 0', (old, new, old))
                    changed += cur.rowcount
    con.close()
    return changed


def untag_missing_weights(study: StudyConfig) -> list[str]:
    """Registered versions whose weights were not exported lose their reuse key (base_key, member_key, ...), so a
    resumed study rebuilds them instead of reusing a model it cannot load; finished cells need none of them."""
    store = Store(cell_config(study, study.arms[0], 0))
    check = study.store.resolve() / "downloads" / "check"
    untagged = []
    for v in store.all_versions(study.study):
        uri = f"models:/{v.name}/{v.version}"
        role = store.role_of(v.name)
        key = KEY_TAG.get(role)
        if key is None or role == "ensemble" or key not in v.tags:  # an ensemble has no weights of its own
            continue
        try:
            store.download(uri, check / f"{v.name}-{v.version}")
        except MllmError:
            store.untag_version(v.name, v.version, key, note=("weights", "not in the light store"))
            untagged.append(uri)
    shutil.rmtree(check, ignore_errors=True)
    print(f"study {study.study}: {len(untagged)} registered versions without weights will be rebuilt if needed")
    return untagged
