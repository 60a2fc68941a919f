"""Against the service stack (`bash scripts/stack.sh up`): an MLflow server on PostgreSQL with S3 (moto)
artifacts, and Optuna studies in PostgreSQL. Every mllm step runs as its own process, as on a cluster.

Faults drilled here: four independent search workers on one study, a worker SIGKILLed mid-trial, the tracking
server gone for 20 s in the middle of a search, a fine-tune SIGKILLed in the middle of writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import backdate_heartbeats, trials_that_ran

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
MLLM = str(Path(sys.executable).with_name("mllm"))
FINISHED_STATES = ("COMPLETE", "PRUNED")


@pytest.fixture(scope="module")
def stack() -> dict[str, str]:
    uri = os.environ.get("MLLM_STACK_TRACKING_URI", "")
    storage = os.environ.get("MLLM_OPTUNA_STORAGE", "")
    return {"tracking_uri": uri, "storage": storage, "bucket": os.environ.get("MLLM_STACK_BUCKET", ""),
            "s3": os.environ.get("MLLM_STACK_S3_ENDPOINT", ""), "password": urlparse(storage).password or ""}


def settings(stack: dict[str, str], name: str, out: Path, **extra: object) -> list[str]:
    sets = {"name": name, "tracking.tracking_uri": stack["tracking_uri"], "search.storage": "${MLLM_OPTUNA_STORAGE}",
            "output_dir": str(out), **extra}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def mllm(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the config names the store
    return subprocess.run([MLLM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([MLLM, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def client(stack: dict[str, str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack["tracking_uri"], registry_uri=stack["tracking_uri"])


def all_runs(stack: dict[str, str], experiment: str) -> list:
    c = client(stack)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} on the server"
    return c.search_runs([exp.experiment_id], max_results=5000)


_STORAGES: dict[str, object] = {}


def study(stack: dict[str, str], name: str):
    """The study, through one storage (one connection pool) per test session: the polling loops below would
    otherwise open a pool per look and exhaust PostgreSQL's connection slots."""
    import optuna

    if stack["storage"] not in _STORAGES:
        _STORAGES[stack["storage"]] = optuna.storages.RDBStorage(stack["storage"])
    return optuna.load_study(study_name=name, storage=_STORAGES[stack["storage"]])


