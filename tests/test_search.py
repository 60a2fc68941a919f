"""Search and promote on tiny registered members: tracking, resume, stale-trial retry, parallel workers,
the promotion gate and its lock."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from mllm.errors import MllmError
from mllm.tracking.store import Store

from .conftest import backdate_heartbeats, readers_of_splits, tiny_cfg, trials_that_ran


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    from mllm import finetune
    tmp = tmp_path_factory.mktemp("search")
    cfg = tiny_cfg(tmp, f"search.storage=sqlite:///{tmp}/optuna.db", "search.n_trials=6",
                   f"tracking.artifact_location={tmp}/artifacts", "evaluate.bootstrap_samples=200")
    return cfg, finetune.run(cfg, progress=False)


def study(cfg):
    import optuna

    from mllm.search import open_storage, study_name

    return optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg))


@pytest.mark.slow
def test_search_tracks_every_trial_never_reads_test_and_resumes(trained, monkeypatch) -> None:
    import mlflow
    import optuna

    from mllm import search
    from mllm.data import splits as data
    cfg, ft = trained
    real = data.load_splits
    for module in readers_of_splits():  # the test split unreadable to every module that reads data
        monkeypatch.setattr(module, "load_splits", lambda c: dataclasses.replace(real(c), test=None))
    result = search.run(cfg)
    assert result.trials == 6 and result.best_recipe is not None
    parent = mlflow.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(result.best_trial)
    artifacts = {a.path for a in Store(cfg).client.list_artifacts(result.run_id, "figures")}
    assert {"figures/optimization_history.png", "figures/parallel_coordinate.png"} <= artifacts
    assert "figures/param_importances.png" in artifacts or "figures/param_importances.txt" in artifacts
    trials = mlflow.search_runs(experiment_names=[cfg.name], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(trials) == 6 and {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["mllm.trial_state"] for r in trials} <= {"COMPLETE", "PRUNED"}
    assert all(k in trials[0].data.params for k in ("method", "weights", "density", "lambda"))
    assert all("val_macro_f1" in r.data.metrics and not any("test" in m for m in r.data.metrics) for r in trials)
    best = study(cfg).best_trial
    assert best.number == result.best_trial and best.user_attrs["recipe"]["method"] in cfg.search.methods
    # The study started from the standard merges: each searched method at equal weights, enqueued first.
    first = sorted(study(cfg).trials, key=lambda t: t.number)[:4]
    assert [t.params["method"] for t in first] == cfg.search.methods
    assert all(t.params[f"weight_{i}"] == 1.0 for t in first for i in range(3))
    # DARE trials are scored over search.mask_seeds seeds: the mean, its spread, and the seed nearest the mean.
    dare = next(r for r in trials if r.data.params["method"] == "dare_ties")
    seeds = sorted(k for k in dare.data.metrics if k.startswith("val_macro_f1_seed_"))
    assert len(seeds) == cfg.search.mask_seeds and "val_macro_f1_std" in dare.data.metrics
    per_seed = [dare.data.metrics[k] for k in seeds]
    assert dare.data.metrics["val_macro_f1"] == pytest.approx(float(np.mean(per_seed)))
    chosen = int(dare.data.tags["mllm.mask_seed"])
    assert abs(dare.data.metrics[f"val_macro_f1_seed_{chosen}"] - np.mean(per_seed)) == pytest.approx(
        min(abs(v - np.mean(per_seed)) for v in per_seed))

    # A rerun with a higher target continues the same study: 2 more trials, numbers 0..7, no duplicates.
    more = search.run(cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_trials": 8})}))
    numbers = [t.number for t in study(cfg).get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED))]
    assert more.trials == 8 and sorted(numbers) == list(range(8))
    assert search.run(cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_trials": 8})})).trials == 8


@pytest.mark.slow
def test_stale_trial_of_a_killed_worker_is_retried_with_its_parameters(trained) -> None:
    import mlflow
    import optuna

    from mllm import search
    from mllm.tracking import runs as tracking
    cfg, _ = trained
    # Not enqueued: Optuna runs waiting trials first come, first served, so the standard merges would take the
    # three trials before the re-queued one (a real study's budget is larger than its enqueued trials).
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "study_name": "stale", "n_trials": 3, "heartbeat_s": 1, "grace_s": 60, "enqueue": False})})
    search.run(cfg, create_only=True)
    # A worker that started a trial (heartbeat recorded, MLflow run open) and then died with SIGKILL. A long
    # grace period: only the backdated heartbeat below makes a trial stale, never a slow machine.
    st = search.open_storage(cfg)
    s = optuna.load_study(study_name="stale", storage=st)
    trial = s.ask({"method": optuna.distributions.CategoricalDistribution(cfg.search.methods)})
    params = dict(trial.params)
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    experiment = tracking.ensure_experiment(Store(cfg).client, cfg.name)
    dead_run = mlflow.MlflowClient().create_run(experiment, run_name="trial-killed")
    trial.set_user_attr("mlflow_run_id", dead_run.info.run_id)
    trial.set_user_attr("recipe", {"method": params["method"]})
    st.record_heartbeat(trial._trial_id)
    assert backdate_heartbeats(st, [trial._trial_id], cfg.search.grace_s + 1) == 1  # past the grace period: stale

    search.run(cfg)
    trials = optuna.load_study(study_name="stale", storage=st).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params["method"] == params["method"]
    assert retried[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert mlflow.get_run(dead_run.info.run_id).info.status == "KILLED"  # not left RUNNING


@pytest.mark.slow
def test_two_local_workers_share_one_study(trained) -> None:
    import mlflow
    import optuna

    from mllm import search
    cfg, _ = trained
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"study_name": "pair", "n_trials": 6,
                                                                          "workers": 2})})
    result = search.run(cfg)
    trials = trials_that_ran(study(cfg).trials)  # a trial a race put past the budget is ended FAIL unrun
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert result.trials >= 6 and len(done) == len(trials) == 6  # every trial that ran finished, none lost
    assert len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs.get("mlflow_run_id") for t in trials}
    runs = [mlflow.get_run(r) for r in workers]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {result.run_id}
    assert {r.data.tags["mllm.worker"] for r in runs} <= {"0", "1"} and len(runs) == len(trials)


@pytest.mark.slow
def test_layer_group_search_and_its_mergekit_merge(trained) -> None:
    """search.layer_groups: trials carry per-group weights and densities; the best recipe, materialised by
    mergekit through merge.run, is the merge the trial scored (same tensors as the in-memory merge)."""
    from safetensors.torch import load_file

    from mllm import merge, search
    from mllm.merging.inmemory import MemberStack

    cfg, ft = trained
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "study_name": "groups", "n_trials": 3, "layer_groups": 2, "methods": ["dare_ties"], "mask_seeds": 2,
        "sampler": "cmaes"})})
    result = search.run(cfg)
    recipe = result.best_recipe
    assert recipe is not None and [g.name for g in recipe.groups] == ["embeddings", "block 0", "block 1", "head"]
    assert all(g.density is not None for g in recipe.groups) and recipe.seed in (cfg.merge.seed, cfg.merge.seed + 1)
    members = [m.model_uri for m in ft.members if m.name != "full"]
    made = merge.run(cfg.model_copy(update={"merge": recipe}), members, ft.base_uri)
    store = Store(cfg)
    stack = MemberStack(store.download(ft.base_uri), [store.download(u) for u in members])
    ours = stack.merged(recipe)
    reference = load_file(store.download(made.model_uri) / "model.safetensors")
    assert max((ours[n] - reference[n]).abs().max().item() for n in reference) < 2e-6


def test_search_refuses_bad_storage_and_methods(tmp_path) -> None:
    from mllm import search
    cfg = tiny_cfg(tmp_path, "search.storage=notadb://x")
    with pytest.raises(MllmError, match="search.storage: cannot open notadb://x"):
        search.open_storage(cfg)
    with pytest.raises(MllmError, match="no in-memory method"):
        search.run(tiny_cfg(tmp_path, "search.methods=[slerp]"))


def gate_versions(trained, experiment: str, n: int) -> tuple[object, Store, list[str]]:
    """(config, store, version numbers) of `n` fresh versions of `experiment`'s merged model for gate tests (any
    artifacts do: the gate reads predictions it is handed)."""
    cfg, ft = trained
    store = Store(cfg.model_copy(update={"name": experiment}))
    name = store.model_name("merged")
    store.client.create_registered_model(name)
    return cfg, store, [str(store.client.create_model_version(name, ft.base_uri, tags={"n": str(i)}).version)
                        for i in range(n)]


@pytest.mark.slow
def test_concurrent_promoters_leave_champion_on_the_better_model(trained, tmp_path) -> None:
    from mllm.promote import gate

    cfg, store, (v1, v2, v3) = gate_versions(trained, "gate", 3)
    store.set_alias("merged", "champion", v1)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    preds = {v1: np.where(rng.random(400) < 0.4, labels, (labels + 1) % 3),  # champion: poor
             v2: np.where(rng.random(400) < 0.95, labels, (labels + 1) % 3),  # the best
             v3: np.where(rng.random(400) < 0.7, labels, (labels + 1) % 3)}  # beats v1, loses to v2
    barrier = threading.Barrier(2)
    outcomes = {}

    def champion_preds(version: str) -> np.ndarray:
        time.sleep(0.5)  # a slow champion evaluation: without the lock both promoters would decide on v1
        return preds[version]

    def promoter(version: str) -> None:
        barrier.wait()
        outcomes[version] = gate(cfg, store, version, labels, preds[version], None, 3, champion_preds)

    threads = [threading.Thread(target=promoter, args=(v,)) for v in (v3, v2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert str(store.alias_version("merged", "champion").version) == v2
    assert outcomes[v2][1].promote
    # Whoever went first, the other compared itself with the model that was champion at that moment.
    assert outcomes[v3][0] in (v1, v2) and outcomes[v3][1].promote == (outcomes[v3][0] == v1)


@pytest.mark.slow
def test_a_promote_killed_between_its_decision_and_the_alias_is_finished_by_the_rerun(trained, monkeypatch) -> None:
    from mllm.promote import gate

    cfg, store, (v1,) = gate_versions(trained, "gate-killed", 1)
    name = store.model_name("merged")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 300)
    preds = np.where(rng.random(300) < 0.8, labels, (labels + 1) % 3)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # SIGKILL's stand-in: the decision is written, the alias never moves

    monkeypatch.setattr(store, "set_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        gate(cfg, store, v1, labels, preds, None, 3, lambda v: preds)
    monkeypatch.undo()
    assert store.alias_version("merged", "champion") is None
    tags = store.client.get_model_version(name, v1).tags
    assert tags["promotion_outcome"] == "became champion" and tags["promotion_replaced"] == "none (first champion)"

    def decided_again(version: str) -> np.ndarray:
        raise AssertionError(f"the rerun decided again against {version}")

    for _ in range(2):  # the rerun finishes the first decision; a third run changes nothing
        before, decision = gate(cfg, store, v1, labels, preds, None, 3, decided_again)
        assert before is None and decision.promote and str(store.alias_version("merged", "champion").version) == v1
    assert store.client.get_model_version(name, v1).tags == tags


@pytest.mark.slow
def test_a_single_member_recipe_is_refused_at_the_gate_in_one_line(trained, tmp_path, capsys) -> None:
    from mllm import promote, search
    cfg, ft = trained
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "study_name": "single", "n_trials": 1, "enqueue": False, "nll_guard": None})})
    members = [m.model_uri for m in sorted(ft.members, key=lambda m: m.name) if m.name != "full"]
    search.run(cfg, members, ft.base_uri, create_only=True)
    study(cfg).enqueue_trial({"method": "linear", "weight_0": 0.0, "weight_1": 1.0, "weight_2": 0.0})
    result = search.run(cfg, members, ft.base_uri)
    assert result.chosen.number == 0 and result.chosen.recipe.weights == [0.0, 1.0, 0.0]
    store = Store(cfg)
    before = len(store.find_versions(store.model_name("merged"), {}))
    capsys.readouterr()
    out = promote.run(cfg, store=store)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("promote:")]
    assert lines == [f"promote: refused: the searched recipe (trial 0) puts all its weight on {members[1]}: "
                     "promote the member itself"]
    assert out.model_uri is None and not out.decision.promote and members[1] in out.decision.reason
    assert len(store.find_versions(store.model_name("merged"), {})) == before  # nothing materialised or registered
    run = store.client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mllm.single_member"] == members[1]
    assert "promote the member itself" in run.data.tags["mllm.promotion"]
