"""Registered versions are MLflow models: the tiny pipeline's champion loads with `mlflow.pyfunc`, agrees with
`mllm evaluate` review by review, is served by `mlflow models serve`, and the Models tab's logged models carry
their test metrics; the ensemble is registered and served the same way."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mllm.config import load_config
from mllm.errors import MllmError
from mllm.tracking.store import Store

from .conftest import REPO, readers_of_splits

REVIEWS = ["This medicine worked within a week and I have no side effects at all.",
           "Terrible headaches and nausea, I stopped after three days.",
           "It helped a little with the pain but I gained weight."]
MLFLOW_WARNINGS: list[str] = []  # what MLflow's loggers warned about while the pipeline ran


class Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        MLFLOW_WARNINGS.append(f"{record.name}: {record.getMessage()}")


TEST_READS: dict[str, int] = {"sealed": 0, "final": 0}  # load_splits calls with the test split hidden / shown


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny pipeline, run once for this module in its own stores, with the test split unreadable (None) to
    every stage but the final evaluation: a stage that read it would crash the pipeline."""
    import dataclasses

    from mllm import pipeline
    from mllm.data import splits as data
    tmp = tmp_path_factory.mktemp("serving")
    cwd = os.getcwd()
    os.chdir(tmp)
    import mlflow  # noqa: F401  (importing it configures MLflow's loggers, which would drop a handler added before)

    collect = Collect(logging.WARNING)
    logging.getLogger("mlflow").addHandler(collect)
    state = {"final": False}
    real_splits, real_final = data.load_splits, pipeline.final_evaluation

    def sealed(cfg: object) -> object:
        splits = real_splits(cfg)
        TEST_READS["final" if state["final"] else "sealed"] += 1
        return splits if state["final"] else dataclasses.replace(splits, test=None)

    def final(*args: object, **kwargs: object) -> object:
        state["final"] = True
        try:
            return real_final(*args, **kwargs)
        finally:
            state["final"] = False

    try:
        with pytest.MonkeyPatch.context() as patch:
            for module in readers_of_splits():
                patch.setattr(module, "load_splits", sealed)
            patch.setattr(pipeline, "final_evaluation", final)
            cfg = load_config(REPO / "configs" / "tiny.yaml", [
                f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", f"output_dir={tmp}/out",
                f"search.storage=sqlite:///{tmp}/optuna.db", "search.n_trials=4", "evaluate.bootstrap_samples=200"])
            result = pipeline.run(cfg)
    finally:
        os.chdir(cwd)
        logging.getLogger("mlflow").removeHandler(collect)
    return cfg, result, tmp


@pytest.fixture
def pipeline(built: tuple) -> tuple:
    """The built pipeline, with mlflow pointed at its stores (conftest resets them before every test)."""
    import mlflow

    mlflow.set_tracking_uri(built[0].tracking.tracking_uri)
    mlflow.set_registry_uri(built[0].tracking.tracking_uri)
    return built


@pytest.mark.slow
def test_champion_loads_with_pyfunc_and_agrees_with_evaluate(pipeline) -> None:
    import mlflow

    cfg, result, tmp = pipeline
    assert result.champion == "models:/tiny-merged@champion"
    store = Store(cfg)
    champion = store.alias_version("merged", "champion")
    runs = store.find_runs({"mllm.model_uri": f"models:/tiny-merged/{champion.version}", "mllm.split": "test"})
    assert runs, "the champion was evaluated on test"
    frame = pd.read_csv(store.run_artifact(runs[0].info.run_id, "predictions.csv", tmp / "pred"), keep_default_na=False)

    model = mlflow.pyfunc.load_model("models:/tiny-merged@champion")
    served = model.predict(frame["text"].tolist())
    assert [p.label for p in served] == frame["predicted"].tolist()  # every review of the tiny test split
    probs = np.array([[p.probabilities[n] for n in ("negative", "neutral", "positive")] for p in served])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == [("negative", "neutral", "positive").index(p.label) for p in served]).all()
    # A one-column DataFrame works like the list; an empty list gives an empty answer; a non-string is refused.
    two = frame["text"].head(2).tolist()
    assert [p.label for p in model.predict(pd.DataFrame({"text": two}))] == [p.label for p in served[:2]]
    assert model.predict([]) == []
    with pytest.raises(Exception, match="Expected type str, but got int"):
        model.predict(["fine", 3])

    # The version says what it is, in tags and a markdown description.
    assert "test macro-F1" in champion.description and "promotion" in champion.description
    assert champion.tags["promotion_replaced"] == "none (first champion)"
    meta = store.client.get_model_version("tiny-merged", champion.version)
    assert meta.source.startswith("models:/m-")


