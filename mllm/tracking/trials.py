"""The Optuna study behind a search: its storage (with heartbeats and retries of killed workers' trials), its
name, objectives and samplers, and its best trial, which `mllm.promote` also reads.

    st = open_storage(cfg)                    # sqlite:///optuna.db, or one PostgreSQL shared by many workers
    study = optuna.load_study(study_name=study_name(cfg), storage=st)
    best(study)                               # the trial promote materialises

A trial whose worker stops beating for `search.grace_s` seconds is failed and re-queued with the same
parameters (up to 3 times), and its MLflow run is ended KILLED.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from mllm.basics import redact
from mllm.config.schema import ExperimentConfig
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.evaluation.choice import candidates_of, choose, validation_parts
from mllm.evaluation.selection import best_member
from mllm.tracking.sampling import order_free_sampler
from mllm.tracking.store import Store


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.search.study_name or f"{cfg.name}-search"


def objectives(cfg: ExperimentConfig) -> list[str]:
    second = cfg.search.second_objective
    return ["maximize"] + ([] if second == "none" else ["minimize" if second == "density" else "maximize"])


def startup_trials(cfg: ExperimentConfig) -> int:
    """Random start-up trials before TPE / CMA-ES model the space: search.startup_trials, else n_trials // 4 and
    at least 4 (TPE's fixed 10 would leave a 10-trial search all random)."""
    s = cfg.search
    return s.startup_trials if s.startup_trials is not None else max(4, s.n_trials // 4)


def sampler(cfg: ExperimentConfig) -> Any:
    """search.sampler, built afresh for each trial from (search.seed, the trial's index): workers and restarts do
    not change what is proposed (mllm.tracking.sampling)."""
    import optuna

    startup = startup_trials(cfg)

    def make(seed: int) -> Any:
        if cfg.search.sampler == "tpe":  # liar: parallel workers spread out
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup)
        if cfg.search.sampler == "cmaes":  # the method (categorical) is sampled independently
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        if cfg.search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.NSGAIISampler(seed=seed)

    return order_free_sampler(make, cfg.search.seed)


def _retry_stale(cfg: ExperimentConfig | None, study: Any, trial: Any) -> None:
    """A killed worker's trial: re-queue it with the same parameters and end its MLflow run KILLED."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id and cfg is not None:
        Store(cfg).terminate_run(run_id, "KILLED")


@functools.cache
def _sqlite_storage_class() -> type:
    """RDBStorage whose taking of a WAITING trial is one conditional UPDATE. Optuna takes it by reading the trial
    `FOR UPDATE` and then writing RUNNING; SQLite has no row locks, so two workers that both read WAITING both took
    the trial, ran it twice, and the slower one failed with "Cannot tell a COMPLETE trial" (optuna#4621; seen in
    tests/test_search.py under CPU contention). PostgreSQL locks the row and keeps Optuna's way."""
    from datetime import datetime

    import optuna
    import sqlalchemy as sa
    from optuna.storages._rdb import models  # the trials table Optuna's own storage writes

    class SqliteStorage(optuna.storages.RDBStorage):
        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            if state != optuna.trial.TrialState.RUNNING or values is not None:
                return super().set_trial_state_values(trial_id, state, values)
            table = models.TrialModel
            take = (sa.update(table)
                    .where(table.trial_id == trial_id, table.state == optuna.trial.TrialState.WAITING)
                    .values(state=optuna.trial.TrialState.RUNNING, datetime_start=datetime.now()))
            with self.engine.begin() as conn:
                taken = conn.execute(take).rowcount == 1
            if not taken and self.get_trial(trial_id).state.is_finished():
                raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial_id} has already finished")
            return taken

    return SqliteStorage


def storage(url: str, heartbeat: int = 10, grace: int = 30, cfg: ExperimentConfig | None = None,
            wait_s: float = 0) -> Any:
    """The study storage, with heartbeats: a trial whose worker stops beating for `grace` seconds is failed
    and re-queued with the same parameters (up to 3 times); with `cfg`, its MLflow run in that store is ended.
    An unreachable database is retried for `wait_s` seconds (a worker whose search was running a moment ago: the
    database is restarting); a malformed URL, or one unreachable past that, is refused in one line."""
    import time
    import warnings

    import optuna
    import sqlalchemy.exc

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough
    end = time.monotonic() + wait_s
    while True:
        try:
            kind = _sqlite_storage_class() if url.startswith("sqlite") else optuna.storages.RDBStorage
            return kind(url, heartbeat_interval=heartbeat, grace_period=grace,
                        heartbeat_stale_trial_callback=functools.partial(_retry_stale, cfg),
                        engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except sqlalchemy.exc.OperationalError as e:
            if time.monotonic() < end:
                time.sleep(min(2.0, heartbeat))
                continue
            error: Exception = e
        except Exception as e:  # sqlalchemy's ArgumentError and the like: a bad URL
            error = e
        first = redact(str(error)).splitlines()[0][:200]
        raise MllmError(f"search.storage: cannot open {redact(url)} ({first})",
                        "give a database URL (sqlite:///optuna.db, postgresql+psycopg2://user:pw@host/db) "
                        "that is reachable") from None


def open_storage(cfg: ExperimentConfig, wait: bool = False) -> Any:
    """`wait`: retry an unreachable database for search.storage_wait_s (a worker joining a running search)."""
    return storage(cfg.search.storage, cfg.search.heartbeat_s, cfg.search.grace_s, cfg,
                   cfg.search.storage_wait_s if wait else 0)


def finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def best(study: Any) -> Any | None:
    """The best finished trial (multi-objective: the Pareto trial with the highest macro-F1)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def reference_nll(store: Store, members: list[str]) -> float | None:
    """The validation NLL of the best member (mllm.evaluation.selection's rule), as recorded on its registered version:
    the NLL guard's reference where the members were validated on the rows the trials are scored on."""
    versions = {m: store.resolve(m)[1] for m in members}
    tags = {m: dict(v.tags) if v is not None else {} for m, v in versions.items()}

    def value(m: str, key: str) -> float | None:
        return float(tags[m][key]) if tags[m].get(key) else None

    return guard_reference([(m, value(m, "val_macro_f1"), value(m, "val_nll")) for m in members])


def guard_reference(scores: Sequence[tuple[str, float | None, float | None]]) -> float | None:
    """The NLL guard's reference from (member, validation macro-F1, validation NLL): the best member's NLL."""
    top, _ = best_member(list(scores))
    return next((nll for m, _, nll in scores if m == top), None) if top else None


def chosen(cfg: ExperimentConfig, study: Any, store: Store,
           member_scores: Sequence[tuple[str, float | None, float | None]] | None = None) -> Any | None:
    """The searched merge: search.choice applied to the study's complete trials (mllm.evaluation.choice), or None when
    no complete trial kept its per-review scores. `member_scores`: the members' (URI, macro-F1, NLL) on the rows the
    trials were scored on, for the NLL guard, where their registered figures are on other rows (domain specialists:
    mllm.search.member_validation); None: their registered figures."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    candidates = candidates_of(complete)
    if not candidates:
        return None
    reference = (guard_reference(member_scores) if member_scores is not None
                 else reference_nll(store, study.user_attrs.get("members", [])))
    data = load_splits(cfg.data)
    labels = data.validation["label"].to_numpy()
    search, holdout, groups = validation_parts(cfg.search, data.validation)
    s = cfg.search
    return choose(candidates, labels, search, holdout, len(data.label_names), s.choice, s.top_k, s.se_multiplier,
                  s.nll_guard, reference, s.seed, groups)
