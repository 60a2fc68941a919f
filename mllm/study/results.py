"""A study's results, read from its MLflow runs only: per arm a table of test macro-F1 per model and fold, the
paired comparisons of the searched merge, secondary metrics and one figure; rendered by `mllm.study.document`.

    cells = collect(study)                   # (arm, fold) -> Cell: the finished cell run and its model runs
    arm = summarise(study, study.arms[0], cells)
    arm.rows, arm.comparisons

Derived rows: the best member (by validation macro-F1, then NLL, in each fold), the mean member, DARE-TIES and
DARE-linear as the mean over mask seeds (their spread reported), and for arms that name one, the full-data member
and the bigger model: another arm's seed-0 member in the same fold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mllm.errors import MllmError
from mllm.evaluation import selection
from mllm.evaluation.metrics import holm
from mllm.study.config import Arm, StudyConfig, cell_config
from mllm.study.stats import Comparison, compare, fold_bootstrap, reading, t_interval
from mllm.tracking.store import Store

MERGE_ROWS = (("uniform", "uniform soup"), ("greedy", "greedy soup"), ("ta-1", "task arithmetic, lambda 1"),
              ("ta-k", "task arithmetic, lambda K"), ("ties", "TIES"))
EXTRA_ROWS = (("regmean", "RegMean"),)
SECONDARY = ("accuracy", "nll", "ece")


@dataclass
class Model:
    name: str
    kind: str
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    test: np.ndarray  # logits


@dataclass
class Cell:
    arm: str
    fold: int
    run_id: str
    experiment: str
    seconds: dict[str, float]
    sizes: dict[str, int]
    labels: np.ndarray  # test labels
    models: dict[str, Model]
    trials: dict[str, Any] | None = None  # the cell's trials.json: the search's trials, per validation review
    domains: np.ndarray | None = None  # each test row's domain, when the cell holds several


def collect(study: StudyConfig) -> dict[tuple[str, int], Cell]:
    """Every finished cell of the study (the newest per arm and fold), with its model runs' metrics and test logits.
    Once some cell's search kept its per-review trial scores (search.choice), cells of the older protocol, whose
    searched merge was the best validation trial, are left out rather than mixed into the same rows."""
    cells: dict[tuple[str, int], Cell] = {}
    for arm in study.arms:
        for fold in range(study.folds):
            cfg = cell_config(study, arm, fold)
            store = Store(cfg)
            found = store.find_runs({"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": str(fold),
                                     "mllm.stage": "study-cell"})
            if not found:
                continue
            cell = found[0]
            models: dict[str, Model] = {}
            labels = np.zeros(0, dtype=np.int64)
            domains = None
            for r in store.find_runs({"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": str(fold),
                                      "mllm.stage": "study-model"}):
                if r.data.tags.get("mlflow.parentRunId") != cell.info.run_id:
                    continue
                path = store.run_artifact(r.info.run_id, "predictions.csv",
                                          study.store.resolve() / "downloads" / r.info.run_id)
                frame = pd.read_csv(path)
                test = frame[frame["split"] == "test"].sort_values("row")
                labels = test["label"].to_numpy()
                domains = test["domain"].astype(str).to_numpy() if "domain" in test else None
                logits = test[[c for c in frame.columns if c.startswith("logit_")]].to_numpy(dtype=np.float32)
                name = r.data.tags["mllm.study_model"]
                models[name] = Model(name, r.data.tags["mllm.kind"], r.info.run_id, dict(r.data.params),
                                     dict(r.data.metrics), logits)
            m = cell.data.metrics
            trials = None
            if not arm.reference:
                try:
                    path = store.run_artifact(cell.info.run_id, "trials.json",
                                              study.store.resolve() / "downloads" / cell.info.run_id)
                    trials = json.loads(Path(path).read_text(encoding="utf-8"))
                except Exception:  # a cell of an older mllm kept no per-review trial scores
                    trials = None
            cells[(arm.name, fold)] = Cell(
                arm.name, fold, cell.info.run_id, cfg.name, {k: v for k, v in m.items() if k.endswith("_s")},
                {s: int(cell.data.params.get(f"{s}_rows", 0)) for s in ("train", "validation", "test")},
                labels, models, trials, domains)
    if any(c.trials for c in cells.values()):  # one protocol per report: cells run before search.choice are out
        for key in [k for k, c in cells.items() if c.trials is None and not study.arm(k[0]).reference]:
            del cells[key]
    return cells


@dataclass
class FoldValue:
    macro_f1: float
    metrics: dict[str, float]  # test_* and val_* figures (means for derived rows)
    run_ids: list[str]
    preds: np.ndarray | None = None  # test predictions (None for means over models)
    spread: float | None = None  # sd over DARE mask seeds


@dataclass
class Row:
    label: str
    folds: list[FoldValue | None]
    note: str = ""

    def values(self) -> list[float]:
        return [f.macro_f1 for f in self.folds if f is not None]

    def metric(self, name: str) -> list[float]:
        return [f.metrics[name] for f in self.folds if f is not None and name in f.metrics]


@dataclass
class ArmSummary:
    arm: Arm
    folds: list[int]
    rows: list[Row]
    comparisons: list[tuple[str, Comparison, float, str]] = field(default_factory=list)  # label, c, Holm p, reading
    boot: dict[str, tuple[float, float]] = field(default_factory=dict)  # row label -> 95% bootstrap interval
    chosen: list[str] = field(default_factory=list)  # labels of rows a choice on validation picked (optimism table)


def _value(m: Model) -> FoldValue:
    return FoldValue(m.metrics["test_macro_f1"], m.metrics, [m.run_id], m.test.argmax(1))


def _mean(models: list[Model], spread: bool = False) -> FoldValue:
    keys = set.intersection(*(set(m.metrics) for m in models))
    f1 = [m.metrics["test_macro_f1"] for m in models]
    return FoldValue(float(np.mean(f1)), {k: float(np.mean([m.metrics[k] for m in models])) for k in keys},
                     [m.run_id for m in models], None, float(np.std(f1, ddof=1)) if spread and len(f1) > 1 else None)


def val_objective(m: Model) -> float:
    """A model's validation figure as the search's objective reads it: with per-domain figures logged (several
    domains), the mean over domains of their macro-F1; else the validation macro-F1."""
    per_domain = [v for k, v in m.metrics.items() if k.startswith("val_macro_f1_")]
    return float(np.mean(per_domain)) if per_domain else m.metrics["val_macro_f1"]


def ta_chosen(cell: Cell) -> Model:
    """The task-arithmetic merge of the lambda grid with the best validation objective (ties: the smaller lambda)."""
    grid = [(float(m.params.get("lambda_", "1.0")), m) for n, m in cell.models.items()
            if (n.startswith("ta-") and n != "ta-1") or n == "uniform"]  # ta-1 is the uniform soup (SAME)
    return max(grid, key=lambda x: (val_objective(x[1]), -x[0]))[1]


def _members(cell: Cell) -> list[Model]:
    return sorted((m for m in cell.models.values() if m.kind == "member"), key=lambda m: int(m.name.split(":")[1]))


def best_member(cell: Cell) -> Model:
    """The member with the best validation macro-F1 (then the lower validation NLL): mllm.evaluation.selection's rule,
    the one the report and the promotion gate use, read on validation only."""
    members = {m.name: m for m in _members(cell)}
    top, _ = selection.best_member([(n, m.metrics["val_macro_f1"], m.metrics["val_nll"]) for n, m in members.items()])
    assert top is not None  # every study member is scored on validation
    return members[top]


def policies_of(cell: Cell) -> dict[str, Model]:
    """policy -> the model it chose in this cell: the cell's searched merge under its policy at run time, and the
    other policies' choices over the same trials ("policy:<name>")."""
    searched = cell.models["searched"]
    out = {searched.params.get("policy", "best-all"): searched}
    out.update({n.split(":", 1)[1]: m for n, m in cell.models.items() if n.startswith("policy:")})
    return out


