"""The search space: what a search trial can express, the standard recipes a study starts from, and the trial
parameters of a given recipe.

    recipe = suggest_recipe(trial, cfg, k)            # inside an Optuna objective: method, weights, density, lambda
    standard_trials(cfg, k, soup=[1.0, 0.0, 1.0])     # the standard merges and the greedy soup, as trial parameters
    recipe, params, distributions = as_trial(params, cfg, k)   # what a search trial makes of these parameters
    same_merge(recipe, merged, k)                     # would both recipes merge the same weights?

`as_trial` replays `suggest_recipe` on fixed parameters, so a merge scored elsewhere (the pipeline's validation
stage) enters a study with exactly the names and distributions the sampler learns from (mllm.merging.finished).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.merging.groups import LayerGroup
from mllm.merging.inmemory import IN_MEMORY
from mllm.merging.methods import info


def weights_from(raw: list[float], zero_below: float) -> list[float]:
    """Suggested weights with those below `zero_below` set to 0 (the member left out); if that leaves none, the
    largest stays, so a single member (and any subset) is in the space and no recipe is empty."""
    out = [0.0 if w < zero_below else w for w in raw]
    if not any(out):
        top = max(range(len(raw)), key=raw.__getitem__)
        out[top] = max(raw[top], 1e-3)
    return out


def max_lambda(cfg: ExperimentConfig, k: int) -> float:
    """The upper end of a searched lambda: search.max_lambda, else K (at least 1)."""
    return max(1.0, cfg.search.max_lambda or float(k))


def suggest_recipe(trial: Any, cfg: ExperimentConfig, k: int, groups: list[LayerGroup] | None = None
                   ) -> MergeConfig:
    """The trial's merge recipe: method, per-member weights in [0, 1] (below search.zero_below: 0), the density and
    lambda (up to search.max_lambda, default K) the method reads, and per-layer-group weights and densities."""
    s = cfg.search
    methods = [m for m in s.methods if m in IN_MEMORY]
    method = trial.suggest_categorical("method", methods)
    values: dict[str, Any] = {"method": method, "seed": cfg.merge.seed, "normalize": cfg.merge.normalize}
    values["weights"] = weights_from([trial.suggest_float(f"weight_{i}", 0.0, 1.0) for i in range(k)], s.zero_below)
    dense = info(method).uses("density")
    if dense:
        values["density"] = trial.suggest_float("density", 0.1, 1.0)
    if info(method).task_vector:  # normalised weights: lambda K with equal weights is the sum of the task vectors
        values["lambda"] = trial.suggest_float("lambda", 0.5, max_lambda(cfg, k))
    if groups:
        values["groups"] = [{
            "name": g.name, "filters": list(g.filters),
            "weights": weights_from([trial.suggest_float(f"g{j}_weight_{i}", 0.0, 1.0) for i in range(k)],
                                    s.zero_below),
            "density": trial.suggest_float(f"g{j}_density", 0.1, 1.0) if dense else None,
        } for j, g in enumerate(groups)]
    return MergeConfig.model_validate(values)


def standard_trials(cfg: ExperimentConfig, k: int, soup: list[float] | None = None) -> list[dict[str, Any]]:
    """Parameters of a new study's first trials: each searched method at equal weights with merge.density and
    merge.lambda (the standard merges), and the greedy soup's 1/0 weights as a linear merge. With layer groups
    every group repeats the recipe's weights and density (parameters for groups a worker does not have are
    ignored: up to search.layer_groups block groups + embeddings + head)."""
    s = cfg.search
    out = []
    recipes = [(m, [1.0] * k) for m in s.methods if m in IN_MEMORY]
    if soup is not None and "linear" in s.methods and len(soup) == k:
        recipes.append(("linear", [float(w) for w in soup]))
    top = max_lambda(cfg, k)
    for method, weights in recipes:
        params: dict[str, Any] = {"method": method, **{f"weight_{i}": w for i, w in enumerate(weights)}}
        if info(method).uses("density"):
            params["density"] = min(1.0, max(0.1, cfg.merge.density))
        if info(method).task_vector:
            params["lambda"] = min(top, max(0.5, cfg.merge.lambda_))
        for j in range(cfg.search.layer_groups + 2 if cfg.search.layer_groups else 0):
            params.update({f"g{j}_weight_{i}": w for i, w in enumerate(weights)})
            if "density" in params:
                params[f"g{j}_density"] = params["density"]
        out.append(params)
    return out


def as_trial(params: dict[str, Any], cfg: ExperimentConfig, k: int) -> tuple[MergeConfig, dict[str, Any], Any]:
    """(recipe, parameters, distributions) of a search trial given `params` (no layer groups): `suggest_recipe`
    replayed on them, so the names and distributions are the ones the sampler reads."""
    import optuna

    fixed = optuna.trial.FixedTrial(params)
    recipe = suggest_recipe(fixed, cfg, k)
    return recipe, fixed.params, fixed.distributions


# MergeConfig fields a method's result depends on, when the method reads them (info(method).uses).
_READ = (("density", "density"), ("lambda_", "lambda"), ("gamma", "gamma"), ("epsilon", "epsilon"), ("t", "t"),
         ("normalize", "normalize"))


def same_merge(a: MergeConfig, b: MergeConfig, k: int) -> bool:
    """Whether recipes `a` and `b` merge K members into the same weights: same method, weights (None: equal), the
    parameters the method reads, the seed of a random-mask method; layer groups only when neither has any."""
    if a.method != b.method or a.groups or b.groups or a.method == "regmean":
        return False
    how = info(a.method)
    if not np.allclose(a.weights or [1.0] * k, b.weights or [1.0] * k, rtol=0, atol=1e-12):
        return False
    if any(how.uses(name) and getattr(a, field) != getattr(b, field) for field, name in _READ):
        return False
    return not how.random or a.seed == b.seed
