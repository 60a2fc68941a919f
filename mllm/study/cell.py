"""One study cell (an arm on one fold): its members, every comparison model, the search, one final scoring on test.

    run_id = run_cell(study, study.arm("soup"), fold=0)     # the cell's MLflow run; reused once it finished

In order, with every choice on validation and the test split read last:
1. members: the registered members of the cell's data (any code version: a study resumes), trained when missing;
2. validation: each member, the uniform soup, task arithmetic at lambda K and TIES, merged in memory
   (mllm.merging.inmemory) and scored; the best member and the greedy soup are chosen on these figures; then the Optuna
   search (`trials`) on validation;
3. test: those recipes, DARE-TIES and DARE-linear at merge.density / merge.lambda over `mask_seeds` seeds, the
   greedy soup and the searched recipe scored once, with the members' logit ensemble, the majority class and
   TF-IDF (C chosen on validation). Task arithmetic at lambda 1 is the uniform soup's merge (SAME).
Each model is one MLflow run nested under the cell's run: validation and test metrics, the recipe as params, and
`predictions.csv` (split, row, label, one logit column per class), from which RESULTS.md is computed.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import numpy as np
import pandas as pd

from mllm import finetune, search
from mllm.evaluation.baselines import ensure_tfidf, majority_logits
from mllm.basics import short_hash
from mllm.evaluation.choice import POLICIES, Choice, candidates_of, choose, split_rows
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import SplitData, load_splits
from mllm.evaluate import score
from mllm.evaluation.metrics import classification_summary, log_softmax
from mllm.merging.scorer import Scorer
from mllm.evaluation.selection import best_member
from mllm.merging.soups import greedy_order, greedy_weights
from mllm.tracking.store import Store
from mllm.tracking.trials import open_storage
from mllm.study.config import Arm, StudyConfig, cell_config

# Task arithmetic at lambda 1 on normalised weights is base + mean(task vectors): the uniform soup's weights (equal
# up to float rounding, tests/test_fastmerge.py), so it is scored once and recorded under both names.
SAME = {"ta-1": "uniform"}
# Scored on validation: what a choice reads (members: best member, greedy order) and the merges a reader compares
# with their search trials. DARE's per-seed merges are scored on test only (their validation figures are the
# search's enqueued DARE trials).
VALIDATION_KINDS = ("member", "merge", "searched")


def fixed_recipes(cfg: ExperimentConfig, k: int, mask_seeds: int) -> dict[str, tuple[str, MergeConfig]]:
    """name -> (kind, recipe) of every model scored from the members with a recipe fixed before any scoring."""
    m = cfg.merge

    def recipe(method: str, **update: Any) -> MergeConfig:
        return m.model_copy(update={"method": method, "weights": None, "normalize": True, "groups": None, **update})

    out: dict[str, tuple[str, MergeConfig]] = {
        f"member:{i}": ("member", recipe("linear", weights=[1.0 if j == i else 0.0 for j in range(k)]))
        for i in range(k)}
    out["uniform"] = ("merge", recipe("linear"))
    out["ta-1"] = ("merge", recipe("task_arithmetic", **{"lambda_": 1.0}))  # the uniform soup's weights: see SAME
    out["ta-k"] = ("merge", recipe("task_arithmetic", **{"lambda_": float(k)}))
    out["ties"] = ("merge", recipe("ties"))
    for method in ("dare_ties", "dare_linear"):
        for s in range(mask_seeds):
            out[f"{method}:{s}"] = ("dare", recipe(method, seed=s))
    return out


def cell_members(cfg: ExperimentConfig, store: Store, data: SplitData) -> tuple[str, list[tuple[str, str]]]:
    """(base URI, [(member name, URI)]): the newest registered member of each planned name trained on this cell's
    data, training those that are missing."""
    names = [s.name for s in finetune.plan_members(cfg, data) if s.name not in ("full", finetune.BIGGER)]

    def found() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for v in store.find_versions(store.model_name("member"), {"dataset_fingerprint": data.fingerprint}):
            if v.tags.get("member_key"):  # a light store's import untags versions whose weights were not exported
                out.setdefault(v.tags.get("member", ""), v)
        return out

    have = found()
    missing = [n for n in names if n not in have]
    if missing:
        finetune.run(cfg, missing, store=store)
        have = found()
    bases = {have[n].tags["base_version"] for n in names}
    if len(bases) != 1:
        raise RuntimeError(f"{cfg.name}: members of several bases {sorted(bases)}")
    return store.model_uri("base", bases.pop()), [(n, store.model_uri("member", have[n].version)) for n in names]


def cell_key(study: StudyConfig, arm: Arm, cfg: ExperimentConfig, fingerprint: str) -> str:
    """A finished cell with this key is reused: the arm's config (which determines its members), the data and the
    study settings that change a cell's figures; not where the store lies, so an imported light store resumes, and
    not search.choice: a cell scores every policy's choice, and which one the report calls the searched merge is
    read when the report is written."""
    where_free = cfg.to_dict()
    where_free.pop("output_dir")
    where_free.pop("tracking")
    where_free["search"].pop("storage")
    where_free["search"].pop("choice")
    return short_hash([where_free, fingerprint, study.trials, study.mask_seeds, arm.name, arm.reference], 20)


def _train_seconds(store: Store, uris: list[str]) -> float:
    """Wall time of the members' training runs (recorded by finetune, whenever they ran)."""
    total = 0.0
    for uri in uris:
        run = store.client.get_run(store.resolve(uri)[1].run_id)
        total += ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
    return total


