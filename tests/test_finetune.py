"""The fine-tune stage on tiny random models: registration, lineage, reuse, early stopping, freezing, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mllm.config import ExperimentConfig, load_config
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.tracking.store import Store

from .conftest import TINY, tiny_cfg


def runs(cfg: ExperimentConfig):
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    return mlflow.search_runs(experiment_names=[cfg.name], output_format="list")


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns lands here
    return tmp_path


def test_finetune_registers_base_and_members(in_tmp: Path) -> None:
    from mllm.finetune import run
    from mllm.models.modeling import load_classifier

    cfg = tiny_cfg(in_tmp)
    result = run(cfg, progress=False)
    assert [m.name for m in result.members] == ["shard-0", "shard-1", "shard-2", "full"]  # include_full: default on
    assert [m.version for m in result.members] == ["1", "2", "3", "4"] and not any(m.reused for m in result.members)
    assert result.base_uri == "models:/tiny-base/1"

    all_runs = runs(cfg)
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    parent = next(r for r in all_runs if r.info.run_name == "finetune")
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["base", "full", "shard-0", "shard-1", "shard-2"]
    member_run = next(r for r in children if r.info.run_name == "shard-1")
    assert member_run.data.params["finetune.batch_size"] == "16" and member_run.data.params["member.shard"] == "1"
    assert member_run.data.tags["mllm.dataset_fingerprint"] == result.fingerprint
    assert "mllm.git_sha" in member_run.data.tags and "mllm.version.torch" in member_run.data.tags
    inputs = {i.dataset.name for i in member_run.inputs.dataset_inputs}
    assert inputs == {"tiny-shard-1-train", "tiny-shard-1-validation"}
    history = Store(cfg).client.get_metric_history(member_run.info.run_id, "train_loss")
    assert len(history) == member_run.data.metrics["steps"] > 1  # loss logged per step
    assert "val_macro_f1" in member_run.data.metrics and "learning_rate" in member_run.data.metrics

    version = Store(cfg).client.get_model_version("tiny-finetuned", "2")
    assert version.tags["member"] == "shard-1" and version.tags["base_version"] == "1"
    assert version.tags["dataset_fingerprint"] == result.fingerprint and version.run_id == member_run.info.run_id
    local = Store(cfg).download("models:/tiny-finetuned/2", in_tmp / "dl")
    model, tokenizer = load_classifier(local)
    assert model.config.id2label[0] == "negative" and tokenizer.pad_token_id == model.config.pad_token_id
    # Members moved away from the shared base, and from each other.
    base = load_file(result.base_dir / "model.safetensors")
    store = Store(cfg)
    weights = [load_file(store.download(m.model_uri, in_tmp / m.name) / "model.safetensors") for m in result.members]
    key = "score.weight"
    assert not torch.equal(weights[0][key], base[key]) and not torch.equal(weights[0][key], weights[1][key])
    assert not (cfg.output_dir / "members" / "shard-0" / "checkpoints").exists()  # cleaned once registered

    again = run(cfg, progress=False)
    assert all(m.reused for m in again.members) and [m.version for m in again.members] == ["1", "2", "3", "4"]
    assert len(Store(cfg).find_versions("tiny-base", {})) == 1


def test_a_pretrained_bigger_model_is_fine_tuned_on_all_rows_and_registered_apart(in_tmp: Path) -> None:
    """model.bigger_model naming a pretrained body (here tiny-llama next to tiny-gpt2 members): finetune trains it
    on all training rows with the members' recipe + model.bigger_finetune, registers it as <exp>-bigger (not a
    member, and its base is not the members' base), and evaluate finds it there."""
    import json

    from mllm.finetune import bigger_uri, run

    cfg = tiny_cfg(in_tmp, "model.bigger_model=tiny-llama", "model.bigger_finetune={freeze_layers: 1}",
                   "finetune.members=2", "finetune.include_full=false")
    result = run(cfg, progress=False)
    assert [m.name for m in result.members] == ["shard-0", "shard-1", "bigger"]
    assert result.members[-1].model_uri == "models:/tiny-bigger/1"
    store = Store(cfg)
    version = store.client.get_model_version("tiny-bigger", "1")
    assert version.tags["pretrained"] == "tiny-llama" and version.tags["strategy"] == "full"
    assert store.client.get_run(version.run_id).data.params["member.train_rows"] == str(len(load_splits(
        cfg.data).train))
    assert sorted(v.tags["member"] for v in store.find_versions("tiny-finetuned", {})) == ["shard-0", "shard-1"]
    assert len(store.find_versions("tiny-base", {})) == 1  # the bigger model's own base is not registered
    folder = store.download("models:/tiny-bigger/1")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    frozen = load_file(folder / "model.safetensors")
    base = load_file(next((cfg.output_dir / "bigger-base").iterdir()) / "model.safetensors")
    assert torch.equal(frozen["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(frozen["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert bigger_uri(cfg, store) == "models:/tiny-bigger/1"
    again = run(cfg, members=["bigger"], progress=False)  # --member bigger: only it, reused
    assert [(m.name, m.reused) for m in again.members] == [("bigger", True)]
    with pytest.raises(MllmError, match="has not been fine-tuned"):
        bigger_uri(tiny_cfg(in_tmp, "model.bigger_model=tiny-bert"), store)


def test_members_by_seed_and_domain(in_tmp: Path, shared_data: Path) -> None:
    from mllm.finetune import plan_members

    cfg = tiny_cfg(in_tmp, "finetune.strategy=seeds", "finetune.members=2", "finetune.include_full=true",
                   "finetune.learning_rates=[0.001, 0.0001]")
    splits = load_splits(cfg.data)
    specs = plan_members(cfg, splits)
    # Every seed member trains on all rows: no separate full member (it would be seed-0 again).
    assert [(s.name, s.seed, s.learning_rate, len(s.rows)) for s in specs] == [
        ("seed-0", 42, 0.001, len(splits.train)), ("seed-1", 43, 0.0001, len(splits.train))]
    yelp = {"name": "yelp", "path": str(shared_data / "yelp" / "yelp.csv.gz"), "label_column": "stars",
            "label_kind": "stars5"}
    cfg = tiny_cfg(in_tmp, "finetune.strategy=domains", f"data.datasets=[{{preset: drugscom-sample}}, {yelp}]",
                   "finetune.include_full=false")
    specs = plan_members(cfg, load_splits(cfg.data))
    assert [s.name for s in specs] == ["domain-drugscom-sample", "domain-yelp"]
    assert all(set(s.rows["domain"]) == {s.domain} for s in specs)
    with pytest.raises(MllmError, match="needs two or more datasets"):
        plan_members(tiny_cfg(in_tmp, "finetune.strategy=domains"), load_splits(tiny_cfg(in_tmp).data))


def test_unknown_member_is_refused(in_tmp: Path) -> None:
    from mllm.finetune import run

    with pytest.raises(MllmError, match="--member shard-9: no such member; fix: choose from shard-0, shard-1"):
        run(tiny_cfg(in_tmp), ["shard-9"], progress=False)
    assert not (in_tmp / "mlflow.db").exists()  # refused before any tracking store was touched


def test_member_key_covers_its_rows_and_the_member_count(in_tmp: Path) -> None:
    """shard-0 of a 3-way split and shard-0 of a 2-way split are different members: never reused for each other."""
    from mllm.finetune import member_key, plan_members

    def keys(*overrides: str) -> dict[str, str]:
        cfg = tiny_cfg(in_tmp, *overrides)
        return {s.name: member_key(cfg, s, "base-v1", "fp", "sha") for s in plan_members(cfg, load_splits(cfg.data))}

    three, again, two = keys("finetune.members=3"), keys("finetune.members=3"), keys("finetune.members=2")
    assert three == again  # deterministic: a rerun reuses
    assert three["shard-0"] != two["shard-0"] and three["shard-1"] != two["shard-1"]
    cfg = tiny_cfg(in_tmp, "finetune.members=3")
    spec = plan_members(cfg, load_splits(cfg.data))[0]
    changed = type(spec)(spec.name, spec.strategy, spec.rows.iloc[1:], spec.seed, spec.learning_rate, shard=spec.shard)
    assert member_key(cfg, changed, "base-v1", "fp", "sha") != three["shard-0"]  # one row less: another member


def _train(tmp: Path, **ft_overrides: object):
    from mllm.models.modeling import build_base
    from mllm.models.training import train_member

    cfg = tiny_cfg(tmp, *(f"finetune.{k}={v}" for k, v in ft_overrides.items()))
    splits = load_splits(cfg.data)
    base = build_base(cfg.model, splits.label_names, 0, tmp / "base")
    result = train_member(base, splits.train["text"].tolist(), splits.train["label"].to_numpy(),
                          splits.validation["text"].tolist(), splits.validation["label"].to_numpy(),
                          cfg.finetune, cfg.model, tmp / "work", seed=1, learning_rate=cfg.finetune.learning_rate,
                          key="k", progress=False)
    return base, result


def test_early_stopping_on_validation_macro_f1(tmp_path: Path) -> None:
    # A learning rate too small to change predictions: macro-F1 never improves, so training stops after
    # the first evaluation plus `patience` evaluations without gain.
    _, result = _train(tmp_path, learning_rate=1e-12, epochs=20, eval_every_steps=1, early_stopping_patience=2)
    assert result.stopped_early and result.steps == 3 and len(result.history) == 3
    assert result.best["step"] == 1


def test_freezing_keeps_embeddings_and_lower_layers(tmp_path: Path) -> None:
    base, result = _train(tmp_path, freeze_embeddings="true", freeze_layers=1, learning_rate=0.01)
    before, after = load_file(base / "model.safetensors"), load_file(result.model_dir / "model.safetensors")
    for name in before:
        same = torch.equal(before[name], after[name])
        frozen = name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))
        assert same == frozen, name


