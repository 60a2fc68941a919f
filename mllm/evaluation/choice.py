"""Choosing among search trials under noise: which trial becomes the searched merge, and how optimistic that is.

    search, holdout = split_rows(labels, fraction=0.5, seed=0)      # the search optimises `search` rows only
    c = choose(candidates, labels, search, holdout, k=3, policy="crossfit", top_k=5)
    c.number, c.search_macro_f1, c.holdout_macro_f1, c.optimism

A search scores every trial on the whole validation split but optimises only its `search` rows; the `holdout`
rows are never read by the sampler or the pruner. Each trial keeps its per-review predictions and NLL, so a policy
can be applied (and compared with another) after the fact, from the study's storage alone:

- best: the highest macro-F1 on the search rows (the old rule, there on the rows the sampler optimised);
- crossfit: the `top_k` trials by search-row macro-F1, re-scored on the held-out rows and chosen there;
- one_se: among trials within `se_multiplier` bootstrap standard errors of the best search-row macro-F1, the
  simplest (fewest free parameters, then nearest the uniform soup) - Hastie, Tibshirani & Friedman, ESL 7.10;
- nll: the lowest search-row NLL (a lower-variance objective; macro-F1 is reported beside it).
Every policy first drops trials whose search-row NLL is more than `nll_guard` nats above the reference (the best
member's validation NLL): a merge that is far worse calibrated than its members is never chosen, whatever its
macro-F1.

Optimism is the score where a choice was made minus the score elsewhere (Cawley & Talbot, JMLR 2010). Here it is
search-row minus held-out macro-F1 of the chosen trial; the study also measures validation minus test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from mllm.config.schema import MergeConfig
from mllm.errors import MllmError
from mllm.evaluation.metrics import domain_macro_f1, log_softmax, resampled_scores
from mllm.merging.methods import info

Policy = Literal["best", "crossfit", "one_se", "nll"]
POLICIES: tuple[str, ...] = ("best", "crossfit", "one_se", "nll")


def objective_groups(objective: str, domains: Any) -> np.ndarray | None:
    """A domain id per validation row when the search's objective is the mean over domains
    (search.objective=domain_mean) and the rows hold two or more domains; else None (one pooled macro-F1)."""
    codes, names = pd.factorize(pd.Series(domains))
    return codes.astype(np.int64) if objective == "domain_mean" and len(names) > 1 else None


def validation_parts(search_cfg: Any, validation: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(search rows, held-out rows, domain ids or None) of a validation split under `search_cfg` (SearchConfig):
    the one place the search, its choice and the promotion gate cut validation the same way."""
    groups = objective_groups(search_cfg.objective, validation["domain"])
    search, holdout = split_rows(validation["label"].to_numpy(), search_cfg.crossfit_fraction, search_cfg.seed, groups)
    return search, holdout, groups


