"""One study cell (an arm on one fold): its members, every comparison model, the search, one final scoring on test.

    run_id = run_cell(study, study.arm("soup"), fold=0)     # the cell's MLflow run; reused once it finished

In order (`run_cell`), with every choice on validation and the test split read last:
1. members (`cell_members`): the registered members of the cell's data (any code version: a study resumes), trained
   when missing;
2. validation (`score_validation`, `search_choices`): each member, the uniform soup, task arithmetic at lambda K and
   TIES, merged in memory (mllm.merging.inmemory) and scored; the best member and the greedy soup are chosen on these
   figures; then the Optuna search (`trials`) on validation and each choice policy's pick among its trials;
3. test (`score_test`): those recipes, DARE-TIES and DARE-linear at merge.density / merge.lambda over `mask_seeds`
   seeds, the greedy soup and the searched recipe scored once, with the members' logit ensemble, the majority class
   and TF-IDF (C chosen on validation). Task arithmetic at lambda 1 is the uniform soup's merge (SAME). An arm's
   extra merges (RegMean, a task-arithmetic lambda grid) and its reference members (a domains arm's multi-domain
   member) are scored alike (mllm.study.recipes).
Each model is one MLflow run nested under the cell's run (`mllm.study.modelruns.log_models`): validation and test
metrics, the recipe as params, and `predictions.csv` (split, row, label, domain with several domains, one logit
column per class), from which RESULTS.md is computed.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import numpy as np
import pandas as pd

from mllm import finetune, search
from mllm.basics import short_hash
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import SplitData, load_splits
from mllm.evaluation.baselines import ensure_tfidf
from mllm.evaluation.choice import POLICIES, Choice, candidates_of, choose, objective_groups, validation_parts
from mllm.evaluation.metrics import classification_summary, domain_macro_f1, log_softmax
from mllm.evaluation.selection import best_member
from mllm.merging.regmean import member_rows
from mllm.merging.scorer import Scorer
from mllm.merging.soups import greedy_order, greedy_weights
from mllm.models.precision import resolve_precision
from mllm.study.config import Arm, StudyConfig, cell_config
from mllm.study.modelruns import log_models
from mllm.study.recipes import SAME, extra_recipes, fixed_recipes, majority_by_domain, needs_rows, reference_members
from mllm.study.work import CellWork, Earlier
from mllm.tracking.runs import RunLog
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags
from mllm.tracking.trials import guard_reference, open_storage

# Scored on validation: what a choice reads (members: best member, greedy order) and the merges a reader compares
# with their search trials. DARE's per-seed merges are scored on test only (their validation figures are the
# search's enqueued DARE trials).
VALIDATION_KINDS = ("member", "merge", "searched")


def cell_members(cfg: ExperimentConfig, store: Store, data: SplitData) -> tuple[str, list[tuple[str, str]]]:
    """(base URI, [(member name, URI)]): the newest registered member of each planned name trained on this cell's
    data, training those that are missing."""
    names = [s.name for s in finetune.plan_members(cfg, data) if s.name not in ("full", finetune.BIGGER)]

    def found() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for v in store.find_versions(store.model_name("member"), {"dataset_fingerprint": data.fingerprint}):
            tags = VersionTags.of(v)
            if tags.member_key:  # a light store's import untags versions whose weights were not exported
                out.setdefault(tags.member or "", v)
        return out

    have = found()
    missing = [n for n in names if n not in have]
    if missing:
        finetune.run(cfg, missing, store=store)
        have = found()
    bases = {VersionTags.of(have[n]).base_version for n in names}
    if len(bases) != 1:
        raise RuntimeError(f"{cfg.name}: members of several bases {sorted(bases)}")
    return store.model_uri("base", bases.pop()), [(n, store.model_uri("member", have[n].version)) for n in names]


def cell_key(study: StudyConfig, arm: Arm, cfg: ExperimentConfig, fingerprint: str) -> str:
    """A finished cell with this key is reused: the arm's config (which determines its members), the data and the
    study settings that change a cell's figures; not where the store lies, so an imported light store resumes, and
    not search.choice: a cell scores every policy's choice, and which one the report calls the searched merge is
    read when the report is written."""
    where_free = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "tracking")}
    where_free["search"] = {k: v for k, v in where_free["search"].items()
                            if k not in ("storage", "storage_wait_s", "choice")}
    # Settings added later that leave a cell's figures as they were keep its key: the arm's extra merges (a
    # finished cell gains them, mllm.study.addendum), a domain-mean objective over one domain (its macro-F1), and
    # fp32, which every cell ran in under model.dtype=auto before model.precision replaced it (bf16 keys anew).
    where_free["merge"] = {k: v for k, v in where_free["merge"].items() if not k.startswith("regmean_")}
    model = {k: v for k, v in where_free["model"].items() if k != "precision"}
    precision = resolve_precision(cfg.model)
    where_free["model"] = {**model, "dtype": "auto"} if precision == "fp32" else {**model, "precision": precision}
    if len(cfg.data.datasets) == 1 or where_free["search"].get("objective") == "pooled":
        where_free["search"].pop("objective", None)
    return short_hash([where_free, fingerprint, study.trials, study.mask_seeds, arm.name, arm.reference], 20)


def _train_seconds(store: Store, uris: list[str]) -> float:
    """Wall time of the members' training runs (recorded by finetune, whenever they ran)."""
    total = 0.0
    for uri in uris:
        run = store.get_run(store.resolve(uri)[1].run_id)
        total += ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
    return total


