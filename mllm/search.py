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
A new study starts from the standard merges and the greedy soup (`start_trials`): those the pipeline already scored
on validation enter it as finished trials (`mllm.merging.finished`), the others are enqueued and scored first.

MLflow: one parent run per study invocation (tags `best_trial`, `best_value`, `chosen_trial`, `chosen_policy`,
the chosen recipe as `chosen_recipe.json`, its optimism, Optuna's figures), one nested run per trial (parameters,
metrics per step, held-out macro-F1, state). Weights are never stored per trial: `mllm promote` materialises them.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mllm import evaluate
from mllm.basics import quiet_libraries, redact
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.evaluation.choice import ROWS_ATTR, rows_attr
from mllm.merge import check_members, registered_members
from mllm.merging.finished import Evaluated, Validation, add_trial, objective_values, seed_mean, spread, trial_params
from mllm.merging.groups import LayerGroup, plan_groups
from mllm.merging.inmemory import IN_MEMORY
from mllm.merging.methods import info
from mllm.merging.regmean import member_rows
from mllm.merging.scorer import Scorer, TrialScore, score_rows
from mllm.merging.space import as_trial, same_merge, standard_trials, suggest_recipe, weights_from
from mllm.tracking.runs import RunLog, owner
from mllm.tracking.sampling import run_budget
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags
from mllm.tracking.trials import best, chosen, finished, objectives, open_storage, sampler, study_name

__all__ = ["Evaluated", "SearchResult", "best", "finished", "open_storage", "run", "standard_trials", "study_name",
           "suggest_recipe", "weights_from", "work"]


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


def worker_groups(cfg: ExperimentConfig, scorer: Scorer) -> list[LayerGroup]:
    """search.layer_groups groups over the blocks (and embeddings, head) some member trained."""
    changed = set(scorer.stack.names) - scorer.stack.unchanged
    return plan_groups(scorer.model, scorer.stack.names, changed, cfg.search.layer_groups)


def worker_scorer(cfg: ExperimentConfig, store: Store, members: list[str], base: str) -> Scorer:
    """The members resident (with their training rows when regmean is searched) and validation cut for trials."""
    rows = member_rows(cfg, store, members) if "regmean" in cfg.search.methods else None  # RegMean's grams
    return Scorer(cfg, store.download(base), [store.download(u) for u in members], member_rows=rows)


