"""The bottom floor: small helpers every layer may use, importing nothing of mllm's.

- `redact`: mask credentials in URIs and query strings before anything is printed, logged or tagged.
- `quiet_libraries`: keep the console for mllm's own progress (libraries log warnings and errors only).
- `slug`: a file-name-safe form of a model URI (download folders, run names).
- `short_hash`: a stable content hash of JSON-able values (reuse keys).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys

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
