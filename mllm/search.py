"""The search stage: an Optuna study over merge recipes, each trial an in-memory merge scored on validation.

    mllm search -c configs/tiny.yaml                      # search.n_trials trials, TPE, sqlite:///optuna-tiny.db
    mllm search --workers 4                               # four local worker processes on one study
    mllm search --storage postgresql+psycopg2://u:pw@db/optuna --study-name drugs-1   # one worker per machine

Trials choose the method (`search.methods`), one weight per member, and the density / lambda the method
reads; the objective is macro-F1 on the validation split (the test split is never scored here, and config
validation refuses it as an objective). A trial merges in memory (`mllm.fastmerge`: members loaded once per
worker, on the GPU when there is one), evaluates pre-tokenised, length-sorted validation batches (bf16 on
CUDA), and with `search.prune` scores growing validation subsets (1/4, 1/2, all) so the median pruner can
stop hopeless trials early. The study lives in an Optuna RDB storage: workers on any machine join it, the
schema is created once before they start, heartbeats mark a killed worker's trial stale and it is retried
with the same parameters, and rerunning a study continues it up to `search.n_trials` finished trials.

MLflow: one parent run per study invocation (tags `best_trial`, `best_value`, the recipe as
`best_recipe.json`, Optuna's figures), one nested run per trial (parameters, metrics per step, state).
Weights are never stored per trial: `mllm promote` materialises the best recipe with mergekit.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllm.config import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.fastmerge import IN_MEMORY
from mllm.merge import TASK_VECTOR, USES_DENSITY

STAGES = (0.25, 0.5, 1.0)  # shares of the validation split scored before each pruning decision


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.search.study_name or f"{cfg.name}-search"


def suggest_recipe(trial: Any, cfg: ExperimentConfig, k: int) -> MergeConfig:
    """The trial's merge recipe: method, per-member weights and the parameters that method reads."""
    methods = [m for m in cfg.search.methods if m in IN_MEMORY]
    method = trial.suggest_categorical("method", methods)
    values: dict[str, Any] = {"method": method, "seed": cfg.merge.seed, "normalize": cfg.merge.normalize}
    values["weights"] = [trial.suggest_float(f"weight_{i}", 0.05, 1.0) for i in range(k)]
    if method in USES_DENSITY:
        values["density"] = trial.suggest_float("density", 0.1, 1.0)
    if method in TASK_VECTOR:
        values["lambda"] = trial.suggest_float("lambda", 0.5, 1.5)
    return MergeConfig.model_validate(values)


class ValidationSet:
    """The validation split tokenised once, cut into stages (a seeded permutation), each stage's rows
    length-sorted into batches that are collated once and reused by every trial."""

    def __init__(self, texts: list[str], labels: np.ndarray, tokenizer: Any, cfg: ExperimentConfig, device: Any,
                 stages: tuple[float, ...]) -> None:
        from mllm.modeling import collate, encode, length_batches

        self.labels = labels
        encoded = encode(tokenizer, texts, cfg.model.max_length)
        order = np.random.default_rng(cfg.search.seed).permutation(len(texts))
        cuts = [0, *sorted({max(1, round(s * len(texts))) for s in stages})]
        self.stages: list[list[tuple[np.ndarray, dict[str, Any]]]] = []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            rows = order[lo:hi]
            batches = length_batches([len(encoded[i]) for i in rows], cfg.evaluate.batch_size, seed=None)
            self.stages.append([(rows[b], collate(encoded, rows[b], tokenizer.pad_token_id, device))
                                for b in batches])


@dataclass(frozen=True)
class TrialScore:
    macro_f1: float
    worst_class_f1: float
    accuracy: float
    rows: int