@pytest.fixture(scope="module")
def members(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A base and three tiny members registered on the server (one fine-tune for the search drills)."""
    folder = tmp_path_factory.mktemp("svc-members")
    name = f"svc-{uuid.uuid4().hex[:8]}"
    sets = settings(stack, name, folder / "out")
    ok(mllm("finetune", "-c", str(TINY), *sets, cwd=folder))
    return {"name": name, "sets": sets, "folder": folder}


def test_tiny_pipeline_on_the_stack(stack: dict[str, str], tmp_path: Path) -> None:
    """The whole pipeline against the server: artifacts in the bucket, champion loads back by alias, every run
    ended, and the PostgreSQL password (part of search.storage) in no param, tag, description or artifact."""
    import boto3
    import mlflow

    from mllm.config import load_config
    from mllm.models.modeling import load_classifier
    from mllm.tracking.store import Store

    name = f"svc-pipe-{uuid.uuid4().hex[:8]}"
    out = ok(mllm("pipeline", "-c", str(TINY), *settings(stack, name, tmp_path / "out", **{"search.n_trials": 4}),
                  cwd=tmp_path))
    assert f"champion: models:/{name}-merged@champion" in out
    assert stack["password"] not in out

    runs = all_runs(stack, name)
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    stages = {r.data.tags.get("mllm.stage") for r in runs}
    assert {"finetune", "merge", "evaluate", "search", "search-trial", "promote", "pipeline"} <= stages

    # Artifacts went through the server into the bucket.
    s3 = boto3.client("s3", endpoint_url=stack["s3"])
    experiment_id = runs[0].info.experiment_id
    keys, objects = [], {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack["bucket"], Prefix=f"mlflow/{experiment_id}/"):
        for obj in page.get("Contents", []):
            keys.append(obj["Key"])
            objects[obj["Key"]] = s3.get_object(Bucket=stack["bucket"], Key=obj["Key"])["Body"].read()
    assert any(k.endswith("model.safetensors") and "/models/m-" in k for k in keys), keys[:20]  # logged models
    assert any(k.endswith("confusion_matrix.png") for k in keys)
    assert any(k.endswith("report.md") for k in keys)

    # The champion loads back through the registry alias and classifies.
    cfg = load_config(TINY, [f"name={name}", f"tracking.tracking_uri={stack['tracking_uri']}",
                              f"output_dir={tmp_path / 'out'}"])
    folder = Store(cfg).download(f"models:/{name}-merged@champion", tmp_path / "champion")
    model, tokenizer = load_classifier(folder, "champion")
    batch = tokenizer(["Worked well, no side effects.", "Terrible headaches."], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)
    # ... and as an MLflow model, through the server and the bucket, the way a user loads it.
    mlflow.set_tracking_uri(stack["tracking_uri"])
    mlflow.set_registry_uri(stack["tracking_uri"])
    served = mlflow.pyfunc.load_model(f"models:/{name}-merged@champion").predict(["Worked well.", "Awful."])
    assert [set(p.probabilities) for p in served] == [{"negative", "neutral", "positive"}] * 2
    logged = client(stack).search_logged_models([experiment_id])
    with_test = {m.name for m in logged if any(x.key == "test_macro_f1" for x in m.metrics or [])}
    assert {f"{name}-base", f"{name}-finetuned-shard-0", f"{name}-merged-ties", f"{name}-ensemble"} <= with_test
    champion = client(stack).get_model_version_by_alias(f"{name}-merged", "champion")
    assert champion.tags.get("study") and len(champion.tags["parents"].split(",")) == 3

    # No credential anywhere a person or another tool reads.
    secret = stack["password"]
    assert secret
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert secret not in value, f"{run.info.run_name}: {key}"
    for version in client(stack).search_model_versions(f"name LIKE '{name}-%'"):
        assert secret not in json.dumps(version.tags) + (version.description or "")
    for key, body in objects.items():
        assert secret.encode() not in body, key
    storage_tags = [r.data.tags["mllm.storage"] for r in runs if "mllm.storage" in r.data.tags]
    assert storage_tags and all(":***@" in t for t in storage_tags)


def test_four_workers_share_one_postgres_study(stack: dict[str, str], members: dict[str, object]) -> None:
    """Four independent `mllm search` processes on one study: every trial finishes once with one run."""
    folder, sets = members["folder"], members["sets"]
    name = f"w4-{uuid.uuid4().hex[:8]}"
    n = 12
    args = ["search", "-c", str(TINY), *sets, "--study-name", name, "--n-trials", str(n),
            "--set", "search.grace_s=600"]  # nobody is killed here: four workers on two cores are not stale
    ok(mllm(*args, "--create-only", cwd=folder))
    procs = [popen(*args, "--worker-index", str(i), cwd=folder) for i in range(4)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outs)

    everything = study(stack, name).get_trials(deepcopy=False)
    assert sorted(t.number for t in everything) == list(range(len(everything)))
    assert n <= len(everything) <= n + 3  # each worker may start one trial while the last ones finish
    trials = trials_that_ran(everything)  # a trial past the budget is ended FAIL before it runs
    states = [(t.number, t.state.name) for t in trials]
    assert len(trials) == n and all(s in FINISHED_STATES for _, s in states), states
    recipes = {json.dumps(t.user_attrs["recipe"], sort_keys=True) for t in trials}
    assert len(recipes) == len(trials), "workers proposed the same recipe (same sampler seed?)"
    owners = {t.user_attrs["owner"] for t in trials}
    assert len(owners) >= 2, owners

    runs = [r for r in all_runs(stack, str(members["name"])) if r.data.tags.get("mllm.study") == name]
    trial_runs = [r for r in runs if r.data.tags.get("mllm.stage") == "search-trial"]
    assert len(trial_runs) == len(trials)
    by_id = {r.info.run_id: r for r in trial_runs}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["mllm.trial"] == str(t.number)
        assert run.data.tags["mllm.trial_state"] == t.state.name
    assert len([r for r in runs if r.data.tags.get("mllm.stage") == "search"]) == 4
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.chaos  # a fault drill: runs after the default suite (scripts/test.sh)
def test_sigkilled_worker_trial_is_retried(stack: dict[str, str], members: dict[str, object]) -> None:
    """A worker SIGKILLed mid-trial: its trial goes stale (no heartbeat), fails, and is rerun with the same
    parameters by the next worker, which also ends the dead worker's runs KILLED; the study completes."""
    import optuna

    folder, sets = members["folder"], members["sets"]
    name = f"kill-{uuid.uuid4().hex[:8]}"
    n, grace = 10, 60  # long: only the backdated heartbeats below make a trial stale, never a slow machine
    args = ["search", "-c", str(TINY), *sets, "--study-name", name, "--n-trials", str(n),
            "--set", "search.heartbeat_s=1", "--set", f"search.grace_s={grace}"]
    ok(mllm(*args, "--create-only", cwd=folder))
    def running_of(pid: int) -> list:
        running = study(stack, name).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [t for t in running if t.user_attrs.get("owner", "").endswith(f"/{pid}")
                and "mlflow_run_id" in t.user_attrs]  # inside the trial's run

    owner = victim = None
    for attempt in range(4):  # the kill must land inside a trial; a trial can end between the look and the kill
        victim = popen(*args, "--worker-index", str(attempt), cwd=folder)
        caught = None
        deadline = time.time() + 300
        while caught is None and time.time() < deadline and victim.poll() is None:
            done = study(stack, name).get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if done and running_of(victim.pid):  # mid-trial, after at least one finished
                caught = True
            else:
                time.sleep(0.05)
        assert caught, "no trial was caught running"
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        stale = running_of(victim.pid)  # the trial it was in when it died (it may have started the next one)
        if stale:
            owner = stale[0]
            break
    assert owner is not None and victim is not None, "no SIGKILL landed inside a trial in 4 attempts"
    print(f"SIGKILL landed inside trial {owner.number} on attempt {attempt + 1}")
    assert owner.user_attrs["owner"].endswith(f"/{victim.pid}")

    # Every worker so far is dead: backdate their RUNNING trials' last heartbeats past the grace period (stale
    # now, for the survivor's check), instead of waiting it out.
    dead = [t._trial_id for t in study(stack, name).get_trials(deepcopy=False,
                                                                states=(optuna.trial.TrialState.RUNNING,))]
    assert owner._trial_id in dead and backdate_heartbeats(_STORAGES[stack["storage"]], dead, grace + 1) >= 1
    survivor = popen(*args, "--worker-index", "9", cwd=folder)
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out[-3000:]

    trials = study(stack, name).get_trials(deepcopy=False)
    killed = trials[owner.number]
    assert killed.state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == owner.number]
    assert len(retries) == 1 and retries[0].state.name in FINISHED_STATES
    assert retries[0].params == killed.params
    assert retries[0].user_attrs["owner"].endswith(f"/{survivor.pid}")
    assert len([t for t in trials if t.state.name in FINISHED_STATES]) == n

    runs = {r.info.run_id: r for r in all_runs(stack, str(members["name"])) if r.data.tags.get("mllm.study") == name}
    assert runs[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    victim_runs = [r for r in runs.values() if r.data.tags.get("mllm.owner", "").endswith(f"/{victim.pid}")]
    statuses = {r.info.run_name: r.info.status for r in victim_runs}
    assert statuses[f"search-{name}"] == "KILLED", statuses  # ended by the survivor's sweep of dead owners
    assert statuses[f"trial-{owner.number}"] == "KILLED", statuses  # ended by the stale-trial callback
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


@pytest.mark.chaos  # a fault drill: runs after the default suite (scripts/test.sh)
def test_tracking_server_outage_mid_search(stack: dict[str, str], members: dict[str, object]) -> None:
    """The tracking server stops for 20 s while a search is logging: the client retries, the search completes
    and nothing is lost (every trial has its finished run with its metrics), or it fails with one clear line
    and no run is left RUNNING."""
    import optuna

    folder, sets = members["folder"], members["sets"]
    name = f"outage-{uuid.uuid4().hex[:8]}"
    n = 14
    proc = popen("search", "-c", str(TINY), *sets, "--study-name", name, "--n-trials", str(n), cwd=folder)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            done = study(stack, name).get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        except KeyError:  # the study does not exist yet
            done = []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before the outage"
    subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "mlflow-stop"], check=True, capture_output=True)
    stopped = time.time()
    try:
        time.sleep(20)
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "mlflow-start"], check=True, capture_output=True)
    outage = time.time() - stopped
    out = proc.communicate(timeout=600)[0]

    runs = [r for r in all_runs(stack, str(members["name"])) if r.data.tags.get("mllm.study") == name]
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    trials = study(stack, name).get_trials(deepcopy=False)
    print(f"outage of {outage:.1f} s: search exit code {proc.returncode}, {len(trials)} trials")
    if proc.returncode == 0:
        assert outage >= 20
        assert len([t for t in trials if t.state.name in FINISHED_STATES]) == n
        by_id = {r.info.run_id: r for r in runs}
        for t in trials:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.info.status == "FINISHED", (t.number, run.info.status)
            assert "val_macro_f1" in run.data.metrics and "trial_s" in run.data.metrics
            assert run.data.params["trial"] == str(t.number)
        parent = [r for r in runs if r.data.tags.get("mllm.stage") == "search"]
        assert len(parent) == 1 and parent[0].data.metrics["trials_finished"] == n
    else:
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 2 and "tracking" in lines[-1], out[-3000:]