def policy_choices(cfg: ExperimentConfig, study_name: str, validation: pd.DataFrame, members: list[np.ndarray],
                   scores: list[tuple[str, float, float]], cell: RunLog) -> dict[str, Choice]:
    """The searched merge under every choice policy (mllm.evaluation.choice), all from the one search's trials:
    "searched" is the configured search.choice, "policy:<name>" the others, and "policy:best-all" the old rule (the
    highest macro-F1 on every validation row, no guard). The trials' per-review scores go to the cell run as
    `trials.json` (with the members' per-review NLL and the rows each part holds), from which the report measures
    every policy between validation halves without reading test. `scores`: the members' (URI, macro-F1, NLL) on
    `validation`, the ones the search's guard read (mllm.tracking.trials.guard_reference: one reference for both)."""
    import optuna

    trials = optuna.load_study(study_name=study_name, storage=open_storage(cfg)).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    candidates = candidates_of(trials)
    s, k, labels = cfg.search, members[0].shape[1], validation["label"].to_numpy()
    search, holdout, groups = validation_parts(s, validation)
    member_nll = [-log_softmax(m.astype(np.float64))[np.arange(len(labels)), labels] for m in members]
    reference, top = guard_reference(scores), best_member(list(scores))[0]
    best = next((i for i, (uri, _, _) in enumerate(scores) if uri == top), None)

    def pick(policy: str) -> Choice:
        return choose(candidates, labels, search, holdout, k, policy, s.top_k, s.se_multiplier, s.nll_guard,
                      reference, s.seed, groups)

    out = {"searched": pick(s.choice)}
    out.update({f"policy:{p}": pick(p) for p in POLICIES if p != s.choice})
    old = choose(candidates, labels, np.arange(len(labels)), np.zeros(0, dtype=np.int64), k, "best", groups=groups)
    out["policy:best-all"] = Choice("best-all", old.number, old.recipe, old.search_macro_f1, None, old.search_nll,
                                    "every validation row", "highest macro-F1 on every validation row (the old rule)")
    cell.json({"labels": labels.tolist(), "search_rows": search.tolist(), "holdout_rows": holdout.tolist(),
               "num_labels": k, "groups": None if groups is None else groups.tolist(),
               "choice": s.choice, "top_k": s.top_k, "se_multiplier": s.se_multiplier,
               "nll_guard": s.nll_guard, "seed": s.seed, "best_member": best,
               "member_nll": [np.round(x, 4).tolist() for x in member_nll],
               "trials": [{"number": c.number, "recipe": c.recipe.model_dump(mode="json", by_alias=True),
                           "pred": c.pred.tolist(), "nll": c.nll.tolist()} for c in candidates],
               "chosen": {n: {"trial": c.number, "policy": c.policy, "chosen_on": c.chosen_on, "reason": c.reason}
                          for n, c in out.items()}}, "trials.json")
    return out


def read_predictions(path: str) -> dict[str, np.ndarray]:
    """split -> logits (rows in order) from a model run's predictions.csv."""
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("logit_")]
    return {split: part.sort_values("row")[columns].to_numpy(dtype=np.float32)
            for split, part in frame.groupby("split", sort=False)}


