"""Domain experts merged into one model: the domain-mean objective, the domains strategy's input checks, and the
study's domains arm (specialists, the multi-domain member, extra merges, a finished cell gaining RegMean)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mllm.config.schema import MergeConfig
from mllm.evaluation.choice import Candidate, choose, objective_groups, split_rows
from mllm.evaluation.metrics import domain_macro_f1, macro_f1
from mllm.study.recipes import extra_recipes, majority_by_domain, ta_lambdas

from .conftest import REPO, tiny_cfg


def test_domain_mean_objective_is_the_mean_of_each_domains_macro_f1() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    preds = np.array([0, 1, 2, 1, 1, 1, 0, 0])
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    a, b = macro_f1(labels[:3], preds[:3], 3), macro_f1(labels[3:], preds[3:], 3)
    assert domain_macro_f1(labels, preds, 3, groups) == pytest.approx(((a + b) / 2, min(a, b)))
    assert domain_macro_f1(labels, preds, 3, None) == (macro_f1(labels, preds, 3),) * 2
    assert objective_groups("domain_mean", ["x", "x"]) is None  # one domain: the pooled macro-F1, as before
    assert objective_groups("pooled", ["x", "y"]) is None
    assert objective_groups("domain_mean", ["y", "x", "y"]).tolist() == [0, 1, 0]


def test_search_half_is_stratified_by_domain_and_label_and_unchanged_for_one_domain() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    groups = np.repeat([0, 1, 2], 100)
    search, held = split_rows(labels, 0.5, 0, groups)
    assert not set(search) & set(held) and len(search) + len(held) == 300
    for g in range(3):
        for label in range(3):
            stratum = np.flatnonzero((groups == g) & (labels == label))
            assert abs(np.isin(stratum, search).sum() - len(stratum) / 2) <= 1
    one = split_rows(labels, 0.5, 0)
    assert [x.tolist() for x in one] == [x.tolist() for x in split_rows(labels, 0.5, 0, np.zeros(300, int))]


def test_choice_reads_the_domain_mean_when_the_search_optimised_it() -> None:
    # Domain 0 has 90 rows, domain 1 has 10. Trial 0 is perfect on the big domain and always wrong on the small one;
    # trial 1 is a little worse on the big domain and right on the small one. Pooled macro-F1 prefers trial 0, the
    # mean over domains trial 1.
    labels = np.array([0, 1, 2] * 30 + [0, 1] * 5)
    groups = np.array([0] * 90 + [1] * 10)
    p0 = labels.copy()
    p0[90:] = 2
    p1 = labels.copy()
    p1[:12] = (labels[:12] + 1) % 3
    cands = [Candidate(i, MergeConfig(method="linear"), p, np.zeros(100)) for i, p in enumerate((p0, p1))]
    rows = np.arange(100)
    empty = np.zeros(0, dtype=np.int64)
    assert choose(cands, labels, rows, empty, 3).number == 0
    assert choose(cands, labels, rows, empty, 3, groups=groups).number == 1
    assert choose(cands, labels, rows, empty, 3, "one_se", groups=groups).search_macro_f1 > 0


def test_extra_merges_and_the_majority_of_each_domain(tmp_path: Path) -> None:
    extras = extra_recipes(tiny_cfg(tmp_path), ["regmean", "ta-grid"], 3)
    assert ta_lambdas(3) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert sorted(extras) == ["regmean", "ta-0.5", "ta-1.5", "ta-2", "ta-2.5"]  # ta-1 and ta-k are standard rows
    assert extras["regmean"][1].method == "regmean" and extras["ta-2.5"][1].lambda_ == 2.5
    train = pd.DataFrame({"label": [0, 0, 1, 2, 2, 2], "domain": ["a", "a", "a", "b", "b", "b"]})
    rows = pd.DataFrame({"label": [0, 2, 1], "domain": ["b", "a", "b"]})
    assert majority_by_domain(train, rows, 3).argmax(1).tolist() == [2, 0, 2]


def test_a_finished_cells_key_ignores_settings_that_leave_it_as_it_was(tmp_path: Path) -> None:
    from mllm.study.cell import cell_key
    from mllm.study.config import cell_config, load_study

    study = load_study(REPO / "configs" / "studies" / "drugs.yaml")
    soup = study.arm("soup")
    cfg = cell_config(study, soup, 0)
    key = cell_key(study, soup, cfg, "f")
    other = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"regmean_alpha": 0.5}),
                                   "search": cfg.search.model_copy(update={"objective": "pooled"})})
    assert cell_key(study, soup, other, "f") == key  # one domain: pooled and the domain mean are one objective
    lr = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"learning_rate": 1e-3})})
    assert cell_key(study, soup, lr, "f") != key
    domains = study.arm("domains")
    dcfg = cell_config(study, domains, 0)
    assert dcfg.finetune.strategy == "domains" and [d.name for d in dcfg.data.datasets] == ["drug", "yelp", "android"]
    pooled = dcfg.model_copy(update={"search": dcfg.search.model_copy(update={"objective": "pooled"})})
    assert cell_key(study, domains, pooled, "f") != cell_key(study, domains, dcfg, "f")


def _domains_config(tmp: Path, shared: Path, **data: object) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw.update(name="doms", output_dir=str(tmp / "out"))
    raw["data"] = {"datasets": [{"preset": "drugscom-sample", "name": "drug"},
                                {"name": "yelp", "path": str(shared / "yelp" / "yelp.csv.gz"), "text_columns": ["text"],
                                 "label_column": "stars", "label_kind": "stars5"}],
                   "label_scheme": "sentiment3", "max_rows": 150, **data}
    raw["finetune"].update(strategy="domains")
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    raw["search"]["storage"] = f"sqlite:///{tmp / 'optuna.db'}"
    path = tmp / "doms.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", ["no-class", "no-split"])
def test_domains_strategy_refuses_a_domain_it_cannot_learn_or_judge(tmp_path: Path, case: str, shared_data: Path
                                                                    ) -> None:
    if case == "no-class":  # stars 1-4 negative, 5 neutral: no yelp review is positive
        path = _domains_config(tmp_path, shared_data, sentiment_cuts={"rating10": [4, 6], "stars5": [4, 5]})
        expected = "data.datasets[1] (yelp): no positive rows in training after mapping to sentiment3"
    else:  # three reviews, one per class: every one of them lands in train, none in validation
        tiny = tmp_path / "three.csv"
        pd.DataFrame({"text": ["awful app", "it is fine", "love it"], "stars": [1, 3, 5]}).to_csv(tiny, index=False)
        path = _domains_config(tmp_path, shared_data)
        raw = yaml.safe_load(path.read_text())
        raw["data"]["datasets"][1]["path"] = str(tiny)
        path.write_text(yaml.safe_dump(raw))
        expected = "data.datasets[1] (yelp): no rows in the validation split"
    done = subprocess.run([sys.executable, "-m", "mllm.cli", "finetune", "-c", str(path)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before the base was built
    if (tmp_path / "mlflow.db").exists():
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_registered_models()
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                    if r.info.status == "RUNNING"]


def _cell(fold: int, rng: np.random.Generator, domains: tuple[str, ...] = ("a", "b")) -> object:
    """A finished domains cell with synthetic test logits: each specialist right on its own domain's rows 90% of
    the time, a merge right 85%, the multi-domain member 88%."""
    from mllm.study.results import Cell, Model

    n = 60
    doms = np.repeat(np.array(domains), n)
    labels = rng.integers(0, 3, len(doms))

    def model(name: str, kind: str, hit: np.ndarray, val: float, **params: str) -> Model:
        preds = np.where(rng.random(len(doms)) < hit, labels, (labels + 1) % 3)
        logits = np.eye(3, dtype=np.float32)[preds]
        return Model(name, kind, f"run-{name}-{fold}", params, {"val_macro_f1": val, "test_macro_f1": 0.0}, logits)

    models = {f"member:{i}": model(f"member:{i}", "member", np.where(doms == d, 0.9, 0.5), 0.6, member=f"domain-{d}")
              for i, d in enumerate(domains)}
    models.update({"uniform": model("uniform", "merge", np.full(len(doms), 0.85), 0.7, lambda_="1.0"),
                   "ties": model("ties", "merge", np.full(len(doms), 0.6), 0.5),
                   "searched": model("searched", "searched", np.full(len(doms), 0.8), 0.65),
                   "ta-2": model("ta-2", "merge", np.full(len(doms), 0.7), 0.55, lambda_="2.0"),
                   "full": model("full", "full", np.full(len(doms), 0.88), 0.8),
                   "ensemble": model("ensemble", "ensemble", np.full(len(doms), 0.87), 0.8)})
    return Cell("domains", fold, f"cell-{fold}", "x", {}, {"train": 300, "validation": 60, "test": len(doms)},
                labels, models, None, doms)


def test_per_domain_section_judges_the_merge_chosen_on_validation(tmp_path: Path) -> None:
    from mllm.study.config import load_study
    from mllm.study.perdomain import BEST, render_domains, summarise_domains

    study = load_study(REPO / "configs" / "studies" / "drugs.yaml")
    arm = study.arm("domains")
    rng = np.random.default_rng(0)
    cells = {("domains", f): _cell(f, rng) for f in range(3)}
    s = summarise_domains(study, arm, cells)
    assert s is not None and s.domains == ("a", "b") and s.chosen == ["uniform soup"] * 3  # best validation figure
    assert np.allclose(s.f1[BEST], s.f1["uniform soup"])
    r = s.retention("uniform soup")
    assert r.shape == (3, 2) and np.isfinite(r).all()
    assert np.allclose(r[:, 0], s.f1["uniform soup"][:, 0] / s.f1["specialist a"][:, 0])
    text = "\n".join(render_domains(s))
    for part in ("### Arm `domains` per domain", "| specialist a |", "| multi-domain member |", "Retention",
                 "merge minus the a specialist on a", "merge minus the multi-domain member on the mean over domains",
                 "Goal: keep at least 95%", "Goal: within 0.02", "task arithmetic (lambda on validation)"):
        assert part in text, part
    one = {("domains", 0): _cell(0, rng, ("a",))}
    one[("domains", 0)].domains = None  # a one-domain cell has no domain column
    assert summarise_domains(study, arm, one) is None


@pytest.mark.slow
def test_domains_arm_runs_and_a_finished_cell_gains_regmean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            shared_data: Path) -> None:
    """A tiny study: a shards arm runs, then RegMean is added to it (the finished cells gain a RegMean run and
    nothing else is redone), and a domains arm runs with its specialists, multi-domain member, RegMean and the
    task-arithmetic grid; RESULTS.md has the per-domain section."""
    from mlflow import MlflowClient

    from mllm.study.config import cell_config, load_study
    from mllm.study.runner import run_study, write_report

    monkeypatch.chdir(tmp_path)
    doms = _domains_config(tmp_path, shared_data)
    raw = {"study": "dstudy", "experiment": str(REPO / "configs" / "tiny.yaml"), "folds": 2,
           "store": str(tmp_path / "store"), "trials": 2, "mask_seeds": 1, "bootstrap_samples": 200,
           "results": str(tmp_path / "docs" / "RESULTS.md"),
           "set": ["data.max_rows=120", "finetune.members=2", "evaluate.bootstrap_samples=100",
                   "merge.regmean_rows=16"],
           "arms": [{"name": "shards", "set": ["finetune.strategy=shards", "finetune.include_full=false"]}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = run_study(load_study(path), folds=[0])
    raw["arms"][0]["merges"] = ["regmean"]
    raw["arms"].append({"name": "domains", "experiment": str(doms), "merges": ["regmean", "ta-grid"]})
    path.write_text(yaml.safe_dump(raw))
    study = load_study(path)
    ids = run_study(study, folds=[0, 1])
    assert ids[0] == first[0]  # the finished shards cell is reused, not rerun
    client = MlflowClient(cell_config(study, study.arms[0], 0).tracking.tracking_uri)
    for run_id in ids:
        cell = client.get_run(run_id)
        children = client.search_runs([cell.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        names = {r.data.tags.get("mllm.study_model") for r in children}
        assert "regmean" in names, cell.data.tags["mllm.arm"]
        regmean = next(r for r in children if r.data.tags.get("mllm.study_model") == "regmean")
        assert regmean.data.params["method"] == "regmean" and "test_macro_f1" in regmean.data.metrics
        if cell.data.tags["mllm.arm"] == "domains":
            assert {"full", "ta-0.5", "ta-1.5", "searched", "ensemble"} <= names
            full = next(r for r in children if r.data.tags.get("mllm.study_model") == "full")
            assert {"test_macro_f1_drug", "test_macro_f1_yelp", "val_macro_f1_drug"} <= set(full.data.metrics)
    assert sum(1 for r in client.search_runs([client.get_run(ids[0]).info.experiment_id],
                                             f"tags.mlflow.parentRunId = '{ids[0]}'")
               if r.data.tags.get("mllm.study_model") == "regmean") == 1  # added once, not on every resume
    text = write_report(study, "study.yaml").read_text()
    for part in ("### Arm `domains` per domain", "| specialist drug |", "| RegMean |", "multi-domain member",
                 "Goal: keep at least 95%"):
        assert part in text, part


def test_a_specialist_keeps_its_best_weights_on_its_own_domain(tmp_path: Path, shared_data: Path) -> None:
    from mllm.config import load_config
    from mllm.data.splits import load_splits
    from mllm.finetune import member_validation, plan_members

    cfg = load_config(_domains_config(tmp_path, shared_data))
    splits = load_splits(cfg.data)
    specs = {s.name: s for s in plan_members(cfg, splits)}
    assert set(specs) == {"domain-drug", "domain-yelp", "full"}
    assert set(member_validation(specs["domain-yelp"], splits)["domain"]) == {"yelp"}
    assert len(member_validation(specs["full"], splits)) == len(splits.validation)  # the multi-domain member: all
