"""The fine-tune stage: one shared base classifier, K members trained from it, each tracked and registered.

    mllm finetune -c configs/tiny.yaml                      # base + all members, sequentially
    mllm finetune -c configs/tiny.yaml --member shard-1     # one member (e.g. one Slurm array task)

Every member starts from the same base checkpoint (pretrained body + one seeded head), so task vectors
(member - base) share one base, as TIES/DARE/task arithmetic need. The base is registered as
`<experiment>-base`, members as versions of `<experiment>-finetuned`. A member whose key (config, data
fingerprint, base, code version) is already registered is reused, not retrained; a member that crashed
resumes from its newest complete checkpoint when rerun.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mllm.config import ExperimentConfig
from mllm.data import SplitData, load_splits, make_shards
from mllm.errors import MllmError
from mllm.modeling import build_base, check_pretrained, read_source, update_source
from mllm.prefix import PrefixCache


@dataclass(frozen=True, eq=False)
class MemberSpec:
    """One member to train: its name, training rows and what varies."""

    name: str
    strategy: str
    rows: pd.DataFrame
    seed: int
    learning_rate: float
    shard: int | None = None
    domain: str | None = None


@dataclass(frozen=True)
class MemberOutcome:
    name: str
    model_uri: str  # models:/<experiment>-finetuned/<version>
    version: str
    run_id: str
    val_metrics: dict[str, float]
    wall_s: float
    reused: bool


@dataclass(frozen=True)
class FinetuneResult:
    base_dir: Path
    base_uri: str
    parent_run_id: str | None
    members: list[MemberOutcome]
    fingerprint: str


def plan_members(cfg: ExperimentConfig, splits: SplitData) -> list[MemberSpec]:
    """The members `finetune.strategy` asks for (+ `full` when include_full)."""
    ft = cfg.finetune
    rates = ft.learning_rates or [ft.learning_rate] * ft.members
    specs: list[MemberSpec] = []
    if ft.strategy == "shards":
        for i, rows in enumerate(make_shards(splits.train, ft.members, cfg.data.seed)):
            specs.append(MemberSpec(f"shard-{i}", "shards", rows, ft.seed + i, rates[i], shard=i))
    elif ft.strategy == "seeds":
        for i in range(ft.members):
            specs.append(MemberSpec(f"seed-{i}", "seeds", splits.train, ft.seed + i, rates[i]))
    else:
        domains = list(dict.fromkeys(splits.train["domain"]))
        if len(domains) < 2:
            raise MllmError(f"finetune.strategy=domains needs two or more datasets, got {domains}",
                            "add datasets to data.datasets or use strategy shards/seeds")
        for i, domain in enumerate(domains):
            rows = splits.train[splits.train["domain"] == domain].reset_index(drop=True)
            specs.append(MemberSpec(f"domain-{domain}", "domains", rows, ft.seed + i, ft.learning_rate, domain=domain))
    if ft.include_full:
        specs.append(MemberSpec("full", "full", splits.train, ft.seed, ft.learning_rate))
    return specs


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_key(cfg: ExperimentConfig, label_names: tuple[str, ...]) -> str:
    """Identity of the base classifier: pretrained body, revision, labels, head seed, mllm version."""
    from mllm import __version__

    return _hash([cfg.model.name_or_path, cfg.model.revision, label_names, cfg.finetune.seed, __version__])


def member_key(cfg: ExperimentConfig, spec: MemberSpec, base: str, fingerprint: str, code: str) -> str:
    """Identity of a member: a registered version with the same key is reused instead of retrained."""
    ft = cfg.finetune.model_dump(mode="json", exclude={"members", "include_full", "learning_rates", "strategy"})
    return _hash([base, fingerprint, spec.name, spec.strategy, spec.seed, spec.learning_rate, ft,
                  cfg.model.max_length, cfg.model.dtype, code])


def run(cfg: ExperimentConfig, members: list[str] | None = None, *, parent_run_id: str | None = None,
        base_only: bool = False, force: bool = False, progress: bool = True) -> FinetuneResult:
    """Build/reuse the base, then train (or reuse) each selected member; return their registered versions."""
    from mllm import tracking

    check_pretrained(cfg.model)  # before any run is opened
    splits = load_splits(cfg.data)
    specs = plan_members(cfg, splits)
    if members:
        unknown = sorted(set(members) - {s.name for s in specs})
        if unknown:
            raise MllmError(f"--member {', '.join(unknown)}: no such member",
                            f"choose from {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in members]
    tracking.configure(cfg.tracking)
    code = tracking.git_sha()
    outcomes: list[MemberOutcome] = []

    def stage(parent: str | None) -> tuple[Path, str]:
        base_dir, base_version = _ensure_base(cfg, splits)
        if base_only:
            return base_dir, base_version
        # Members with frozen embeddings + lowest layers share them: validation computes them once (mllm.prefix).
        prefix = PrefixCache(cfg.finetune.freeze_layers if cfg.finetune.freeze_embeddings else 0)
        for spec in specs:
            outcomes.append(_member(cfg, spec, splits, base_dir, base_version, parent, code, force, progress,
                                    prefix))
        return base_dir, base_version

    if parent_run_id:  # members of a parent run started elsewhere (e.g. a Slurm array)
        base_dir, base_version = stage(parent_run_id)
        parent = parent_run_id
    else:
        with tracking.tracked_run(cfg, "finetune", stage="finetune",
                                  tags={"mllm.dataset_fingerprint": splits.fingerprint}) as run_:
            tracking.log_params({f"split.{k}": v for k, v in splits.sizes().items()})
            tracking.log_split_inputs({"train": splits.train, "validation": splits.validation},
                                      cfg.name, splits.fingerprint)
            base_dir, base_version = stage(run_.info.run_id)
            parent = run_.info.run_id
    return FinetuneResult(base_dir, f"models:/{cfg.name}-base/{base_version}", parent, outcomes, splits.fingerprint)


def _ensure_base(cfg: ExperimentConfig, splits: SplitData) -> tuple[Path, str]:
    """The base checkpoint folder and its registered version: reused by key, else built and registered."""
    from mllm import registry, tracking

    key = base_key(cfg, splits.label_names)
    name = f"{cfg.name}-base"
    local = cfg.output_dir / "base"
    found = registry.find_versions(name, {"base_key": key})
    if found:
        version = found[0]
        if read_source(local).get("base_key") != key:
            local = registry.download(f"models:/{name}/{version.version}", cfg.output_dir / "downloads" / f"base-{key}")
        return local, str(version.version)
    build_base(cfg.model, splits.label_names, cfg.finetune.seed, local)
    update_source(local, base_key=key)
    with tracking.tracked_run(cfg, "base", stage="base", tags={"mllm.base_key": key}, log_config=False) as run_:
        uri = tracking.log_artifacts(local, "model")
        version = registry.register(name, uri, run_.info.run_id,
                                    {"base_key": key, "pretrained": cfg.model.name_or_path,
                                     "labels": ",".join(splits.label_names), "seed": cfg.finetune.seed},
                                    description="Shared base classifier: pretrained body + seeded head.")
    return local, str(version.version)


def _member(cfg: ExperimentConfig, spec: MemberSpec, splits: SplitData, base_dir: Path, base_version: str,
            parent: str | None, code: str, force: bool, progress: bool, prefix: Any = None) -> MemberOutcome:
    from mllm import registry, tracking
    from mllm.train import train_member

    key = member_key(cfg, spec, base_version, splits.fingerprint, code)
    name = f"{cfg.name}-finetuned"
    found = [] if force else registry.find_versions(name, {"member_key": key})
    if found:
        v = found[0]
        metrics = {k.removeprefix("val_"): float(t) for k, t in v.tags.items() if k.startswith("val_")}
        print(f"finetune {spec.name}: reusing {name} version {v.version} (same config, data, base and code)")
        return MemberOutcome(spec.name, f"models:/{name}/{v.version}", str(v.version), v.run_id, metrics, 0.0, True)
    tags = {"mllm.member": spec.name, "mllm.strategy": spec.strategy, "mllm.member_key": key,
            "mllm.base_version": base_version, "mllm.dataset_fingerprint": splits.fingerprint}
    with tracking.tracked_run(cfg, spec.name, stage="finetune-member", parent_run_id=parent, tags=tags) as run_:
        tracking.log_params({"member.name": spec.name, "member.seed": spec.seed, "member.shard": spec.shard,
                             "member.learning_rate": spec.learning_rate, "member.domain": spec.domain,
                             "member.train_rows": len(spec.rows)})
        tracking.log_split_inputs({"train": spec.rows, "validation": splits.validation}, f"{cfg.name}-{spec.name}",
                                  splits.fingerprint)
        logger = tracking.MetricLogger()
        work = cfg.output_dir / "members" / spec.name
        if force:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        result = train_member(
            base_dir, spec.rows["text"].tolist(), spec.rows["label"].to_numpy(), splits.validation["text"].tolist(),
            splits.validation["label"].to_numpy(), cfg.finetune, cfg.model, work,
            seed=spec.seed, learning_rate=spec.learning_rate, key=key, log=logger, progress=progress, name=spec.name,
            prefix=prefix,
        )
        logger.flush()
        # Lineage for merge: which registered base this member came from.
        update_source(result.model_dir, base_key=base_key(cfg, splits.label_names), base_version=base_version)
        summary = {"wall_s": result.wall_s, "train_samples_per_s": result.train_samples_per_s, "steps": result.steps,
                   "resumed_from_step": result.resumed_from, **{f"best_val_{k}": v for k, v in result.best.items()}}
        tracking.log_metrics(summary)
        tracking.set_tags({"mllm.stopped_early": result.stopped_early, "mllm.resumed_from_step": result.resumed_from})
        uri = tracking.log_artifacts(result.model_dir, "model")
        version = registry.register(name, uri, run_.info.run_id, {
            "member": spec.name, "strategy": spec.strategy, "shard": spec.shard, "domain": spec.domain,
            "seed": spec.seed, "learning_rate": spec.learning_rate, "base_version": base_version,
            "dataset_fingerprint": splits.fingerprint, "member_key": key,
            **{f"val_{k}": round(v, 6) for k, v in result.best.items() if k != "step"},
        }, description=f"Member {spec.name} fine-tuned from {cfg.name}-base version {base_version}.")
        # Registered: the crash-recovery state has served its purpose (the final weights stay in work/final).
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        (work / "best.safetensors").unlink(missing_ok=True)
        print(f"finetune {spec.name}: val macro-F1 {result.best.get('macro_f1', float('nan')):.4f}, "
              f"{result.wall_s:.1f} s -> {name} version {version.version}")
        return MemberOutcome(spec.name, f"models:/{name}/{version.version}", str(version.version), run_.info.run_id,
                             {k: v for k, v in result.best.items() if k != "step"}, result.wall_s, False)
