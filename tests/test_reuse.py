"""No work done twice: the pipeline's validation scores of the standard merges enter its search as finished trials,
scorers of one process share the members' resident stack, and the report's paired tests share one set of
resamples; each with the figures of the way it replaced."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import tiny_cfg

# --- the report's bootstrap: one set of resamples, the same numbers -------------------------------------------


def _old_bootstrap_ci(labels, preds, k, samples, confidence, seed):  # the implementation before resampled_draws
    from mllm.evaluation.metrics import _resamples, resampled_scores

    acc, f1 = [], []
    for index in _resamples(len(labels), samples, seed):
        a, f = resampled_scores(labels, preds, k, index)
        acc.append(a)
        f1.append(f)
    tail = (1 - confidence) / 2 * 100
    return {name: tuple(float(x) for x in np.percentile(np.concatenate(v), [tail, 100 - tail]))
            for name, v in (("accuracy", acc), ("macro_f1", f1))}


def _old_diffs(labels, a, b, k, samples, seed):  # paired_test's differences before resampled_draws
    from mllm.evaluation.metrics import _resamples, resampled_scores

    return np.concatenate([resampled_scores(labels, a, k, index)[1] - resampled_scores(labels, b, k, index)[1]
                           for index in _resamples(len(labels), samples, seed)])


def _noisy(labels: np.ndarray, keep: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(labels)) < keep, labels, rng.integers(0, 3, len(labels)))


def test_intervals_and_paired_tests_keep_their_numbers_on_shared_draws() -> None:
    from mllm.evaluation.metrics import bootstrap_ci, paired_test

    labels = np.random.default_rng(0).integers(0, 3, 137)
    a, b = _noisy(labels, 0.8, 1), _noisy(labels, 0.6, 2)
    assert bootstrap_ci(labels, a, 3, 1000, 0.9, 4) == _old_bootstrap_ci(labels, a, 3, 1000, 0.9, 4)
    t = paired_test(labels, a, b, 3, samples=1000, confidence=0.9, seed=4)
    old = _old_diffs(labels, a, b, 3, 1000, 4)
    assert np.array_equal(t.diffs, old)
    tail = (1 - 0.9) / 2 * 100
    assert t.macro_f1_diff_ci == tuple(float(x) for x in np.percentile(old, [tail, 100 - tail]))


def test_report_pairs_read_one_set_of_resamples_with_the_figures_of_a_test_per_pair(monkeypatch) -> None:
    from mllm.config import load_config
    from mllm.evaluation import metrics, report

    cfg = load_config("configs/tiny.yaml", ["evaluate.bootstrap_samples=600", "evaluate.seed=3"])
    labels = np.random.default_rng(1).integers(0, 3, 90)
    roles = {"models:/m/1": "member", "models:/m/2": "member", "models:/x/1": "merged", "models:/x/2": "merged",
             "models:/e/1": "ensemble", "majority": "majority"}
    runs = [SimpleNamespace(info=SimpleNamespace(run_id=f"r{i}"),
                            data=SimpleNamespace(tags={"mllm.model_uri": uri, "mllm.role": role}))
            for i, (uri, role) in enumerate(roles.items())]
    preds = {r.info.run_id: _noisy(labels, 0.4 + 0.1 * i, i) for i, r in enumerate(runs)}
    s = report.Scored(runs, ["negative", "neutral", "positive"], labels, preds, {})
    drawn = []
    real = metrics._resamples
    monkeypatch.setattr(metrics, "_resamples", lambda *a, **k: drawn.append(a) or real(*a, **k))
    tests = report.paired_tests(s, "models:/m/1", "models:/x/2", {"ensemble": [runs[4]], "bigger": []}, cfg)
    assert len(drawn) == 1  # one set of index draws for the 5 pairs (a test per pair drew 5)
    assert set(tests) == {(u, "models:/m/1") for u in ("models:/x/1", "models:/x/2", "models:/e/1", "majority")} | {
        ("models:/x/2", "models:/e/1")}
    e = cfg.evaluate
    for (a, b), t in tests.items():
        ra, rb = (next(r.info.run_id for r in runs if r.data.tags["mllm.model_uri"] == u) for u in (a, b))
        alone = metrics.paired_test(labels, preds[ra], preds[rb], 3, e.bootstrap_samples, e.confidence, e.seed)
        assert np.array_equal(t.diffs, alone.diffs) and t.summary() == alone.summary()


# --- members resident once per process --------------------------------------------------------------------------


def test_scorers_of_one_process_share_the_members_and_score_the_same(family, tmp_path, monkeypatch) -> None:
    from mllm.config.schema import MergeConfig
    from mllm.merging import inmemory
    from mllm.merging.scorer import Scorer

    loads = []
    real = inmemory.MemberStack.__init__
    monkeypatch.setattr(inmemory.MemberStack, "__init__", lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    cfg = tiny_cfg(tmp_path, "search.prune=false")
    texts = ["The side effects were terrible.", "Works well, no problems at all", "It did nothing for me",
             "Great, my pain is much better", "I would not recommend it to anyone."]
    reviews = (texts, np.array([0, 2, 0, 2, 0]))
    dirs = [family[f"m{i}"] for i in range(3)]
    recipes = [MergeConfig(method="ties", density=0.5), MergeConfig(method="dare_linear", density=0.4, seed=3),
               MergeConfig(method="linear", weights=[1.0, 0.0, 1.0])]
    alone = Scorer(cfg, family["base"], dirs, reviews=reviews)  # the first scorer loads the members
    fresh = [alone.logits(r) for r in recipes]
    del alone
    gc.collect()  # no holder left: the stack is freed with its scorer, as an unshared one is
    a = Scorer(cfg, family["base"], dirs, reviews=reviews)
    b = Scorer(cfg, family["base"], dirs, reviews=(texts[::-1], reviews[1][::-1]))
    assert len(loads) == 2 and a.stack is b.stack and a.model is not b.model  # loaded once; own containers
    for r, expected in zip(recipes, fresh, strict=True):  # interleaved merges of one stack: the same logits
        got_b = b.logits(r)
        np.testing.assert_array_equal(a.logits(r), expected)
        np.testing.assert_array_equal(got_b, expected[::-1])
    other = Scorer(cfg, family["base"], dirs[:2], reviews=reviews)  # other members: their own stack
    assert other.stack is not a.stack and len(loads) == 3
    del a, b, other
    gc.collect()

    # A study cell keeps its members resident from the validation scorer to the test scorer, then lets them go.
    from mllm.study.work import CellWork

    work = CellWork(None, None, 0, "", cfg, cfg, None, None, "", [], family["base"], dirs, {}, {})
    validation = work.scorer(reviews=reviews)
    del validation
    gc.collect()  # the validation scorer is gone, its members are not
    test = work.scorer(reviews=(texts[:2], reviews[1][:2]))
    assert len(loads) == 4 and test.stack is work.stack
    np.testing.assert_allclose(test.logits(recipes[1]), fresh[1][:2], atol=1e-5)  # other batches: padding
    work.release()
    del test
    gc.collect()
    work.scorer(reviews=reviews)
    assert len(loads) == 5  # released with the last scorer: loaded again


# --- the pipeline: the standard merges are not scored again ------------------------------------------------------


@pytest.mark.slow
def test_pipeline_search_takes_the_validation_scores_as_finished_trials(tmp_path, monkeypatch) -> None:
    import mlflow
    import optuna

    from mllm import pipeline, search
    from mllm.config.schema import MergeConfig
    from mllm.evaluation.choice import ROWS_ATTR, candidates_of
    from mllm.merging import scorer
    from mllm.merging.finished import SOURCE
    from mllm.merging.space import as_trial, same_merge, standard_trials
    from mllm.tracking.store import Store
    from mllm.tracking.trials import chosen

    cfg = tiny_cfg(tmp_path, f"search.storage=sqlite:///{tmp_path}/optuna.db", "search.n_trials=7",
                   "search.mask_seeds=2", "search.prune_min_rows=2", "evaluate.bootstrap_samples=200")
    scored = []  # every recipe a Scorer merged stage by stage (a search trial)
    real = scorer.Scorer.stages

    def stages(self, recipe):
        scored.append(recipe)
        yield from real(self, recipe)

    monkeypatch.setattr(scorer.Scorer, "stages", stages)
    pipeline.run(cfg)
    storage = search.open_storage(cfg)
    study = optuna.load_study(study_name=search.study_name(cfg), storage=storage)
    members, base = study.user_attrs["members"], study.user_attrs["base"]
    k, store = len(members), Store(cfg)
    standard = [as_trial(p, cfg, k)[0] for p in standard_trials(cfg, k, search.greedy_soup_weights(store, members,
                                                                                                   base))]
    assert len(standard) == 5 and len(scored) == 2  # 7 trials: 5 entered finished, 2 sampled and scored
    assert not [r for r in scored if any(same_merge(r, s, k) for s in standard)]
    trials = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)),
                    key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(7))

    # The old way: the same recipes enqueued in a fresh study and scored by a worker.
    old_cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"study_name": "old", "n_trials": 5})})
    search.run(old_cfg, members, base)
    assert len(scored) == 7
    old = sorted(optuna.load_study(study_name="old", storage=storage).trials, key=lambda t: t.number)
    for new, before in zip(trials[:5], old, strict=True):
        assert new.params == before.params and new.distributions == before.distributions
        assert new.values == pytest.approx(before.values, abs=1e-12)
        assert before.intermediate_values and new.intermediate_values == pytest.approx(before.intermediate_values,
                                                                                       abs=1e-12)
        assert new.user_attrs["recipe"] == before.user_attrs["recipe"]  # a DARE merge: the seed nearest the mean
        assert new.user_attrs[ROWS_ATTR]["pred"] == before.user_attrs[ROWS_ATTR]["pred"]
        np.testing.assert_allclose(new.user_attrs[ROWS_ATTR]["nll"], before.user_attrs[ROWS_ATTR]["nll"], atol=2e-4)
        run, old_run = (mlflow.get_run(t.user_attrs["mlflow_run_id"]) for t in (new, before))
        assert run.data.tags["mllm.trial_source"] == SOURCE and run.data.tags["mllm.evaluation_run"]
        for key in ("val_macro_f1", "holdout_macro_f1", "val_macro_f1_std"):
            assert run.data.metrics.get(key) == pytest.approx(old_run.data.metrics.get(key), abs=1e-12), key
    assert sum("val_macro_f1_std" in mlflow.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
               for t in trials[:5]) == 2  # the two DARE merges, over search.mask_seeds seeds

    # The choice policies read them like any trial, and pick among them when they are all there is.
    assert len(candidates_of(trials)) == 7
    only_added = SimpleNamespace(get_trials=lambda deepcopy=False, states=(): trials[:5], user_attrs=study.user_attrs)
    for policy in ("best", "crossfit", "one_se", "nll"):
        pick = chosen(cfg.model_copy(update={"search": cfg.search.model_copy(update={"choice": policy})}),
                      only_added, store)
        assert pick is not None and pick.number < 5
        assert pick.recipe == MergeConfig.model_validate(trials[pick.number].user_attrs["recipe"])

    # A rerun of the pipeline continues its study: nothing added again, nothing scored.
    pipeline.run(cfg)
    assert len(scored) == 7 and len(study.get_trials()) == 7
