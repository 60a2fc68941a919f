"""A study's definition: arms (experiment configs that differ by a few overrides) crossed with cross-validation
folds, each arm-fold pair a *cell* with its own MLflow experiment, members, merges and search.

    study = load_study("configs/studies/drugs.yaml")
    cfg = cell_config(study, study.arm("soup"), fold=0)   # an ExperimentConfig: data.folds / data.fold set

Every cell shares the study's store (one MLflow tracking database, one Optuna storage, one output folder), so the
whole study shows in one MLflow UI and resumes from what that store holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mllm.config import load_config
from mllm.config.loader import format_validation_error
from mllm.config.schema import ExperimentConfig
from mllm.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arm(Strict):
    """One arm: the study's experiment config with these overrides."""

    name: str = Field(description="Short slug: the cell experiments are <study>-<arm>-f<fold>.")
    title: str = Field("", description="One line for RESULTS.md.")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides of the experiment config.")
    experiment: Path | None = Field(None, description="This arm's own experiment config instead of the study's "
                                    "(e.g. configs/domains.yaml: other data, one member per domain).")
    merges: list[Literal["regmean", "ta-grid"]] = Field(
        default_factory=list, description="Merges scored in this arm's cells beside the standard ones: regmean "
        "(data-aware, merge.regmean_rows / merge.regmean_alpha) and ta-grid (task arithmetic at lambda 0.5 to K in "
        "steps of 0.5, lambda chosen on validation in RESULTS.md). A finished cell gains the ones it lacks.")
    full_member: str | None = Field(None, description="An earlier seeds arm whose seed-0 member (all training rows, "
                                    "finetune.seed, the same recipe) is this arm's full-data member.")
    bigger: str | None = Field(None, description="An earlier seeds arm whose seed-0 member is this arm's bigger "
                               "model (one fine-tuning of a larger body on the same rows).")
    reference: bool = Field(False, description="Only train and score the members (e.g. one fine-tuning of a "
                            "bigger body for another arm's `bigger`): no merges, no search, no table of its own.")


class StudyConfig(Strict):
    study: str = Field(description="Study name: prefix of every cell experiment.")
    experiment: Path = Field(description="The experiment config every arm starts from.")
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds (data.folds).")
    store: Path = Field(Path("studies/study"), description="Folder of the study's tracking and search databases "
                        "and checkpoints.")
    tracking_uri: str | None = Field(None, description="A tracking server instead of <store>/mlflow.db.")
    search_storage: str | None = Field(None, description="An Optuna storage instead of <store>/optuna.db.")
    trials: int = Field(30, ge=1, description="Search trials per cell, on validation only.")
    mask_seeds: int = Field(5, ge=1, description="DARE merges with default parameters: one per mask seed.")
    bootstrap_samples: int = Field(10_000, ge=100)
    alpha: float = Field(0.05, gt=0, lt=0.5)
    equivalence_margin: float = Field(0.05, gt=0, lt=1, description="Pre-stated margin of macro-F1.")
    results: Path = Field(Path("docs/RESULTS.md"), description="Where the study's report is written.")
    set: list[str] = Field(default_factory=list, description="Overrides applied to every arm (before the arm's).")
    arms: list[Arm] = Field(min_length=1)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    notes: list[str] = Field(default_factory=list, description="Paragraphs for RESULTS.md's Scope section: what "
                             "was left out and why.")

    @model_validator(mode="after")
    def _arms(self) -> StudyConfig:
        if not NAME.match(self.study):
            raise ValueError(f"study {self.study!r} must be a lower-case slug (a-z, 0-9, -)")
        seen: list[str] = []
        for i, arm in enumerate(self.arms):
            if not NAME.match(arm.name):
                raise ValueError(f"arms[{i}].name {arm.name!r} must be a lower-case slug (a-z, 0-9, -)")
            if arm.name in seen:
                raise ValueError(f"arms[{i}].name {arm.name!r} is used twice")
            for key in ("full_member", "bigger"):
                ref = getattr(arm, key)
                if ref is not None and ref not in seen:
                    raise ValueError(f"arms[{i}].{key}: {ref!r} is not an earlier arm (arms run in order)")
            if arm.reference and (arm.full_member or arm.bigger):
                raise ValueError(f"arms[{i}] ({arm.name}) is a reference arm: it has no full_member or bigger")
            seen.append(arm.name)
        return self

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"--arm {name}: no such arm", f"choose from {', '.join(a.name for a in self.arms)}")

    def cell_name(self, arm: str, fold: int) -> str:
        return f"{self.study}-{arm}-f{fold}"


def load_study(path: Path | str) -> StudyConfig:
    """Read and validate a study config (yaml.safe_load); every arm's experiment config is checked too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {path} not found", "pass a study YAML, e.g. configs/studies/drugs.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}", "fix the YAML syntax there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping", "start the file with study:, experiment:, arms:")
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path)), f"edit {path}") from None
    for arm in study.arms:
        cell_config(study, arm, 0)  # a bad override names its arm before anything runs
    return study


def store_uris(study: StudyConfig) -> tuple[str, str]:
    """(tracking URI, Optuna storage URL) of the study's store."""
    root = study.store.resolve()
    return (study.tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
            study.search_storage or f"sqlite:///{root / 'optuna.db'}")


def cell_config(study: StudyConfig, arm: Arm, fold: int) -> ExperimentConfig:
    """The experiment config of one cell: the arm's overrides, then the study's fold, names and store."""
    tracking, storage = store_uris(study)
    fixed = [f"data.folds={study.folds}", f"data.fold={fold}", f"name={study.cell_name(arm.name, fold)}",
             f"output_dir={study.store.resolve() / f'{arm.name}-f{fold}'}", f"tracking.tracking_uri={tracking}",
             f"search.storage={storage}", f"search.n_trials={study.trials}", "search.workers=1",
             *([] if study.tracking_uri else [f"tracking.artifact_location={study.store.resolve() / 'artifacts'}"]),
             *([f"model.device={study.device}"] if study.device != "auto" else [])]
    try:
        return load_config(arm.experiment or study.experiment, [*study.set, *arm.set, *fixed])
    except ConfigError as e:
        raise ConfigError(f"arms[{arm.name}]: {e.what}", e.fix) from None
