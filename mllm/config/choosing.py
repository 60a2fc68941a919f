"""The config sections that choose: the Optuna search over merge recipes (and which of its trials becomes the
searched merge) and the promotion gate. Neither may decide on the test split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mllm.config.base import MergeMethod, Section, refuse_test


class SearchConfig(Section):
    """The Optuna study over merge recipes (scored on the validation split only)."""

    n_trials: int = Field(10, ge=1, le=100_000, description="Finished (complete or pruned) trials the study "
                          "should have; a rerun continues it up to this number.")
    methods: list[MergeMethod] = Field(
        default_factory=lambda: ["linear", "ties", "dare_ties", "dare_linear"], min_length=1,
        description="Merge methods the search may choose (in-memory ones).")
    sampler: Literal["tpe", "cmaes", "random", "nsgaii"] = Field("tpe", description="The Optuna sampler.")
    objective_split: Literal["validation", "test"] = Field("validation", description="Must be validation.")
    objective: Literal["domain_mean", "pooled"] = Field(
        "domain_mean", description="domain_mean: the mean over the data's domains (data.datasets) of each domain's "
        "validation macro-F1, so a merge of domain experts is judged on every domain alike (one domain: its "
        "macro-F1); pooled: macro-F1 over all validation rows. The worst domain is logged beside it.")
    second_objective: Literal["none", "worst_class_f1", "density"] = Field(
        "none", description="A second Optuna objective beside macro-F1 (a multi-objective study: a "
        "Pareto front).")
    storage: str = Field("sqlite:///optuna.db", description="Optuna storage URL shared by all workers.")
    study_name: str | None = Field(None, description="Default: <experiment>-search.")
    workers: int = Field(1, ge=1, le=256, description="Local worker processes.")
    timeout_s: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")
    prune: bool = Field(True, description="Score growing validation subsets and prune hopeless trials (a pruning "
                        "decision never reads fewer than prune_min_rows reviews; off when validation is smaller).")
    prune_min_rows: int = Field(100, ge=1, description="Fewest validation reviews a pruning decision may read.")
    startup_trials: int | None = Field(None, ge=0, description="TPE/CMA-ES random start-up trials (None: "
                                       "n_trials // 4, at least 4); enqueued trials count toward them.")
    max_lambda: float | None = Field(None, gt=0, description="Upper end of lambda (None: K, the number of members: "
                                     "lambda K with equal weights is the sum of the task vectors).")
    zero_below: float = Field(0.05, ge=0, lt=1, description="A suggested weight below this is 0 (the member is "
                              "left out), so single members and subsets are in the space.")
    layer_groups: int = Field(0, ge=0, le=64, description="0: one weight per member. N: the trained transformer "
                              "blocks in N contiguous groups plus embeddings and head (when trained), each with "
                              "its own weight per member and density (CMA-ES suits more than about 10 dimensions).")
    mask_seeds: int = Field(3, ge=1, le=32, description="Random-mask methods (DARE, DELLA) are scored over this "
                            "many mask seeds: the objective is the mean; the recipe keeps the seed nearest it.")
    enqueue: bool = Field(True, description="Start a new study from the standard merges (equal weights, "
                          "merge.density / merge.lambda) and the greedy soup, if registered.")
    crossfit_fraction: float = Field(0.5, description="Share of the validation split the search optimises "
                                     "(stratified, seeded by search.seed); the rest is held out: never read by the "
                                     "sampler or the pruner, it chooses among the top trials (choice=crossfit) and is "
                                     "the promotion gate's split (promote.split=holdout).")
    choice: Literal["best", "crossfit", "one_se", "nll"] = Field(
        "best", description="How the searched merge is chosen among the trials (mllm.evaluation.choice): best "
        "search-row macro-F1 (default: chosen by the study's no-test criterion, docs/RESULTS.md); crossfit (the top_k "
        "re-scored on the held-out rows); one_se (the simplest within se_multiplier bootstrap SEs of the best); nll "
        "(lowest search-row NLL).")
    top_k: int = Field(5, ge=1, le=1000, description="choice=crossfit: trials re-scored on the held-out rows.")
    se_multiplier: float = Field(1.0, description="choice=one_se: how many bootstrap standard errors below the "
                                 "best search-row macro-F1 a simpler trial may be (0: the best).")
    nll_guard: float | None = Field(0.5, gt=0, description="Trials whose search-row NLL is more than this many nats "
                                    "above the best member's validation NLL are never chosen (None: no guard).")
    heartbeat_s: int = Field(10, ge=1, le=3600, description="Workers' heartbeat interval (seconds).")
    grace_s: int = Field(30, ge=2, le=86400, description="A trial without a heartbeat for this long is retried.")
    storage_wait_s: int = Field(180, ge=0, le=86400, description="How long a worker waits for an unreachable study "
                                "storage (a restarted database) before stopping with one line; the trial it was "
                                "running is retried once the storage is back.")
    seed: int = Field(0, description="Seed of the sampler and of the search/held-out split of validation.")

    @field_validator("objective_split")
    @classmethod
    def _no_test(cls, v: str) -> str:
        return refuse_test(v, "set search.objective_split=validation")

    @field_validator("crossfit_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"{v} is outside (0, 1); set it between 0 and 1, e.g. 0.5 (half of validation for the "
                             "search, half held out)")
        return v

    @field_validator("se_multiplier")
    @classmethod
    def _se(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"{v} is below 0; set 0 or more (1 is the one-standard-error rule)")
        return v

    @model_validator(mode="after")
    def _objectives(self) -> SearchConfig:
        if (self.sampler == "nsgaii") != (self.second_objective != "none"):
            raise ValueError("sampler nsgaii goes with a second_objective (worst_class_f1 or density), "
                             "and a second_objective needs sampler nsgaii")
        return self


class PromoteConfig(Section):
    """The champion gate: decided on validation (or a selection split), never on test."""

    split: Literal["holdout", "validation", "selection"] = Field(
        "holdout", description="The split the gate decides on: holdout (the validation rows the search never "
        "optimised: search.crossfit_fraction), selection (data.selection_fraction > 0), or validation (includes the "
        "rows the search optimised: only with promote.allow_search_split).")
    allow_search_split: bool = Field(False, description="Let promote.split=validation decide on rows the search "
                                     "optimised (its optimism then inflates the gate).")
    margin: float = Field(0.0, ge=0, lt=1, description="The one-sided lower confidence bound of the macro-F1 gain "
                          "over the current champion must exceed this.")
    non_inferiority_margin: float = Field(0.05, ge=0, lt=1, description="The one-sided lower confidence bound of the "
                                          "macro-F1 difference to the best member must exceed minus this.")
    alpha: float = Field(0.05, gt=0, lt=1, description="One-sided level of both bounds.")
    bootstrap_samples: int = Field(10_000, ge=10_000, le=1_000_000, description="Paired bootstrap resamples of a "
                                   "decision (at least 10,000).")

    @field_validator("split", mode="before")
    @classmethod
    def _no_test(cls, v: Any) -> Any:
        return refuse_test(v, "use holdout, or selection with data.selection_fraction > 0")