def score_rows(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> TrialScore:
    from mllm.metrics import classification_summary, per_class_f1

    summary = classification_summary(logits, labels)
    f1 = per_class_f1(labels, logits.argmax(1), num_labels)
    return TrialScore(summary["macro_f1"], float(f1.min()), summary["accuracy"], len(labels))


class Scorer:
    """Members resident once per worker; `stages(recipe)` merges in memory and yields the score after each
    validation stage (rows seen so far)."""

    def __init__(self, cfg: ExperimentConfig, base_dir: Path, member_dirs: list[Path],
                 reviews: tuple[list[str], np.ndarray] | None = None) -> None:
        """`reviews` (texts, label ids) replaces the validation split (benchmarks)."""
        from mllm.data import load_splits
        from mllm.fastmerge import MemberStack
        from mllm.modeling import load_tokenizer, resolve_device

        self.device, self.autocast = resolve_device(cfg.model)
        self.stack = MemberStack(base_dir, member_dirs, self.device)
        self.model = self.stack.model()
        tokenizer = load_tokenizer(base_dir)
        if reviews is None:
            validation = load_splits(cfg.data).validation  # the only split a search reads
            reviews = (validation["text"].tolist(), validation["label"].to_numpy())
        self.num_labels = self.model.config.num_labels
        self.data = ValidationSet(reviews[0], np.asarray(reviews[1]), tokenizer, cfg, self.device,
                                  STAGES if cfg.search.prune else (1.0,))
        self.prefix = self._frozen_prefix(cfg)

    def _frozen_prefix(self, cfg: ExperimentConfig) -> Any:
        """When every member kept the base's embeddings and lowest blocks (finetune.freeze_*), every merge of
        them does too: the states entering the first trained block are computed once, with the base."""
        from mllm.prefix import PrefixCache, prefix_state

        depth = cfg.finetune.freeze_layers if cfg.finetune.freeze_embeddings else 0
        depth = min(depth, self.model.config.num_hidden_layers - 1)
        if depth <= 0:
            return None
        names = prefix_state(self.model, depth)
        if any(n not in d or bool(d[n].any()) for d in self.stack.deltas for n in names):
            return None  # some member changed a weight below the trained blocks: score every trial in full
        cache = PrefixCache(depth)
        with cache.record(self.model, "validation"):
            self._forward(range(len(self.data.stages)), None)
        return cache if cache.usable else None

    def _forward(self, stages: Any, prefix: Any) -> list[np.ndarray]:
        import torch

        out = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                     enabled=self.autocast is not None):
            for s in stages:
                start = sum(len(b) for b in self.data.stages[:s])  # cached batches before this stage
                with prefix.replay(self.model, start) if prefix else _nothing():
                    out += [self.model(**batch).logits.float().cpu().numpy() for _, batch in self.data.stages[s]]
        return out

    def stages(self, recipe: MergeConfig):
        start = time.perf_counter()
        self.stack.merge_into(self.model, recipe)
        merge_s = time.perf_counter() - start
        rows: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        for s, stage in enumerate(self.data.stages):
            logits += self._forward([s], self.prefix)
            rows += [index for index, _ in stage]
            seen = np.concatenate(rows)
            yield score_rows(np.concatenate(logits), self.data.labels[seen], self.num_labels), merge_s


@contextmanager
def _nothing():  # noqa: ANN202
    yield


def objectives(cfg: ExperimentConfig) -> list[str]:
    second = cfg.search.second_objective
    return ["maximize"] + ([] if second == "none" else ["minimize" if second == "density" else "maximize"])