def earlier_models(study: StudyConfig, arm: Arm, fold: int, store: Store, key: str, members: list[np.ndarray]
                   ) -> Earlier:
    """The fixed models of an earlier finished cell of this arm and fold (another key: older code or settings)
    whose members give these validation logits (to 1e-4): name -> (split -> logits, run id, params). Their
    figures do not depend on the search, so a rerun of the choice takes them over instead of scoring them again;
    {} when there is no such cell or its members differ (a retraining that did not reproduce them)."""
    cells = [r for r in store.find_runs({"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": str(fold),
                                         "mllm.stage": "study-cell"}) if r.data.tags.get("mllm.study_cell") != key
             and r.info.status == "FINISHED"]
    if not cells:
        return {}
    cell = cells[0]  # the newest
    out: Earlier = {}
    for r in store.find_runs({"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": str(fold),
                              "mllm.stage": "study-model"}):
        name = r.data.tags["mllm.study_model"]
        if r.data.tags.get("mlflow.parentRunId") != cell.info.run_id or name == "searched" or name.startswith(
                "policy:"):
            continue
        path = store.run_artifact(r.info.run_id, "predictions.csv", study.store.resolve() / "downloads" / r.info.run_id)
        out[name] = (read_predictions(path), r.info.run_id, dict(r.data.params))
    for i, logits in enumerate(members):
        old = out.get(f"member:{i}", ({}, "", {}))[0].get("validation")
        if old is None or old.shape != logits.shape or not np.allclose(old, logits, atol=1e-4):
            return {}
    print(f"study: {arm.name} f{fold}: members equal those of cell run {cell.info.run_id}; its fixed models are "
          "taken over, not scored again")
    return out


