"""What a search trial records from its validation logits, and merges already scored on validation entering a study
as finished trials.

    data = Validation.of(cfg)                               # the search rows, held-out rows and domains of validation
    score, nearest = seed_mean([data.score(x, data.search) for x in per_seed_logits])
    add_trial(study, cfg, evaluated, params, distributions, recipe, data, store, parent_run_id)

The pipeline's validation stage scores the standard merges (the uniform soup, TIES, DARE, the greedy soup) on the
whole validation split; a search would score the same recipes again as its first trials. Instead each such merge
enters the study as a COMPLETE trial built from its evaluation's logits: the parameters and distributions
`suggest_recipe` gives (mllm.merging.space.as_trial: TPE learns from it), the objective a search trial computes
(macro-F1 on the search rows, with several domains the mean over domains; the second objective where configured),
the intermediate values it would report to the pruner, and the user attributes the choice policies read (`recipe`,
the per-review rows). A random-mask recipe is scored over search.mask_seeds seeds like a search trial: its
evaluation is the first seed, the caller scores the others in memory. Each gets its MLflow trial run under the
search's run, tagged with the evaluation run its logits came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import load_splits
from mllm.evaluation.choice import ROWS_ATTR, rows_attr, validation_parts
from mllm.merging.methods import info
from mllm.merging.scorer import TrialScore, score_rows, stage_rows, stage_shares
from mllm.tracking.runs import RunLog, owner
from mllm.tracking.store import Store

SOURCE = "validation evaluation"  # the mllm.trial_source tag of a trial entered from an evaluation run


@dataclass(frozen=True)
class Evaluated:
    """A merge scored on the whole validation split, with the recipe it was merged with."""

    recipe: MergeConfig
    logits: np.ndarray  # (validation reviews, classes), in validation order
    run_id: str  # the evaluation run (predictions.csv)
    uri: str = ""  # the merged model


@dataclass(frozen=True)
class Validation:
    """The validation split as a search reads it: labels, search rows, held-out rows, domains (or None)."""

    labels: np.ndarray
    search: np.ndarray
    holdout: np.ndarray
    groups: np.ndarray | None
    num_labels: int

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Validation:
        data = load_splits(cfg.data)
        search, holdout, groups = validation_parts(cfg.search, data.validation)
        return cls(data.validation["label"].to_numpy(), search, holdout, groups, len(data.label_names))

    def score(self, logits: np.ndarray, rows: np.ndarray) -> TrialScore:
        """The objective's figures of these validation logits on `rows` (as mllm.merging.scorer.score_rows)."""
        return score_rows(logits[rows], self.labels[rows], self.num_labels,
                          None if self.groups is None else self.groups[rows])


def objective_values(score: TrialScore, recipe: MergeConfig, cfg: ExperimentConfig) -> float | tuple[float, float]:
    """The values a trial returns to Optuna: macro-F1 on the search rows, and search.second_objective if any."""
    second = cfg.search.second_objective
    if second == "none":
        return score.macro_f1
    if second == "worst_class_f1":
        return score.macro_f1, score.worst_class_f1
    return score.macro_f1, recipe.density if info(recipe.method).uses("density") else 1.0


def seed_mean(scores: Sequence[TrialScore]) -> tuple[TrialScore, int]:
    """(the mean over mask seeds of macro-F1, worst-class F1, accuracy and worst-domain F1; the index of the seed
    whose macro-F1 is nearest that mean: the seed the recipe keeps)."""
    f1 = np.array([x.macro_f1 for x in scores])
    nearest = int(np.argmin(np.abs(f1 - f1.mean())))
    worst = [x.worst_domain_f1 for x in scores if x.worst_domain_f1 is not None]
    return TrialScore(float(f1.mean()), float(np.mean([x.worst_class_f1 for x in scores])),
                      float(np.mean([x.accuracy for x in scores])), scores[0].rows,
                      float(np.mean(worst)) if worst else None), nearest


def spread(seeds: Sequence[int], scores: Sequence[TrialScore]) -> dict[str, float]:
    """A random-mask trial's per-seed macro-F1 and its spread, as its run logs them."""
    f1 = np.array([x.macro_f1 for x in scores])
    return {"val_macro_f1_mean": float(f1.mean()), "val_macro_f1_std": float(f1.std(ddof=1)),
            "val_macro_f1_min": float(f1.min()), "val_macro_f1_max": float(f1.max()),
            **{f"val_macro_f1_seed_{s}": float(v) for s, v in zip(seeds, f1, strict=True)}}


