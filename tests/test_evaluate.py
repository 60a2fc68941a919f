"""The evaluate stage and the report: metric maths against scikit-learn, bootstrap and paired tests, the
stage end to end on tiny registered models (baselines, reuse, artifacts), and its refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support

from mllm.config import EvaluateConfig
from mllm.errors import MllmError
from mllm.evaluate import metric_module, score
from mllm.evaluation.metrics import bootstrap_ci, classification_summary, paired_test, resampled_scores
from mllm.tracking.store import Store

from .conftest import tiny_cfg

LABELS = ("negative", "neutral", "positive")


def sample(n: int, k: int = 3, seed: int = 0, skill: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits of a somewhat-skilled classifier (the true class gets a bonus)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), labels] += skill
    return labels, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_modules_agree_with_sklearn_and_mllm_metrics(seed: int) -> None:
    labels, logits = sample(300, seed=seed)
    preds = logits.argmax(1)
    out = metric_module("mllm_classification").compute(predictions=preds, references=labels, num_labels=3)
    assert out["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, average=None)
    assert out["precision"] == pytest.approx(list(p)) and out["recall"] == pytest.approx(list(r))
    assert out["f1"] == pytest.approx(list(f))
    ours = classification_summary(logits, labels)  # the training loop's numpy implementation
    assert ours["macro_f1"] == pytest.approx(out["macro_f1"]) and ours["accuracy"] == pytest.approx(out["accuracy"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cal = metric_module("mllm_calibration").compute(predictions=probs, references=labels, bins=15)
    assert cal["nll"] == pytest.approx(log_loss(labels, probs), rel=1e-6)
    assert cal["nll"] == pytest.approx(ours["nll"], rel=1e-5)


def test_ece_by_hand() -> None:
    # Two bins used: confidence 0.9 (2 rows, both right: |1 - 0.9| = 0.1) and 0.6 (2 rows, one right: 0.1).
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    out = metric_module("mllm_calibration").compute(predictions=probs, references=[0, 1, 0, 1], bins=10)
    assert out["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    overconfident = np.array([[0.99, 0.005, 0.005]] * 4)
    out = metric_module("mllm_calibration").compute(predictions=overconfident, references=[0, 1, 1, 1], bins=10)
    assert out["ece"] == pytest.approx(0.99 - 0.25)


def test_missing_class_scores_zero_in_per_class_lists() -> None:
    out = metric_module("mllm_classification").compute(predictions=[0, 0, 2], references=[0, 2, 2], num_labels=3)
    assert out["f1"][1] == 0 and out["support"] == [1, 0, 2]
    assert out["macro_f1"] == pytest.approx(f1_score([0, 2, 2], [0, 0, 2], average="macro"))


def test_vectorised_resampling_matches_sklearn_per_resample() -> None:
    labels, logits = sample(80, seed=3)
    preds = logits.argmax(1)
    index = np.random.default_rng(0).integers(0, 80, size=(25, 80))
    acc, f1 = resampled_scores(labels, preds, 3, index)
    for row in range(25):
        i = index[row]
        assert acc[row] == pytest.approx(accuracy_score(labels[i], preds[i]))
        assert f1[row] == pytest.approx(f1_score(labels[i], preds[i], average="macro"))


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_data() -> None:
    small, large = sample(100, seed=4), sample(3000, seed=4)
    ci_small = bootstrap_ci(small[0], small[1].argmax(1), 3, samples=500, seed=1)
    ci_large = bootstrap_ci(large[0], large[1].argmax(1), 3, samples=500, seed=1)
    for name in ("accuracy", "macro_f1"):
        point = classification_summary(small[1], small[0])[name]
        assert ci_small[name][0] < point < ci_small[name][1]
        assert ci_large[name][1] - ci_large[name][0] < 0.5 * (ci_small[name][1] - ci_small[name][0])
    assert bootstrap_ci(small[0], small[1].argmax(1), 3, samples=500, seed=1) == ci_small  # seeded


def test_paired_test_identical_and_clearly_different() -> None:
    labels, logits = sample(200, seed=5)
    preds = logits.argmax(1)
    same = paired_test(labels, preds, preds, 3, samples=300)
    assert same.macro_f1_diff == 0 and same.mcnemar_p == 1.0 and same.bootstrap_p == 1.0
    better = labels.copy()
    better[:20] = (labels[:20] + 1) % 3  # right on 180 of 200
    worse = (labels + 1) % 3
    worse[:60] = labels[:60]  # right on 60 of 200
    out = paired_test(labels, better, worse, 3, samples=300)
    assert out.macro_f1_diff > 0.4 and out.macro_f1_diff_ci[0] > 0
    assert out.bootstrap_p < 0.01 and out.mcnemar_p < 1e-10
    assert (out.a_only_correct, out.b_only_correct) == (140, 20)  # rows 60-199 and rows 0-19


def test_score_reports_everything_named_in_the_issue() -> None:
    labels, logits = sample(120, seed=6)
    out = score(logits, labels, LABELS, EvaluateConfig(bootstrap_samples=200))
    expected = {"accuracy", "macro_f1", "nll", "ece", "accuracy_ci_low", "accuracy_ci_high", "macro_f1_ci_low",
                "macro_f1_ci_high", *(f"{w}_{n}" for w in ("precision", "recall", "f1") for n in LABELS)}
    assert expected <= set(out)
    assert out["accuracy_ci_low"] <= out["accuracy"] <= out["accuracy_ci_high"]


@pytest.fixture(scope="module")
def merged_experiment(tmp_path_factory: pytest.TempPathFactory):
    """Tiny members fine-tuned, registered and merged (ties), in a module-scoped store."""
    from mllm import finetune, merge
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_cfg(tmp, "finetune.epochs=2", "evaluate.bootstrap_samples=200",
                   f"tracking.artifact_location={tmp}/artifacts")
    trained = finetune.run(cfg, progress=False)
    merged = merge.run(cfg)
    return cfg, trained, merged


@pytest.mark.slow
def test_evaluate_stage_scores_merge_and_baselines_and_reuses(merged_experiment) -> None:
    import mlflow

    from mllm import evaluate
    from mllm.evaluation import report
    cfg, trained, merged = merged_experiment
    result = evaluate.run(cfg, split="validation")
    roles = [(e.candidate.role, e.candidate.uri) for e in result.evaluations]
    members = [m.model_uri for m in trained.members if m.name != "full"]
    full = next(m.model_uri for m in trained.members if m.name == "full")  # include_full is on by default
    assert roles == [*(("member", m) for m in members), ("ensemble", "models:/tiny-ensemble/1"), ("full", full),
                     ("base", trained.base_uri), ("merged", merged.model_uri), ("majority", "majority"),
                     ("tfidf", "models:/tiny-tfidf/1")]
    by_uri = {e.candidate.uri: e for e in result.evaluations}
    ensemble = by_uri["models:/tiny-ensemble/1"]
    np.testing.assert_allclose(ensemble.logits, np.mean([by_uri[m].logits for m in members], axis=0), rtol=1e-6)
    assert ensemble.metrics["forward_passes"] == 3
    assert ensemble.metrics["num_params"] == 3 * by_uri[members[0]].metrics["num_params"]

    # Logged: the metrics, the predictions (which reproduce the metrics) and the confusion matrix.
    run = mlflow.get_run(by_uri[merged.model_uri].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mllm.role"] == "merged"
    assert run.data.tags["mllm.parents"] == ",".join(members)
    assert run.data.tags["mlflow.parentRunId"] == result.run_id
    assert {"predictions.csv", "confusion_matrix.png", "metrics.json"} <= {
        a.path for a in Store(cfg).client.list_artifacts(run.info.run_id)}
    frame = pd.read_csv(Store(cfg).run_artifact(run.info.run_id, "predictions.csv",
                                                       cfg.output_dir / "check"), keep_default_na=False)
    logits = evaluate.logits_from_frame(frame, LABELS)
    assert (logits == by_uri[merged.model_uri].logits).all()  # float32 values survive the CSV exactly
    labels = np.array([LABELS.index(x) for x in frame["label"]])
    assert run.data.metrics["macro_f1"] == pytest.approx(classification_summary(logits, labels)["macro_f1"])
    assert len(frame) == run.data.metrics["rows"] == len(by_uri[members[0]].labels)

    # The same models on the same data and split are not scored again.
    again = evaluate.run(cfg, split="validation")
    assert all(e.reused for e in again.evaluations)
    assert [e.run_id for e in again.evaluations] == [e.run_id for e in result.evaluations]
    reused = {e.candidate.uri: e for e in again.evaluations}
    assert all(reused[u].metrics["macro_f1"] == pytest.approx(e.metrics["macro_f1"]) for u, e in by_uri.items())
    # The baselines a reviewer tries first: the majority class scores exactly the majority rate; the TF-IDF model
    # is a registered MLflow model (its C chosen on validation) whose validation evaluation is on its version.
    from mllm.data.splits import load_splits

    majority, top = by_uri["majority"], int(np.bincount(load_splits(cfg.data).train["label"]).argmax())
    assert (majority.logits.argmax(1) == top).all() and majority.metrics["num_params"] == 0
    assert majority.metrics["accuracy"] == pytest.approx((majority.labels == top).mean())
    tfidf = Store(cfg).resolve("models:/tiny-tfidf/1")[1]
    assert float(tfidf.tags["C"]) in cfg.evaluate.tfidf_c and "validation macro-F1" in tfidf.description
    # Scoring a merge on validation records its figures on the version: what later choices read.
    version = Store(cfg).resolve(merged.model_uri)[1]
    assert float(version.tags["val_macro_f1"]) == pytest.approx(by_uri[merged.model_uri].metrics["macro_f1"], abs=1e-6)

    # The report: every model once, the best member by validation macro-F1, the paired test for the merge.
    rep = report.run(cfg, split="validation")
    assert [r.model for r in rep.rows if r.role == "merged"] == [merged.model_uri]
    assert {r.model for r in rep.rows} == {e.candidate.uri for e in result.evaluations}
    val = {m.model_uri: m.val_metrics["macro_f1"] for m in trained.members}
    assert val[rep.best_member] == max(val.values())
    merged_row = next(r for r in rep.rows if r.role == "merged")
    assert merged_row.versus_best_member is not None and merged_row.cost == 1.0
    assert next(r for r in rep.rows if r.role == "ensemble").cost == 3.0
    assert next(r for r in rep.rows if r.role == "majority").cost == 0.0
    assert "| models:/tiny-merged/1 | merged | ties |" in rep.markdown and "K forward passes" in rep.markdown
    assert {r.role for r in rep.rows} >= {"majority", "tfidf", "full", "ensemble", "base"}
    assert rep.selected_merge == merged.model_uri and rep.verdicts[0].startswith("Merge vs the best member")
    assert "Holm-adjusted" in rep.markdown and "p=0.000" not in rep.markdown
    assert (Store(cfg).client.download_artifacts(rep.run_id, "report.md", str(cfg.output_dir)))


@pytest.mark.slow
def test_evaluate_refusals_leave_no_run(merged_experiment) -> None:
    import mlflow

    from mllm import evaluate
    from mllm.evaluation import report
    cfg, _, merged = merged_experiment
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.name).experiment_id

    def count() -> int:
        return len(mlflow.search_runs([experiment], output_format="list"))

    before = count()
    with pytest.raises(MllmError, match="tiny-merged/99"):
        evaluate.run(cfg, ["models:/tiny-merged/99"])
    with pytest.raises(MllmError, match="nosuch-merged"):
        evaluate.run(cfg, ["models:/nosuch-merged@champion"])
    with pytest.raises(MllmError, match="names no version"):
        evaluate.run(cfg, ["models:/tiny-merged"])
    with pytest.raises(MllmError, match="no evaluations on the train split"):
        report.run(cfg, split="train")
    assert count() == before
    # A model for another label scheme is refused in one line; its run ends FAILED, never RUNNING.
    from mllm.models.tiny import build_tiny_classifier

    other = build_tiny_classifier("gpt2", cfg.output_dir / "two-labels", ("bad", "good"))
    with pytest.raises(MllmError, match="predicts \\['bad', 'good'\\].*data.label_scheme"):
        evaluate.run(cfg, [str(other)], baselines=False)
    running = mlflow.search_runs([experiment], "attributes.status = 'RUNNING'", output_format="list")
    assert running == []


@pytest.mark.slow
def test_cli_evaluate_and_report_one_line_errors(merged_experiment, tmp_path) -> None:
    import subprocess
    import sys

    cfg, _, merged = merged_experiment
    sets = ["--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}", "--set", f"output_dir={cfg.output_dir}",
            "--set", "data.max_rows=150", "--set", "evaluate.bootstrap_samples=200"]
    from .conftest import REPO

    base = [sys.executable, "-m", "mllm.cli"]
    bad = subprocess.run([*base, "evaluate", "-c", str(REPO / "configs" / "tiny.yaml"), *sets, "--model",
                          "models:/tiny-merged/77"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "tiny-merged/77" in bad.stderr
    ok = subprocess.run([*base, "evaluate", "-c", str(REPO / "configs" / "tiny.yaml"), *sets, "--model",
                         merged.model_uri, "--no-baselines"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    out = subprocess.run([*base, "report", "tiny", "-c", str(REPO / "configs" / "tiny.yaml"), *sets],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| models:/tiny-merged/1 | merged | ties |" in out.stdout


@pytest.mark.slow
def test_bigger_model_joins_the_baselines_with_its_relative_cost(merged_experiment) -> None:
    from mllm import evaluate
    from mllm.evaluation import report
    from mllm.models.tiny import build_tiny_classifier

    cfg, trained, merged = merged_experiment
    bigger = build_tiny_classifier("gpt2", cfg.output_dir / "bigger", LABELS, seed=1, hidden=64, layers=4)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"bigger_model": str(bigger)})})
    result = evaluate.run(cfg, [merged.model_uri], split="validation")
    row = next(e for e in result.evaluations if e.candidate.role == "bigger")
    member = next(e for e in result.evaluations if e.candidate.role == "member")
    assert row.metrics["num_params"] > 2 * member.metrics["num_params"]
    rep = report.run(cfg, split="validation", log=False)
    bigger_row = next(r for r in rep.rows if r.role == "bigger")
    assert bigger_row.cost == pytest.approx(row.metrics["num_params"] / member.metrics["num_params"])
    assert bigger_row.versus_best_member is not None
