"""The search stage: an Optuna study over merge recipes, each trial an in-memory merge scored on validation.

    mllm search -c configs/tiny.yaml                      # search.n_trials trials, TPE, sqlite:///optuna-tiny.db
    mllm search --workers 4                               # four local worker processes on one study
    mllm search --storage postgresql+psycopg2://u:pw@db/optuna --study-name drugs-1   # one worker per machine

Trials choose the method (`search.methods`), one weight per member, and the density / lambda the method
reads; the objective is macro-F1 (with several domains, their mean: `search.objective`) on the search part of the
validation split (`search.crossfit_fraction`); the rest is scored too but never read by the sampler or pruner, and
`mllm.evaluation.choice` picks the searched merge from every trial's per-review scores (`search.choice`). The test
split is never scored here (config validation refuses it as an objective). A trial merges in memory
(`mllm.merging.inmemory`: members loaded once per worker, on the GPU when there is one), evaluates pre-tokenised,
length-sorted validation batches (bf16 on CUDA), and with `search.prune` scores growing validation subsets (1/4,
1/2, all) so the median pruner can stop hopeless trials early. The study lives in an Optuna RDB storage: workers
on any machine join it, the schema is created once before they start, heartbeats mark a killed worker's trial stale
and it is retried with the same parameters, and a rerun continues the study up to `search.n_trials` finished trials.

MLflow: one parent run per study invocation (tags `best_trial`, `best_value`, `chosen_trial`, `chosen_policy`,
the chosen recipe as `chosen_recipe.json`, its optimism, Optuna's figures), one nested run per trial (parameters,
metrics per step, held-out macro-F1, state). Weights are never stored per trial: `mllm promote` materialises them.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.basics import quiet_libraries, redact
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.evaluation.choice import ROWS_ATTR, rows_attr
from mllm.merge import check_members, registered_members
from mllm.merging.groups import LayerGroup, plan_groups
from mllm.merging.inmemory import IN_MEMORY
from mllm.merging.methods import info
from mllm.merging.regmean import member_rows
from mllm.merging.scorer import Scorer, TrialScore, score_rows
from mllm.tracking.runs import RunLog, owner
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags
from mllm.tracking.trials import best, chosen, finished, objectives, open_storage, sampler, study_name

__all__ = ["SearchResult", "best", "finished", "open_storage", "run", "study_name", "suggest_recipe", "work"]


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
    """Parameters to enqueue as a new study's first trials: each searched method at equal weights with
    merge.density and merge.lambda (the standard merges), and the greedy soup's 1/0 weights as a linear merge.
    With layer groups every group repeats the recipe's weights and density (parameters for groups a worker does
    not have are ignored: up to search.layer_groups block groups + embeddings + head)."""
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


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    storage: str
    best_trial: int | None
    best_value: float | None
    best_recipe: MergeConfig | None
    trials: int  # finished (complete or pruned) trials of the study
    run_id: str | None
    chosen: Any = None  # mllm.evaluation.choice.Choice: the searched merge under search.choice


def _value(score: TrialScore, recipe: MergeConfig, cfg: ExperimentConfig) -> float | tuple[float, float]:
    second = cfg.search.second_objective
    if second == "none":
        return score.macro_f1
    if second == "worst_class_f1":
        return score.macro_f1, score.worst_class_f1
    return score.macro_f1, recipe.density if info(recipe.method).uses("density") else 1.0


def worker_groups(cfg: ExperimentConfig, scorer: Scorer) -> list[LayerGroup]:
    """search.layer_groups groups over the blocks (and embeddings, head) some member trained."""
    changed = set(scorer.stack.names) - scorer.stack.unchanged
    return plan_groups(scorer.model, scorer.stack.names, changed, cfg.search.layer_groups)


def work(cfg: ExperimentConfig, parent_run_id: str | None, worker: int, members: list[str], base: str) -> None:
    """One search worker: load the members once, then run trials until the study has search.n_trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if finished(optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg))) >= cfg.search.n_trials:
        return  # the study is complete (a rerun of a finished search): nothing to load
    store = Store(cfg)
    rows = member_rows(cfg, store, members) if "regmean" in cfg.search.methods else None  # RegMean's grams
    scorer = Scorer(cfg, store.download(base), [store.download(u) for u in members], member_rows=rows)
    groups = worker_groups(cfg, scorer)
    dims = len(members) * (1 + len(groups)) + 3 + len(groups)  # weights, method, density, lambda, group densities
    if worker == 0 and groups:
        print(f"search: {len(groups)} layer groups ({', '.join(g.name for g in groups)}), up to {dims} dimensions"
              + ("; search.sampler=cmaes suits more than about 10" if cfg.search.sampler == "tpe" and dims > 10
                 else ""))
    prunable = cfg.search.prune and scorer.data.objective_stages > 1  # a decision reads >= prune_min_rows
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if prunable else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg),
                              sampler=sampler(cfg, worker), pruner=pruner)
    single = cfg.search.second_objective == "none"

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        recipe = suggest_recipe(trial, cfg, len(members), groups)
        trial.set_user_attr("owner", owner())  # which process ran it (a killed one?)
        tags = {"mllm.study": study.study_name, "mllm.trial": trial.number, "mllm.worker": worker}
        with store.run(f"trial-{trial.number}", stage="search-trial", parent_run_id=parent_run_id, tags=tags,
                       log_config=False, system_metrics=False) as run:
            trial.set_user_attr("mlflow_run_id", run.id)
            score, recipe, pruned = _trial(trial, recipe, scorer, run, single and prunable, cfg.search.mask_seeds)
        trial.set_user_attr("recipe", recipe.model_dump(mode="json", by_alias=True))  # with the chosen mask seed
        if score.worst_domain_f1 is not None:
            trial.set_user_attr("val_worst_domain_f1", round(score.worst_domain_f1, 6))
        if pruned:
            raise optuna.TrialPruned()
        return _value(score, recipe, cfg)

    stop = optuna.study.MaxTrialsCallback(cfg.search.n_trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                       optuna.trial.TrialState.PRUNED))
    remaining = cfg.search.n_trials - finished(study)
    if remaining > 0:  # n_trials bounds this worker; the callback stops it once the study has enough
        study.optimize(objective, n_trials=remaining, callbacks=[stop], timeout=cfg.search.timeout_s,
                       gc_after_trial=False, show_progress_bar=worker == 0)


