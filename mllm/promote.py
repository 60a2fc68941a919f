"""`mllm promote`: materialise the search's best recipe with mergekit, score it on test, and gate `champion`.

    mllm promote -c configs/tiny.yaml                 # the best trial of <experiment>-search
    mllm promote --study-name drugs-1 --storage postgresql+psycopg2://...

The best trial's recipe (validation macro-F1) is merged by mergekit's `run_merge` (the same maths the
in-memory trial used; tests hold them equal), registered as a version of `<experiment>-merged` tagged with
its study and trial, and evaluated on the test split: the first time anything reads test. It gets alias
`challenger`. It takes `champion` only if there is none, or if its test macro-F1 beats the champion's by more
than `promote.margin` and the paired test (`promote.test`: bootstrap of the macro-F1 difference, or McNemar)
gives p < `promote.alpha`; otherwise the reason is printed, tagged on the version and logged.

Alias updates are last-writer-wins, so the read-compare-move runs under a lock held in the search storage
database (`mllm.locks`): two promoters at once are serialised, and the second compares itself with the
first's result, so `champion` never ends on the worse model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm import evaluate, merge
from mllm.basics import redact
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.locks import db_lock
from mllm.metrics import macro_f1, paired_test
from mllm.store import Store
from mllm.study import best, open_storage, study_name


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    p_value: float | None = None
    macro_f1_diff: float | None = None


@dataclass(frozen=True)
class PromoteResult:
    model_uri: str
    version: str
    test_macro_f1: float
    champion_before: str | None
    champion_after: str | None
    decision: Decision
    run_id: str
    evaluation_run_id: str  # the challenger's test-split evaluation


def decide(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None, k: int,
           cfg: ExperimentConfig) -> Decision:
    """The gate, on test-split predictions (class ids) of the challenger and the current champion."""
    if champion is None:
        return Decision(True, "no champion yet")
    p = cfg.promote
    test = paired_test(labels, challenger, champion, k, p.bootstrap_samples, 1 - p.alpha, cfg.evaluate.seed)
    diff = test.macro_f1_diff
    p_value = test.bootstrap_p if p.test == "bootstrap" else test.mcnemar_p
    summary = (f"test macro-F1 {macro_f1(labels, challenger, k):.4f} vs champion {macro_f1(labels, champion, k):.4f}"
               f" (diff {diff:+.4f}, margin {p.margin}, {p.test} p={p_value:.3f}, alpha {p.alpha})")
    if diff <= p.margin:
        return Decision(False, f"not better by the margin: {summary}", p_value, diff)
    if p_value >= p.alpha:
        return Decision(False, f"not significant: {summary}", p_value, diff)
    return Decision(True, f"better: {summary}", p_value, diff)


def gate(cfg: ExperimentConfig, store: Store, version: str, labels: np.ndarray, preds: np.ndarray, k: int,
         champion_preds: Callable[[str], np.ndarray]) -> tuple[str | None, Decision]:
    """Under the champion lock: read the champion, decide, move the alias. Returns (champion before, decision).
    `champion_preds(version)` gives a registered version's test predictions."""
    with db_lock(cfg.search.storage, f"{store.model_name('merged')}@champion"):
        current = store.alias_version("merged", "champion")
        before = str(current.version) if current is not None else None
        if before == version:
            return before, Decision(False, "already the champion")
        decision = decide(labels, preds, champion_preds(before) if before else None, k, cfg)
        if decision.promote:
            store.set_alias("merged", "champion", version)
    return before, decision