@pytest.mark.slow
def test_only_the_final_evaluation_reads_test_and_promotion_used_validation(pipeline) -> None:
    cfg, result, tmp = pipeline
    readers = {m.__name__ for m in readers_of_splits()}
    assert readers >= {"mllm.finetune", "mllm.evaluate", "mllm.merging.scorer", "mllm.merge"}
    assert TEST_READS["sealed"] >= 5 and TEST_READS["final"] == 1  # every stage ran sealed; test was read once
    store = Store(cfg)
    promote_run = store.find_runs({"mllm.stage": "promote"})[0]
    test_runs = store.find_runs({"mllm.stage": "evaluation", "mllm.split": "test"})
    assert test_runs and min(r.info.start_time for r in test_runs) >= promote_run.info.end_time
    # The decision is tagged with the figures it used: the held-out validation rows, which the search never
    # optimised (its objective read the other rows), recomputed here from the validation evaluations' predictions.
    from mllm.data.splits import load_splits
    from mllm.evaluation.choice import split_rows
    from mllm.evaluation.metrics import macro_f1

    version = store.resolve(promote_run.data.tags["mllm.model_uri"])[1]
    assert version.tags["promotion_split"] == "holdout" and version.tags["promotion_outcome"] == "became champion"
    labels = load_splits(cfg.data).validation["label"].to_numpy()
    searched_rows, held = split_rows(labels, cfg.search.crossfit_fraction, cfg.search.seed)
    assert int(version.tags["promotion_rows"]) == len(held) and len(np.intersect1d(searched_rows, held)) == 0
    names = load_splits(cfg.data).label_names
    val = {}
    for r in store.find_runs({"mllm.stage": "evaluation", "mllm.split": "validation"}):
        frame = pd.read_csv(store.run_artifact(r.info.run_id, "predictions.csv", tmp / "val" / r.info.run_id),
                            keep_default_na=False)
        val.setdefault(r.data.tags["mllm.model_uri"], frame["predicted"].map(names.index).to_numpy())
    challenger = promote_run.data.tags["mllm.model_uri"]
    assert float(version.tags["promotion_challenger_macro_f1"]) == pytest.approx(
        macro_f1(labels[held], val[challenger][held], 3), abs=1e-6)
    best = version.tags["promotion_best_member"]
    assert float(version.tags["promotion_best_member_macro_f1"]) == pytest.approx(
        macro_f1(labels[held], val[best][held], 3), abs=1e-6)
    assert float(version.tags["promotion_p_non_inferior"]) >= 1 / 10_001  # never 0
    assert 0 <= float(version.tags["promotion_power_vs_best_member"]) <= 1
    assert version.tags["choice"] == cfg.search.choice and "search_optimism" in version.tags
    assert "promotion gate (holdout): became champion" in result.report_markdown
    # The report carries every baseline a reviewer asks for, and says what the numbers allow.
    for needle in ("| majority | majority |", "| tfidf |", "| full |", "uniform soup", "greedy soup", "| ensemble |",
                   "Holm-adjusted", "## What the numbers allow", "Merge vs the best member", "Merge vs the logit "
                   "ensemble", "Merge vs the bigger model: not answered", "| validation − test |",
                   "Optimism (validation − test macro-F1 of what a choice picked"):
        assert needle in result.report_markdown, needle
    # The optimism column is each chosen row's validation minus test macro-F1.
    test_f1 = {r.data.tags["mllm.model_uri"]: r.data.metrics["macro_f1"]
               for r in store.find_runs({"mllm.stage": "evaluation", "mllm.split": "test"})}
    line = next(x for x in result.report_markdown.splitlines() if x.startswith(f"| {challenger} |"))
    recorded = float(store.resolve(challenger)[1].tags["val_macro_f1"])
    assert f"{recorded - test_f1[challenger]:+.4f}" in line.split("|")[11]
    assert "p=0.000" not in result.report_markdown