def work(cfg: ExperimentConfig, parent_run_id: str | None, worker: int, members: list[str], base: str,
         scorer: Scorer | None = None) -> None:
    """One search worker: load the members once (or take this process's `scorer` of them), then run trials until
    the study has search.n_trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if finished(optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg, wait=True))) \
            >= cfg.search.n_trials:
        return  # the study is complete (a rerun of a finished search): nothing to load
    store = Store(cfg)
    scorer = scorer or worker_scorer(cfg, store, members, base)
    groups = worker_groups(cfg, scorer)
    dims = len(members) * (1 + len(groups)) + 3 + len(groups)  # weights, method, density, lambda, group densities
    if worker == 0 and groups:
        print(f"search: {len(groups)} layer groups ({', '.join(g.name for g in groups)}), up to {dims} dimensions"
              + ("; search.sampler=cmaes suits more than about 10" if cfg.search.sampler == "tpe" and dims > 10
                 else ""))
    prunable = cfg.search.prune and scorer.data.objective_stages > 1  # a decision reads >= prune_min_rows
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if prunable else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg, wait=True),
                              sampler=sampler(cfg), pruner=pruner)
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
        return objective_values(score, recipe, cfg)

    run_budget(study, objective, cfg.search.n_trials, timeout_s=cfg.search.timeout_s,
               poll_s=cfg.search.heartbeat_s, progress=worker == 0, storage_wait_s=cfg.search.storage_wait_s,
               where=redact(cfg.search.storage))


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
    run.params(trial_params(recipe, trial.number, len(seeds)))
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
            score, nearest = seed_mean(scores)
            recipe, logits = recipe.model_copy(update={"seed": seeds[nearest]}), every[nearest]
            # The objective, logged last (one step on) so the run's val_macro_f1 is the mean the study optimised.
            run.metrics(score.as_metrics(), step=data.objective_stages)
            run.metrics(spread(seeds, scores))
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
                 base: str, errors: Any = None) -> None:  # a spawned process: quiet libraries, then work
    quiet_libraries()
    try:
        work(cfg, parent_run_id, worker, members, base)
    except MllmError as e:
        if errors is not None:
            errors.put((e.what, e.fix))
        raise


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
        store: Store | None = None, evaluated: Sequence[Evaluated] = (),
        member_scores: Sequence[tuple[str, float | None, float | None]] | None = None) -> SearchResult:
    """Create (or continue) the study, run `search.workers` workers on it, and log the outcome.

    `worker_index` tells independent processes on one study apart (in their trials' runs; what a trial proposes
    depends on its index only, mllm.tracking.sampling): local workers are worker_index, worker_index + 1, ...
    `evaluated`: merges already scored on validation (the pipeline's), which a new study takes as finished trials
    instead of scoring them again (`start_trials`). `member_scores`: the members' (URI, macro-F1, NLL) on the whole
    validation split, where the caller has them (a study cell), else `member_validation`.
    """
    store = store or Store(cfg)
    study, members, base = open_study(cfg, members, base, store)
    if "regmean" in cfg.search.methods:
        member_rows(cfg, store, members)  # members without training rows are refused before any run is opened
    name = study.study_name
    if create_only:
        start_trials(cfg, study, members, base, store)
        return SearchResult(name, redact(cfg.search.storage), None, None, None, finished(study), None)
    tags = {"mllm.study": name, "mllm.storage": redact(cfg.search.storage), "mllm.parents": ",".join(members),
            "mllm.base": base}
    with store.run(f"search-{name}", stage="search", parent_run_id=parent_run_id, tags=tags) as parent:
        before = finished(study)
        held: list[Scorer] = []  # members loaded here (other mask seeds) go on to the in-process worker

        def loaded() -> Scorer:
            if not held:
                held.append(worker_scorer(cfg, store, members, base))
            return held[0]

        start_trials(cfg, study, members, base, store, evaluated, parent.id, loaded)
        run_workers(cfg, parent.id, worker_index, members, base, held.pop() if held else None)
        study = _reload(cfg, name)
        top, done = best(study), finished(study)
        parent.metrics({"trials_finished": done, "trials_this_run": done - before})
        parent.table(study.trials_dataframe(), "trials.csv")
        log_figures(study, parent)
        recipe = MergeConfig.model_validate(top.user_attrs["recipe"]) if top else None
        pick = chosen(cfg, study, store,
                      member_scores if member_scores is not None else member_validation(cfg, store, members))
        if top is not None and recipe is not None:
            parent.tags({"best_trial": top.number, "best_value": top.values[0],
                         "best_run": top.user_attrs.get("mlflow_run_id", "")})
            parent.metrics({"best_val_macro_f1": top.values[0]})
        if pick is not None:
            log_choice(parent, study, pick)
    line = f"search {name}: {done} trials finished"
    if pick is not None:
        held = (f", held-out {pick.holdout_macro_f1:.4f} (optimism {pick.optimism:+.4f})"
                if pick.holdout_macro_f1 is not None else "")
        line += (f"; chosen ({pick.policy}): trial {pick.number} ({pick.recipe.method}), search-row macro-F1 "
                 f"{pick.search_macro_f1:.4f}{held}")
    print(line)
    return SearchResult(name, redact(cfg.search.storage), top.number if top else None,
                        top.values[0] if top else None, recipe, done, parent.id, pick)


def log_choice(parent: RunLog, study: Any, pick: Any) -> None:
    """The searched merge (a mllm.evaluation.choice.Choice) on the search run: tags, metrics, its recipe."""
    parent.tags({"chosen_trial": pick.number, "chosen_policy": pick.policy, "chosen_on": pick.chosen_on,
                 "chosen_reason": pick.reason[:5000],
                 "chosen_run": study.trials[pick.number].user_attrs.get("mlflow_run_id", "")})
    parent.metrics({"chosen_search_macro_f1": pick.search_macro_f1, "chosen_search_nll": pick.search_nll,
                    "nll_guard_refused": len(pick.refused),
                    **({"chosen_holdout_macro_f1": pick.holdout_macro_f1, "chosen_optimism": pick.optimism}
                       if pick.holdout_macro_f1 is not None else {})})
    parent.json(pick.recipe.model_dump(mode="json", by_alias=True), "chosen_recipe.json")


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
    return study, members, base


def start_trials(cfg: ExperimentConfig, study: Any, members: list[str], base: str, store: Store,
                 evaluated: Sequence[Evaluated] = (), parent_run_id: str | None = None,
                 loaded: Callable[[], Scorer] | None = None) -> None:
    """A new study's first trials (search.enqueue, once per study): the standard merges and the greedy soup. Those
    scored on validation already (`evaluated`: the same merge, mllm.merging.space.same_merge) enter it finished,
    with their evaluations' scores (mllm.merging.finished); the others are enqueued for the first worker. A
    random-mask recipe scored over several seeds has its evaluation as the first seed and the others scored with
    `loaded()` (these members, loaded once in this process); without it, it is enqueued. With layer groups a
    trial's recipe has groups that no merge has, so all are enqueued."""
    if not cfg.search.enqueue or study.get_trials(deepcopy=False) or study.user_attrs.get("enqueued"):
        return
    study.set_user_attr("enqueued", True)  # once per study, even if a worker is already running
    k = len(members)
    data = Validation.of(cfg) if evaluated and not cfg.search.layer_groups else None
    # At most n_trials of them: the budget's first trials (a smaller budget keeps the first methods).
    for params in standard_trials(cfg, k, greedy_soup_weights(store, members, base))[: cfg.search.n_trials]:
        recipe, suggested, distributions = as_trial(params, cfg, k)
        found = next((e for e in evaluated if data is not None and len(e.logits) == len(data.labels)
                      and same_merge(recipe, e.recipe, k)), None)
        seeds = cfg.search.mask_seeds if info(recipe.method).random else 1
        if found is None or data is None or (seeds > 1 and loaded is None):
            study.enqueue_trial(params, skip_if_exists=True)
            continue
        more = [loaded().logits(recipe.model_copy(update={"seed": recipe.seed + j})) for j in range(1, seeds)]
        number = add_trial(study, cfg, found, suggested, distributions, recipe, data, store, parent_run_id, more)
        print(f"search: trial {number} ({recipe.method}) entered finished from evaluation run {found.run_id}"
              + (f" (its mask seed {recipe.seed}; seeds {recipe.seed + 1}-{recipe.seed + seeds - 1} scored here)"
                 if seeds > 1 else ""))


def member_validation(cfg: ExperimentConfig, store: Store, members: list[str]
                      ) -> list[tuple[str, float | None, float | None]] | None:
    """The members' (URI, macro-F1, NLL) on the whole validation split, the rows trials are scored on, where their
    registered figures are not: a domain specialist keeps its best weights on its own domain's rows (mllm.finetune),
    so its registered NLL is no reference for a merge scored on every domain's (the study cell measures them on the
    same rows too). Evaluated once (the pipeline's validation stage already has them). None: the registered figures
    are on those rows."""
    versions = [store.resolve(m)[1] for m in members]
    if not any(v is not None and VersionTags.of(v).domain for v in versions):
        return None
    result = evaluate.run(cfg, members, split="validation", baselines=False, store=store)
    return [(e.candidate.uri, e.metrics.get("macro_f1"), e.metrics.get("nll")) for e in result.evaluations]


def greedy_soup_weights(store: Store, members: list[str], base: str) -> list[float] | None:
    """The 1/0 weights of the newest greedy soup registered over these members and base, if any."""
    soup = store.newest("merged", {"soup": "greedy", "parents": ",".join(members), "base": base})
    return VersionTags.of(soup).weights if soup is not None else None


def run_workers(cfg: ExperimentConfig, parent_run_id: str, worker_index: int, members: list[str], base: str,
                scorer: Scorer | None = None) -> None:
    """search.workers workers on the study: this process (with `scorer`, this process's members, when given), or
    spawned processes (each holds its own members; the storage coordinates them)."""
    if cfg.search.workers == 1:
        work(cfg, parent_run_id, worker_index, members, base, scorer)
        return
    del scorer  # freed before the workers load their own members
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()  # a worker's one-line error, so this process's last line names the cause
    procs = [ctx.Process(target=_worker_main, args=(cfg, parent_run_id, worker_index + i, members, base, errors))
             for i in range(cfg.search.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        what, fix = errors.get() if not errors.empty() else (None, None)
        raise MllmError(f"{len(failed)} of {len(procs)} search workers failed (exit codes {failed})"
                        + (f": {what}" if what else ""), fix or "see their output above; rerun to continue the study")
