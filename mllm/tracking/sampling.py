"""Proposals that do not depend on the order trials run in, and a study's exact trial budget.

Two workers on one study, or a worker restarted after a kill, must not change which recipes a search scores.
Every trial the search samples has an index: its rank among the study's trials that are not retries (a retry of
a killed worker's trial keeps that trial's parameters and takes no index; trials added from merges scored
elsewhere take theirs in the order the pipeline adds them, the same every time). The sampler proposing trial i
is built afresh from seed (search.seed, i), so trial i's recipe depends on the seed, i and the trials finished
before it, never on which worker asked first or how many processes were killed on the way. While the search is
in its random start-up phase (TPE, CMA-ES) that makes the whole set of recipes identical however the work is
interleaved; in the model phase a recipe still reads the trials finished when it was asked, which parallel
workers change.

The budget is search.n_trials indices: a worker asks for a new trial only while an index below it is unused, and
a trial that a race gave an index past the budget is ended FAIL (user attribute `surplus`) without running.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from mllm.basics import first_line
from mllm.errors import MllmError

RETRY_KEY = "failed_trial"  # Optuna's retry callbacks mark the re-queued copy of a failed trial with it


def is_retry(trial: Any) -> bool:
    return RETRY_KEY in trial.system_attrs


def trial_index(trials: Sequence[Any], number: int) -> int:
    """The index of trial `number`: how many trials numbered before it are not retries."""
    return sum(1 for t in trials if t.number < number and not is_retry(t))


def next_index(trials: Sequence[Any]) -> int:
    """The index a new trial would take."""
    return sum(1 for t in trials if not is_retry(t))


def index_seed(seed: int, index: int) -> int:
    """A 32-bit seed for trial `index` of a search seeded `seed`: independent of the worker and of timing."""
    digest = hashlib.sha256(f"mllm-trial:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def order_free_sampler(make: Callable[[int], Any], seed: int) -> Any:
    """A sampler that, before each trial, builds `make(index_seed(seed, index))` and delegates to it."""
    return _sampler_class()(make, seed)


@functools.cache
def _sampler_class() -> type:
    """Defined on first use, so importing this module does not import optuna."""
    from optuna.samplers import BaseSampler

    class OrderFreeSampler(BaseSampler):
        def __init__(self, make: Callable[[int], Any], seed: int) -> None:
            self._make, self._seed = make, seed
            self._by_trial: dict[int, Any] = {}  # a sampler per open trial (one process may hold several)

        def _of(self, study: Any, trial: Any) -> Any:
            if trial.number not in self._by_trial:
                index = trial_index(study.get_trials(deepcopy=False), trial.number)
                self._by_trial[trial.number] = self._make(index_seed(self._seed, index))
            return self._by_trial[trial.number]

        def before_trial(self, study: Any, trial: Any) -> None:
            self._of(study, trial).before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return self._of(study, trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            return self._of(study, trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            return self._of(study, trial).sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
            self._of(study, trial).after_trial(study, trial, state, values)
            self._by_trial.pop(trial.number, None)

        def reseed_rng(self) -> None:  # the seeds come from the index: nothing to reseed
            pass

    return OrderFreeSampler


class Surplus(Exception):
    """A trial a race between workers gave an index past the budget: ended FAIL before it runs."""


def check_budget(trial: Any, n_trials: int) -> None:
    """Raise Surplus (after marking the trial) when `trial` is a new trial past the study's budget."""
    trials = trial.study.get_trials(deepcopy=False)
    if any(t.number == trial.number and is_retry(t) for t in trials):
        return
    index = trial_index(trials, trial.number)
    if index >= n_trials:
        trial.set_user_attr("surplus", f"index {index} >= search.n_trials {n_trials}")
        raise Surplus(f"trial {trial.number}: index {index} is past the budget")


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a study storage raises while its database is unreachable (SQLAlchemy's errors, Optuna's wrapper)."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, StorageInternalError)


def wait_for_storage(study: Any, wait_s: float, poll_s: float, error: BaseException, where: str) -> None:
    """Poll the study's storage until it answers again, or raise one line naming it after `wait_s` seconds."""
    import time

    print(f"search: the study storage {where} is unreachable ({first_line(error, 120)}); waiting up to "
          f"{wait_s:g} s (search.storage_wait_s)", flush=True)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        time.sleep(poll_s)
        try:
            study.get_trials(deepcopy=False)
        except storage_errors():
            continue
        print("search: the study storage is back; continuing", flush=True)
        return
    raise MllmError(f"search.storage: the study storage {where} has been unreachable for {wait_s:g} s "
                    f"({first_line(error, 120)})", "start the database (or fix search.storage), then rerun: "
                    "finished trials are kept and the interrupted one is retried")


def run_budget(study: Any, objective: Callable[[Any], Any], n_trials: int, *, timeout_s: float | None,
               poll_s: float, progress: bool, storage_wait_s: float = 0, where: str = "") -> None:
    """Run trials of `study` one at a time until it has `n_trials` finished (complete or pruned) trials.

    A new trial is asked for only while an index below the budget is unused or a retry waits; while the last
    indices run in other workers this one waits (polling every `poll_s`), since a worker that dies leaves a retry
    someone has to run. Stale trials are failed (and re-queued) by Optuna's heartbeat check before each ask. A
    storage that stops answering (a restarted database) is waited for up to `storage_wait_s` seconds; the trial it
    interrupted is left to the heartbeat check, which re-queues it.
    """
    import time

    from tqdm.auto import tqdm

    start = time.monotonic()
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress)
    try:
        while timeout_s is None or time.monotonic() - start < timeout_s:
            try:
                if not _step(study, objective, n_trials, poll_s, bar):
                    return
            except storage_errors() as exc:
                wait_for_storage(study, storage_wait_s, poll_s, exc, where)
    finally:
        bar.close()


def _step(study: Any, objective: Callable[[Any], Any], n_trials: int, poll_s: float, bar: Any) -> bool:
    """One turn of `run_budget`: run a trial, or wait for other workers' last ones; False when the study is done."""
    import time

    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (states.COMPLETE, states.PRUNED) for t in trials)
    bar.update(done - bar.n)
    if done >= n_trials:
        return False
    waiting = any(t.state == states.WAITING for t in trials)
    if not waiting and next_index(trials) >= n_trials:
        if not any(t.state == states.RUNNING for t in trials):
            return False  # every index used, nothing running, no retry left (killed more than max_retry times)
        optuna.storages.fail_stale_trials(study)
        time.sleep(poll_s)
        return True
    def budgeted(trial: Any) -> Any:
        check_budget(trial, n_trials)
        return objective(trial)

    study.optimize(budgeted, n_trials=1, catch=(Surplus,), gc_after_trial=False, show_progress_bar=False)
    return True
