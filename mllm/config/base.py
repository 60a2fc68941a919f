"""What every config section shares: the base model, the names a section may hold, and the rule that the test
split decides nothing."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

LabelKind = Literal["rating10", "stars5", "sentiment"]
LabelScheme = Literal["rating10", "sentiment3", "stars5"]
PresetName = Literal[
    "drugscom-sample", "drugscom", "druglib", "lewtun/drug-reviews", "yelp_review_full", "app_reviews"
]
# mergekit's own method names (mergekit/merge_methods/registry.py), and regmean, which mllm implements itself
# (mllm.merging.regmean: it reads each member's training rows, which mergekit's methods never see).
MergeMethod = Literal[
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "karcher", "model_stock", "sce", "regmean",
]

def refuse_test(split: Any, fix: str) -> Any:
    """A split that takes a decision (search objective, promotion gate) may be anything but test."""
    if split == "test":
        raise ValueError(f"the test split decides nothing (only the final evaluation reads it); {fix}")
    return split


class Section(BaseModel):
    """Base of every config section: unknown keys, NaN and infinity are refused; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