def paragraph(uri: str, trial: int, method: str, test_macro_f1: float, before: str | None, decision: Decision,
              store: Store) -> str:
    """What promote did, in one paragraph (printed, and the gist of it in the version's description)."""
    name = store.model_name("merged")
    if before is None:
        replaced = "there was no champion before, so it became the first"
    elif decision.promote:
        replaced = f"it replaced {name} version {before} as champion"
    elif before == uri.rsplit("/", 1)[-1]:
        replaced = "it already was the champion"
    else:
        replaced = f"version {before} stays champion"
    return (f"promote: {uri} (search trial {trial}, {method}, test macro-F1 {test_macro_f1:.4f}) is "
            f"{name}@challenger; {'it is now @champion' if decision.promote else 'it did not take @champion'}: "
            f"{replaced}. Gate: {decision.reason}.")


def record(store: Store, uri: str, version: str, before: str | None, decision: Decision,
           cfg: ExperimentConfig) -> None:
    """The promotion decision where people look: the version's description and tags."""
    replaced = f"version {before}" if before else "none (first champion)"
    outcome = "became champion" if decision.promote else "stays challenger"
    store.note_version(uri, "promotion", f"{outcome}; champion before: {replaced}; {decision.reason}")
    store.set_version_tags("merged", version, {
        "promotion_replaced": replaced, "promotion_test": cfg.promote.test,
        "promotion_macro_f1_diff": "" if decision.macro_f1_diff is None else f"{decision.macro_f1_diff:+.4f}",
        "promotion_p_value": "" if decision.p_value is None else f"{decision.p_value:.4g}"})


def best_recipe(cfg: ExperimentConfig) -> tuple[Any, MergeConfig, list[str], str]:
    """(best trial, its recipe, member URIs, base URI) of the configured study."""
    import optuna

    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(cfg))
    except KeyError:
        raise MllmError(f"search.study_name: no study {name} in {redact(cfg.search.storage)}",
                        "run mllm search first (or set search.study_name / search.storage)") from None
    top = best(study)
    if top is None:
        raise MllmError(f"study {name} has no complete trial", "run mllm search (more trials) first")
    return top, MergeConfig.model_validate(top.user_attrs["recipe"]), study.user_attrs["members"], \
        study.user_attrs["base"]


def run(cfg: ExperimentConfig, parent_run_id: str | None = None, prefix: Any = None,
        store: Store | None = None) -> PromoteResult:
    """Merge the best trial's recipe with mergekit, evaluate it on test, set challenger, gate champion."""
    store = store or Store(cfg)
    top, recipe, members, base = best_recipe(cfg)
    name = study_name(cfg)
    with store.run(f"promote-{name}", stage="promote", parent_run_id=parent_run_id,
                   tags={"mllm.study": name, "mllm.trial": top.number}) as run_:
        merged = merge.run(cfg.model_copy(update={"merge": recipe}), members, base, store=store,
                           tags={"study": name, "trial": top.number, "val_macro_f1": round(top.values[0], 6)})

        def test_logits(uri: str) -> Any:  # reused when that version was scored on this data
            return evaluate.run(cfg, [uri], split="test", baselines=False, prefix=prefix, store=store).evaluations[0]

        scored = test_logits(merged.model_uri)
        store.set_alias("merged", "challenger", merged.version)
        before, decision = gate(cfg, store, merged.version, scored.labels, scored.logits.argmax(1),
                                scored.logits.shape[1],
                                lambda v: test_logits(store.model_uri("merged", v)).logits.argmax(1))
        after = store.alias_version("merged", "champion")
        record(store, merged.model_uri, merged.version, before, decision, cfg)
        run_.tags({"mllm.promoted": decision.promote, "mllm.promotion": decision.reason,
                   "mllm.model_uri": merged.model_uri})
        run_.metrics({"test_macro_f1": scored.metrics["macro_f1"], "test_accuracy": scored.metrics["accuracy"],
                      **({"p_value": decision.p_value} if decision.p_value is not None else {})})
    print(paragraph(merged.model_uri, top.number, recipe.method, scored.metrics["macro_f1"], before, decision,
                    store))
    return PromoteResult(merged.model_uri, merged.version, scored.metrics["macro_f1"], before,
                         str(after.version) if after is not None else None, decision, run_.id, scored.run_id)
