"""The whole flow (`mllm pipeline`, MLproject entry point `main`): fine-tune, merge, score on validation, search,
promote, then one final evaluation on test and the report, in one parent MLflow run.

    mllm pipeline                              # configs/default.yaml's values: SmolLM2-135M on the Drugs.com sample
    mlflow run . -e main -P config=configs/tiny.yaml --env-manager local

Each stage hands the next what it made, as the MLflow multistep example does: fine-tune gives the base and
member URIs that every merge and the search use; the merges (the standard methods, linear being the uniform soup,
and the greedy soup) give the URIs that evaluate scores, and their validation scores become the search's first
finished trials (no recipe is scored twice: mllm.merging.finished). Every choice reads validation (or the selection
split): the best member, the greedy soup, the search and the promotion gate. The test split is read once, by the final
evaluation, after every decision is made. Finished stages are reused, not redone, when their inputs and the code
version match: registered members (by member key), merges (by merge key), evaluations (by evaluation key), the
TF-IDF baseline (by data), the study (a rerun continues it up to search.n_trials finished trials) and the promoted
merge (by merge key).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mllm import evaluate, finetune, merge, promote, search
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.evaluation import report
from mllm.merging import soups
from mllm.tracking.store import Store

STANDARD_METHODS = ("linear", "ties", "dare_ties", "dare_linear")


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    report_markdown: str
    champion: str | None
    stage_seconds: dict[str, float]
    experiment_id: str
    promotion: str  # the gate's reason


def final_evaluation(cfg: ExperimentConfig, merges: list[str], store: Store) -> Any:
    """The only reading of the test split: every merge and its baselines, after every decision is made."""
    return evaluate.run(cfg, merges, split="test", store=store)


def evaluated_merges(validation: Any, recipes: dict[str, MergeConfig]) -> list[search.Evaluated]:
    """The merges the validation stage scored (an evaluate.EvaluateResult), each with the recipe it was merged with
    and its logits on the whole validation split."""
    return [search.Evaluated(recipes[e.candidate.uri], e.logits, e.run_id, e.candidate.uri)
            for e in validation.evaluations if e.candidate.uri in recipes]


def run(cfg: ExperimentConfig, standard_methods: tuple[str, ...] = STANDARD_METHODS) -> PipelineResult:
    store = Store(cfg)
    seconds: dict[str, float] = {}

    def timed(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        print(f"pipeline: {stage} started", flush=True)  # stage markers (scripts/chaos.py aims its kills by them)
        start = time.perf_counter()
        out = fn(*args, store=store, **kwargs)
        took = time.perf_counter() - start
        seconds[stage] = seconds.get(stage, 0.0) + took
        print(f"pipeline: {stage} done in {took:.0f} s")
        return out

    with store.run("pipeline", stage="pipeline") as parent:
        trained = timed("finetune", finetune.run, cfg)
        members = [m.model_uri for m in sorted(trained.members, key=lambda m: m.name)
                   if m.name not in ("full", finetune.BIGGER)]  # reference models, never merged
        recipes = {timed("merge", merge.run, cfg, members, trained.base_uri, recipe=recipe,
                         tags={"soup": "uniform"} if recipe.method == "linear" else None).model_uri: recipe
                   for recipe in [cfg.merge.model_copy(update={"method": m}) for m in standard_methods]}
        merges = list(recipes)
        if len(members) > 1:
            merges.append(timed("merge", soups.greedy_soup, cfg, members, trained.base_uri).model_uri)
            weights = search.greedy_soup_weights(store, members, trained.base_uri)  # the soup just registered
            recipes.update({merges[-1]: soups.soup_recipe(cfg, weights)} if weights else {})
        # Validation figures of every merge and baseline: what the report's choices read (never test).
        prefix = evaluate.new_prefix_cache(cfg)
        validated = timed("validate", evaluate.run, cfg, merges, split="validation", prefix=prefix)
        # The search takes these merges' validation scores as finished trials instead of scoring them again.
        timed("search", search.run, cfg, members, trained.base_uri, evaluated=evaluated_merges(validated, recipes))
        promoted = timed("promote", promote.run, cfg, prefix=prefix, report_test=False)
        scored = timed("evaluate", final_evaluation, cfg,
                       list(dict.fromkeys([*merges, *([promoted.model_uri] if promoted.model_uri else [])])))
        rep = timed("report", report.run, cfg, evaluations=[e.run_id for e in scored.evaluations])
        parent.metrics({f"{k}_s": v for k, v in seconds.items()})
        champion = store.model_uri("merged", promoted.champion_after) if promoted.champion_after else ""
        parent.tags({"mllm.champion": champion, "mllm.promotion": promoted.decision.reason})
    if not promoted.champion_after:
        print(f"pipeline: no merge earned @champion ({promoted.decision.reason})")
    return PipelineResult(parent.id, rep.markdown, f"models:/{store.model_name('merged')}@champion" if champion
                          else None, seconds, store.get_run(parent.id).info.experiment_id,
                          promoted.decision.reason)
