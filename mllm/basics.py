"""The bottom floor: small helpers every layer may use, importing nothing of mllm's.

- `redact`: mask credentials in URIs and query strings before anything is printed, logged or tagged.
- `quiet_libraries`: keep the console for mllm's own progress (libraries log warnings and errors only).
- `slug`: a file-name-safe form of a model URI (download folders, run names).
- `short_hash`: a stable content hash of JSON-able values (reuse keys).
- `atomic_dir`, `publish_dir`, `atomic_file`: write a folder or file under a temporary sibling name and rename it
  when complete, so the real name is complete or absent (resume and reuse code trusts the real names only).
- `disk_full_cause`, `free_space`, `folder_bytes`, `size_text`: recognise and measure a full disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")
_SECRET_PARAMS = re.compile(r"(password|secret|token|access_key)=([^&\s]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Mask passwords in URIs (`postgresql://u:pw@h` -> `postgresql://u:***@h`) and secret query params."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m[1]}=***", text)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, credentials masked (for one-line errors)."""
    return (redact(str(e)).strip().splitlines() or [type(e).__name__])[0][:limit]


def slug(uri: str) -> str:
    """`models:/tiny-merged/3` -> `tiny-merged-3`; `runs:/abc/model` -> `run-abc-model`."""
    return uri.replace("models:/", "").replace("runs:/", "run-").replace("/", "-").replace(":", "")


def short_hash(obj: object, length: int = 16) -> str:
    """A stable hash of a JSON-able value (keys sorted; other objects by str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def quiet_libraries() -> None:
    """Keep the console for mllm's own progress: libraries log warnings and errors only."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines: no usage pings
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run on a server
    for name in ("alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "mlflow" in sys.modules:  # imported before this ran: MLFLOW_LOGGING_LEVEL was read already
        logging.getLogger("mlflow").setLevel(logging.WARNING)


# A full disk or quota. Some libraries report it without an OSError: safetensors (Rust) says "No space left on device
# (os error 28)"; torch.save to a path says only "unexpected pos" (mllm saves through Python files instead).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "(os error 28)", "(os error 122)")


def disk_full_cause(e: BaseException) -> BaseException | None:
    """The exception in `e`'s chain (itself, its cause or context, theirs, ...) saying a disk or quota is full."""
    seen: set[int] = set()
    found: BaseException | None = e
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if (isinstance(found, OSError) and found.errno in DISK_FULL_ERRNOS) or \
                any(text in str(found).lower() for text in _DISK_FULL_TEXT):
            return found
        found = found.__cause__ or found.__context__
    return None


def free_space(path: Path) -> int:
    """Free bytes on the disk holding `path` (before it exists: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(path: Path) -> int:
    """The bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def size_text(n: float) -> str:
    """Bytes for people: `2.1 GB`, `340.0 MB`, `12.5 kB`, `512 B`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _name_full_disk(e: Exception, final: Path) -> None:
    """Re-raise a full disk met while writing `final` as OSError(ENOSPC) naming `final` (libraries seldom name the
    file); anything else unchanged."""
    if disk_full_cause(e) is None or getattr(e, "filename", None):
        raise e
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from e


@contextmanager
def atomic_dir(final: Path) -> Iterator[str]:
    """A temporary sibling folder of `final`, removed on the way out whatever happens; callers fill it and
    `publish_dir` it, so `final` is complete or absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp") as tmp:
        try:
            yield tmp
        except Exception as e:
            _name_full_disk(e, final)


def publish_dir(tmp: str | Path, final: Path) -> None:
    """Move a finished temporary folder into place (replacing an older `final`)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    Path(tmp).mkdir()  # TemporaryDirectory cleans up its (now empty) name


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """A temporary sibling path of `final` to write; renamed to `final` when the block succeeds, removed if not."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except Exception as e:
        _name_full_disk(e, final)
    finally:
        tmp.unlink(missing_ok=True)
