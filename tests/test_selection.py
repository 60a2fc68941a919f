"""Honest selection: bootstrap p-values that are never 0, Holm's correction, one-sided bounds, the best-member rule,
the promotion gate on validation, the readings the report writes, the baselines, the greedy soup's rule, the
selection split, and the config refusals that keep the test split out of every decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mllm.config import load_config
from mllm.data.splits import SplitData, load_splits, split_rows
from mllm.errors import ConfigError, DataError
from mllm.evaluation.baselines import fit_tfidf, majority_logits, save_tfidf
from mllm.evaluation.metrics import bootstrap_p, holm, macro_f1, paired_test
from mllm.evaluation.selection import best_member, reading
from mllm.merging.soups import greedy_order, greedy_weights
from mllm.promote import decide
from mllm.tracking.pyfunc_model import load_tfidf, tfidf_logits


def noisy(labels: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(labels)) < accuracy, labels, (labels + 1) % 3)


LABELS = np.random.default_rng(0).integers(0, 3, 300)


def test_bootstrap_p_values_are_never_zero_and_holm_matches_by_hand() -> None:
    assert bootstrap_p(0, 9999) == 1e-4 and bootstrap_p(9999, 9999) == 1.0
    out = paired_test(LABELS, LABELS, noisy(LABELS, 0.4, 1), 3, samples=2000)
    assert out.bootstrap_p == pytest.approx(2 / 2001)  # every resample favours A: the smallest possible p, not 0
    assert out.p_at_most(0.0) == pytest.approx(1 / 2001) and out.samples == 2000
    # Holm by hand: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([]) == [] and max(holm([0.9, 0.8, 0.7])) <= 1.0


def test_one_sided_bound_and_p_value_agree() -> None:
    a, b = noisy(LABELS, 0.8, 2), noisy(LABELS, 0.7, 3)
    t = paired_test(LABELS, a, b, 3, samples=10_000)
    for alpha in (0.05, 0.1):
        bound = t.lower_bound(alpha)
        assert t.p_at_most(bound - 1e-3) < alpha + 1e-3 and t.p_at_most(bound + 0.02) > alpha
        assert t.lower_bound(alpha) < t.macro_f1_diff < t.upper_bound(alpha)


def test_best_member_by_validation_ties_by_nll_and_refuses_missing_scores() -> None:
    members = [("models:/x/1", 0.40, 0.90), ("models:/x/2", 0.42, 0.95), ("models:/x/3", 0.42, 0.85),
               ("models:/x/4", None, 0.1)]
    best, refused = best_member(members)
    assert best == "models:/x/3"  # tie in macro-F1 broken by the lower NLL, never by a test score
    assert len(refused) == 1 and refused[0].startswith("models:/x/4 has no validation macro-F1")
    assert best_member([("models:/x/5", 0.3, None), ("models:/x/6", 0.3, None)])[0] == "models:/x/5"  # earlier
    assert best_member([("models:/x/7", None, None)]) == (None, [best_member([("models:/x/7", None, None)])[1][0]])
    assert greedy_order(members[:3]) == ["models:/x/3", "models:/x/2", "models:/x/1"]


def test_greedy_soup_keeps_a_member_only_when_validation_does_not_drop() -> None:
    scores = {(1, 0, 0): 0.40, (1, 1, 0): 0.38, (1, 0, 1): 0.40}  # member 1 hurts, member 2 ties: kept
    weights, value, history = greedy_weights([0, 1, 2], lambda w: scores[tuple(int(x) for x in w)], 3)
    assert weights == [1.0, 0.0, 1.0] and value == 0.40
    assert [h["kept"] for h in history] == [True, False, True]


def test_readings_never_call_absence_of_evidence_equivalence() -> None:
    better = paired_test(LABELS, noisy(LABELS, 0.9, 4), noisy(LABELS, 0.5, 5), 3, samples=2000)
    r = reading(better, better.bootstrap_p, 0.05, 0.05, 0.95)
    assert r.word == "better" and r.non_inferior and "CI" in r.sentence
    worse = paired_test(LABELS, noisy(LABELS, 0.5, 5), noisy(LABELS, 0.9, 4), 3, samples=2000)
    assert reading(worse, worse.bootstrap_p, 0.05, 0.05, 0.95).word == "worse"
    close = paired_test(LABELS[:40], noisy(LABELS[:40], 0.7, 6), noisy(LABELS[:40], 0.7, 7), 3, samples=2000)
    text = reading(close, 1.0, 0.05, 0.05, 0.95)
    assert text.word == "not distinguishable at this size" and "equivalent" not in text.sentence
    assert not text.non_inferior and "not shown" in text.sentence  # 40 reviews cannot show it within 0.05


def test_gate_decides_on_validation_predictions_with_one_sided_bounds() -> None:
    cfg = load_config(None, [])
    good, bad = noisy(LABELS, 0.9, 8), noisy(LABELS, 0.5, 9)
    first = decide(LABELS, good, ("models:/m/1", bad), None, 3, cfg)
    assert first.promote and first.reason.startswith("no champion yet; non-inferior to the best member")
    assert first.figures["split"] == "holdout" and first.figures["p_non_inferior"] >= 1 / 10_001
    assert 0 <= first.figures["power_vs_best_member"] <= 1 and "passes with power" in first.reason
    worse = decide(LABELS, bad, ("models:/m/1", good), None, 3, cfg)
    assert not worse.promote and worse.reason.startswith("not shown non-inferior to the best member")
    assert "0.000" not in worse.reason.split("p=")[-1][:5]
    over = decide(LABELS, good, ("models:/m/1", good), ("7", bad), 3, cfg)
    assert over.promote and over.reason.startswith("better than the champion") and over.figures["champion"] == "7"
    same = decide(LABELS, good, None, ("7", good), 3, cfg)
    assert not same.promote and same.reason.startswith("not better than the champion by the margin")
    # The margin is a bound on the difference, not on the point estimate: a clear but small gain fails margin 0.3.
    strict = load_config(None, ["promote.margin=0.3"])
    slightly = noisy(LABELS, 0.6, 9)
    assert macro_f1(LABELS, good, 3) - macro_f1(LABELS, slightly, 3) > 0.2
    assert not decide(LABELS, good, None, ("7", slightly), 3, strict).promote


@pytest.mark.parametrize(("override", "needle"), [
    ("promote.split=test", "promote.split"), ("promote.margin=1", "promote.margin"),
    ("promote.alpha=0", "promote.alpha"), ("promote.alpha=1", "promote.alpha"),
    ("promote.non_inferiority_margin=-0.1", "promote.non_inferiority_margin"),
    ("promote.bootstrap_samples=1000", "promote.bootstrap_samples"), ("promote.split=selection", "selection_fraction"),
    ("evaluate.tfidf_c=[0]", "evaluate.tfidf_c"), ("promote.split=validation", "promote.allow_search_split"),
    ("search.crossfit_fraction=0", "search.crossfit_fraction"),
    ("search.crossfit_fraction=1", "search.crossfit_fraction"),
    ("search.crossfit_fraction=1.5", "search.crossfit_fraction"), ("search.se_multiplier=-0.5", "search.se_multiplier"),
])
def test_config_refuses_test_as_a_deciding_split_and_bad_gate_values(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message and "\n" not in message
    if override == "promote.split=test":
        assert "test split decides nothing" in message


def test_selection_split_comes_out_of_train_only() -> None:
    rows = pd.DataFrame({"text": [f"review {i} words" for i in range(400)], "label": [i % 3 for i in range(400)],
                         "domain": "x"})
    plain = split_rows(rows, 0.15, 0.2, seed=3)
    carved = split_rows(rows, 0.15, 0.2, seed=3, selection_fraction=0.15)
    assert set(plain) == {"train", "validation", "test"} and "selection" in carved
    for name in ("validation", "test"):
        pd.testing.assert_frame_equal(plain[name], carved[name])
    assert set(carved["selection"]["text"]) | set(carved["train"]["text"]) == set(plain["train"]["text"])
    assert not set(carved["selection"]["text"]) & set(carved["train"]["text"])
    cfg = load_config(None, ["data.selection_fraction=0.1", "promote.split=selection"])
    splits = load_splits(cfg.data)
    assert len(splits.split("selection")) > 0 and splits.sizes()["selection"] == len(splits.selection)
    assert splits.fingerprint != load_splits(load_config(None, []).data).fingerprint
    with pytest.raises(DataError, match="selection_fraction"):
        load_splits(load_config(None, []).data).split("selection")


def test_tfidf_baseline_chooses_c_on_validation_and_its_saved_form_scores_like_sklearn(tmp_path: Path) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    real = load_splits(load_config(None, ["data.max_rows=400"]).data)
    splits = SplitData(real.train, real.validation, None, real.label_names, real.fingerprint)  # no test to read
    model, history = fit_tfidf(splits, [0.1, 1.0, 10.0])
    assert [h["C"] for h in history] == [0.1, 1.0, 10.0]
    assert model.c == max(history, key=lambda h: (h["val_macro_f1"], -h["val_nll"]))["C"]
    folder = save_tfidf(model, tmp_path / "tfidf")
    assert sorted(p.name for p in folder.iterdir()) == ["tfidf.json", "tfidf.safetensors"]  # no pickle
    texts = real.test["text"].tolist()
    ours = tfidf_logits(load_tfidf(str(folder)), texts)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    clf = LogisticRegression(C=model.c, class_weight="balanced", max_iter=5000, random_state=0).fit(
        vectorizer.fit_transform(real.train["text"]), real.train["label"])
    theirs = clf.predict_proba(vectorizer.transform(texts))
    shifted = np.exp(ours - ours.max(1, keepdims=True))
    np.testing.assert_allclose(shifted / shifted.sum(1, keepdims=True), theirs, atol=1e-4)


def test_majority_baseline_predicts_the_most_frequent_training_label() -> None:
    logits = majority_logits(np.array([2, 2, 2, 0, 1, 2]), 3, 5)
    assert logits.shape == (5, 3) and (logits.argmax(1) == 2).all()
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(probs, [2 / 9, 2 / 9, 5 / 9], rtol=1e-6)  # add-one smoothed frequencies


def fake_run(uri: str, role: str, parents: str = "", base: str = "") -> object:
    from types import SimpleNamespace

    tags = {"mllm.model_uri": uri, "mllm.role": role, "mllm.parents": parents, "mllm.base": base}
    return SimpleNamespace(data=SimpleNamespace(tags=tags, metrics={}), info=SimpleNamespace(run_id=uri))


def test_report_is_scoped_to_one_member_set_and_base() -> None:
    from mllm.evaluation.report import scope

    ours, theirs = "models:/x-finetuned/1,models:/x-finetuned/2", "models:/x-finetuned/3,models:/x-finetuned/4"
    runs = [fake_run("models:/x-merged/9", "merged", ours, "models:/x-base/1"),  # newest first: the anchor
            fake_run("models:/x-merged/8", "merged", theirs, "models:/x-base/2"),
            fake_run("models:/x-ensemble/2", "ensemble", theirs), fake_run("models:/x-ensemble/1", "ensemble", ours),
            *(fake_run(f"models:/x-finetuned/{i}", "member", base="models:/x-base/1") for i in (1, 2, 3, 4)),
            fake_run("models:/x-finetuned/5", "full", base="models:/x-base/2"),
            fake_run("models:/x-finetuned/6", "full", base="models:/x-base/1"),
            fake_run("models:/x-base/1", "base"), fake_run("models:/x-base/2", "base"),
            fake_run("majority", "majority"), fake_run("models:/x-tfidf/1", "tfidf")]
    kept = [r.data.tags["mllm.model_uri"] for r in scope(runs)]
    assert kept == ["models:/x-merged/9", "models:/x-ensemble/1", "models:/x-finetuned/1", "models:/x-finetuned/2",
                    "models:/x-finetuned/6", "models:/x-base/1", "majority", "models:/x-tfidf/1"]


def test_a_merge_with_all_weight_on_one_member_is_that_member() -> None:
    from mllm.tracking.tags import VersionTags

    def single_member(tags: dict[str, str]) -> str | None:
        return VersionTags.of(tags).single_member

    parents = "models:/x-finetuned/1,models:/x-finetuned/2,models:/x-finetuned/3"
    assert single_member({"weights": "[0.0, 1.0, 0.0]", "parents": parents}) == "models:/x-finetuned/2"
    assert single_member({"weights": "[1.0, 0.0, 1.0]", "parents": parents}) is None
    assert single_member({"weights": "null", "parents": parents}) is None  # equal weights: a real merge
    assert single_member({}) is None


def test_version_tags_read_back_what_they_write() -> None:
    from mllm.tracking.tags import VersionTags

    written = VersionTags(method="ties", parents=("models:/x-finetuned/1", "models:/x-finetuned/2"), base="",
                          weights=[0.25, 0.75], density=0.5, lambda_=1.5, normalize=True, seed=0, trial=3,
                          merge_key="k", val={"macro_f1": 0.5, "nll": 0.9}, extra={"promotion_outcome": "refused"})
    tags = written.as_tags()
    assert tags["lambda"] == "1.5" and tags["weights"] == "[0.25, 0.75]" and tags["val_nll"] == "0.9"
    assert tags["parents"] == "models:/x-finetuned/1,models:/x-finetuned/2" and "shard" not in tags
    assert VersionTags.of(tags) == written
    old = VersionTags.of({"shard": "None", "density": "None", "seed": "2", "member": "seed-2"})  # an older mllm's
    assert old.shard is None and old.density is None and old.seed == 2 and old.member == "seed-2"
    # A light store's note under a field's name (a member whose weights were not exported) stays a note.
    noted = VersionTags.of({"member": "seed-0", "weights": "not in the light store", "val_macro_f1": "n/a"})
    assert noted.weights is None and noted.get("weights") == "not in the light store" and noted.val == {}
    assert noted.as_tags()["weights"] == "not in the light store"
