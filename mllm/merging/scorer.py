"""Scoring a search trial: the validation split tokenised once, a merge made in memory into one resident model,
and macro-F1 after each validation stage (so a pruner can stop hopeless trials early).

    scorer = Scorer(cfg, base_dir, member_dirs)           # members resident once per worker (mllm.merging.inmemory)
    for score, merge_s in scorer.stages(recipe):           # rows seen so far: 1/4, 1/2, all of validation
        ...

Only the validation split is read here (the test split decides nothing). With frozen lower layers shared by every
member, the states entering the first trained block are computed once, with the base (mllm.models.prefix).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllm.config.schema import ExperimentConfig, MergeConfig
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.evaluation.choice import validation_parts
from mllm.evaluation.metrics import classification_summary, domain_macro_f1, per_class_f1
from mllm.merging.inmemory import shared_stack
from mllm.merging.regmean import Grams, GramSource, member_grams
from mllm.models.modeling import collate, encode, length_batches, load_tokenizer
from mllm.models.precision import resolve_device
from mllm.models.prefix import PrefixCache, prefix_state

STAGES = (0.25, 0.5, 1.0)  # shares of the validation split scored before each pruning decision


def stage_shares(rows: int, prune: bool, min_rows: int) -> tuple[float, ...]:
    """The STAGES a search scores: those whose row count is at least `min_rows` (a pruning decision never reads
    fewer reviews), always the whole split; (1.0,), no pruning, when validation is too small for two stages."""
    if not prune:
        return (1.0,)
    return tuple(s for s in STAGES if s == 1.0 or round(s * rows) >= min_rows)


def stage_rows(search_rows: np.ndarray, stages: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """The search rows in the stages a trial scores one after another: a seeded permutation cut at each share."""
    order = np.random.default_rng(seed).permutation(search_rows)
    cuts = [0, *sorted({max(1, round(s * len(order))) for s in stages})]
    return [order[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


class ValidationSet:
    """The validation split tokenised once, cut into stages, each stage's rows length-sorted into batches that are
    collated once and reused by every trial. The stages cover the search rows (a seeded permutation); the held-out
    rows, when there are any, are one last stage that no objective or pruner reads."""

    def __init__(self, texts: list[str], labels: np.ndarray, tokenizer: Any, cfg: ExperimentConfig, device: Any,
                 stages: tuple[float, ...], search_rows: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> None:
        self.labels, self.groups = labels, groups  # groups: a domain id per review (search.objective=domain_mean)
        encoded = encode(tokenizer, texts, cfg.model.max_length)
        self.search_rows = np.arange(len(texts)) if search_rows is None else np.sort(search_rows)
        self.holdout_rows = np.setdiff1d(np.arange(len(texts)), self.search_rows)
        parts = stage_rows(self.search_rows, stages, cfg.search.seed)
        self.objective_stages = len(parts)  # the stages the objective (and a pruner) reads
        if len(self.holdout_rows):
            parts.append(self.holdout_rows)
        self.stages: list[list[tuple[np.ndarray, dict[str, Any]]]] = []
        for rows in parts:
            batches = length_batches([len(encoded[i]) for i in rows], cfg.evaluate.batch_size, seed=None)
            self.stages.append([(rows[b], collate(encoded, rows[b], tokenizer.pad_token_id, device))
                                for b in batches])


    def groups_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The domain ids of these rows (None: one pooled objective)."""
        return None if self.groups is None else self.groups[rows]


@dataclass(frozen=True)
class TrialScore:
    macro_f1: float  # the objective: with several domains, the mean over domains of each one's macro-F1
    worst_class_f1: float
    accuracy: float
    rows: int
    worst_domain_f1: float | None = None  # with several domains: the lowest domain's macro-F1

    def as_metrics(self) -> dict[str, float]:
        """A trial run's figures after a stage (val_macro_f1 is the objective; the worst domain with several)."""
        out = {"val_macro_f1": self.macro_f1, "val_worst_class_f1": self.worst_class_f1, "val_accuracy": self.accuracy,
               "val_rows": self.rows}
        return out if self.worst_domain_f1 is None else {**out, "val_worst_domain_f1": self.worst_domain_f1}


def score_rows(logits: np.ndarray, labels: np.ndarray, num_labels: int, groups: np.ndarray | None = None
               ) -> TrialScore:
    """The objective's figures on these rows (`groups`: a domain id per row, or None for one pooled macro-F1)."""
    summary = classification_summary(logits, labels)
    f1 = per_class_f1(labels, logits.argmax(1), num_labels)
    if groups is None:
        return TrialScore(summary["macro_f1"], float(f1.min()), summary["accuracy"], len(labels))
    mean, worst = domain_macro_f1(labels, logits.argmax(1), num_labels, groups)
    return TrialScore(mean, float(f1.min()), summary["accuracy"], len(labels), worst)


