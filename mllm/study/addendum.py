"""A finished cell gains the extra merges its arm lists (`Arm.merges`) and it lacks: a merge added to a study after
its cells ran (RegMean in the shards arm) is scored on the cell's own members, validation then test, and logged as
one more model run under the cell's run. Nothing else of the cell is redone: an extra merge is a fixed recipe of
the members, so it depends on neither the search nor any other model.

    added = complete_cell(study, study.arm("shards"), fold=0)     # names of the models scored now ([] if none)
"""

from __future__ import annotations

import json

from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import SplitData, load_splits
from mllm.errors import MllmError
from mllm.evaluation.metrics import classification_summary
from mllm.merging.regmean import member_rows
from mllm.study.cell import cell_key, cell_members
from mllm.study.config import Arm, StudyConfig, cell_config
from mllm.study.modelruns import log_models
from mllm.study.recipes import extra_recipes, needs_rows
from mllm.study.work import CellWork
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags


def missing_extras(study: StudyConfig, arm: Arm, cfg: ExperimentConfig, store: Store, cell_id: str, k: int
                   ) -> dict[str, tuple[str, MergeConfig]]:
    """name -> (kind, recipe) of the arm's extra merges that the finished cell has no model run of."""
    have = {r.data.tags.get("mllm.study_model") for r in store.find_runs(
        {"mllm.study": study.study, "mllm.arm": arm.name, "mllm.stage": "study-model"})
        if r.data.tags.get("mlflow.parentRunId") == cell_id}
    return {n: v for n, v in extra_recipes(cfg, arm.merges, k).items() if n not in have}


def loadable_members(cfg: ExperimentConfig, store: Store, data: SplitData, base: str, names: list[str],
                     uris: list[str]) -> tuple[str, list[str]]:
    """(base URI, member URIs) to merge: the cell's own, or, where an imported light store holds no weights for
    them, the members trained again by key, each checked to reproduce the cell's member (validation macro-F1 and
    NLL to 1e-4); a retraining that does not is refused in one line, since the merge would not be of the cell's
    members."""
    try:
        for uri in [base, *uris]:
            store.download(uri)
        return base, uris
    except MllmError:
        pass
    new_base, trained = cell_members(cfg, store, data)
    now = dict(trained)
    for name, uri in zip(names, uris, strict=True):
        then_val, now_val = (VersionTags.of(store.resolve(u)[1]).val for u in (uri, now[name]))
        for metric in ("macro_f1", "nll"):
            if metric not in then_val or abs(then_val[metric] - now_val.get(metric, float("inf"))) > 1e-4:
                raise MllmError(f"{cfg.name}: member {name} trained again here does not reproduce {uri} (validation "
                                f"{metric} {now_val.get(metric)} against {then_val.get(metric)})",
                                "the arm's extra merges need the cell's own members: run it where their weights are")
    print(f"{cfg.name}: members trained again reproduce the cell's ({', '.join(names)}), merged from them")
    return new_base, [now[n] for n in names]


def complete_cell(study: StudyConfig, arm: Arm, fold: int) -> list[str]:
    """Score and log the arm's extra merges a finished cell lacks; return their names."""
    if arm.reference or not arm.merges:
        return []
    cfg = cell_config(study, arm, fold)
    store = Store(cfg)
    data = load_splits(cfg.data)
    done = store.find_runs({"mllm.study_cell": cell_key(study, arm, cfg, data.fingerprint)})
    if not done:
        return []
    cell = done[0]
    uris = [u for u in cell.data.tags["mllm.parents"].split(",") if u]
    names = json.loads(cell.data.params["members"])
    todo = missing_extras(study, arm, cfg, store, cell.info.run_id, len(uris))
    if not todo:
        return []
    base, uris = loadable_members(cfg, store, data, cell.data.tags["mllm.base"], names, uris)
    whole = cfg.model_copy(update={"search": cfg.search.model_copy(update={"prune": False})})
    labels = {"validation": data.validation["label"].to_numpy(), "test": data.test["label"].to_numpy()}
    work = CellWork(study, arm, fold, cell.data.tags["mllm.study_cell"], cfg, whole, store, data, base,
                    list(zip(names, uris, strict=True)), store.download(base), [store.download(u) for u in uris],
                    labels, {}, recipes=dict(todo))
    if needs_rows(todo):
        work.rows = member_rows(cfg, store, uris)
    scorer = work.scorer()  # validation first: the test split is read after
    work.val.update({n: scorer.logits(r) for n, (_, r) in todo.items()})
    del scorer  # the members stay resident (work.stack) for the test scorer
    scorer = work.scorer(reviews=(data.test["text"].tolist(), labels["test"]))
    work.test.update({n: scorer.logits(r) for n, (_, r) in todo.items()})
    del scorer
    work.release()
    log_models(work, cell.info.run_id)
    for name in todo:
        f1 = classification_summary(work.val[name], labels["validation"])["macro_f1"]
        print(f"study: {cfg.name}: {name} added to cell run {cell.info.run_id} (validation macro-F1 {f1:.4f})")
    return list(todo)