@pytest.mark.chaos  # a fault drill: runs after the default suite (scripts/test.sh)
def test_finetune_killed_mid_checkpoint_resumes(stack: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL while a checkpoint is half written: the rerun ignores (and removes) the partial folder, resumes
    from the last complete checkpoint, ends the killed process's runs KILLED, registers the member once, and
    ends with the weights of an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    name = f"svc-ckpt-{uuid.uuid4().hex[:8]}"
    extra = {"finetune.epochs": 6, "finetune.eval_every_steps": 2, "data.max_rows": 150}
    killed_sets = settings(stack, name, tmp_path / "out", **extra)
    args = ["finetune", "-c", str(TINY), "--member", "shard-0"]
    # Kill the process from inside torch.save, after the second checkpoint's weights and half its optimizer state.
    driver = (
        "import os, signal, sys, torch\n"
        "from mllm.cli import main\n"
        "real, seen = torch.save, []\n"
        "def save(obj, f, *a, **k):\n"  # f: a path or (as mllm saves checkpoints) an open file
        "    name = str(getattr(f, 'name', f))\n"
        "    if name.endswith('optimizer.pt'):\n"
        "        seen.append(name)\n"
        "        if len(seen) == 2:\n"
        "            out = f if hasattr(f, 'write') else open(f, 'wb')\n"
        "            out.write(b'half an optimizer state'); out.flush()\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    crashed = subprocess.run([sys.executable, "-c", driver, *args, *killed_sets], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    checkpoints = tmp_path / "out" / "members" / "shard-0" / "checkpoints"
    complete = sorted(p.name for p in checkpoints.glob("step-*"))
    partial = list(checkpoints.glob(".step-*.tmp"))
    assert len(complete) == 1 and len(partial) == 1
    assert (partial[0] / "model.safetensors").is_file() and not (partial[0] / "state.json").exists()
    first_step = int(complete[0].removeprefix("step-"))

    resumed = ok(mllm(*args, *killed_sets, cwd=tmp_path))
    assert "ended 2 run(s) left RUNNING" in resumed
    assert not list(checkpoints.glob(".step-*.tmp"))
    runs = all_runs(stack, name)
    member = [r for r in runs if r.info.run_name == "shard-0"]
    assert sorted(r.info.status for r in member) == ["FINISHED", "KILLED"]
    finished = next(r for r in member if r.info.status == "FINISHED")
    assert int(finished.data.tags["mllm.resumed_from_step"]) == first_step
    killed_runs = [r for r in runs if r.info.status == "KILLED"]
    assert {r.info.run_name for r in killed_runs} == {"finetune", "shard-0"}
    assert all(r.data.tags.get("mllm.ended_by", "").startswith("orphan sweep") for r in killed_runs)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    versions = client(stack).search_model_versions(f"name = '{name}-finetuned'")
    assert len(versions) == 1

    fresh_name = f"svc-fresh-{uuid.uuid4().hex[:8]}"
    ok(mllm(*args, *settings(stack, fresh_name, tmp_path / "fresh", **extra), cwd=tmp_path))
    a = load_file(tmp_path / "out" / "members" / "shard-0" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fresh" / "members" / "shard-0" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
