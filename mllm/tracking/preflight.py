"""The stores a config points at (tracking server or database, model registry, S3 artifacts): a pre-flight check
that they can be reached, and storage failures raised mid-run, both as one `MllmError` line naming the field.

    from mllm.tracking.preflight import preflight
    preflight(cfg.tracking)   # the Store calls it: once per store and process

Why: mlflow retries an unreachable HTTP server or database for minutes before it gives up, and an S3 upload
that fails inside a run surfaces as a botocore traceback. Credentials never reach the message.
"""

from __future__ import annotations

import os

from mllm.basics import redact
from mllm.config.schema import TrackingConfig
from mllm.errors import MllmError

_reachable: set[str] = set()
_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}
_STORE_FIX = "check the URI, that the server or database is running and reachable from here, and the credentials"


def preflight(cfg: TrackingConfig, timeout_s: float = 5.0) -> None:
    """Fail within seconds, in one line, when a configured store cannot be reached: before any run is opened,
    where mlflow itself would retry an HTTP server or a database for minutes (or fail an S3 upload mid-run).
    Each store is checked once per process."""
    stores = (("tracking.tracking_uri", cfg.tracking_uri), ("tracking.registry_uri", cfg.registry_uri),
              ("tracking.artifact_location", cfg.artifact_location))
    for field, uri in stores:
        if not uri or uri in _reachable:
            continue
        s3 = uri.startswith("s3://")
        problem = _s3_problem(uri, timeout_s) if s3 else _connect_problem(uri, timeout_s)
        if problem:
            raise MllmError(f"{field}: cannot {'use' if s3 else 'reach'} {redact(uri)} ({redact(problem)})",
                            "check the bucket, MLFLOW_S3_ENDPOINT_URL and the AWS credentials" if s3 else _STORE_FIX)
        _reachable.add(uri)


def _connect_problem(uri: str, timeout_s: float) -> str | None:
    """Why an http(s) server or a database server in `uri` does not answer (None: it does, or nothing to check)."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:  # a port that is not a number
        return str(e)
    if scheme in ("http", "https"):
        netloc = f"[{host}]" if host and ":" in host else host or ""
        url = f"{scheme}://{netloc}{f':{port}' if port else ''}{parts.path.rstrip('/')}/health"
        try:  # any HTTP answer, even 401/404, means a server is there; urllib honours the proxy variables
            urllib.request.urlopen(url, timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return None
        except urllib.error.URLError as e:
            return str(e.reason)
        except (OSError, ValueError) as e:  # timeouts, resets
            return str(e) or type(e).__name__
        return None
    if scheme in _DB_PORTS and host:  # (no host: a local Unix socket, left to the driver)
        try:
            socket.create_connection((host, port or _DB_PORTS[scheme]), timeout=timeout_s).close()
        except OSError as e:
            return f"{host}:{port or _DB_PORTS[scheme]}: {e.strerror or e}"
    return None


def _s3_problem(uri: str, timeout_s: float) -> str | None:
    """Why the S3 bucket in `uri` cannot take artifacts (None: it can, as far as one listing tells)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1})
    try:
        s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, config=config,
                          verify=os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() != "true")
        s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as e:
        error = e.response.get("Error", {})
        if error.get("Code") == "AccessDenied":  # a policy may allow uploads but not listing: let uploads try
            return None
        return f"{error.get('Code', 'error')}: {error.get('Message', e)}"
    except BotoCoreError as e:
        return str(e)
    return None


def storage_error(e: BaseException) -> MllmError | None:
    """An artifact-store failure raised from inside mlflow mid-run (an S3 upload that cannot connect or is
    refused) as one MllmError naming tracking.artifact_location; None for anything else (a bug keeps its
    traceback)."""
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return None
    found: list[BaseException] = []
    visited: set[int] = set()
    seen: BaseException | None = e
    while seen is not None and id(seen) not in visited:  # the exception, its cause, the cause's cause, ...
        visited.add(id(seen))
        if isinstance(seen, BotoCoreError | ClientError | Boto3Error):
            found.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not found:
        return None
    # S3's own answer (e.g. InvalidAccessKeyId) says more than boto3's wrapper around it.
    client_error = next((f for f in found if isinstance(f, ClientError)), None)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        reason = f"{error.get('Code', 'error')}: {error.get('Message', '')}"
    else:
        reason = (str(found[0]).strip().splitlines() or [type(found[0]).__name__])[0]
    return MllmError(f"tracking.artifact_location: the artifact store failed ({redact(reason)[:200]})",
                     "check the experiment's artifact location, MLFLOW_S3_ENDPOINT_URL and the AWS credentials "
                     "(runs it interrupted ended FAILED)")
