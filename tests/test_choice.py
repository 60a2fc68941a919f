"""Choosing among search trials (mllm.evaluation.choice): the split of validation, each policy on hand-built trials,
the NLL guard, what counts as simpler and as a single member."""

from __future__ import annotations

import numpy as np
import pytest

from mllm.config.schema import MergeConfig
from mllm.errors import MllmError
from mllm.evaluation.choice import Candidate, choose, complexity, single_member, split_rows

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 200)
SEARCH, HOLDOUT = split_rows(LABELS, 0.5, seed=0)


def noisy(accuracy: float, seed: int, rows: np.ndarray | None = None, base: np.ndarray | None = None) -> np.ndarray:
    """Predictions right with probability `accuracy` (on `rows` only, when given; `base` elsewhere)."""
    rng = np.random.default_rng(seed)
    out = np.where(rng.random(len(LABELS)) < accuracy, LABELS, (LABELS + 1) % 3)
    if rows is not None and base is not None:
        out = base.copy()
        out[rows] = np.where(rng.random(len(rows)) < accuracy, LABELS[rows], (LABELS[rows] + 1) % 3)
    return out


def cand(number: int, pred: np.ndarray, nll: float = 0.8, **recipe) -> Candidate:
    return Candidate(number, MergeConfig.model_validate({"method": "linear", "normalize": True, **recipe}), pred,
                     np.full(len(LABELS), nll))


def test_split_rows_is_stratified_disjoint_seeded_and_refuses_bad_fractions() -> None:
    a, b = split_rows(LABELS, 0.5, seed=3)
    assert len(np.intersect1d(a, b)) == 0 and sorted([*a, *b]) == list(range(len(LABELS)))
    for label in range(3):  # each label halved, within one review
        n = (LABELS == label).sum()
        assert abs((LABELS[a] == label).sum() - n / 2) <= 1
    again = split_rows(LABELS, 0.5, seed=3)
    assert (again[0] == a).all() and not np.array_equal(split_rows(LABELS, 0.5, seed=4)[0], a)
    assert len(split_rows(LABELS, 0.25, seed=3)[0]) == pytest.approx(50, abs=2)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(MllmError, match=r"search.crossfit_fraction .* outside \(0, 1\)"):
            split_rows(LABELS, bad, seed=0)


def test_best_and_crossfit_read_the_rows_they_are_given() -> None:
    base = noisy(0.6, 1)
    lucky = noisy(0.95, 2, SEARCH, noisy(0.4, 3))  # great on the search rows, poor on the held-out rows
    steady = noisy(0.75, 4)  # good everywhere
    trials = [cand(0, base), cand(1, lucky, weights=[1.0, 0.5, 0.2]), cand(2, steady, weights=[0.9, 1.0, 0.8])]
    best = choose(trials, LABELS, SEARCH, HOLDOUT, 3, "best")
    assert best.number == 1 and best.chosen_on == "search rows" and best.optimism > 0.3
    cross = choose(trials, LABELS, SEARCH, HOLDOUT, 3, "crossfit", top_k=2)
    assert cross.number == 2 and cross.chosen_on == "held-out rows" and abs(cross.optimism) < 0.15
    assert "top 2 trials" in cross.reason
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "crossfit", top_k=1).number == 1  # top 1: the best
    # Macro-F1 of the chosen trial on each part, as the metric computes it.
    from mllm.evaluation.metrics import macro_f1

    assert cross.search_macro_f1 == pytest.approx(macro_f1(LABELS[SEARCH], steady[SEARCH], 3))
    assert cross.holdout_macro_f1 == pytest.approx(macro_f1(LABELS[HOLDOUT], steady[HOLDOUT], 3))


def test_one_se_prefers_the_simplest_trial_within_the_band() -> None:
    soup = noisy(0.72, 5)
    tuned = soup.copy()  # a little better on the search rows (4 more right), far more complex
    wrong = [i for i in SEARCH if soup[i] != LABELS[i]][:4]
    tuned[wrong] = LABELS[wrong]
    trials = [cand(0, tuned, method="ties", weights=[1.0, 0.3, 0.6], density=0.4, **{"lambda": 2.5}),
              cand(1, soup)]
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "best").number == 0
    one_se = choose(trials, LABELS, SEARCH, HOLDOUT, 3, "one_se", se_multiplier=1.0)
    assert one_se.number == 1 and "within 1 SE" in one_se.reason
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "one_se", se_multiplier=0.0).number == 0  # no band: the best
    with pytest.raises(MllmError, match="search.se_multiplier -1 is below 0"):
        choose(trials, LABELS, SEARCH, HOLDOUT, 3, "one_se", se_multiplier=-1)


def test_nll_policy_and_the_guard_read_calibration() -> None:
    sharp = noisy(0.9, 7)
    calm = noisy(0.7, 8)
    trials = [cand(0, sharp, nll=2.4, weights=[1.0, 0.2, 0.1]), cand(1, calm, nll=0.7)]
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "best").number == 0
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "nll").number == 1
    guarded = choose(trials, LABELS, SEARCH, HOLDOUT, 3, "best", nll_guard=0.5, reference_nll=0.75)
    assert guarded.number == 1 and guarded.refused == (0,) and "NLL guard" in guarded.reason
    # If the guard would refuse every trial, the best calibrated one is kept (a search always has a choice).
    assert choose(trials, LABELS, SEARCH, HOLDOUT, 3, "best", nll_guard=0.01, reference_nll=0.1).number == 1
    with pytest.raises(MllmError, match="search.choice 'median' is not a policy"):
        choose(trials, LABELS, SEARCH, HOLDOUT, 3, "median")
    with pytest.raises(MllmError, match="no complete trial"):
        choose([], LABELS, SEARCH, HOLDOUT, 3, "best")


def test_complexity_orders_recipes_from_the_uniform_soup_out() -> None:
    def c(**recipe) -> tuple[int, float]:
        return complexity(MergeConfig.model_validate({"method": "linear", "normalize": True, **recipe}), 3)

    assert c() == (0, 0.0) and c(weights=[2.0, 2.0, 2.0]) == (0, 0.0)  # equal weights are the soup
    weighted = c(weights=[1.0, 0.5, 0.0])
    ties = c(method="ties", density=0.5)
    ties_lambda = c(method="ties", density=0.5, **{"lambda": 2.0})
    assert (0, 0.0) < weighted and (0, 0.0) < ties < ties_lambda
    assert c(method="ties", density=1.0) < ties  # a density below 1 is one more parameter


def test_single_member_names_the_only_weighted_member() -> None:
    def s(weights, groups=None) -> int | None:
        return single_member(MergeConfig.model_validate({"method": "linear", "weights": weights, "groups": groups}))

    assert s([0.0, 1.0, 0.0]) == 1 and s([0.4, 0.0, 0.2]) is None and s(None) is None
    group = {"name": "g0", "filters": ["layers.0."], "weights": [0.0, 0.7, 0.0]}
    assert s([0.0, 1.0, 0.0], [group]) == 1
    assert s([0.0, 1.0, 0.0], [{**group, "weights": [0.3, 0.0, 0.0]}]) is None  # another member in one group