def sampler(cfg: ExperimentConfig, worker: int) -> Any:
    import optuna

    seed = cfg.search.seed + worker  # workers of one study must not propose the same sequence
    if cfg.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # liar: parallel workers spread out
    if cfg.search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)  # method: independent
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def _retry_stale(study: Any, trial: Any) -> None:
    """A killed worker's trial: re-queue it with the same parameters and end its MLflow run KILLED."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        from mllm import tracking

        tracking.terminate_run(run_id, "KILLED")


def storage(url: str, heartbeat: int = 10, grace: int = 30) -> Any:
    """The study storage, with heartbeats: a trial whose worker stops beating for `grace` seconds is failed
    and re-queued with the same parameters (up to 3 times)."""
    import warnings

    import optuna

    from mllm.tracking import redact

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                          heartbeat_stale_trial_callback=_retry_stale,
                                          engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite")
                                          else None)
    except Exception as e:  # sqlalchemy's ArgumentError / OperationalError: a bad or unreachable URL
        first = redact(str(e)).splitlines()[0][:200]
        raise MllmError(f"search.storage: cannot open {redact(url)} ({first})",
                        "give a database URL (sqlite:///optuna.db, postgresql+psycopg2://user:pw@host/db) "
                        "that is reachable") from None


def open_storage(cfg: ExperimentConfig) -> Any:
    return storage(cfg.search.storage, cfg.search.heartbeat_s, cfg.search.grace_s)


def finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    storage: str
    best_trial: int | None
    best_value: float | None
    best_recipe: MergeConfig | None
    trials: int  # finished (complete or pruned) trials of the study
    run_id: str | None


def _value(score: TrialScore, recipe: MergeConfig, cfg: ExperimentConfig) -> float | tuple[float, float]:
    second = cfg.search.second_objective
    if second == "none":
        return score.macro_f1
    if second == "worst_class_f1":
        return score.macro_f1, score.worst_class_f1
    return score.macro_f1, recipe.density if recipe.method in USES_DENSITY else 1.0


def work(cfg: ExperimentConfig, parent_run_id: str | None, worker: int, members: list[str], base: str) -> None:
    """One search worker: load the members once, then run trials until the study has search.n_trials."""
    import optuna

    from mllm import registry, tracking
    from mllm.merge import _slug

    tracking.configure(cfg.tracking)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if finished(optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg))) >= cfg.search.n_trials:
        return  # the study is complete (a rerun of a finished search): nothing to load
    downloads = cfg.output_dir / "downloads"
    scorer = Scorer(cfg, registry.download(base, downloads / _slug(base)),
                    [registry.download(u, downloads / _slug(u)) for u in members])
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if cfg.search.prune else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=study_name(cfg), storage=open_storage(cfg),
                              sampler=sampler(cfg, worker), pruner=pruner)
    single = cfg.search.second_objective == "none"

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        recipe = suggest_recipe(trial, cfg, len(members))
        trial.set_user_attr("recipe", recipe.model_dump(mode="json", by_alias=True))
        trial.set_user_attr("owner", tracking.owner())  # which process ran it (a killed one?)
        tags = {"mllm.study": study.study_name, "mllm.trial": trial.number, "mllm.worker": worker}
        pruned = False
        with tracking.tracked_run(cfg, f"trial-{trial.number}", stage="search-trial", parent_run_id=parent_run_id,
                                  tags=tags, log_config=False, system_metrics=False) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params({"method": recipe.method, "weights": json.dumps([round(w, 4) for w in recipe.weights
                                                                                 or []]),
                                 "density": recipe.density, "lambda": recipe.lambda_, "seed": recipe.seed,
                                 "trial": trial.number})
            start = time.perf_counter()
            for step, (score, merge_s) in enumerate(scorer.stages(recipe)):  # noqa: B007 (merge_s used below)
                tracking.log_metrics({"val_macro_f1": score.macro_f1, "val_worst_class_f1": score.worst_class_f1,
                                      "val_accuracy": score.accuracy, "val_rows": score.rows}, step=step)
                if single and step < len(scorer.data.stages) - 1:
                    trial.report(score.macro_f1, step)
                    if trial.should_prune():
                        pruned = True
                        break
            tracking.log_metrics({"merge_s": merge_s, "trial_s": time.perf_counter() - start})
            tracking.set_tags({"mllm.trial_state": "PRUNED" if pruned else "COMPLETE"})
        if pruned:
            raise optuna.TrialPruned()
        return _value(score, recipe, cfg)

    stop = optuna.study.MaxTrialsCallback(cfg.search.n_trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                       optuna.trial.TrialState.PRUNED))
    remaining = cfg.search.n_trials - finished(study)
    if remaining > 0:  # n_trials bounds this worker; the callback stops it once the study has enough
        study.optimize(objective, n_trials=remaining, callbacks=[stop], timeout=cfg.search.timeout_s,
                       gc_after_trial=False, show_progress_bar=worker == 0)


def _worker_main(cfg: ExperimentConfig, parent_run_id: str | None, worker: int, members: list[str],
                 base: str) -> None:  # a spawned process: quiet libraries, then work
    from mllm.cli import quiet_libraries

    quiet_libraries()
    work(cfg, parent_run_id, worker, members, base)


def best(study: Any) -> Any | None:
    """The best finished trial (multi-objective: the Pareto trial with the highest macro-F1)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def log_figures(study: Any) -> None:
    """Optuna's history, parameter importance and parallel-coordinate plots (Pareto front with two objectives)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    from mllm import tracking

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
            tracking.log_figure(figure, f"figures/{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importance needs 2+ complete trials
            tracking.log_text(f"{name}: not drawn ({e})", f"figures/{name}.txt")


def run(cfg: ExperimentConfig, members: list[str] | None = None, base: str | None = None,
        parent_run_id: str | None = None, create_only: bool = False, worker_index: int = 0) -> SearchResult:
    """Create (or continue) the study, run `search.workers` workers on it, and log the outcome.

    `worker_index` tells independent processes on one study apart (their samplers' seeds): local workers are
    worker_index, worker_index + 1, ...
    """
    import multiprocessing

    import optuna

    from mllm import registry, tracking
    from mllm.merge import _slug, check_members, registered_members

    tracking.configure(cfg.tracking)
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
            registry.check_uri(uri, "--member" if uri != base else "--base", tokenizer=uri == base)
    else:
        base, members = registered_members(cfg.name)
    assert base is not None
    downloads = cfg.output_dir / "downloads"
    check_members([registry.download(u, downloads / _slug(u)) for u in members],
                  registry.download(base, downloads / _slug(base)), "ties",
                  "--member" if given else f"{cfg.name}-finetuned member", "--base" if given else f"{cfg.name}-base")
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
    if create_only:
        return SearchResult(name, tracking.redact(cfg.search.storage), None, None, None, finished(study), None)
    tags = {"mllm.study": name, "mllm.storage": tracking.redact(cfg.search.storage), "mllm.parents": ",".join(members),
            "mllm.base": base}
    with tracking.tracked_run(cfg, f"search-{name}", stage="search", parent_run_id=parent_run_id, tags=tags) as parent:
        before = finished(study)
        if cfg.search.workers == 1:
            work(cfg, parent.info.run_id, worker_index, members, base)
        else:  # processes, not threads: each holds its own members; the storage coordinates them
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker_main, args=(cfg, parent.info.run_id, worker_index + i, members, base))
                     for i in range(cfg.search.workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = [p.exitcode for p in procs if p.exitcode != 0]
            if failed:
                raise MllmError(f"{len(failed)} of {len(procs)} search workers failed (exit codes {failed})",
                                "see their output above; rerun to continue the study")
        study = optuna.load_study(study_name=name, storage=st)
        top = best(study)
        done = finished(study)
        tracking.log_metrics({"trials_finished": done, "trials_this_run": done - before})
        tracking.log_table(study.trials_dataframe(), "trials.csv")
        log_figures(study)
        recipe = MergeConfig.model_validate(top.user_attrs["recipe"]) if top else None
        if top is not None and recipe is not None:
            tracking.set_tags({"best_trial": top.number, "best_value": top.values[0],
                               "best_run": top.user_attrs.get("mlflow_run_id", "")})
            tracking.log_metrics({"best_val_macro_f1": top.values[0]})
            tracking.log_dict(recipe.model_dump(mode="json", by_alias=True), "best_recipe.json")
    print(f"search {name}: {done} trials finished" + (f", best trial {top.number} val macro-F1 {top.values[0]:.4f} "
                                                      f"({recipe.method})" if top and recipe else ""))
    return SearchResult(name, tracking.redact(cfg.search.storage), top.number if top else None,
                        top.values[0] if top else None, recipe, done, parent.info.run_id)
