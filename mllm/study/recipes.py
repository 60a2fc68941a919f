"""What a study cell scores besides its search: the recipes fixed before any scoring, the arm's extra merges, the
reference models that are not merges of the members, and the majority baseline.

    fixed_recipes(cfg, k=3, mask_seeds=5)          # members, uniform soup, task arithmetic at 1 and K, TIES, DARE
    extra_recipes(cfg, arm, k=3)                   # arm.merges: regmean, ta-grid (lambda 0.5 .. K)
    reference_members(cfg, store, data)            # [("full", uri)]: a domains arm's multi-domain member

Every recipe here is fixed before a score is read; the one choice among them (the task-arithmetic lambda of a
ta-grid) is made on validation when RESULTS.md is written, never on test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mllm import finetune
from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import SplitData
from mllm.evaluation.baselines import majority_logits
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

# Task arithmetic at lambda 1 on normalised weights is base + mean(task vectors): the uniform soup's weights (equal
# up to float rounding, tests/test_fastmerge.py), so it is scored once and recorded under both names.
SAME = {"ta-1": "uniform"}
REFERENCES = ("full",)  # members trained beside the merged ones, scored as they are (never merged)


def _recipe(cfg: ExperimentConfig, method: str, **update: Any) -> MergeConfig:
    return cfg.merge.model_copy(update={"method": method, "weights": None, "normalize": True, "groups": None,
                                        **update})


def fixed_recipes(cfg: ExperimentConfig, k: int, mask_seeds: int) -> dict[str, tuple[str, MergeConfig]]:
    """name -> (kind, recipe) of every model scored from the members with a recipe fixed before any scoring."""
    out: dict[str, tuple[str, MergeConfig]] = {
        f"member:{i}": ("member", _recipe(cfg, "linear", weights=[1.0 if j == i else 0.0 for j in range(k)]))
        for i in range(k)}
    out["uniform"] = ("merge", _recipe(cfg, "linear"))
    out["ta-1"] = ("merge", _recipe(cfg, "task_arithmetic", lambda_=1.0))  # the uniform soup's weights: see SAME
    out["ta-k"] = ("merge", _recipe(cfg, "task_arithmetic", lambda_=float(k)))
    out["ties"] = ("merge", _recipe(cfg, "ties"))
    for method in ("dare_ties", "dare_linear"):
        for s in range(mask_seeds):
            out[f"{method}:{s}"] = ("dare", _recipe(cfg, method, seed=s))
    return out


def ta_lambdas(k: int) -> list[float]:
    """The task-arithmetic grid of a ta-grid arm: 0.5 to K (the sum of the task vectors) in steps of 0.5."""
    return [float(x) for x in np.arange(0.5, k + 1e-9, 0.5)]


def ta_name(lam: float, k: int) -> str:
    return "ta-k" if lam == float(k) else f"ta-{lam:g}"


def extra_recipes(cfg: ExperimentConfig, merges: list[str], k: int) -> dict[str, tuple[str, MergeConfig]]:
    """name -> (kind, recipe) of an arm's extra merges (`Arm.merges`): RegMean at merge.regmean_rows /
    merge.regmean_alpha, and the task-arithmetic lambdas of the grid that fixed_recipes lacks."""
    out: dict[str, tuple[str, MergeConfig]] = {}
    if "regmean" in merges:
        out["regmean"] = ("merge", _recipe(cfg, "regmean"))
    if "ta-grid" in merges:
        for lam in ta_lambdas(k):
            if ta_name(lam, k) not in ("ta-1", "ta-k"):
                out[ta_name(lam, k)] = ("merge", _recipe(cfg, "task_arithmetic", lambda_=lam))
    return out


def needs_rows(recipes: dict[str, tuple[str, MergeConfig | None]]) -> bool:
    """Whether a data-aware merge (RegMean: the members' own training rows) is among the recipes."""
    return any(r is not None and r.method == "regmean" for _, r in recipes.values())


def reference_members(cfg: ExperimentConfig, store: Store, data: SplitData) -> list[tuple[str, str]]:
    """[(name, model URI)] of the members a cell scores as they are: the multi-domain member (`full`) of a domains
    arm (finetune.strategy=domains with include_full), trained when the store lacks it. Other arms: none (a shards
    arm's full-data member is another arm's seed member, `Arm.full_member`)."""
    if cfg.finetune.strategy != "domains" or not cfg.finetune.include_full:
        return []

    def found() -> Any:
        for v in store.find_versions(store.model_name("member"), {"dataset_fingerprint": data.fingerprint}):
            tags = VersionTags.of(v)
            if tags.member == "full" and tags.member_key:
                return v
        return None

    version = found()
    if version is None:
        finetune.run(cfg, ["full"], store=store)
        version = found()
    return [("full", store.model_uri("member", version.version))]


def majority_by_domain(train: pd.DataFrame, rows: pd.DataFrame, k: int) -> np.ndarray:
    """The majority baseline's scores per row from the training labels of the row's own domain (one domain: the
    usual majority class; `mllm.evaluation.baselines.majority_logits`)."""
    out = np.zeros((len(rows), k), dtype=np.float32)
    for domain, part in rows.groupby("domain", sort=False):
        labels = train.loc[train["domain"] == domain, "label"].to_numpy()
        out[part.index.to_numpy()] = majority_logits(labels, k, len(part))
    return out