def summarise(study: StudyConfig, arm: Arm, cells: dict[tuple[str, int], Cell]) -> ArmSummary:
    """The arm's rows over its finished folds, their bootstrap intervals and the searched merge's comparisons."""
    folds = [f for f in range(study.folds) if (arm.name, f) in cells]
    if not folds:
        raise MllmError(f"arm {arm.name}: no finished cell", "run mllm study CONFIG (without --report-only)")
    mine = [cells[(arm.name, f)] for f in folds]
    rows, seeds = _rows(study, arm, cells, folds)
    out = ArmSummary(arm, folds, rows)
    out.chosen = ["best member (validation)", "greedy soup", "TF-IDF", "searched merge",
                  "task arithmetic, lambda chosen on validation",
                  *(r.label for r in rows if r.label.startswith("searched: "))]
    out.boot = _bootstrap(study, rows, mine)
    out.comparisons = _comparisons(study, arm, rows, mine, seeds)
    return out


def _seed_members(cells: dict[tuple[str, int], Cell], ref: str, folds: list[int]
                  ) -> tuple[list[FoldValue | None], list[list[np.ndarray]] | None]:
    """Another arm's seed members in each fold (the same rows and recipe: a model trained at several seeds): the
    mean over seeds per fold, and each seed's test predictions per fold (None when a fold has none)."""
    out: list[FoldValue | None] = []
    per: list[list[np.ndarray]] = []
    for f in folds:
        c = cells.get((ref, f))
        found = _members(c) if c is not None else []
        out.append(_mean(found, spread=True) if found else None)
        per.append([m.test.argmax(1) for m in found])
    return out, per if all(per) else None