def test_gradient_accumulation_counts_one_step_per_group(tmp_path: Path) -> None:
    # batch 8 x 2 accumulated micro-batches makes as many optimizer steps as batch 16 (weights differ by dropout).
    _, big = _train(tmp_path / "a", batch_size=16, grad_accum=1, epochs=1)
    _, acc = _train(tmp_path / "b", batch_size=8, grad_accum=2, epochs=1)
    assert big.steps == acc.steps
    assert np.isfinite(acc.best["nll"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_member_resumes_from_newest_complete_checkpoint(tmp_path: Path, sig: signal.Signals) -> None:
    """Kill a member mid-training; the rerun resumes from its checkpoint and ends where an uninterrupted run does."""
    sets = ["--set", "finetune.epochs=25", "--set", "finetune.eval_every_steps=4", "--set", "data.max_rows=150"]
    mllm = str(Path(sys.executable).with_name("mllm"))

    def cmd(folder: Path) -> list[str]:
        folder.mkdir(exist_ok=True)
        return [mllm, "finetune", "-c", str(TINY), "--member", "shard-0", *sets,
                "--set", f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db", "--set", f"output_dir={folder}/out"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    checkpoints = killed / "out" / "members" / "shard-0" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*/state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated" in err.decode()
        statuses = {r.info.run_name: r.info.status for r in runs(load_config(TINY, [
            f"tracking.tracking_uri=sqlite:///{killed}/mlflow.db"]))}
        assert statuses["shard-0"] == "KILLED" and statuses["finetune"] == "KILLED"
    else:
        assert proc.returncode == -signal.SIGKILL
    assert list(checkpoints.glob("step-*"))

    resumed = subprocess.run(cmd(killed), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cfg = load_config(TINY, [f"tracking.tracking_uri=sqlite:///{killed}/mlflow.db"])
    member = [r for r in runs(cfg) if r.info.run_name == "shard-0" and r.info.status == "FINISHED"]
    assert len(member) == 1
    resumed_from = int(member[0].data.tags["mllm.resumed_from_step"])
    assert resumed_from > 0 and resumed_from % 4 == 0 and member[0].data.metrics["steps"] > resumed_from

    fresh = tmp_path / "fresh"
    done = subprocess.run(cmd(fresh), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(killed / "out" / "members" / "shard-0" / "final" / "model.safetensors")
    b = load_file(fresh / "out" / "members" / "shard-0" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_failed_stage_ends_runs_failed(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside training ends the member run and its parent FAILED, and registers nothing."""
    from mllm import finetune
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mllm.finetune.train_member", boom)
    cfg = tiny_cfg(in_tmp)
    with pytest.raises(RuntimeError, match="disk full"):
        finetune.run(cfg, ["shard-0"], progress=False)
    statuses = {r.info.run_name: r.info.status for r in runs(cfg)}
    assert statuses == {"finetune": "FAILED", "base": "FINISHED", "shard-0": "FAILED"}
    assert Store(cfg).find_versions("tiny-finetuned", {}) == []


def test_cut_model_upload_leaves_no_pending_model(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow creates a LoggedModel before it uploads its files and marks it FAILED on an Exception, but not on
    SIGTERM or Ctrl-C (BaseException) mid-upload: then mllm marks it FAILED, so the Models tab lists no model
    with missing files as pending, and the run ends KILLED."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from mllm.errors import Terminated

    def sigterm(*args, **kwargs):
        raise Terminated("signal 15")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", sigterm)
    cfg = tiny_cfg(in_tmp)
    store = Store(cfg)
    checkpoint = in_tmp / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(Terminated):
        with store.run("cut", stage="test", system_metrics=False) as run:
            run.model("tiny-cut", checkpoint, ("negative", "positive"), ["fine"], {}, {})
    experiment = store.client.get_experiment_by_name(cfg.name).experiment_id
    models = store.client.search_logged_models([experiment])
    assert [(m.name, m.status) for m in models] == [("tiny-cut", LoggedModelStatus.FAILED)]
    assert [r.info.status for r in runs(cfg)] == ["KILLED"]