def split_rows(labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(search rows, held-out rows): a seeded split of the validation rows, stratified by label (by domain and
    label when `groups` gives a domain per row), with `fraction` of each stratum's rows (rounded, at least one
    where a stratum has two or more) in the search part."""
    if not 0 < fraction < 1:
        raise MllmError(f"search.crossfit_fraction {fraction} is outside (0, 1)",
                        "set it between 0 and 1, e.g. 0.5 (half of validation for the search, half held out)")
    rng = np.random.default_rng(seed)
    strata = labels if groups is None else groups * (int(labels.max(initial=0)) + 1) + labels
    search: list[np.ndarray] = []
    for label in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == label))
        take = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            take = min(max(take, 1), len(rows) - 1)
        search.append(rows[:take])
    chosen = np.sort(np.concatenate(search)) if search else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return chosen.astype(np.int64), rest.astype(np.int64)


@dataclass(frozen=True)
class Candidate:
    """A finished trial: its recipe and per-review predicted class and NLL on every validation row."""

    number: int
    recipe: MergeConfig
    pred: np.ndarray  # (n_validation,) class ids
    nll: np.ndarray  # (n_validation,) -log p(true label)


def complexity(recipe: MergeConfig, k: int) -> tuple[int, float]:
    """(free parameters, distance from the uniform soup): what the one-SE rule calls simpler. The uniform soup
    (linear, equal weights) is (0, 0.0); each departure from it (unequal weights, a density below 1, lambda not 1,
    another method, layer groups) adds parameters and distance."""
    weights = np.asarray(recipe.weights or [1.0] * k, dtype=np.float64)
    w = weights / weights.sum()
    unequal = not np.allclose(w, 1.0 / k)
    free = (k - 1 if unequal else 0) + (recipe.method != "linear")
    distance = float(np.abs(w - 1.0 / k).sum()) + (0.5 if recipe.method != "linear" else 0.0)
    if info(recipe.method).uses("density") and recipe.density is not None and recipe.density < 1:
        free, distance = free + 1, distance + (1.0 - recipe.density)
    if info(recipe.method).task_vector and abs(recipe.lambda_ - 1.0) > 1e-9:
        free, distance = free + 1, distance + abs(recipe.lambda_ - 1.0)
    if recipe.groups:
        free += len(recipe.groups) * k
        distance += float(len(recipe.groups))
    return free, distance


def single_member(recipe: MergeConfig) -> int | None:
    """The index of the one member a recipe puts all its weight on (in every layer group), else None."""
    sets = [recipe.weights] + [g.weights for g in recipe.groups or []]
    kept = {tuple(i for i, w in enumerate(ws) if w) for ws in sets if ws is not None}
    if len(kept) == 1:
        only = next(iter(kept))
        return only[0] if len(only) == 1 else None
    return None


@dataclass(frozen=True)
class Choice:
    policy: str
    number: int
    recipe: MergeConfig
    search_macro_f1: float
    holdout_macro_f1: float | None  # None without held-out rows
    search_nll: float
    chosen_on: str  # the rows that made the final choice
    reason: str
    refused: tuple[int, ...] = field(default=())  # trials the NLL guard dropped

    @property
    def optimism(self) -> float | None:
        """Search-row minus held-out macro-F1 of the chosen trial."""
        return None if self.holdout_macro_f1 is None else self.search_macro_f1 - self.holdout_macro_f1


def _f1(c: Candidate, labels: np.ndarray, rows: np.ndarray, k: int, groups: np.ndarray | None = None) -> float:
    return domain_macro_f1(labels[rows], c.pred[rows], k, None if groups is None else groups[rows])[0]


def bootstrap_se(labels: np.ndarray, pred: np.ndarray, k: int, samples: int = 2000, seed: int = 0,
                 groups: np.ndarray | None = None) -> float:
    """Bootstrap standard error of macro-F1 over these reviews (with `groups`: of the mean over domains of each
    domain's macro-F1, resampling within each domain)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        index = rng.integers(0, len(labels), size=(samples, len(labels)))
        return float(resampled_scores(labels, pred, k, index)[1].std(ddof=1))
    per_domain = []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        index = rng.integers(0, len(rows), size=(samples, len(rows)))
        per_domain.append(resampled_scores(labels[rows], pred[rows], k, index)[1])
    return float(np.mean(per_domain, axis=0).std(ddof=1))


def choose(candidates: Sequence[Candidate], labels: np.ndarray, search: np.ndarray, holdout: np.ndarray, k: int,
           policy: str = "best", top_k: int = 5, se_multiplier: float = 1.0, nll_guard: float | None = None,
           reference_nll: float | None = None, seed: int = 0, groups: np.ndarray | None = None) -> Choice:
    """Apply `policy` to the candidates (module docstring). Ties keep the earlier trial. `groups` (a domain id per
    validation row, `objective_groups`): macro-F1 is the mean over domains, as the search optimised it."""
    if policy not in POLICIES:
        raise MllmError(f"search.choice {policy!r} is not a policy", f"use one of {', '.join(POLICIES)}")
    if se_multiplier < 0:
        raise MllmError(f"search.se_multiplier {se_multiplier} is below 0", "set it to 0 or more (1 is the rule)")
    if not candidates:
        raise MllmError("the study has no complete trial with per-review scores", "run mllm search (more trials)")
    pool = sorted(candidates, key=lambda c: c.number)
    nll = {c.number: float(c.nll[search].mean()) for c in pool}
    refused: tuple[int, ...] = ()
    if nll_guard is not None and reference_nll is not None:
        kept = [c for c in pool if nll[c.number] <= reference_nll + nll_guard]
        refused = tuple(c.number for c in pool if c not in kept)
        pool = kept or [min(pool, key=lambda c: nll[c.number])]  # none passes: the best calibrated one
    f1 = {c.number: _f1(c, labels, search, k, groups) for c in pool}
    held = {c.number: _f1(c, labels, holdout, k, groups) for c in pool} if len(holdout) else {}
    top = max(pool, key=lambda c: f1[c.number])  # max keeps the first of equals: the earlier trial
    chosen_on = "search rows"
    if policy == "best":
        pick, why = top, f"highest search-row macro-F1 ({f1[top.number]:.4f})"
    elif policy == "crossfit":
        if not held:
            raise MllmError("search.choice=crossfit needs held-out rows", "set search.crossfit_fraction below 1")
        ranked = sorted(pool, key=lambda c: -f1[c.number])[:top_k]
        pick = max(ranked, key=lambda c: held[c.number])
        chosen_on = "held-out rows"
        why = (f"best held-out macro-F1 ({held[pick.number]:.4f}) among the top {len(ranked)} trials by search-row "
               f"macro-F1 ({', '.join(str(c.number) for c in ranked)})")
    elif policy == "one_se":
        se = bootstrap_se(labels[search], top.pred[search], k, seed=seed,
                          groups=None if groups is None else groups[search])
        floor = f1[top.number] - se_multiplier * se
        near = [c for c in pool if f1[c.number] >= floor]
        pick = min(near, key=lambda c: (*complexity(c.recipe, k), -f1[c.number], c.number))
        why = (f"simplest of {len(near)} trials within {se_multiplier:g} SE ({se:.4f}) of the best search-row "
               f"macro-F1 {f1[top.number]:.4f}")
    else:
        pick = min(pool, key=lambda c: nll[c.number])
        why = f"lowest search-row NLL ({nll[pick.number]:.4f})"
    if refused:
        why += f"; {len(refused)} trials dropped by the NLL guard (> {reference_nll:.3f} + {nll_guard:g} nats)"
    return Choice(policy, pick.number, pick.recipe, f1[pick.number], held.get(pick.number), nll[pick.number],
                  chosen_on, why, refused)


ROWS_ATTR = "validation_rows"  # a trial's user attribute: {"pred": [...], "nll": [...]} in validation order


def rows_attr(logits: np.ndarray, labels: np.ndarray) -> dict[str, list[Any]]:
    """What a trial stores for the policies: predicted class and NLL (4 decimals) per validation review."""
    nll = -log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]
    return {"pred": logits.argmax(1).astype(int).tolist(), "nll": np.round(nll, 4).tolist()}


def candidates_of(trials: Sequence[Any]) -> list[Candidate]:
    """Candidates from complete Optuna trials that stored their per-review scores (older trials did not)."""
    out = []
    for t in trials:
        rows = t.user_attrs.get(ROWS_ATTR)
        if rows and "recipe" in t.user_attrs:
            out.append(Candidate(t.number, MergeConfig.model_validate(t.user_attrs["recipe"]),
                                 np.asarray(rows["pred"], dtype=np.int64), np.asarray(rows["nll"], dtype=np.float64)))
    return out