def _rows(study: StudyConfig, arm: Arm, cells: dict[tuple[str, int], Cell], folds: list[int]
          ) -> tuple[list[Row], dict[str, list[list[np.ndarray]]]]:
    """The arm's table rows in order, and per row that is a reference trained at several seeds, each fold's seed
    predictions (what its comparison resamples)."""
    mine = [cells[(arm.name, f)] for f in folds]
    seeds: dict[str, list[list[np.ndarray]]] = {}

    def other(ref: str, label: str) -> list[FoldValue | None]:
        values, per = _seed_members(cells, ref, folds)
        if per is not None:
            seeds[label] = per
        return values

    rows = [Row(f"member {m.params.get('member', i)}", [_value(_members(c)[i]) for c in mine])
            for i, m in enumerate(_members(mine[0]))]
    rows.append(Row("best member (validation)", [_value(best_member(c)) for c in mine],
                    "chosen per fold by validation macro-F1"))
    rows.append(Row("mean member", [_mean(_members(c)) for c in mine]))
    if arm.full_member:
        rows.append(Row("full-data member", other(arm.full_member, "full-data member"),
                        f"the {arm.full_member} arm's seed members: all training rows, same recipe; mean of seeds"))
    baselines = (("ensemble", "logit ensemble"), ("majority", "majority class"), ("tfidf", "TF-IDF"))
    for name, label in (*baselines, *MERGE_ROWS):
        rows.append(Row(label, [_value(c.models[name]) for c in mine]))
    for name, label in EXTRA_ROWS:  # an arm's extra merges (Arm.merges), once every fold's cell has them
        if all(name in c.models for c in mine):
            rows.append(Row(label, [_value(c.models[name]) for c in mine]))
    if all(any(n.startswith("ta-") and n not in ("ta-1", "ta-k") for n in c.models) for c in mine):  # ta-grid
        rows.append(Row("task arithmetic, lambda chosen on validation", [_value(ta_chosen(c)) for c in mine],
                        "the grid's lambda (0.5 to K) with the best validation objective, per fold"))
    if all("full" in c.models for c in mine):
        rows.append(Row("multi-domain member", [_value(c.models["full"]) for c in mine],
                        "one member fine-tuned on every domain's training rows (what the merge stands in for)"))
    for method, label in (("dare_ties", "DARE-TIES"), ("dare_linear", "DARE-linear")):
        found = [[m for k, m in c.models.items() if k.startswith(f"{method}:")] for c in mine]
        rows.append(Row(f"{label} (mean of {len(found[0])} mask seeds)", [_mean(x, spread=True) for x in found],
                        "spread: sd over mask seeds"))
    rows += _searched_rows(study, arm, folds, mine)
    if arm.bigger:
        rows.append(Row("bigger model", other(arm.bigger, "bigger model"),
                        f"the {arm.bigger} arm's seed members, each fine-tuned once on the same rows; mean of seeds"))
    return rows, seeds


def _searched_rows(study: StudyConfig, arm: Arm, folds: list[int], mine: list[Cell]) -> list[Row]:
    """The searched merge under the configured search.choice (when every cell scored it; else the policy the cells
    ran with), then every other policy's choice over the same trials."""
    choice = cell_config(study, arm, folds[0]).search.choice
    by_policy = [policies_of(c) for c in mine]
    policy = choice if all(choice in p for p in by_policy) else mine[0].models["searched"].params.get("policy",
                                                                                                    "best-all")
    rows = [Row("searched merge", [_value(p[policy]) for p in by_policy],
                f"the search's choice ({policy}) among {study.trials} trials, validation only")]
    for name in sorted(set.intersection(*(set(p) for p in by_policy)) - {policy}):
        rows.append(Row(f"searched: {name}", [_value(p[name]) for p in by_policy],
                        "another choice policy over the same trials (mllm.evaluation.choice)"))
    return rows


def _bootstrap(study: StudyConfig, rows: list[Row], mine: list[Cell]) -> dict[str, tuple[float, float]]:
    """Row label -> 95% bootstrap interval over test reviews (within folds), for rows with predictions in every fold."""
    labels = [c.labels for c in mine]
    k = mine[0].models["searched"].test.shape[1]
    out: dict[str, tuple[float, float]] = {}
    for row in rows:
        if all(f is not None and f.preds is not None for f in row.folds):
            d = fold_bootstrap(labels, [f.preds for f in row.folds], k, study.bootstrap_samples)  # type: ignore
            out[row.label] = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)))
    return out