def run_cell(study: StudyConfig, arm: Arm, fold: int) -> str:
    """Run (or reuse) one cell; return its MLflow run id."""
    cfg = cell_config(study, arm, fold)
    store = Store(cfg)
    data = load_splits(cfg.data)
    key = cell_key(study, arm, cfg, data.fingerprint)
    done = store.find_runs({"mllm.study_cell": key})
    if done:
        print(f"study: {cfg.name} finished in run {done[0].info.run_id}, reused")
        return done[0].info.run_id
    # The cell's own Optuna study: a rerun under other settings searches afresh, an interrupted one continues.
    own = cfg.search.model_copy(update={"study_name": f"{cfg.name}-search-{key[:8]}"})
    cfg = cfg.model_copy(update={"search": own})
    start = time.perf_counter()
    base, members = cell_members(cfg, store, data)
    references = dict(reference_members(cfg, store, data))
    uris = [u for _, u in members]
    trained_now = time.perf_counter() - start
    tags = {"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": fold, "mllm.study_cell": key,
            "mllm.parents": ",".join(uris), "mllm.base": base, "mllm.dataset_fingerprint": data.fingerprint}
    seconds: dict[str, float] = {"members_train_s": _train_seconds(store, uris), "members_now_s": trained_now}
    with store.run(f"study {arm.name} fold {fold}", stage="study-cell", tags=tags) as cell:
        cell.params({"study": study.study, "arm": arm.name, "fold": fold, "folds": study.folds,
                     "members": json.dumps([n for n, _ in members]), "trials": study.trials,
                     "mask_seeds": study.mask_seeds, **{f"{s}_rows": n for s, n in data.sizes().items()}})
        whole = cfg.model_copy(update={"search": cfg.search.model_copy(update={"prune": False})})
        work = CellWork(study, arm, fold, key, cfg, whole, store, data, base, members, store.download(base),
                        [store.download(u) for u in uris],
                        {"validation": data.validation["label"].to_numpy(), "test": data.test["label"].to_numpy()},
                        seconds, references=references)
        if not arm.reference and needs_rows(extra_recipes(cfg, arm.merges, len(members))):
            work.rows = member_rows(cfg, store, uris)
        tick = time.perf_counter()  # 1. validation: every choice is made here
        scorer = work.scorer()
        score_validation(work, scorer)
        seconds["validation_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if not arm.reference:
            search_choices(work, scorer, cell)
        seconds["search_s"] = time.perf_counter() - tick
        del scorer  # the validation cut and its model copy; the members stay resident for the test scorer
        gc.collect()
        score_test(work)  # 2. test: read once, after every choice
        log_models(work, cell.id)
        cell.json({"order": [members[i][0] for i in work.order], "greedy": work.history, "weights": work.weights},
                  "greedy.json")
        cell.metrics(seconds)
    print(f"study: {cfg.name} done ({', '.join(f'{k} {v:.0f}' for k, v in seconds.items())})")
    return cell.id


def score_validation(work: CellWork, scorer: Scorer) -> None:
    """Validation logits of the members and the merges (an earlier cell's when its members are the same), then the
    greedy soup: members added best-first while validation macro-F1 does not drop, its logits scored once."""
    k, val, labels = len(work.members), work.val, work.labels["validation"]
    work.recipes = {**fixed_recipes(work.cfg, k, work.study.mask_seeds), **extra_recipes(work.cfg, work.arm.merges, k)}
    if work.arm.reference:  # members only: another arm's reference model
        work.recipes = {name: v for name, v in work.recipes.items() if v[0] == "member"}
    for name, uri in work.references.items():  # scored as they are: a stack of one member
        work.recipes[name] = (name, None)
        val[name] = work.scorer(members=[work.store.download(uri)]).logits(MergeConfig(method="linear"))
    val.update({name: scorer.logits(r) for name, (kind, r) in work.recipes.items() if kind == "member"})
    work.earlier = earlier_models(work.study, work.arm, work.fold, work.store, work.key,
                                  [val[f"member:{i}"] for i in range(k)])
    for name, (kind, r) in work.recipes.items():
        if kind in VALIDATION_KINDS and name not in SAME and name not in val:
            earlier = work.earlier.get(name, ({}, "", {}))[0]
            val[name] = earlier["validation"] if "validation" in earlier else scorer.logits(r)
    member_f1 = [classification_summary(val[f"member:{i}"], labels) for i in range(k)]
    work.order = [int(i) for i in greedy_order([(str(i), f["macro_f1"], f["nll"]) for i, f in enumerate(member_f1)])]
    work.weights = [1.0] * k
    if work.arm.reference:
        return
    soups: dict[tuple[float, ...], np.ndarray] = {}

    groups = objective_groups(work.cfg.search.objective, work.data.validation["domain"])

    def soup_f1(weights: list[float]) -> float:  # the search's objective (several domains: their mean macro-F1)
        soups[tuple(weights)] = scorer.logits(MergeConfig(method="linear", weights=weights, normalize=True))
        return domain_macro_f1(labels, soups[tuple(weights)].argmax(1), soups[tuple(weights)].shape[1], groups)[0]

    work.weights, _, work.history = greedy_weights(work.order, soup_f1, k)
    work.recipes["greedy"] = ("merge", MergeConfig(method="linear", weights=work.weights, normalize=True))
    val["greedy"] = soups[tuple(work.weights)]


def search_choices(work: CellWork, scorer: Scorer, cell: RunLog) -> None:
    """The Optuna search on validation, then each policy's choice, scored on validation once per distinct trial."""
    members = [work.val[f"member:{i}"] for i in range(len(work.members))]
    labels = work.data.validation["label"].to_numpy()
    scores = [(u, x["macro_f1"], x["nll"]) for (_, u), x in  # float64: the NLL policy_choices records per review
              zip(work.members, (classification_summary(m.astype(np.float64), labels) for m in members), strict=True)]
    result = search.run(work.cfg, [u for _, u in work.members], work.base, parent_run_id=cell.id, store=work.store,
                        member_scores=scores)  # one guard reference for the search and every policy below
    work.picks = policy_choices(work.cfg, result.study_name, work.data.validation, members, scores, cell)
    for name, pick in work.picks.items():
        work.recipes[name] = ("searched" if name == "searched" else "policy", pick.recipe)
        same = next((n for n, p in work.picks.items() if n in work.val and p.number == pick.number), None)
        work.val[name] = work.val[same] if same else scorer.logits(pick.recipe)


def score_test(work: CellWork) -> None:
    """Every model's test logits (once per distinct merge), then the baselines': the one read of the test split."""
    tick = time.perf_counter()
    picks, test, reviews = work.picks, work.test, (work.data.test["text"].tolist(), work.labels["test"])
    scorer = work.scorer(reviews=reviews)
    for name, (_, r) in work.recipes.items():
        same = next((n for n, p in picks.items() if n in test and name in picks
                     and p.number == picks[name].number), None)
        if name in SAME:
            continue
        if name in work.references:
            test[name] = work.scorer(reviews, [work.store.download(work.references[name])]).logits(
                MergeConfig(method="linear"))
            continue
        if same:
            test[name] = test[same]
        elif work.taken_over(name):
            test[name] = work.earlier[name][0]["test"]
        else:
            test[name] = scorer.logits(r)
    del scorer
    work.release()  # the members' last merge is done
    for name, same in SAME.items():
        if same in test:
            work.val[name], test[name] = work.val[same], test[same]
    gc.collect()
    if not work.arm.reference:  # the members' logit ensemble, the majority class, TF-IDF (C chosen on validation)
        data, k = work.data, len(work.members)
        work.tfidf = work.store.model_uri("tfidf", ensure_tfidf(work.cfg, data, work.store).version)
        for split, out in (("validation", work.val), ("test", test)):
            out["ensemble"] = np.mean([out[f"member:{i}"] for i in range(k)], axis=0).astype(np.float32)
            out["majority"] = majority_by_domain(data.train, data.split(split), len(data.label_names))
            probs = work.store.predict_proba(work.tfidf, data.split(split)["text"].tolist())
            out["tfidf"] = np.log(np.clip(probs, 1e-30, None)).astype(np.float32)
        work.recipes.update({"ensemble": ("ensemble", None), "majority": ("majority", None), "tfidf": ("tfidf", None)})
    work.seconds["test_s"] = time.perf_counter() - tick
