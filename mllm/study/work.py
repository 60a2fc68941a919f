"""What a study cell's phases share: the cell's inputs, and what each phase hands on (models, logits, choices,
seconds). `mllm.study.cell` fills it in; `mllm.study.modelruns` logs it; `mllm.study.addendum` refills a finished
cell's extra merges with it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import SplitData
from mllm.evaluation.choice import Choice
from mllm.merging.inmemory import MemberStack
from mllm.merging.scorer import Scorer
from mllm.study.config import Arm, StudyConfig
from mllm.tracking.store import Store

# name -> (split -> logits, run id, params) of an earlier cell's fixed models
Earlier = dict[str, tuple[dict[str, np.ndarray], str, dict[str, str]]]


@dataclass
class CellWork:
    """One cell as its phases fill it in: what they read, then what they hand on (models, logits, choices, seconds)."""

    study: StudyConfig
    arm: Arm
    fold: int
    key: str
    cfg: ExperimentConfig  # with the cell's own Optuna study
    whole: ExperimentConfig  # cfg without pruning: fixed models are scored on all validation rows
    store: Store
    data: SplitData
    base: str  # the base's model URI
    members: list[tuple[str, str]]  # (name, model URI)
    base_dir: Path
    dirs: list[Path]
    labels: dict[str, np.ndarray]  # split -> labels
    seconds: dict[str, float]
    recipes: dict[str, tuple[str, MergeConfig | None]] = field(default_factory=dict)  # name -> (kind, recipe)
    val: dict[str, np.ndarray] = field(default_factory=dict)  # name -> logits
    test: dict[str, np.ndarray] = field(default_factory=dict)
    earlier: Earlier = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # members best-first on validation
    weights: list[float] = field(default_factory=list)  # the greedy soup's
    history: list[Any] = field(default_factory=list)  # the greedy soup's steps
    picks: dict[str, Choice] = field(default_factory=dict)  # "searched" and "policy:<name>"
    tfidf: str = ""  # the TF-IDF model's URI
    references: dict[str, str] = field(default_factory=dict)  # name -> URI: scored as they are (a multi-domain member)
    rows: list[list[str]] | None = None  # the members' own training texts, for a data-aware merge (RegMean)
    # The members' resident stack, kept from the first scorer of them to `release()`: the validation scorer, the
    # search's in-process worker and the test scorer share it (mllm.merging.inmemory.shared_stack), one load.
    stack: MemberStack | None = None

    def scorer(self, reviews: tuple[list[str], np.ndarray] | None = None, members: list[Path] | None = None
               ) -> Scorer:
        """Members resident for merging (or `members` alone), scoring validation or `reviews`."""
        out = Scorer(self.whole, self.base_dir, self.dirs if members is None else members, reviews=reviews,
                     member_rows=self.rows if members is None else None)
        if members is None:
            self.stack = out.stack
        return out

    def release(self) -> None:
        """Let the members' stack go (with its last scorer): after the cell's last merge."""
        self.stack = None

    def taken_over(self, name: str) -> bool:
        """Whether an earlier cell's logits of `name` stand for this cell's (the greedy soup: with the same weights)."""
        return name in self.earlier and (
            name != "greedy" or self.earlier[name][2].get("weights") == json.dumps(self.weights))
