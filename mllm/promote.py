"""`mllm promote`: materialise the search's chosen recipe with mergekit, and let the gate decide, on validation rows
the search never optimised, whether it becomes `champion`.

    mllm promote -c configs/tiny.yaml                 # the chosen trial of <experiment>-search (search.choice)
    mllm promote --study-name drugs-1 --storage postgresql+psycopg2://...

The chosen trial (`search.choice` applied by `mllm.evaluation.choice`; by default the best on the search rows) is
merged by mergekit's `run_merge` (the same maths the in-memory trial used; tests hold them equal), registered as a
version of `<experiment>-merged` tagged with its study, trial and policy, and gets alias `challenger`. A recipe with all
its weight on one member is refused before that, in one line naming the member. The gate reads `promote.split`
(holdout: the validation rows the search's objective never read; or a selection split carved from train), never
test, with paired bootstrap tests (`promote.bootstrap_samples`, at least 10,000):
1. non-inferiority to the best member (chosen by validation, `mllm.evaluation.selection`): the one-sided (1 - alpha)
   lower confidence bound of (challenger - best member) macro-F1 must exceed -`promote.non_inferiority_margin`;
2. with a champion, superiority: the lower bound of (challenger - champion) must exceed `promote.margin`.
Each states its power (a challenger exactly as good passes with it). A challenger that fails stays `challenger`;
the reason is printed, tagged on the version (with the figures the decision used) and written into its
description. Only then is the challenger scored on test, for the report (the pipeline leaves that to its final
evaluation).

Alias updates are last-writer-wins, so the read-compare-move runs under a lock held in the search storage
database (`mllm.tracking.locks`): two promoters at once are serialised, and the second compares itself with the
first's result, so `champion` never ends on the worse model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mllm import evaluate, merge
from mllm.basics import redact
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.evaluation.choice import single_member, validation_parts
from mllm.evaluation.metrics import macro_f1, paired_test
from mllm.evaluation.selection import best_member
from mllm.search import member_validation
from mllm.tracking.locks import db_lock
from mllm.tracking.store import Store
from mllm.tracking.trials import best, chosen, open_storage, study_name


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)  # what the decision read (tagged on the version)


@dataclass(frozen=True)
class PromoteResult:
    model_uri: str | None  # None: refused before anything was materialised (a single-member recipe)
    version: str | None
    split: str  # the split the gate decided on
    macro_f1: float  # the challenger's macro-F1 on that split
    champion_before: str | None
    champion_after: str | None
    decision: Decision
    run_id: str
    evaluation_run_id: str | None  # the challenger's evaluation on the decision split
    test_macro_f1: float | None = None  # scored after the decision, for the report only
    test_evaluation_run_id: str | None = None


def versus(labels: np.ndarray, challenger: np.ndarray, other: np.ndarray, k: int, cfg: ExperimentConfig,
           threshold: float, name: str) -> tuple[float, dict[str, float], str]:
    """(p-value of H0: challenger - other <= threshold, figures, a summary) of a paired bootstrap on `promote.split`.
    H0 is rejected (p < alpha) exactly when the one-sided (1 - alpha) lower bound of the difference is above the
    threshold."""
    p = cfg.promote
    t = paired_test(labels, challenger, other, k, p.bootstrap_samples, 1 - 2 * p.alpha, cfg.evaluate.seed)
    bound, p_value, score = t.lower_bound(p.alpha), t.p_at_most(threshold), macro_f1(labels, other, k)
    se = float(t.diffs.std(ddof=1))
    chance = power(se, threshold, p.alpha)
    summary = (f"{p.split} macro-F1 {macro_f1(labels, challenger, k):.4f} vs {name} {score:.4f} (diff "
               f"{t.macro_f1_diff:+.4f}, one-sided {1 - p.alpha:.0%} lower bound {bound:+.4f} against {threshold:+g}, "
               f"p={p_value:.4g}; {len(labels)} reviews, SE {se:.3f}: a challenger exactly as good passes with power "
               f"{chance:.0%})")
    return p_value, {"macro_f1": round(score, 6), "diff": round(t.macro_f1_diff, 6), "lower_bound": round(bound, 6),
                     "se": round(se, 6), "power": round(chance, 4)}, summary


def power(se: float, threshold: float, alpha: float) -> float:
    """The chance that a challenger whose true difference is 0 gets a one-sided (1 - alpha) lower bound above
    `threshold` (normal approximation, the paired bootstrap's SE): Phi(-threshold / SE - z(1 - alpha))."""
    from scipy.stats import norm

    if se <= 0:
        return 1.0 if threshold < 0 else 0.0
    return float(norm.cdf(-threshold / se - norm.ppf(1 - alpha)))


def decide(labels: np.ndarray, challenger: np.ndarray, reference: tuple[str, np.ndarray] | None,
           champion: tuple[str, np.ndarray] | None, k: int, cfg: ExperimentConfig) -> Decision:
    """The gate, on predictions (class ids) of `promote.split`: non-inferiority to the best member, then
    superiority over the champion by `promote.margin`, each as a one-sided (1 - alpha) lower confidence bound."""
    p = cfg.promote
    figures: dict[str, Any] = {"split": p.split, "rows": len(labels), "alpha": p.alpha,
                               "bootstrap_samples": p.bootstrap_samples,
                               "challenger_macro_f1": round(macro_f1(labels, challenger, k), 6)}
    notes = []
    if reference is not None:  # the best member
        uri, preds = reference
        p_ni, found, summary = versus(labels, challenger, preds, k, cfg, -p.non_inferiority_margin,
                                      f"best member {uri}")
        figures.update({"best_member": uri, "p_non_inferior": p_ni, "non_inferiority_margin": p.non_inferiority_margin,
                        **{f"{key}_vs_best_member" if key != "macro_f1" else "best_member_macro_f1": v
                           for key, v in found.items()}})
        if p_ni >= p.alpha:
            return Decision(False, f"not shown non-inferior to the best member: {summary}", figures)
        notes.append(f"non-inferior to the best member: {summary}")
    if champion is None:
        return Decision(True, "; ".join(["no champion yet", *notes]), figures)
    version, preds = champion
    p_sup, found, summary = versus(labels, challenger, preds, k, cfg, p.margin, f"champion version {version}")
    figures.update({"champion": version, "p_better_than_champion": p_sup, "margin": p.margin,
                    **{f"{key}_vs_champion" if key != "macro_f1" else "champion_macro_f1": v
                       for key, v in found.items()}})
    if p_sup >= p.alpha:
        return Decision(False, "; ".join([f"not better than the champion by the margin: {summary}", *notes]), figures)
    return Decision(True, "; ".join([f"better than the champion: {summary}", *notes]), figures)


def gate(cfg: ExperimentConfig, store: Store, version: str, labels: np.ndarray, preds: np.ndarray,
         reference: tuple[str, np.ndarray] | None, k: int,
         champion_preds: Callable[[str], np.ndarray]) -> tuple[str | None, Decision]:
    """Under the champion lock: read the champion, decide, record the decision on the version, then move the alias.
    Returns (champion before, decision). `reference`: (URI, predictions) of the best member; `champion_preds(version)`
    gives a registered version's predictions on `promote.split`.

    The decision is written before the alias moves (write-ahead), so a promote killed in between is finished by the
    rerun with the first decision, never decided again against itself: a version's recorded decision stands while
    the champion it was made against is still the champion (or the version itself became it)."""
    uri = store.model_uri("merged", version)
    with db_lock(cfg.search.storage, f"{store.model_name('merged')}@champion"):
        current = store.alias_version("merged", "champion")
        before = str(current.version) if current is not None else None
        earlier = recorded(store, uri)
        if earlier is not None:
            against, decision = earlier
            if before == against or (decision.promote and before == version):  # that decision still stands
                if decision.promote and before != version:  # the alias move a killed promote did not make
                    store.set_alias("merged", "champion", version)
                return earlier
        if before == version:
            return before, Decision(False, "already the champion")
        decision = decide(labels, preds, reference, (before, champion_preds(before)) if before else None, k, cfg)
        record(store, uri, before, decision)
        if decision.promote:
            store.set_alias("merged", "champion", version)
    return before, decision


def paragraph(uri: str, trial: int, method: str, split: str, score: float, before: str | None, decision: Decision,
              store: Store) -> str:
    """What promote did, in one paragraph (printed, and the gist of it in the version's description)."""
    name = store.model_name("merged")
    if decision.promote:
        replaced = f"it replaced {name} version {before} as champion" if before else \
            "there was no champion before, so it became the first"
    elif before == uri.rsplit("/", 1)[-1]:
        replaced = "it already was the champion"
    elif before:
        replaced = f"version {before} stays champion"
    else:
        replaced = "there is still no champion: no merge has earned the alias"
    return (f"promote: {uri} (search trial {trial}, {method}, {split} macro-F1 {score:.4f}) is "
            f"{name}@challenger; {'it is now @champion' if decision.promote else 'it did not take @champion'}: "
            f"{replaced}. Gate ({split} split only): {decision.reason}.")


def record(store: Store, uri: str, before: str | None, decision: Decision) -> None:
    """The promotion decision where people look: the version's description and tags (with the figures it used).
    `promotion_outcome` is written last: a version that has it holds the whole decision (see `recorded`)."""
    replaced = f"version {before}" if before else "none (first champion)" if decision.promote else "none"
    outcome = "became champion" if decision.promote else "stays challenger"
    store.note_version(uri, "promotion", f"{outcome}; champion before: {replaced}; {decision.reason}")
    store.tag_version(uri, {"promotion_replaced": replaced,
                            **{f"promotion_{k}": v for k, v in decision.figures.items()}})
    store.tag_version(uri, {"promotion_outcome": outcome})


def recorded(store: Store, uri: str) -> tuple[str | None, Decision] | None:
    """(champion before, decision) as `record` wrote them on the version, or None when no decision is complete."""
    _, version = store.resolve(uri)
    tags = dict(version.tags) if version is not None else {}
    if "promotion_outcome" not in tags:
        return None
    replaced = tags.get("promotion_replaced", "none")
    figures = {k.removeprefix("promotion_"): _number(v) for k, v in tags.items()
               if k.startswith("promotion_") and k not in ("promotion_outcome", "promotion_replaced")}
    return (replaced.removeprefix("version ") if replaced.startswith("version ") else None,
            Decision(tags["promotion_outcome"] == "became champion", tags.get("promotion", "").split("; ", 2)[-1],
                     figures))


def _number(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Searched:
    """The searched merge a promotion starts from: the chosen trial of the configured study."""

    number: int
    recipe: MergeConfig
    members: list[str]
    base: str
    score: float  # its macro-F1 on the rows that made the final choice
    choice: Any = None  # mllm.evaluation.choice.Choice (None for a study whose trials kept no per-review scores)


def searched(cfg: ExperimentConfig, store: Store) -> Searched:
    """The searched merge of the configured study: search.choice applied to its trials (a study from an older mllm,
    whose trials kept no per-review scores, falls back to its best trial)."""
    import optuna

    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(cfg))
    except KeyError:
        raise MllmError(f"search.study_name: no study {name} in {redact(cfg.search.storage)}",
                        "run mllm search first (or set search.study_name / search.storage)") from None
    members, base = study.user_attrs["members"], study.user_attrs["base"]
    pick = chosen(cfg, study, store, member_validation(cfg, store, members))
    if pick is not None:
        score = pick.holdout_macro_f1 if pick.chosen_on == "held-out rows" else pick.search_macro_f1
        return Searched(pick.number, pick.recipe, members, base, float(score), pick)
    top = best(study)
    if top is None:
        raise MllmError(f"study {name} has no complete trial", "run mllm search (more trials) first")
    return Searched(top.number, MergeConfig.model_validate(top.user_attrs["recipe"]), members, base, top.values[0])


def gate_rows(cfg: ExperimentConfig) -> tuple[str, np.ndarray | None]:
    """(the data split the gate scores, the rows of it that it reads: None for all). promote.split=holdout is the
    validation rows the search never optimised."""
    if cfg.promote.split == "holdout":
        return "validation", validation_parts(cfg.search, load_splits(cfg.data).validation)[1]
    return cfg.promote.split, None


def refuse_single(cfg: ExperimentConfig, store: Store, pick: Searched, run_: Any) -> PromoteResult | None:
    """A recipe with all its weight on one member is no merge: refused before anything is materialised."""
    only = single_member(pick.recipe)
    if only is None:
        return None
    member = pick.members[only]
    reason = f"the searched recipe (trial {pick.number}) puts all its weight on {member}: promote the member itself"
    run_.tags({"mllm.promoted": False, "mllm.promotion": reason, "mllm.single_member": member})
    print(f"promote: refused: {reason}")
    current = store.alias_version("merged", "champion")
    before = str(current.version) if current is not None else None
    return PromoteResult(None, None, cfg.promote.split, pick.score, before, before, Decision(False, reason),
                         run_.id, None)


def run(cfg: ExperimentConfig, parent_run_id: str | None = None, prefix: Any = None,
        store: Store | None = None, report_test: bool = True) -> PromoteResult:
    """Merge the chosen trial's recipe with mergekit, set challenger, gate champion on `promote.split`; then (with
    `report_test`) score the challenger on test for the report."""
    store = store or Store(cfg)
    pick = searched(cfg, store)
    members, name, split = pick.members, study_name(cfg), cfg.promote.split
    data_split, rows = gate_rows(cfg)
    with store.run(f"promote-{name}", stage="promote", parent_run_id=parent_run_id,
                   tags={"mllm.study": name, "mllm.trial": pick.number, "mllm.promote_split": split}) as run_:
        refused = refuse_single(cfg, store, pick, run_)
        if refused is not None:
            return refused
        tags = {"study": name, "trial": pick.number, "val_macro_f1": round(pick.score, 6)}
        if pick.choice is not None:
            tags.update({"choice": pick.choice.policy, "chosen_on": pick.choice.chosen_on,
                         "search_macro_f1": round(pick.choice.search_macro_f1, 6)})
            if pick.choice.holdout_macro_f1 is not None:
                tags.update({"holdout_macro_f1": round(pick.choice.holdout_macro_f1, 6),
                             "search_optimism": round(pick.choice.optimism, 6)})
        merged = merge.run(cfg, members, pick.base, store=store, tags=tags, recipe=pick.recipe)

        def scored(uris: list[str]) -> list[Any]:  # reused when that version was scored on this data and split
            return evaluate.run(cfg, uris, split=data_split, baselines=False, prefix=prefix, store=store).evaluations

        def gated(e: Any) -> np.ndarray:  # class ids on the gate's rows
            preds = e.logits.argmax(1)
            return preds if rows is None else preds[rows]

        found = {e.candidate.uri: e for e in scored([merged.model_uri, *members])}
        challenger = found[merged.model_uri]
        top_member, refusals = best_member([(m, found[m].candidate.val_macro_f1, found[m].candidate.val_nll)
                                           for m in members])
        for line in refusals:
            print(f"promote: {line}")
        store.set_alias("merged", "challenger", merged.version)
        k = challenger.logits.shape[1]
        labels = challenger.labels if rows is None else challenger.labels[rows]
        before, decision = gate(cfg, store, merged.version, labels, gated(challenger),
                                (top_member, gated(found[top_member])) if top_member else None, k,
                                lambda v: gated(scored([store.model_uri("merged", v)])[0]))
        after = store.alias_version("merged", "champion")
        score = macro_f1(labels, gated(challenger), k)
        run_.tags({"mllm.promoted": decision.promote, "mllm.promotion": decision.reason,
                   "mllm.model_uri": merged.model_uri})
        run_.metrics({f"{split}_macro_f1": score,
                      **{k_: v for k_, v in decision.figures.items() if isinstance(v, float | int)}})
        print(paragraph(merged.model_uri, pick.number, pick.recipe.method, split, score, before, decision, store))
        test = None
        if report_test:  # after the decision: the test split reports, it decides nothing
            test = evaluate.run(cfg, [merged.model_uri], split="test", baselines=False, store=store).evaluations[0]
            run_.metrics({"test_macro_f1": test.metrics["macro_f1"], "test_accuracy": test.metrics["accuracy"]})
            print(f"promote: {merged.model_uri} test macro-F1 {test.metrics['macro_f1']:.4f} (reported; it decided "
                  "nothing)")
    return PromoteResult(merged.model_uri, merged.version, split, score, before,
                         str(after.version) if after is not None else None, decision, run_.id, challenger.run_id,
                         test.metrics["macro_f1"] if test else None, test.run_id if test else None)
