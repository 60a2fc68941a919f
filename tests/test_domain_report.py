"""The report's per-domain section (`mllm.evaluation.domains`): per-domain macro-F1 against scikit-learn, bootstraps
that resample within each domain, retention as a ratio, the domain-mean paired test, the goals' verdicts, and the
section end to end on two real domains (the Drugs.com sample and Yelp) with tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mllm.evaluation import domains as dom
from mllm.evaluation.metrics import paired_test

from .conftest import tiny_cfg

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 400)
DOMAINS = np.array(["drug"] * 150 + ["yelp"] * 250)
RANDOM = RNG.integers(0, 3, 400)


def noisy(accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(LABELS)) < accuracy, LABELS, (LABELS + 1) % 3)


def test_domain_scores_match_sklearn_and_resample_within_each_domain() -> None:
    preds = noisy(0.7, 1)
    s = dom.domain_scores(preds, LABELS, DOMAINS, 3, samples=300, seed=4)
    assert s.domains == ("drug", "yelp") and s.rows == (150, 250) and s.draws.shape == (300, 2)
    for d in s.domains:
        rows = DOMAINS == d
        assert s.of(d) == pytest.approx(f1_score(LABELS[rows], preds[rows], average="macro"))
        lo, hi = s.interval(d)
        assert lo < s.of(d) < hi
    assert s.mean == pytest.approx(np.mean(s.macro_f1)) and s.worst == min(s.by_domain.items(), key=lambda x: x[1])
    # Reference: domain j's resample i draws that domain's rows only, from the generator seeded (seed, j).
    for j, d in enumerate(s.domains):
        rows = np.flatnonzero(DOMAINS == d)
        index = rows[np.random.default_rng([4, j]).integers(0, len(rows), size=(200, len(rows)))]
        for i in (0, 1, 199):
            assert s.draws[i, j] == pytest.approx(f1_score(LABELS[index[i]], preds[index[i]], average="macro"))
    # Logits give the same figures as their argmax.
    logits = np.eye(3)[preds] + 0.01
    assert dom.domain_scores(logits, LABELS, DOMAINS, 3, samples=300, seed=4).by_domain == s.by_domain


def test_retention_is_the_ratio_to_each_domains_specialist() -> None:
    assert dom.retention({"drug": 0.5, "yelp": 0.3, "android": 0.2}, {"drug": 1.0, "yelp": 0.6}) == {
        "drug": 0.5, "yelp": 0.5}  # no android specialist: left out
    assert np.isnan(dom.retention({"drug": 0.4}, {"drug": 0.0})["drug"])
    assert dom.lowest({"drug": 0.9, "yelp": 0.7, "x": float("nan")}) == ("yelp", 0.7) and dom.lowest({}) is None
    spec = dom.domain_scores(noisy(0.8, 2), LABELS, DOMAINS, 3, samples=500)
    merge = dom.domain_scores(noisy(0.6, 3), LABELS, DOMAINS, 3, samples=500)
    assert dom.retention_interval(spec, spec, "yelp") == (1.0, 1.0)  # paired draws: the same resamples
    lo, hi = dom.retention_interval(merge, spec, "yelp")
    assert lo < merge.of("yelp") / spec.of("yelp") < hi < 1
    with pytest.raises(ValueError, match="unpaired"):
        dom.retention_interval(merge, dom.domain_scores(noisy(0.8, 2), LABELS, DOMAINS, 3, samples=500, seed=1), "yelp")


def test_domain_mean_test_resamples_within_domains() -> None:
    perfect_on_drug = np.where(DOMAINS == "drug", LABELS, RANDOM)  # perfect on drug, random on yelp
    t = dom.domain_mean_test(LABELS, perfect_on_drug, RANDOM, DOMAINS, 3, samples=1000)
    a = dom.domain_scores(perfect_on_drug, LABELS, DOMAINS, 3, samples=1000)
    b = dom.domain_scores(RANDOM, LABELS, DOMAINS, 3, samples=1000)
    assert t.macro_f1_diff == pytest.approx(a.mean - b.mean)
    # On yelp both predict the same rows: the difference comes from drug alone, halved by the mean over 2 domains.
    np.testing.assert_allclose(t.diffs, (a.draws[:, 0] - b.draws[:, 0]) / 2)
    assert (a.draws[:, 0] == 1).all() and t.bootstrap_p < 0.01 and t.macro_f1_diff_ci[0] > 0
    # Pooled, the rows are weighed by domain size (250 yelp rows outweigh 150 drug rows); per domain they count once.
    pooled = paired_test(LABELS, perfect_on_drug, RANDOM, 3, samples=1000).macro_f1_diff
    assert t.macro_f1_diff > pooled
    same = dom.domain_mean_test(LABELS, RANDOM, RANDOM, DOMAINS, 3, samples=200)
    assert same.macro_f1_diff == 0 and same.bootstrap_p == 1.0 and (same.diffs == 0).all()
    own = dom.own_domain_test(LABELS, perfect_on_drug, RANDOM, DOMAINS, "yelp", 3, samples=200)
    assert own.macro_f1_diff == 0 and own.a_only_correct == own.b_only_correct == 0


def test_a_single_domain_split_gives_no_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unread(cfg: object) -> None:
        raise AssertionError("one configured dataset: no data is read for the per-domain section")

    monkeypatch.setattr(dom, "load_splits", unread)
    cfg = tiny_cfg(tmp_path)
    assert dom.row_domains(cfg.data, "test", 45, None) == (None, "")
    assert dom.section(cfg, "test", None, LABELS, 3, [("m", "merged", RANDOM, None)], "m") is None
    assert dom.render(dom.DomainReport(), "test", 0.95) == []


def synthetic_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge: np.ndarray) -> dom.DomainReport:
    monkeypatch.setattr(dom, "row_domains", lambda *a: (DOMAINS, ""))
    cfg = tiny_cfg(tmp_path, "evaluate.bootstrap_samples=500")
    full = noisy(0.97, 7)
    models = [("merge", "merged", merge, None), ("ens", "ensemble", noisy(0.75, 8), None),
              ("spec-drug", "member", np.where(DOMAINS == "drug", LABELS, RANDOM), "drug"),
              ("spec-yelp", "member", np.where(DOMAINS == "yelp", LABELS, RANDOM), "yelp"),
              ("full", "full", full, None), ("majority", "majority", np.zeros(400, int), None)]
    return dom.section(cfg, "test", None, LABELS, 3, models, "merge")


def test_goals_and_verdicts_on_synthetic_predictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merge = np.where(DOMAINS == "drug", LABELS, noisy(0.8, 9))  # keeps drug, loses a fifth of yelp
    r = synthetic_section(tmp_path, monkeypatch, merge)
    assert r.specialists == {"drug": "spec-drug", "yelp": "spec-yelp"}
    assert set(r.retained) == {"merge", "ens", "full"} and r.retained["merge"]["drug"] == 1.0
    assert r.retained["merge"]["yelp"] == pytest.approx(r.scores["merge"].of("yelp") / r.scores["spec-yelp"].of("yelp"))
    assert r.goals == {"retention": False, "full_mean": False}
    assert set(r.comparisons) == {"specialist drug", "specialist yelp", "full", "ensemble"}
    text = "\n".join(r.verdicts)
    assert "on yelp's 250 reviews: the selected merge is **worse**" in text
    assert "on drug's 150 reviews: the selected merge is **not distinguishable at this size**" in text
    assert "**not met** on the point estimates; the worst domain, yelp, keeps" in text and "short of 95%" in text
    markdown = "\n".join(dom.render(r, "test", 0.95))
    assert "| model | role | drug | yelp | min retention |" in markdown
    assert "| spec-drug | specialist (drug) |" in markdown
    assert "| drug (spec-drug) | **1.0000** |" in markdown
    m = dom.metrics(r)
    assert m["domain_drug_macro_f1"] == 1.0 and m["retention_min"] == pytest.approx(r.retained["merge"]["yelp"])
    assert m["goal_retention_met"] == 0.0 and "full_domain_mean_macro_f1" in m and "specialist_yelp_macro_f1" in m
    r = synthetic_section(tmp_path, monkeypatch, np.where(DOMAINS == "drug", LABELS, LABELS))  # perfect everywhere
    assert r.goals == {"retention": True, "full_mean": True}
    assert "**met** on the point estimates" in "\n".join(r.verdicts)


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    """Tiny specialists of the Drugs.com sample and Yelp, their full-data member, one merge, scored on validation
    (what selects the merge) and test, then reported."""
    from mllm import evaluate, finetune, merge
    from mllm.evaluation import report

    tmp = tmp_path_factory.mktemp("domains")
    yelp = {"name": "yelp", "path": str(shared_data / "yelp" / "yelp.csv.gz"), "text_columns": ["text"],
            "label_column": "stars", "label_kind": "stars5"}
    cfg = tiny_cfg(tmp, "finetune.strategy=domains", f"data.datasets=[{{preset: drugscom-sample, name: drug}}, {yelp}]",
                   "data.max_rows=120", "evaluate.bootstrap_samples=300", f"tracking.artifact_location={tmp}/artifacts")
    trained = finetune.run(cfg, progress=False)
    members = [m.model_uri for m in trained.members if m.name.startswith("domain-")]
    merged = merge.run(cfg, members, trained.base_uri)
    evaluate.run(cfg, [merged.model_uri], split="validation")
    evaluate.run(cfg, [merged.model_uri], split="test")
    return cfg, trained, merged, report.run(cfg, split="test")


@pytest.mark.slow
def test_report_has_per_domain_rows_and_retention(two_domains) -> None:
    import json

    import mlflow

    from mllm.tracking.store import Store

    cfg, trained, merged, rep = two_domains
    r = rep.per_domain
    assert r is not None and r.domains == ("drug", "yelp") and r.selected == merged.model_uri == rep.selected_merge
    specialists = {m.name: m.model_uri for m in trained.members}
    assert r.specialists == {"drug": specialists["domain-drug"], "yelp": specialists["domain-yelp"]}
    assert set(r.scores) == {row.model for row in rep.rows}  # every model of the table has its per-domain row
    md = rep.markdown
    assert "## Per domain (test split: drug " in md and "| mean over domains | worst |" in md
    assert "| model | role | drug | yelp | min retention |" in md
    assert f"| {merged.model_uri} | merged (selected) |" in md
    assert f"| drug ({specialists['domain-drug']}) | **" in md and "### What the per-domain numbers allow" in md
    assert "keeps at least 95% of each specialist's macro-F1" in md and "within 0.02 of the multi-domain member" in md
    for row in rep.rows:  # the per-domain rows, as macro_f1 is computed on the table's own predictions
        s = r.scores[row.model]
        assert sum(s.rows) == row.metrics["rows"] and f"| {row.model} | " in md.split("## Per domain")[1]
    run = mlflow.get_run(rep.run_id)
    assert run.data.metrics["domain_drug_macro_f1"] == pytest.approx(r.scores[merged.model_uri].of("drug"))
    assert "retention_min" in run.data.metrics and "full_domain_mean_macro_f1" in run.data.metrics
    summary = Store(cfg).client.download_artifacts(rep.run_id, "report.json", str(cfg.output_dir / "check"))
    per_domain = json.loads(Path(summary).read_text())["per_domain"]
    assert per_domain["models"][merged.model_uri]["retention"].keys() == {"drug", "yelp"}


@pytest.mark.slow
def test_the_nll_guard_reads_the_specialists_on_the_rows_a_trial_is_scored_on(two_domains) -> None:
    """A specialist keeps (and registers) its validation figures on its own domain's rows; a domains search scores
    its trials on every domain's, so the NLL guard's reference is the best specialist there (as in a study cell),
    read from the validation runs the pipeline already has; members of one task keep their registered figures."""
    import numpy as np

    from mllm import evaluate
    from mllm.data.splits import load_splits
    from mllm.evaluation.metrics import log_softmax
    from mllm.search import member_validation
    from mllm.tracking.store import Store
    from mllm.tracking.trials import guard_reference, reference_nll

    cfg, trained, _, _ = two_domains
    store = Store(cfg)
    members = [m.model_uri for m in trained.members if m.name.startswith("domain-")]
    scores = member_validation(cfg, store, members)
    assert scores is not None and {uri for uri, _, _ in scores} == set(members)
    again = evaluate.run(cfg, members, split="validation", baselines=False)
    assert all(e.reused for e in again.evaluations)  # the validation runs the fixture's evaluation made
    by_uri = {e.candidate.uri: e for e in again.evaluations}
    top = max(members, key=lambda m: by_uri[m].metrics["macro_f1"])
    logits, labels = by_uri[top].logits, by_uri[top].labels
    nll = float(-log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean())
    validation = load_splits(cfg.data).validation
    assert len(labels) == len(validation) and set(validation["domain"]) == {"drug", "yelp"}  # every domain's rows
    assert guard_reference(scores) == pytest.approx(nll, abs=1e-4)
    own = reference_nll(store, members)  # the registered figures: one domain's rows each
    assert own is not None and own != pytest.approx(nll, abs=1e-4)
    full = [m.model_uri for m in trained.members if m.name == "full"]
    assert full and member_validation(cfg, store, full) is None  # validated on every row already
