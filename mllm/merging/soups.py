"""The greedy soup (Wortsman et al. 2022, "Model soups"): members added in order of validation macro-F1, each kept
only if the soup's validation macro-F1 does not drop.

    result = greedy_soup(cfg, member_uris, base_uri)      # a registered linear merge with weights 1 (kept) / 0

Each candidate soup is the uniform average of the kept members (`linear`, normalised), merged in memory
(`mllm.merging.inmemory`) and scored on the whole validation split (with several domains and search.objective
domain_mean: the mean over domains of their macro-F1); the first member is the best one by validation
(`mllm.evaluation.selection.best_member`'s order). The soup is registered through `mllm.merge.run` as a linear merge
over all members with weight 1 for the kept ones and 0 for the others, so its parents are the member set it was chosen
from; the history (member tried, soup score, kept or not) is logged in a `greedy-soup` run.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from mllm import merge
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.errors import MllmError
from mllm.evaluate import describe
from mllm.evaluation.metrics import domain_macro_f1
from mllm.evaluation.selection import best_member
from mllm.merging.scorer import Scorer
from mllm.tracking.store import Store


def greedy_order(ranked: list[tuple[str, float | None, float | None]]) -> list[str]:
    """Member URIs from best to worst by validation (best_member's rule applied repeatedly)."""
    left, order = list(ranked), []
    while left:
        top, _ = best_member(left)
        if top is None:
            raise MllmError(f"{left[0][0]} has no validation macro-F1, so the greedy soup cannot rank it",
                            "fine-tune members with mllm finetune (it records their validation scores)")
        order.append(top)
        left = [m for m in left if m[0] != top]
    return order


def greedy_weights(order: list[int], score: Any, k: int) -> tuple[list[float], float, list[dict[str, Any]]]:
    """(weights: 1 kept, 0 not; the soup's score; the history), given member indices in greedy order and
    `score(weights)`."""
    kept = [order[0]]
    weights = [1.0 if i in kept else 0.0 for i in range(k)]
    current = score(weights)
    history = [{"member": order[0], "soup_val_macro_f1": current, "kept": True}]
    for i in order[1:]:
        trial = [1.0 if j in kept or j == i else 0.0 for j in range(k)]
        value = score(trial)
        keep = value >= current
        history.append({"member": i, "soup_val_macro_f1": value, "kept": keep})
        if keep:
            kept, weights, current = [*kept, i], trial, value
    return weights, current, history


def soup_recipe(cfg: ExperimentConfig, weights: list[float]) -> MergeConfig:
    """The recipe a soup with these 1/0 weights is merged with: the uniform average of the kept members."""
    return cfg.merge.model_copy(update={"method": "linear", "weights": weights, "normalize": True})


def greedy_soup(cfg: ExperimentConfig, members: list[str], base: str, store: Store | None = None) -> Any:
    """Choose the greedy soup on validation, then merge it with mergekit and register it (`merge.run`)."""
    store = store or Store(cfg)
    ranked = [(m, c.val_macro_f1, c.val_nll) for m in members for c in [describe(m, store, "member")]]
    order = [members.index(u) for u in greedy_order(ranked)]
    with store.run("greedy-soup", stage="soup", tags={"mllm.parents": ",".join(members), "mllm.base": base}) as run_:
        whole = cfg.model_copy(update={"search": cfg.search.model_copy(update={"prune": False})})
        held = {"scorer": Scorer(whole, store.download(base), [store.download(u) for u in members])}  # validation

        def score(weights: list[float]) -> float:
            recipe = MergeConfig(method="linear", weights=weights, normalize=True)
            scorer = held["scorer"]  # every validation row (the search's held-out part included), as before
            preds = scorer.logits(recipe).argmax(1)  # the search's objective: several domains, their mean
            return domain_macro_f1(scorer.data.labels, preds, scorer.num_labels, scorer.data.groups)[0]

        weights, value, history = greedy_weights(order, score, len(members))
        held.clear()
        gc.collect()  # the members' task vectors, before mergekit loads the members again
        for step, h in enumerate(history):
            run_.metrics({"soup_val_macro_f1": h["soup_val_macro_f1"], "kept": float(h["kept"])}, step=step)
        run_.json({"order": [members[i] for i in order], "history": [{**h, "member": members[h["member"]]}
                                                                     for h in history]}, "greedy_soup.json")
        kept = [members[i] for i, w in enumerate(weights) if w]
        recipe = soup_recipe(cfg, weights)
        result = merge.run(cfg, members, base, store=store, recipe=recipe, tags={
            "soup": "greedy", "soup_order": json.dumps([members[i] for i in order]),
            "soup_val_macro_f1": round(value, 6)})
        run_.tags({"mllm.model_uri": result.model_uri, "mllm.soup_kept": ",".join(kept)})
    print(f"greedy soup: kept {len(kept)} of {len(members)} members ({', '.join(kept)}) -> {result.model_uri}")
    return result
