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

from mllm.config import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.metrics import macro_f1, paired_test


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


def gate(cfg: ExperimentConfig, name: str, version: str, labels: np.ndarray, preds: np.ndarray, k: int,
         champion_preds: Callable[[str], np.ndarray]) -> tuple[str | None, Decision]:
    """Under the champion lock: read the champion, decide, move the alias. Returns (champion before, decision).
    `champion_preds(version)` gives a registered version's test predictions."""
    from mllm import registry
    from mllm.locks import db_lock

    with db_lock(cfg.search.storage, f"{name}@champion"):
        current = registry.alias_version(name, "champion")
        before = str(current.version) if current is not None else None
        if before == version:
            return before, Decision(False, "already the champion")
        decision = decide(labels, preds, champion_preds(before) if before else None, k, cfg)
        if decision.promote:
            registry.set_alias(name, "champion", version)
    return before, decision


def run(cfg: ExperimentConfig, parent_run_id: str | None = None, prefix: Any = None) -> PromoteResult:
    """Merge the best trial's recipe with mergekit, evaluate it on test, set challenger, gate champion."""
    import optuna

    from mllm import evaluate, merge, registry, search, tracking

    tracking.configure(cfg.tracking)
    name = search.study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=search.open_storage(cfg))
    except KeyError:
        raise MllmError(f"search.study_name: no study {name} in {tracking.redact(cfg.search.storage)}",
                        "run mllm search first (or set search.study_name / search.storage)") from None
    top = search.best(study)
    if top is None:
        raise MllmError(f"study {name} has no complete trial", "run mllm search (more trials) first")
    recipe = MergeConfig.model_validate(top.user_attrs["recipe"])
    members, base = study.user_attrs["members"], study.user_attrs["base"]
    model_name = f"{cfg.name}-merged"
    with tracking.tracked_run(cfg, f"promote-{name}", stage="promote", parent_run_id=parent_run_id,
                              tags={"mllm.study": name, "mllm.trial": top.number}) as run_:
        merged = merge.run(cfg.model_copy(update={"merge": recipe}), members, base,
                           tags={"study": name, "trial": top.number, "val_macro_f1": round(top.values[0], 6)})
        scored = evaluate.run(cfg, [merged.model_uri], split="test", baselines=False, prefix=prefix).evaluations[0]
        labels, k = scored.labels, scored.logits.shape[1]
        registry.set_alias(model_name, "challenger", merged.version)

        def champion_preds(version: str) -> np.ndarray:  # reused when the champion was scored on this data
            return evaluate.run(cfg, [f"models:/{model_name}/{version}"], split="test", baselines=False,
                                prefix=prefix).evaluations[0].logits.argmax(1)

        before, decision = gate(cfg, model_name, merged.version, labels, scored.logits.argmax(1), k, champion_preds)
        after = registry.alias_version(model_name, "champion")
        registry.set_version_tags(model_name, merged.version, {"promotion": decision.reason})
        tracking.set_tags({"mllm.promoted": decision.promote, "mllm.promotion": decision.reason,
                           "mllm.model_uri": merged.model_uri})
        tracking.log_metrics({"test_macro_f1": scored.metrics["macro_f1"], "test_accuracy": scored.metrics["accuracy"],
                              **({"p_value": decision.p_value} if decision.p_value is not None else {})})
    verdict = "champion" if decision.promote else "challenger only"
    print(f"promote: {merged.model_uri} (trial {top.number}, {recipe.method}) test macro-F1 "
          f"{scored.metrics['macro_f1']:.4f} -> {verdict}: {decision.reason}")
    return PromoteResult(merged.model_uri, merged.version, scored.metrics["macro_f1"], before,
                         str(after.version) if after is not None else None, decision, run_.info.run_id)