def _comparisons(study: StudyConfig, arm: Arm, rows: list[Row], mine: list[Cell],
                 seeds: dict[str, list[list[np.ndarray]]]) -> list[tuple[str, Comparison, float, str]]:
    """The searched merge against each reference of the arm's family, Holm-adjusted within the family, with their
    reading; a reference without predictions in every fold is left out."""
    labels = [c.labels for c in mine]
    k = mine[0].models["searched"].test.shape[1]
    by_label = {r.label: r for r in rows}
    searched = by_label["searched merge"]
    family = [("best member (validation)", "the best member"), ("logit ensemble", "the logit ensemble"),
              ("uniform soup", "the uniform soup"), ("greedy soup", "the greedy soup")]
    family += [("full-data member", "the full-data member (seeds)")] if arm.full_member else []
    family += [("multi-domain member", "the multi-domain member")] if "multi-domain member" in by_label else []
    family += [("bigger model", "the bigger model (seeds)")] if arm.bigger else []
    found: list[tuple[str, Comparison]] = []
    ratio = float(np.mean([c.sizes["test"] / c.sizes["train"] for c in mine if c.sizes.get("train")] or [0.0]))
    for label, words in family:
        ref = by_label[label]
        if label in seeds:
            b: list[Any] = seeds[label]
        elif all(f is not None and f.preds is not None for f in ref.folds):
            b = [f.preds for f in ref.folds]  # type: ignore[union-attr]
        else:
            continue
        found.append((words, compare(labels, [f.preds for f in searched.folds],  # type: ignore[misc]
                                     b, k, study.bootstrap_samples, test_train=ratio)))
    adjusted = holm([c.p_train for _, c in found]) if found else []
    return [(w, c, p, reading(c, study.equivalence_margin, p, study.alpha))
            for (w, c), p in zip(found, adjusted, strict=True)]


def optimism(summary: ArmSummary) -> list[tuple[str, list[float]]]:
    """(row label, validation minus test macro-F1 per fold) for every row a choice on validation picked."""
    rows = {r.label: r for r in summary.rows}
    out = []
    for label in summary.chosen:
        row = rows.get(label)
        if row is None:
            continue
        val, test = row.metric("val_macro_f1"), row.metric("test_macro_f1")
        if len(val) == len(test) == len(summary.folds):
            out.append((label, [v - t for v, t in zip(val, test, strict=True)]))
    return out


def interval(values: list[float]) -> tuple[float, float, float]:
    return t_interval(values) if values else (float("nan"),) * 3


def seconds(study: StudyConfig, cells: dict[tuple[str, int], Cell]) -> pd.DataFrame:
    """Wall seconds per arm and part (members' training, validation scoring, search, test scoring)."""
    parts = {"members_train_s": "members (training)", "validation_s": "validation scoring",
             "search_s": "search", "test_s": "test scoring"}
    rows = []
    for arm in study.arms:
        mine = [c for (a, _), c in cells.items() if a == arm.name]
        rows.append({"arm": arm.name, "folds": len(mine),
                     **{label: sum(c.seconds.get(k, 0.0) for c in mine) for k, label in parts.items()}})
    frame = pd.DataFrame(rows)
    frame["total"] = frame[list(parts.values())].sum(axis=1)
    return frame


def figure(summary: ArmSummary, title: str) -> Any:
    """Test macro-F1 per model: mean over folds with its 95% t-interval, and each fold's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(summary.rows))
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.4))
    markers = "os^Dv<>p"
    for y, row in enumerate(rows):
        mean, lo, hi = interval(row.values())
        if np.isfinite(lo):
            ax.plot([max(lo, 0.0), min(hi, 1.0)], [y, y], color="0.55", lw=1.0,
                    label="95% t-interval over folds (clipped to 0-1)")
        if row.label in summary.boot:
            ax.plot(summary.boot[row.label], [y, y], color="0.1", lw=3.5, solid_capstyle="butt",
                    label="95% bootstrap over reviews")
        ax.plot([mean], [y], "o", color="crimson" if row.label == "searched merge" else "black", ms=6, zorder=3)
        for f, fold in zip(row.folds, summary.folds, strict=True):
            if f is not None:
                ax.plot([f.macro_f1], [y + 0.18], markers[fold % len(markers)], color=f"C{fold}", ms=4, alpha=0.8,
                        label=f"fold {fold}")
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test macro-F1: mean over folds (dot), intervals, each fold (coloured)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    return fig