def _trial(trial: Any, recipe: MergeConfig, scorer: Scorer, run: RunLog, prune: bool, mask_seeds: int
           ) -> tuple[TrialScore, MergeConfig, bool]:
    """Score one recipe stage by stage inside its run; (score on the search rows, recipe, whether the pruner
    stopped it). A finished trial then scores the held-out rows too and keeps its per-review predictions and NLL
    on the whole validation split (`mllm.evaluation.choice`: the policies read them; the objective never does).

    A random-mask method (DARE, DELLA) is scored with `mask_seeds` seeds (merge.seed, +1, ...): the first seed stage
    by stage (the pruner reads it), the others on the whole split; the score is the mean over seeds (macro-F1,
    worst-class F1, accuracy), the spread is logged, and the recipe keeps the seed whose macro-F1 is nearest the
    mean (what promote materialises)."""
    seeds = [recipe.seed + j for j in range(mask_seeds)] if info(recipe.method).random else [recipe.seed]
    run.params({"method": recipe.method, "weights": json.dumps([round(w, 4) for w in recipe.weights or []]),
                "density": recipe.density, "lambda": recipe.lambda_, "seed": recipe.seed, "trial": trial.number,
                "mask_seeds": len(seeds), "layer_groups": len(recipe.groups or [])})
    if recipe.groups:
        run.json([g.model_dump(mode="json", exclude={"filters"}) for g in recipe.groups], "groups.json")
    start, pruned, merge_s = time.perf_counter(), False, 0.0
    data = scorer.data
    for step, (score, merge_s) in enumerate(scorer.stages(recipe)):  # noqa: B007 (merge_s is read after the loop)
        run.metrics(score.as_metrics(), step=step)
        if prune and step < data.objective_stages - 1:
            trial.report(score.macro_f1, step)
            if trial.should_prune():
                pruned = True
                break
    if not pruned:
        logits = scorer.rest()
        if len(seeds) > 1:
            every = [logits] + [scorer.logits(recipe.model_copy(update={"seed": s})) for s in seeds[1:]]
            scores = [score_rows(x[data.search_rows], data.labels[data.search_rows], scorer.num_labels,
                                 data.groups_of(data.search_rows)) for x in every]
            f1 = np.array([x.macro_f1 for x in scores])
            nearest = int(np.argmin(np.abs(f1 - f1.mean())))
            recipe, logits = recipe.model_copy(update={"seed": seeds[nearest]}), every[nearest]
            worst = [x.worst_domain_f1 for x in scores if x.worst_domain_f1 is not None]
            score = TrialScore(float(f1.mean()), float(np.mean([x.worst_class_f1 for x in scores])),
                               float(np.mean([x.accuracy for x in scores])), score.rows,
                               float(np.mean(worst)) if worst else None)
            # The objective, logged last (one step on) so the run's val_macro_f1 is the mean the study optimised.
            run.metrics(score.as_metrics(), step=data.objective_stages)
            run.metrics({"val_macro_f1_mean": score.macro_f1, "val_macro_f1_std": float(f1.std(ddof=1)),
                         "val_macro_f1_min": float(f1.min()), "val_macro_f1_max": float(f1.max()),
                         **{f"val_macro_f1_seed_{s}": float(v) for s, v in zip(seeds, f1, strict=True)}})
            run.tags({"mllm.mask_seed": recipe.seed})
        trial.set_user_attr(ROWS_ATTR, rows_attr(logits, data.labels))
        if len(data.holdout_rows):  # logged for people; the sampler and the pruner never see it
            held = score_rows(logits[data.holdout_rows], data.labels[data.holdout_rows], scorer.num_labels,
                              data.groups_of(data.holdout_rows))
            run.metrics({"holdout_macro_f1": held.macro_f1, "holdout_rows": held.rows})
    run.metrics({"merge_s": merge_s, "trial_s": time.perf_counter() - start})
    run.tags({"mllm.trial_state": "PRUNED" if pruned else "COMPLETE"})
    return score, recipe, pruned


