"""`mllm report EXPERIMENT`: the comparison table of an experiment's evaluations on one split.

    mllm report drugscom                 # test split, newest evaluation per model
    mllm report tiny -c configs/tiny.yaml --split validation

Reads the evaluation runs the evaluate stage logged (nothing is re-scored), keeps those on the newest
evaluated data (dataset fingerprint) and the newest per model, and compares each non-member model with the
best member, chosen by validation macro-F1 (recorded when it was registered), so the choice never looks at
the split being reported. The paired test resamples the same reviews for both models (bootstrap of the
macro-F1 difference) and counts the reviews only one of them gets right (McNemar, exact). The table is
printed and logged as `report.md` (plus `report.json`) in a `report` run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mllm.config.schema import ExperimentConfig
from mllm.errors import MllmError
from mllm.metrics import PairedTest, paired_test
from mllm.store import Store

ROLE_ORDER = {"merged": 0, "ensemble": 1, "member": 2, "base": 3, "bigger": 4, "model": 5}


@dataclass(frozen=True)
class Row:
    model: str
    role: str
    method: str
    recipe: str
    metrics: dict[str, float]
    cost: float  # forward-pass parameters per review, relative to one member
    run_id: str
    versus_best_member: PairedTest | None = None


@dataclass(frozen=True)
class ReportResult:
    experiment: str
    split: str
    rows: list[Row]
    best_member: str | None
    markdown: str
    run_id: str | None


def collect(store: Store, experiment: str, split: str) -> list[Any]:
    """The newest evaluation run per model on `split`, all on the newest evaluated data."""
    runs = store.find_runs({"mllm.stage": "evaluation", "mllm.split": split}, experiment=experiment)
    if not runs:
        raise MllmError(f"experiment {experiment} has no evaluations on the {split} split",
                        "run mllm evaluate first (it scores the merges and their baselines)")
    fingerprint = runs[0].data.tags.get("mllm.dataset_fingerprint")
    newest: dict[str, Any] = {}
    for r in runs:  # newest first
        if r.data.tags.get("mllm.dataset_fingerprint") == fingerprint:
            newest.setdefault(r.data.tags["mllm.model_uri"], r)
    return list(newest.values())


def _predictions(store: Store, run_id: str, dst: Path) -> pd.DataFrame:
    return pd.read_csv(store.run_artifact(run_id, "predictions.csv", dst / run_id), keep_default_na=False)


def build_rows(runs: list[Any], cfg: ExperimentConfig, work: Path, store: Store) -> tuple[list[Row], str | None]:
    members = [r for r in runs if r.data.tags.get("mllm.role") == "member"]
    reference = members[0] if members else None
    if members:  # the best member by validation macro-F1; the reported split's score only breaks ties
        reference = max(members, key=lambda r: (float(r.data.tags.get("mllm.val_macro_f1", "-1")),
                                                r.data.metrics.get("macro_f1", 0.0)))
    unit = reference.data.metrics.get("num_params") if reference else None
    best_preds = _predictions(store, reference.info.run_id, work) if reference else None
    rows = []
    for r in sorted(runs, key=lambda r: (ROLE_ORDER.get(r.data.tags.get("mllm.role", "model"), 9),
                                         -r.data.metrics.get("macro_f1", 0.0))):
        t, m = r.data.tags, r.data.metrics
        cost = m.get("num_params", 0.0) / unit if unit else m.get("forward_passes", 1.0)
        versus = None
        if best_preds is not None and t.get("mllm.role") != "member":
            preds = _predictions(store, r.info.run_id, work)
            labels = best_preds["label"].to_numpy()
            if len(preds) == len(best_preds) and (preds["label"].to_numpy() == labels).all():
                names = sorted(set(labels) | set(preds["predicted"]) | set(best_preds["predicted"]))
                code = {n: i for i, n in enumerate(names)}
                versus = paired_test(np.array([code[x] for x in labels]),
                                     np.array([code[x] for x in preds["predicted"]]),
                                     np.array([code[x] for x in best_preds["predicted"]]), len(names),
                                     cfg.evaluate.bootstrap_samples, cfg.evaluate.confidence, cfg.evaluate.seed)
        rows.append(Row(t["mllm.model_uri"], t.get("mllm.role", "model"), t.get("mllm.method", ""),
                        t.get("mllm.recipe", ""), dict(m), cost, r.info.run_id, versus))
    return rows, reference.data.tags["mllm.model_uri"] if reference else None


def render(rows: list[Row], experiment: str, split: str, best: str | None, cfg: ExperimentConfig) -> str:
    conf = f"{cfg.evaluate.confidence:.0%}"
    n = int(rows[0].metrics.get("rows", 0)) if rows else 0
    lines = [f"# {experiment}: {split} split ({n} reviews)", "",
             f"| model | role | method | parameters | accuracy ({conf} CI) | macro-F1 ({conf} CI) | NLL | ECE "
             "| cost | vs best member: Δ macro-F1 (CI), p bootstrap, p McNemar |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        m = r.metrics
        versus = "best member" if r.model == best else ""
        if r.versus_best_member is not None:
            v = r.versus_best_member
            versus = (f"{v.macro_f1_diff:+.4f} ({v.macro_f1_diff_ci[0]:+.3f}, {v.macro_f1_diff_ci[1]:+.3f}), "
                      f"p={v.bootstrap_p:.3f}, p={v.mcnemar_p:.3f}"
                      + (" **differs**" if v.bootstrap_p < cfg.evaluate.alpha else ""))
        lines.append(
            f"| {r.model} | {r.role} | {r.method} | {r.recipe} | {m.get('accuracy', float('nan')):.4f} "
            f"({m.get('accuracy_ci_low', float('nan')):.3f}-{m.get('accuracy_ci_high', float('nan')):.3f}) | "
            f"{m.get('macro_f1', float('nan')):.4f} ({m.get('macro_f1_ci_low', float('nan')):.3f}-"
            f"{m.get('macro_f1_ci_high', float('nan')):.3f}) | {m.get('nll', float('nan')):.3f} | "
            f"{m.get('ece', float('nan')):.3f} | {r.cost:.1f}x | {versus} |")
    lines += ["", "cost: parameters run per review relative to one member; the ensemble runs every member "
              "(K forward passes, K times a merge's inference cost).",
              f"best member: {best or 'none evaluated'}, chosen by validation macro-F1 (never by this split). "
              f"**differs**: paired bootstrap p < {cfg.evaluate.alpha}; CIs are percentile bootstrap over reviews "
              f"({cfg.evaluate.bootstrap_samples} resamples)."]
    return "\n".join(lines) + "\n"


def run(cfg: ExperimentConfig, experiment: str | None = None, split: str | None = None,
        log: bool = True, store: Store | None = None, evaluations: list[str] | None = None) -> ReportResult:
    """Build the comparison table; print-ready markdown, also logged in a `report` run when `log`.
    `evaluations`: the evaluation run ids to compare (the pipeline hands over its own); by default the newest
    evaluation of each model on the newest evaluated data."""
    store = store or Store(cfg)
    experiment = experiment or cfg.name
    split = split or cfg.evaluate.split
    runs = collect(store, experiment, split) if not evaluations else sorted(  # newest first, as collect gives them
        (store.client.get_run(i) for i in evaluations), key=lambda r: r.info.start_time, reverse=True)
    rows, best = build_rows(runs, cfg, cfg.output_dir / "report", store)
    markdown = render(rows, experiment, split, best, cfg)
    run_id = None
    if log:
        with store.run(f"report-{split}", stage="report", tags={"mllm.split": split}, experiment=experiment) as r:
            r.text(markdown, "report.md")
            r.mlflow_table(table_frame(rows, best), "report_table.json")
            r.json({"split": split, "best_member": best, "rows": [asdict(x) for x in rows]}, "report.json")
            run_id = r.id
    return ReportResult(experiment, split, rows, best, markdown, run_id)


def table_frame(rows: list[Row], best: str | None) -> pd.DataFrame:
    """The comparison table as a frame (the MLflow table logged with the report)."""
    out = []
    for r in rows:
        v = r.versus_best_member
        out.append({"model": r.model, "role": r.role, "method": r.method, "recipe": r.recipe,
                    **{k: r.metrics.get(k) for k in ("accuracy", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high",
                                                     "nll", "ece")},
                    "cost": r.cost, "best_member": r.model == best,
                    "diff_vs_best_member": v.macro_f1_diff if v else None, "p_bootstrap": v.bootstrap_p if v else None,
                    "evaluation_run": r.run_id})
    return pd.DataFrame(out)


def to_json(result: ReportResult) -> str:
    return json.dumps({"experiment": result.experiment, "split": result.split, "best_member": result.best_member,
                       "rows": [asdict(x) for x in result.rows]}, indent=2, default=str)