def trial_params(recipe: MergeConfig, number: int, seeds: int) -> dict[str, Any]:
    """A trial run's MLflow parameters."""
    return {"method": recipe.method, "weights": json.dumps([round(w, 4) for w in recipe.weights or []]),
            "density": recipe.density, "lambda": recipe.lambda_, "seed": recipe.seed, "trial": number,
            "mask_seeds": seeds, "layer_groups": len(recipe.groups or [])}


def stage_scores(cfg: ExperimentConfig, data: Validation, logits: np.ndarray) -> list[TrialScore]:
    """The scores a search trial sees after each validation stage (rows seen so far), the last on every search row:
    the stages `mllm.merging.scorer.ValidationSet` cuts, with the same seed."""
    s = cfg.search
    parts = stage_rows(data.search, stage_shares(len(data.search), s.prune, s.prune_min_rows), s.seed)
    return [data.score(logits, np.concatenate(parts[:i + 1])) for i in range(len(parts))]


def log_rows(run: RunLog, logits: np.ndarray, data: Validation) -> dict[str, Any]:
    """The held-out figures (logged for people; no sampler or pruner reads them) and the per-review rows the choice
    policies read (the returned user attribute)."""
    if len(data.holdout):
        held = data.score(logits, data.holdout)
        run.metrics({"holdout_macro_f1": held.macro_f1, "holdout_rows": held.rows})
    return rows_attr(logits, data.labels)


def add_trial(study: Any, cfg: ExperimentConfig, e: Evaluated, params: dict[str, Any], distributions: dict[str, Any],
              recipe: MergeConfig, data: Validation, store: Store, parent_run_id: str | None,
              more: Sequence[np.ndarray] = ()) -> int:
    """Enter `e` in `study` as a COMPLETE trial of `recipe` (the search trial with these `params`), with its MLflow
    trial run; return its number. `more`: the recipe's validation logits under the next mask seeds (recipe.seed + 1,
    ...), for a random-mask method scored over several."""
    import optuna

    every = [e.logits, *more]
    seeds = [recipe.seed + j for j in range(len(every))]
    scores = [data.score(x, data.search) for x in every]
    score, nearest = seed_mean(scores)  # one seed: its own score
    stages = stage_scores(cfg, data, e.logits)
    number = len(study.get_trials(deepcopy=False))  # the trial add_trial creates (no worker runs yet)
    tags = {"mllm.study": study.study_name, "mllm.trial": number, "mllm.trial_source": SOURCE,
            "mllm.evaluation_run": e.run_id, "mllm.model_uri": e.uri}
    with store.run(f"trial-{number}", stage="search-trial", parent_run_id=parent_run_id, tags=tags,
                   log_config=False, system_metrics=False) as run:
        run.params(trial_params(recipe, number, len(seeds)))
        for step, stage in enumerate(stages):
            run.metrics(stage.as_metrics(), step=step)
        if len(every) > 1:  # the objective, one step on, as a search trial logs it
            run.metrics(score.as_metrics(), step=len(stages))
            run.metrics(spread(seeds, scores))
        recipe = recipe.model_copy(update={"seed": seeds[nearest]})
        attrs = {"owner": owner(), "mlflow_run_id": run.id, "evaluation_run": e.run_id,
                 "recipe": recipe.model_dump(mode="json", by_alias=True),
                 ROWS_ATTR: log_rows(run, every[nearest], data)}  # the kept seed's, as a search trial keeps
        if score.worst_domain_f1 is not None:
            attrs["val_worst_domain_f1"] = round(score.worst_domain_f1, 6)
        run.tags({"mllm.trial_state": "COMPLETE", **({"mllm.mask_seed": recipe.seed} if len(every) > 1 else {})})
        values = objective_values(score, recipe, cfg)
        # What a search trial reports to the pruner: the first seed's score after each stage but the last.
        reported = cfg.search.second_objective == "none" and cfg.search.prune and len(stages) > 1
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=list(values) if isinstance(values, tuple) else [values],
            user_attrs=attrs, intermediate_values={i: s.macro_f1 for i, s in enumerate(stages[:-1])} if reported
            else None))
    return number