def _worker_main(cfg: ExperimentConfig, parent_run_id: str | None, worker: int, members: list[str],
                 base: str) -> None:  # a spawned process: quiet libraries, then work
    quiet_libraries()
    work(cfg, parent_run_id, worker, members, base)


def log_figures(study: Any, run: RunLog) -> None:
    """Optuna's history, parameter importance and parallel-coordinate plots (Pareto front with two objectives)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    names = ["val_macro_f1"] + ([] if len(study.directions) == 1 else ["second"])
    # With two objectives, the single-objective plots show the first (macro-F1).
    first = {"target": (lambda t: t.values[0]) if len(names) > 1 else None, "target_name": names[0]}
    figures = {"optimization_history": lambda: plots.plot_optimization_history(study, **first),
               "param_importances": lambda: plots.plot_param_importances(study, **first),
               "parallel_coordinate": lambda: plots.plot_parallel_coordinate(study, **first)}
    if len(names) > 1:
        figures["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=names)
    for name, make in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(9, 5)
            run.figure(figure, f"figures/{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importance needs 2+ complete trials
            run.text(f"{name}: not drawn ({e})", f"figures/{name}.txt")


def run(cfg: ExperimentConfig, members: list[str] | None = None, base: str | None = None,
        parent_run_id: str | None = None, create_only: bool = False, worker_index: int = 0,
        store: Store | None = None) -> SearchResult:
    """Create (or continue) the study, run `search.workers` workers on it, and log the outcome.

    `worker_index` tells independent processes on one study apart (their samplers' seeds): local workers are
    worker_index, worker_index + 1, ...
    """
    store = store or Store(cfg)
    study, members, base = open_study(cfg, members, base, store)
    if "regmean" in cfg.search.methods:
        member_rows(cfg, store, members)  # members without training rows are refused before any run is opened
    name = study.study_name
    if create_only:
        return SearchResult(name, redact(cfg.search.storage), None, None, None, finished(study), None)
    tags = {"mllm.study": name, "mllm.storage": redact(cfg.search.storage), "mllm.parents": ",".join(members),
            "mllm.base": base}
    with store.run(f"search-{name}", stage="search", parent_run_id=parent_run_id, tags=tags) as parent:
        before = finished(study)
        run_workers(cfg, parent.id, worker_index, members, base)
        study = _reload(cfg, name)
        top, done = best(study), finished(study)
        parent.metrics({"trials_finished": done, "trials_this_run": done - before})
        parent.table(study.trials_dataframe(), "trials.csv")
        log_figures(study, parent)
        recipe = MergeConfig.model_validate(top.user_attrs["recipe"]) if top else None
        pick = chosen(cfg, study, store)
        if top is not None and recipe is not None:
            parent.tags({"best_trial": top.number, "best_value": top.values[0],
                         "best_run": top.user_attrs.get("mlflow_run_id", "")})
            parent.metrics({"best_val_macro_f1": top.values[0]})
        if pick is not None:
            parent.tags({"chosen_trial": pick.number, "chosen_policy": pick.policy, "chosen_on": pick.chosen_on,
                         "chosen_reason": pick.reason[:5000],
                         "chosen_run": study.trials[pick.number].user_attrs.get("mlflow_run_id", "")})
            parent.metrics({"chosen_search_macro_f1": pick.search_macro_f1, "chosen_search_nll": pick.search_nll,
                            "nll_guard_refused": len(pick.refused),
                            **({"chosen_holdout_macro_f1": pick.holdout_macro_f1, "chosen_optimism": pick.optimism}
                               if pick.holdout_macro_f1 is not None else {})})
            parent.json(pick.recipe.model_dump(mode="json", by_alias=True), "chosen_recipe.json")
    line = f"search {name}: {done} trials finished"
    if pick is not None:
        held = (f", held-out {pick.holdout_macro_f1:.4f} (optimism {pick.optimism:+.4f})"
                if pick.holdout_macro_f1 is not None else "")
        line += (f"; chosen ({pick.policy}): trial {pick.number} ({pick.recipe.method}), search-row macro-F1 "
                 f"{pick.search_macro_f1:.4f}{held}")
    print(line)
    return SearchResult(name, redact(cfg.search.storage), top.number if top else None,
                        top.values[0] if top else None, recipe, done, parent.id, pick)


def _reload(cfg: ExperimentConfig, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(cfg))


def open_study(cfg: ExperimentConfig, members: list[str] | None, base: str | None, store: Store
               ) -> tuple[Any, list[str], str]:
    """(study, member URIs, base URI): the study created or continued, checked to search these members."""
    import optuna

    if cfg.search.objective_split != "validation":  # config validation refuses it too; never score test here
        raise MllmError("search.objective_split must be validation", "set search.objective_split=validation")
    if not [m for m in cfg.search.methods if m in IN_MEMORY]:
        raise MllmError(f"search.methods {cfg.search.methods} has no in-memory method",
                        f"use some of {', '.join(sorted(IN_MEMORY))}")
    st = open_storage(cfg)  # first: an unreachable database is the cheapest thing to find out
    given = bool(members)
    if members:
        if not base:
            raise MllmError("--base: search with --member needs --base", "pass the base classifier the members share")
        for uri in [*members, base]:
            store.check_uri(uri, "--member" if uri != base else "--base", tokenizer=uri == base)
    else:
        base, members = registered_members(store)
    assert base is not None and members is not None
    check_members([store.download(u) for u in members], store.download(base), "ties",
                  "--member" if given else f"{store.model_name('member')} member",
                  "--base" if given else store.model_name("base"))
    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=st, directions=objectives(cfg), load_if_exists=True)
    recorded = study.user_attrs.get("members")
    if recorded is None:
        study.set_user_attr("members", members)
        study.set_user_attr("base", base)
        study.set_user_attr("experiment", cfg.name)
    elif recorded != members or study.user_attrs.get("base") != base:
        raise MllmError(f"study {name} searched other members ({', '.join(recorded)})",
                        "set search.study_name to a new name, or pass the same members")
    if [d.name for d in study.directions] != [d.upper() for d in objectives(cfg)]:
        raise MllmError(f"study {name} has other objectives", "set search.study_name to a new name")
    if cfg.search.enqueue and not study.get_trials(deepcopy=False) and not study.user_attrs.get("enqueued"):
        study.set_user_attr("enqueued", True)  # once per study, even if a worker is already running
        # At most n_trials of them: the budget's first trials (a smaller budget keeps the first methods).
        for params in standard_trials(cfg, len(members), greedy_soup_weights(store, members, base))[
                : cfg.search.n_trials]:
            study.enqueue_trial(params, skip_if_exists=True)
    return study, members, base


def greedy_soup_weights(store: Store, members: list[str], base: str) -> list[float] | None:
    """The 1/0 weights of the newest greedy soup registered over these members and base, if any."""
    soup = store.newest("merged", {"soup": "greedy", "parents": ",".join(members), "base": base})
    return VersionTags.of(soup).weights if soup is not None else None


def run_workers(cfg: ExperimentConfig, parent_run_id: str, worker_index: int, members: list[str], base: str) -> None:
    """search.workers workers on the study: this process, or spawned processes (each holds its own members; the
    storage coordinates them)."""
    if cfg.search.workers == 1:
        work(cfg, parent_run_id, worker_index, members, base)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(cfg, parent_run_id, worker_index + i, members, base))
             for i in range(cfg.search.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise MllmError(f"{len(failed)} of {len(procs)} search workers failed (exit codes {failed})",
                        "see their output above; rerun to continue the study")
