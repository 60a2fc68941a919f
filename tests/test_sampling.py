"""Order-free proposals and the exact trial budget (mllm.tracking.sampling): a study's recipes depend on the seed
and each trial's index, not on which worker asked first, how many ran at once or how many were killed."""

from __future__ import annotations

import optuna
import pytest

from mllm.tracking.sampling import Surplus, check_budget, index_seed, next_index, order_free_sampler, run_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(seed: int = 3) -> optuna.Study:
    return optuna.create_study(sampler=order_free_sampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed))


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1) + trial.suggest_int("k", 0, 9)


def _recipes(study: optuna.Study) -> list[tuple[float, int]]:
    return sorted((t.params["x"], t.params["k"]) for t in study.trials if t.state.name == "COMPLETE")


def test_index_seed_is_stable_and_distinct() -> None:
    assert index_seed(0, 1) == index_seed(0, 1)
    assert len({index_seed(s, i) for s in range(3) for i in range(50)}) == 150


def test_interleaving_and_a_killed_trial_do_not_change_the_recipes() -> None:
    plain = _study()
    run_budget(plain, _objective, 6, timeout_s=None, poll_s=0.01, progress=False)
    # two "workers" asking alternately, one trial failed mid-way and re-queued with its parameters (as Optuna's
    # heartbeat retry does), and a study with another sampler seed: only the seed changes what is proposed
    interleaved = _study()
    first, second = interleaved.ask(), interleaved.ask()
    x = first.suggest_float("x", 0, 1), first.suggest_int("k", 0, 9)
    interleaved.tell(second, _objective(second))
    interleaved.tell(first, state=optuna.trial.TrialState.FAIL)
    interleaved.enqueue_trial({"x": x[0], "k": x[1]}, skip_if_exists=False)
    waiting = [t for t in interleaved.get_trials() if t.state.name == "WAITING"][0]
    interleaved._storage.set_trial_system_attr(waiting._trial_id, "failed_trial", first.number)
    run_budget(interleaved, _objective, 6, timeout_s=None, poll_s=0.01, progress=False)
    assert _recipes(interleaved) == _recipes(plain)
    assert len(_recipes(plain)) == 6
    other = _study(seed=4)
    run_budget(other, _objective, 6, timeout_s=None, poll_s=0.01, progress=False)
    assert _recipes(other) != _recipes(plain)


def test_a_trial_past_the_budget_is_failed_without_running() -> None:
    study = _study()
    run_budget(study, _objective, 3, timeout_s=None, poll_s=0.01, progress=False)
    assert next_index(study.get_trials()) == 3
    late = study.ask()  # a worker that asked in the same instant as the one that took the last index
    with pytest.raises(Surplus):
        check_budget(late, 3)
    assert "surplus" in study.get_trials()[-1].user_attrs
    run_budget(study, _objective, 3, timeout_s=None, poll_s=0.01, progress=False)  # complete: returns at once
    assert len(_recipes(study)) == 3


class _Flaky:
    """A study whose storage is unreachable for its first `down` calls (a restarting database)."""

    def __init__(self, down: int) -> None:
        self.down = down

    def get_trials(self, deepcopy: bool = False) -> list:
        import sqlalchemy.exc

        if self.down > 0:
            self.down -= 1
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return []


def test_an_unreachable_storage_is_waited_for_then_named_in_one_line() -> None:
    import sqlalchemy.exc

    from mllm.errors import MllmError
    from mllm.tracking.sampling import wait_for_storage

    err = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    wait_for_storage(_Flaky(down=3), wait_s=5, poll_s=0.01, error=err, where="postgresql://u:***@db/optuna")
    with pytest.raises(MllmError) as caught:
        wait_for_storage(_Flaky(down=10**6), wait_s=0.05, poll_s=0.01, error=err,
                         where="postgresql://u:***@db/optuna")
    line = str(caught.value)
    assert "search.storage" in line and "postgresql://u:***@db/optuna" in line and "\n" not in line
    assert "rerun" in line



def test_two_workers_that_both_saw_a_waiting_trial_cannot_both_take_it(tmp_path, monkeypatch) -> None:
    """SQLite has no row locks: with Optuna's own storage two workers that both read a WAITING trial both set it
    RUNNING (one trial run twice, then "Cannot tell a COMPLETE trial"). mllm's SQLite storage lets one take it."""
    import threading

    from optuna.storages._rdb import models

    from mllm.tracking.trials import storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    read = models.TrialModel.find_or_raise_by_id
    both_read = threading.Barrier(2, timeout=5)

    def read_then_wait(*args, **kwargs):  # each worker has read the trial before either writes
        found = read(*args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            both_read.wait()
        return found

    def take_twice(storages) -> list[bool]:
        study = optuna.create_study(study_name="s", storage=url, load_if_exists=True)
        study.enqueue_trial({"x": float(len(study.trials))})
        trial_id = study.trials[-1]._trial_id
        out: list[bool] = [False, False]

        def take(i: int) -> None:
            try:
                out[i] = storages[i].set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
            except threading.BrokenBarrierError:
                out[i] = False

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", staticmethod(read_then_wait))
    assert take_twice([optuna.storages.RDBStorage(url) for _ in range(2)]) == [True, True]  # Optuna's way: twice
    assert sorted(take_twice([storage(url) for _ in range(2)])) == [False, True]  # mllm's: once