@pytest.mark.slow
def test_logged_models_carry_their_test_metrics(pipeline) -> None:
    cfg, _, _ = pipeline
    store = Store(cfg)
    experiment = store.client.get_experiment_by_name(cfg.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    models = store.client.search_logged_models([experiment.experiment_id])
    by_version = {}
    for name in ("tiny-base", "tiny-finetuned", "tiny-merged", "tiny-ensemble"):
        for v in store.find_versions(name, {}):
            by_version[(name, v.version)] = Store.model_id(v)
    assert {n for n, _ in by_version} == {"tiny-base", "tiny-finetuned", "tiny-merged", "tiny-ensemble"}
    logged = {m.model_id: m for m in models}
    assert set(by_version.values()) <= set(logged)
    for (name, version), model_id in by_version.items():
        metrics = {m.key: m for m in logged[model_id].metrics or []}
        assert "test_macro_f1" in metrics, (name, version, sorted(metrics))
        assert metrics["test_macro_f1"].dataset_name == "tiny-test"
        assert {"test_accuracy", "test_nll", "test_ece", "test_macro_f1_ci_low"} <= set(metrics)
    ensemble = store.newest("ensemble")
    assert len(ensemble.tags["members"].split(",")) == 3 and ensemble.tags["member_0"].startswith("models:/")
    # Logging runs every model on its input example (the ensemble loads its members then): none may fail.
    assert not [w for w in MLFLOW_WARNINGS if "input example" in w], MLFLOW_WARNINGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
@pytest.mark.parametrize("uri", ["models:/tiny-merged@champion", "models:/tiny-ensemble/1"])
def test_mlflow_models_serve_answers_invocations(pipeline, uri: str) -> None:
    import mlflow

    cfg, _, tmp = pipeline
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri, "MLFLOW_REGISTRY_URI":
           cfg.tracking.tracking_uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        for _ in range(120):  # the server imports the model's libraries first: seconds
            if server.poll() is not None:
                raise AssertionError(server.stdout.read().decode()[-3000:])
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                break
            time.sleep(1)
        status, answer = _post(port, {"inputs": REVIEWS})
        assert status == 200, answer
        rows = answer["predictions"]
        assert len(rows) == 3 and all(r["label"] in ("negative", "neutral", "positive") for r in rows)
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
        local = mlflow.pyfunc.load_model(uri).predict(REVIEWS)
        assert [r["label"] for r in rows] == [p.label for p in local]
        assert _post(port, {"inputs": []}) == (200, {"predictions": []})
        status, answer = _post(port, {"inputs": [1, 2]})
        assert status == 400 and "Expected type str" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_plain_folder_versions_still_load_and_broken_models_are_refused(pipeline, tmp_path: Path) -> None:
    """Versions registered before mllm logged MLflow models (plain folders) still load in mllm's stages; a model
    whose files are missing is refused in one line naming its URI."""
    from mllm import evaluate
    cfg, result, _ = pipeline
    store = Store(cfg)
    member = store.download("models:/tiny-finetuned/1")  # the Hugging Face folder inside the MLflow model
    old = tmp_path / "old"
    shutil.copytree(member, old)
    name = "legacy-merged"
    store.client.create_registered_model(name)
    version = store.client.create_model_version(name, str(old))
    folder = store.download(f"models:/{name}/{version.version}", tmp_path / "dl")
    assert (folder / "config.json").is_file()
    scored = evaluate.run(cfg, [f"models:/{name}/{version.version}"], split="validation", baselines=False)
    assert scored.evaluations[0].metrics["rows"] > 0

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    version = store.client.create_model_version(name, str(broken))
    with pytest.raises(MllmError, match=f"models:/{name}/{version.version}: the model's files are missing"):
        store.download(f"models:/{name}/{version.version}", tmp_path / "dl2")