def _predictions(frames: dict[str, np.ndarray], labels: dict[str, np.ndarray], names: tuple[str, ...]
                 ) -> pd.DataFrame:
    parts = []
    for split, logits in frames.items():
        part = pd.DataFrame(logits, columns=[f"logit_{n}" for n in names])
        part.insert(0, "label", labels[split])
        part.insert(0, "row", np.arange(len(logits)))
        part.insert(0, "split", split)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def policy_choices(cfg: ExperimentConfig, study_name: str, labels: np.ndarray, members: list[np.ndarray],
                   cell: Any) -> dict[str, Choice]:
    """The searched merge under every choice policy (mllm.evaluation.choice), all from the one search's trials: "searched" is
    the configured search.choice, "policy:<name>" the others, and "policy:best-all" the old rule (the highest
    macro-F1 on every validation row, no guard). The trials' per-review scores go to the cell run as `trials.json`
    (with the members' per-review NLL and the rows each part holds), from which the report measures every policy
    between validation halves without reading test."""
    import optuna

    trials = optuna.load_study(study_name=study_name, storage=open_storage(cfg)).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    candidates = candidates_of(trials)
    s, k = cfg.search, members[0].shape[1]
    search, holdout = split_rows(labels, s.crossfit_fraction, s.seed)
    member_nll = [-log_softmax(m.astype(np.float64))[np.arange(len(labels)), labels] for m in members]
    f1 = [classification_summary(m, labels) for m in members]
    top, _ = best_member([(str(i), x["macro_f1"], x["nll"]) for i, x in enumerate(f1)])
    reference = float(member_nll[int(top)].mean()) if top is not None else None

    def pick(policy: str) -> Choice:
        return choose(candidates, labels, search, holdout, k, policy, s.top_k, s.se_multiplier, s.nll_guard,
                      reference, s.seed)

    out = {"searched": pick(s.choice)}
    out.update({f"policy:{p}": pick(p) for p in POLICIES if p != s.choice})
    every = np.arange(len(labels))
    old = choose(candidates, labels, every, np.zeros(0, dtype=np.int64), k, "best")
    out["policy:best-all"] = Choice("best-all", old.number, old.recipe, old.search_macro_f1, None, old.search_nll,
                                    "every validation row", "highest macro-F1 on every validation row (the old rule)")
    cell.json({"labels": labels.tolist(), "search_rows": search.tolist(), "holdout_rows": holdout.tolist(),
               "num_labels": k, "choice": s.choice, "top_k": s.top_k, "se_multiplier": s.se_multiplier,
               "nll_guard": s.nll_guard, "seed": s.seed, "best_member": int(top) if top is not None else None,
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
                   ) -> dict[str, tuple[dict[str, np.ndarray], str, dict[str, str]]]:
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
    out = {}
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
        base_dir, dirs = store.download(base), [store.download(u) for u in uris]
        recipes = fixed_recipes(cfg, len(uris), study.mask_seeds)
        labels = {"validation": data.validation["label"].to_numpy(), "test": data.test["label"].to_numpy()}

        if arm.reference:  # members only: another arm's reference model
            recipes = {k: v for k, v in recipes.items() if v[0] == "member"}
        tick = time.perf_counter()  # 1. validation: every choice is made here
        scorer: Scorer | None = Scorer(whole, base_dir, dirs)
        assert scorer is not None
        val = {name: scorer.logits(r) for name, (kind, r) in recipes.items() if kind == "member"}
        earlier = earlier_models(study, arm, fold, store, key, [val[f"member:{i}"] for i in range(len(uris))])
        for name, (kind, r) in recipes.items():
            if kind in VALIDATION_KINDS and name not in SAME and name not in val:
                val[name] = earlier[name][0]["validation"] if "validation" in earlier.get(name, ({}, "", {}))[0] \
                    else scorer.logits(r)
        member_f1 = [classification_summary(val[f"member:{i}"], labels["validation"]) for i in range(len(uris))]
        order = [int(i) for i in greedy_order([(str(i), f["macro_f1"], f["nll"]) for i, f in enumerate(member_f1)])]

        soups: dict[tuple[float, ...], np.ndarray] = {}  # the greedy soup's validation logits, scored once

        def soup_f1(weights: list[float]) -> float:
            assert scorer is not None
            logits = scorer.logits(MergeConfig(method="linear", weights=weights, normalize=True))
            soups[tuple(weights)] = logits
            return classification_summary(logits, labels["validation"])["macro_f1"]

        weights, history = [1.0] * len(uris), []
        if not arm.reference:
            weights, _, history = greedy_weights(order, soup_f1, len(uris))
            recipes["greedy"] = ("merge", MergeConfig(method="linear", weights=weights, normalize=True))
            val["greedy"] = soups[tuple(weights)]
        seconds["validation_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        picks: dict[str, Choice] = {}
        if not arm.reference:
            result = search.run(cfg, uris, base, parent_run_id=cell.id, store=store)
            picks = policy_choices(cfg, result.study_name, labels["validation"], [val[f"member:{i}"]
                                                                                  for i in range(len(uris))], cell)
            for name, pick in picks.items():  # one validation scoring per distinct trial
                recipes[name] = ("searched" if name == "searched" else "policy", pick.recipe)
                same = next((n for n, p in picks.items() if n in val and p.number == pick.number), None)
                val[name] = val[same] if same else scorer.logits(pick.recipe)
        seconds["search_s"] = time.perf_counter() - tick
        scorer = None
        gc.collect()

        tick = time.perf_counter()  # 2. test: read once, after every choice
        scorer = Scorer(whole, base_dir, dirs, reviews=(data.test["text"].tolist(), labels["test"]))
        test: dict[str, np.ndarray] = {}
        for name, (_, r) in recipes.items():
            same = next((n for n, p in picks.items() if n in test and name in picks
                         and p.number == picks[name].number), None)
            if name in SAME:
                continue
            if same:
                test[name] = test[same]
            elif name in earlier and (name != "greedy" or earlier[name][2].get("weights") == json.dumps(weights)):
                test[name] = earlier[name][0]["test"]
            else:
                test[name] = scorer.logits(r)
        scorer = None
        for name, same in SAME.items():
            if same in test:
                val[name], test[name] = val[same], test[same]
        gc.collect()
        tfidf = ""
        if not arm.reference:
            for split, out in (("validation", val), ("test", test)):
                out["ensemble"] = np.mean([out[f"member:{i}"] for i in range(len(uris))], axis=0).astype(np.float32)
                out["majority"] = majority_logits(data.train["label"].to_numpy(), len(data.label_names),
                                                  len(labels[split]))
            tfidf = store.model_uri("tfidf", ensure_tfidf(cfg, data, store).version)
            for split, out in (("validation", val), ("test", test)):
                probs = store.predict_proba(tfidf, data.split(split)["text"].tolist())
                out["tfidf"] = np.log(np.clip(probs, 1e-30, None)).astype(np.float32)
            recipes.update({"ensemble": ("ensemble", None), "majority": ("majority", None),
                            "tfidf": ("tfidf", None)})
        seconds["test_s"] = time.perf_counter() - tick

        for name, (kind, recipe) in recipes.items():
            index = int(name.split(":")[1]) if kind == "member" else None
            params: dict[str, Any] = {"model": name, "kind": kind}
            if kind == "member":
                params.update(member=members[index][0], model_uri=uris[index])
            elif kind == "tfidf":
                params["model_uri"] = tfidf
            elif recipe is not None:
                params.update(method=recipe.method, weights=json.dumps(recipe.weights), density=recipe.density,
                              lambda_=recipe.lambda_, seed=recipe.seed)
            if name in picks:
                pick = picks[name]
                params.update(trial=pick.number, policy=pick.policy, chosen_on=pick.chosen_on,
                              groups=json.dumps([g.model_dump(mode="json") for g in recipe.groups or []]))
            if name in SAME:
                params["scored_as"] = SAME[name]
            if name in earlier and name not in picks and kind not in ("ensemble", "majority", "tfidf") and (
                    name != "greedy" or earlier[name][2].get("weights") == json.dumps(weights)):
                params["reused_from"] = earlier[name][1]  # the earlier cell's run: same members, same logits
            metrics = {f"val_{m}": x for m, x in classification_summary(val[name], labels["validation"]).items()
                       } if name in val else {}
            metrics.update({f"test_{m}": x for m, x in score(test[name], labels["test"], data.label_names,
                                                               cfg.evaluate).items()})
            with store.run(f"{arm.name} f{fold} {name}", stage="study-model", parent_run_id=cell.id,
                           tags={"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": fold,
                                 "mllm.study_model": name, "mllm.kind": kind}, log_config=False,
                           system_metrics=False) as run_:
                run_.params(params)
                run_.metrics(metrics)
                run_.table(_predictions({**({"validation": val[name]} if name in val else {}), "test": test[name]},
                                        labels, data.label_names), "predictions.csv")
        cell.json({"order": [members[i][0] for i in order], "greedy": history, "weights": weights}, "greedy.json")
        cell.metrics(seconds)
    print(f"study: {cfg.name} done ({', '.join(f'{k} {v:.0f}' for k, v in seconds.items())})")
    return cell.id
