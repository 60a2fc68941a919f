"""Run (or resume) a study cell by cell, fold-major, then write its RESULTS.md from the MLflow runs.

    run_study(load_study("configs/studies/drugs.yaml"))        # every cell not finished yet, then the report
    write_report(study, "configs/studies/drugs.yaml")           # the report alone, from what the store holds

Cells run fold by fold (every arm of fold 0, then fold 1, ...), so an interrupted study has whole folds first.
A finished cell is reused (its key: the arm's config, data, members and study settings); an unfinished one
starts again, reusing its registered members and continuing its Optuna study.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

from mllm.study.addendum import complete_cell
from mllm.study.cell import run_cell
from mllm.study.config import StudyConfig, cell_config
from mllm.study.document import render
from mllm.study.results import collect, figure, seconds, summarise
from mllm.tracking.runs import git_sha
from mllm.tracking.store import Store


def run_study(study: StudyConfig, arms: list[str] | None = None, folds: list[int] | None = None) -> list[str]:
    """Run the selected cells (all by default); return their cell run ids."""
    chosen = [study.arm(a) for a in arms] if arms else study.arms
    ids = []
    for fold in folds if folds is not None else range(study.folds):
        for arm in chosen:
            start = time.perf_counter()
            print(f"study {study.study}: arm {arm.name}, fold {fold} of {study.folds}")
            ids.append(run_cell(study, arm, fold))
            complete_cell(study, arm, fold)  # extra merges added to the arm after the cell ran
            print(f"study {study.study}: arm {arm.name}, fold {fold}: {time.perf_counter() - start:.0f} s")
    return ids


def write_report(study: StudyConfig, config_path: str) -> Path:
    """RESULTS.md and one figure per arm (beside it, in results/), also logged to a report run in the experiment
    named after the study."""
    code = git_sha()  # before this report writes its own figures into the working tree
    cells = collect(study)
    summaries = [summarise(study, arm, cells) for arm in study.arms
                 if not arm.reference and any(a == arm.name for a, _ in cells)]
    out = study.results
    figdir = out.parent / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    cfg = cell_config(study, study.arms[0], 0)
    store = Store(cfg.model_copy(update={"name": study.study}))
    with store.run(f"results {study.study}", stage="study-report", tags={"mllm.study": study.study},
                   log_config=False, system_metrics=False) as run_:
        figures = {}
        for s in summaries:
            path = figdir / f"{study.study}-{s.arm.name}.png"
            fig = figure(s, f"{study.study}: arm {s.arm.name} ({len(s.folds)} folds)")
            fig.savefig(path, dpi=110)
            run_.figure(fig, f"{s.arm.name}.png")
            figures[s.arm.name] = path.relative_to(out.parent)
        wall = seconds(study, cells)
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = render(study, config_path, cells, summaries, wall, figures, run_.id, code, when)
        run_.text(text, "RESULTS.md")
        run_.metrics({f"{s.arm.name}_{re.sub(r'[^a-z0-9]+', '_', w.removeprefix('the ')).strip('_')}_diff": c.point
                      for s in summaries for w, c, _, _ in s.comparisons})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"study {study.study}: wrote {out} ({len(cells)} cells, report run {run_.id})")
    return out
