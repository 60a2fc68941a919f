"""The search space (what a trial can express) and the study's set-up: zero weights, lambda up to K, layer groups,
enqueued standard merges, start-up trials scaled to the budget, pruning stages of at least prune_min_rows reviews."""

from __future__ import annotations

import optuna
import pytest

from mllm.config import load_config
from mllm.merging.groups import LayerGroup
from mllm.merging.scorer import stage_shares
from mllm.search import standard_trials, suggest_recipe, weights_from
from mllm.tracking.trials import startup_trials


def cfg(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


def test_weights_below_the_threshold_are_zero_and_one_member_always_stays() -> None:
    assert weights_from([0.9, 0.01, 0.3], 0.05) == [0.9, 0.0, 0.3]
    assert weights_from([0.01, 0.04, 0.02], 0.05) == [0.0, 0.04, 0.0]  # the largest stays: never an empty merge
    assert weights_from([0.0, 0.0, 0.0], 0.05) == [0.001, 0.0, 0.0]


def fixed(params: dict) -> optuna.trial.FixedTrial:
    return optuna.trial.FixedTrial(params)


def test_the_sum_of_task_vectors_and_single_members_are_reachable() -> None:
    c = cfg("search.methods=[task_arithmetic,ties,linear]")
    # lambda K = 3 with equal weights: the sum of the three task vectors (normalised weights divide by 3).
    recipe = suggest_recipe(fixed({"method": "task_arithmetic", "weight_0": 1.0, "weight_1": 1.0, "weight_2": 1.0,
                                   "lambda": 3.0}), c, 3)
    assert recipe.lambda_ == 3.0 and recipe.weights == [1.0, 1.0, 1.0]
    single = suggest_recipe(fixed({"method": "linear", "weight_0": 0.02, "weight_1": 0.7, "weight_2": 0.0}), c, 3)
    assert single.weights == [0.0, 0.7, 0.0]
    with pytest.warns(UserWarning, match="high=3.0"):  # the distribution ends at K
        suggest_recipe(fixed({"method": "ties", "weight_0": 1.0, "weight_1": 1.0, "weight_2": 1.0, "density": 0.5,
                              "lambda": 3.5}), c, 3)
    capped = cfg("search.methods=[ties]", "search.max_lambda=2.0")
    with pytest.warns(UserWarning, match="high=2.0"):
        suggest_recipe(fixed({"method": "ties", "weight_0": 1.0, "weight_1": 1.0, "weight_2": 1.0, "density": 0.5,
                              "lambda": 2.5}), capped, 3)


def test_layer_groups_get_their_own_weights_and_density() -> None:
    c = cfg("search.methods=[dare_ties]", "search.layer_groups=2")
    groups = [LayerGroup("block 0", ("h.0.",)), LayerGroup("head", ("score.weight",))]
    params = {"method": "dare_ties", "density": 0.5, "lambda": 1.0, **{f"weight_{i}": 0.5 for i in range(3)},
              **{f"g0_weight_{i}": w for i, w in enumerate([1.0, 0.0, 0.2])}, "g0_density": 0.3,
              **{f"g1_weight_{i}": w for i, w in enumerate([0.1, 0.6, 0.9])}, "g1_density": 0.9}
    recipe = suggest_recipe(fixed(params), c, 3, groups)
    assert [g.name for g in recipe.groups] == ["block 0", "head"]
    assert recipe.at("transformer.h.0.attn.c_attn.weight") == ([1.0, 0.0, 0.2], 0.3)
    assert recipe.at("score.weight") == ([0.1, 0.6, 0.9], 0.9)
    assert recipe.at("transformer.wte.weight") == ([0.5, 0.5, 0.5], 0.5)  # outside every group: the recipe's


def test_standard_merges_and_the_greedy_soup_are_enqueued_first() -> None:
    c = cfg("search.methods=[linear,ties,dare_ties]", "merge.density=0.5")
    trials = standard_trials(c, 3, soup=[1.0, 0.0, 1.0])
    assert [t["method"] for t in trials] == ["linear", "ties", "dare_ties", "linear"]
    assert trials[1] == {"method": "ties", "weight_0": 1.0, "weight_1": 1.0, "weight_2": 1.0, "density": 0.5,
                         "lambda": 1.0}
    assert [trials[3][f"weight_{i}"] for i in range(3)] == [1.0, 0.0, 1.0]
    # Every enqueued trial lies inside the space: a study replays it as a suggested recipe.
    for params in trials:
        recipe = suggest_recipe(fixed(params), c, 3)
        assert recipe.method == params["method"]
    grouped = standard_trials(cfg("search.methods=[ties]", "search.layer_groups=2"), 3)
    assert grouped[0]["g3_weight_2"] == 1.0 and grouped[0]["g0_density"] == grouped[0]["density"]


def test_start_up_trials_scale_with_the_budget() -> None:
    assert startup_trials(cfg("search.n_trials=10")) == 4
    assert startup_trials(cfg("search.n_trials=40")) == 10
    assert startup_trials(cfg("search.n_trials=40", "search.startup_trials=2")) == 2


def test_pruning_never_decides_on_fewer_than_min_rows() -> None:
    assert stage_shares(147, True, 100) == (1.0,)  # the Drugs.com sample: no pruning
    assert stage_shares(400, True, 100) == (0.25, 0.5, 1.0)
    assert stage_shares(300, True, 100) == (0.5, 1.0)
    assert stage_shares(10_000, False, 100) == (1.0,)