class Scorer:
    """Members resident once per worker; `stages(recipe)` merges in memory and yields the score after each
    validation stage (rows seen so far)."""

    def __init__(self, cfg: ExperimentConfig, base_dir: Path, member_dirs: list[Path],
                 reviews: tuple[list[str], np.ndarray] | None = None,
                 member_rows: list[list[str]] | None = None) -> None:
        """`reviews` (texts, label ids) replaces the validation split (benchmarks). `member_rows`: each member's own
        training texts (mllm.merging.regmean.member_rows), which regmean recipes need."""
        self.device, self.autocast = resolve_device(cfg.model)
        self.gram_source = None if member_rows is None else GramSource.of(cfg, member_rows)
        self.grams: dict[int, list[Grams]] = {}  # regmean_rows -> each member's Gram matrices, computed once
        self.stack = shared_stack(base_dir, member_dirs, self.device)  # loaded once per process, shared
        self.model = self.stack.model()
        tokenizer = load_tokenizer(base_dir)
        search_rows, groups = None, None
        if reviews is None:
            validation = load_splits(cfg.data).validation  # the only split a search reads
            reviews = (validation["text"].tolist(), validation["label"].to_numpy())
            search_rows, _, groups = validation_parts(cfg.search, validation)
        self.num_labels = self.model.config.num_labels
        n = len(reviews[0]) if search_rows is None else len(search_rows)
        self.data = ValidationSet(reviews[0], np.asarray(reviews[1]), tokenizer, cfg, self.device,
                                  stage_shares(n, cfg.search.prune, cfg.search.prune_min_rows), search_rows, groups)
        self.prefix = self._frozen_prefix(cfg)

    def _frozen_prefix(self, cfg: ExperimentConfig) -> Any:
        """When every member kept the base's embeddings and lowest blocks (finetune.freeze_*), every merge of
        them does too: the states entering the first trained block are computed once, with the base."""
        depth = cfg.finetune.freeze_layers if cfg.finetune.freeze_embeddings else 0
        depth = min(depth, self.model.config.num_hidden_layers - 1)
        if depth <= 0:
            return None
        names = prefix_state(self.model, depth)
        if any(n not in d or d[n] is not None for d in self.stack.deltas for n in names):
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
                with prefix.replay(self.model, start) if prefix else nullcontext():
                    out += [self.model(**batch).logits.float().cpu().numpy() for _, batch in self.data.stages[s]]
        return out

    def prepare(self, recipe: MergeConfig) -> None:
        """For a regmean recipe: the members' Gram matrices, computed (or read from the cache) on the first such
        recipe and reused by every later one (alpha and weights apply at merge time)."""
        if recipe.method != "regmean":
            return
        if self.gram_source is None:
            raise MllmError("merge.method=regmean: this scorer has no training rows of the members",
                            "pass member_rows (mllm.merging.regmean.member_rows), or leave regmean out of the search")
        n = recipe.regmean_rows
        if n not in self.grams:
            self.grams[n] = member_grams(self.stack.member_dirs, self.gram_source, n, self.stack.unchanged,
                                         self.device)
        self.stack.set_grams(self.grams[n])

    def stages(self, recipe: MergeConfig) -> Iterator[tuple[TrialScore, float]]:
        """Merge, then yield (score on the search rows seen so far, merge seconds) after each objective stage.
        Once the generator is exhausted, `rest()` scores the held-out rows of the same merge."""
        self.prepare(recipe)  # regmean's Gram matrices: once per scorer, not part of the merge time
        start = time.perf_counter()
        self.stack.merge_into(self.model, recipe)
        merge_s = time.perf_counter() - start
        rows: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        self._seen = (rows, logits)
        for s in range(self.data.objective_stages):
            logits += self._forward([s], self.prefix)
            rows += [index for index, _ in self.data.stages[s]]
            seen = np.concatenate(rows)
            yield score_rows(np.concatenate(logits), self.data.labels[seen], self.num_labels,
                             self.data.groups_of(seen)), merge_s

    def rest(self) -> np.ndarray:
        """After `stages` ran to the end: the merge's logits on every review (held-out rows scored now), in the
        order the reviews were given."""
        rows, logits = self._seen
        for s in range(self.data.objective_stages, len(self.data.stages)):
            logits += self._forward([s], self.prefix)
            rows += [index for index, _ in self.data.stages[s]]
        out = np.zeros((len(self.data.labels), self.num_labels), dtype=np.float32)
        out[np.concatenate(rows)] = np.concatenate(logits)
        return out

    def logits(self, recipe: MergeConfig) -> np.ndarray:
        """The merge's logits on every review, in the order the reviews were given (a study scores fixed recipes
        this way; build the scorer with search.prune off so there is one stage)."""
        self.prepare(recipe)
        self.stack.merge_into(self.model, recipe)
        out = np.zeros((len(self.data.labels), self.num_labels), dtype=np.float32)
        for s, stage in enumerate(self.data.stages):
            for (index, _), batch in zip(stage, self._forward([s], self.prefix), strict=True):
                out[index] = batch
        return out
