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

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mllm import __version__
from mllm.basics import folder_bytes, short_hash
from mllm.config.schema import ExperimentConfig
from mllm.data.splits import SplitData, load_splits, make_shards
from mllm.errors import DiskSpace, MllmError
from mllm.models.modeling import bigger_needs_training, build_base, check_pretrained, read_source, update_source
from mllm.models.precision import resolve_precision
from mllm.models.prefix import ExampleCache, PrefixCache
from mllm.models.training import train_member
from mllm.tracking.runs import git_sha
from mllm.tracking.store import Role, Store
from mllm.tracking.tags import VersionTags

BIGGER = "bigger"  # the member name of model.bigger_model, fine-tuned on all training rows


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
        domains = check_domains(cfg, splits)
        for i, domain in enumerate(domains):
            rows = splits.train[splits.train["domain"] == domain].reset_index(drop=True)
            specs.append(MemberSpec(f"domain-{domain}", "domains", rows, ft.seed + i, ft.learning_rate, domain=domain))
    if ft.include_full and ft.strategy != "seeds":  # seed members already train on all rows: each is a full member
        specs.append(MemberSpec("full", "full", splits.train, ft.seed, ft.learning_rate))
    return specs


def check_domains(cfg: ExperimentConfig, splits: SplitData) -> list[str]:
    """The domains of finetune.strategy=domains, in data.datasets order, refusing in one line a domain that a
    split lacks or whose training rows miss a class after the label mapping (its specialist could never predict
    it, and retention on that domain would be undefined)."""
    names = [d.name for d in cfg.data.datasets]
    if len(names) < 2:
        raise MllmError(f"finetune.strategy=domains needs two or more datasets, got {names}",
                        "add datasets to data.datasets or use strategy shards/seeds")
    for i, name in enumerate(names):
        for split in ("train", "validation", "test"):
            if not (splits.split(split)["domain"] == name).any():
                raise MllmError(f"data.datasets[{i}] ({name}): no rows in the {split} split",
                                "add rows to that dataset, or raise data.max_rows, data.val_fraction or "
                                "data.test_fraction")
        counts = splits.train.loc[splits.train["domain"] == name, "label"].value_counts()
        missing = [label for j, label in enumerate(splits.label_names) if counts.get(j, 0) == 0]
        if missing:
            raise MllmError(f"data.datasets[{i}] ({name}): no {'/'.join(missing)} rows in training after mapping "
                            f"to {cfg.data.label_scheme}",
                            "fix data.sentiment_cuts or that dataset's label_kind, add such rows, or drop the domain")
    return names


def base_key(cfg: ExperimentConfig, label_names: tuple[str, ...]) -> str:
    """Identity of the base classifier: pretrained body, revision, labels, head seed, mllm version."""
    return short_hash([cfg.model.name_or_path, cfg.model.revision, label_names, cfg.finetune.seed, __version__])


def member_key(cfg: ExperimentConfig, spec: MemberSpec, base: str, fingerprint: str, code: str) -> str:
    """Identity of a member: a registered version with the same key is reused instead of retrained. It covers the
    member's own training rows (a different `finetune.members` gives shard-i other rows), the member count and the
    resolved precision (a bf16 member is not an fp32 member; auto keys as what it resolves to)."""
    ft = cfg.finetune.model_dump(mode="json", exclude={"include_full", "learning_rates", "strategy"})
    rows = short_hash(spec.rows[["text", "label"]].to_numpy().tolist())
    return short_hash([base, fingerprint, spec.name, spec.strategy, spec.seed, spec.learning_rate, ft, rows,
                       cfg.model.max_length, resolve_precision(cfg.model), code])


def select(specs: list[MemberSpec], names: list[str] | None, extra: tuple[str, ...] = ()) -> list[MemberSpec]:
    """The members named (all when None), refusing unknown names in one line (`extra`: other names allowed)."""
    unknown = sorted(set(names or []) - {s.name for s in specs} - set(extra))
    if unknown:
        raise MllmError(f"--member {', '.join(unknown)}: no such member",
                        f"choose from {', '.join(s.name for s in specs)}")
    return [s for s in specs if not names or s.name in names]


def run(cfg: ExperimentConfig, members: list[str] | None = None, *, parent_run_id: str | None = None,
        base_only: bool = False, force: bool = False, progress: bool = True, store: Store | None = None
        ) -> FinetuneResult:
    """Build/reuse the base, then train (or reuse) each selected member; return their registered versions.
    `parent_run_id`: nest the member runs under a run started elsewhere (a Slurm array) instead of a new one."""
    check_pretrained(cfg.model)  # before any run is opened
    resolve_precision(cfg.model)  # refuses bf16 on a device without it, before any run too
    bigger = bigger_needs_training(cfg.model.bigger_model) and not base_only and (not members or BIGGER in members)
    if bigger:
        check_pretrained(cfg.bigger_config().model)
    splits = load_splits(cfg.data)
    specs = select(plan_members(cfg, splits), members, (BIGGER,) if bigger_needs_training(cfg.model.bigger_model)
                   else ())
    store = store or Store(cfg)

    def stage(parent: str) -> FinetuneResult:
        base_dir, base_version = ensure_base(cfg, splits, store, members=not base_only and bool(specs))
        # Members with frozen embeddings + lowest layers share them: validation computes them once (mllm.models.prefix).
        depth = cfg.finetune.freeze_layers if cfg.finetune.freeze_embeddings else 0
        prefix = PrefixCache(depth)
        # ... and so do their training examples' frozen states (seed members, the full member after the shards).
        examples = ExampleCache(depth)
        outcomes = [] if base_only else [member(cfg, s, splits, base_dir, base_version, parent, store, force=force,
                                                progress=progress, prefix=prefix, examples=examples) for s in specs]
        if bigger:
            outcomes.append(train_bigger(cfg, splits, parent, store, force=force, progress=progress))
        return FinetuneResult(base_dir, store.model_uri("base", base_version), parent, outcomes, splits.fingerprint)

    if parent_run_id:
        return stage(parent_run_id)
    with store.run("finetune", stage="finetune", tags={"mllm.dataset_fingerprint": splits.fingerprint}) as run_:
        run_.params({f"split.{k}": len(splits.split(k)) for k in ("train", "validation")})  # training reads no more
        run_.inputs({"train": splits.train, "validation": splits.validation}, cfg.name, splits.fingerprint)
        return stage(run_.id)


def member_bytes(base_dir: Path) -> int:
    """About the most one member's training holds in output_dir at once (an upper bound: frozen layers have no
    optimiser state): two checkpoints while the newer replaces the older, each the fp32 weights and AdamW's two
    moments (3x the weights), the best weights, and the final model (weights + tokenizer), which stays."""
    weights = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    return 6 * weights + folder_bytes(base_dir)


def ensure_base(cfg: ExperimentConfig, splits: SplitData, store: Store, members: bool = True) -> tuple[Path, str]:
    """The base checkpoint folder and its registered version: reused by key, else built and registered (`members`:
    members will be trained from it, so a disk too small for one member's training refuses before registering)."""
    key = base_key(cfg, splits.label_names)
    local = cfg.output_dir / "base"

    version = store.find("base", key)
    if version is None:
        space = DiskSpace(cfg.output_dir, "building the base classifier")
        with space:
            build_base(cfg.model, splits.label_names, cfg.finetune.seed, local)
            update_source(local, base_key=key)
        if members:  # sized by the base just written; before anything is registered
            space.need(member_bytes(local), "fine-tuning a member")
        tags = VersionTags(base_key=key, pretrained=cfg.model.name_or_path, labels=tuple(splits.label_names),
                           seed=cfg.finetune.seed)
        with space, store.run("base", stage="base", tags={"mllm.base_key": key}, log_config=False) as run_:
            version = store.register("base", run_, local, tags.as_tags(),
                                     description=f"**Shared base classifier**: `{cfg.model.name_or_path}` with one "
                                     f"seeded head (seed {cfg.finetune.seed}) for {', '.join(splits.label_names)}; "
                                     "every member is fine-tuned from it and task vectors are taken against it.",
                                     examples=splits.examples())
    elif read_source(local).get("base_key") != key:
        local = store.download(store.model_uri("base", version.version),
                               cfg.output_dir / "downloads" / f"base-{key}")
    return local, str(version.version)


def train_bigger(cfg: ExperimentConfig, splits: SplitData, parent: str | None, store: Store, *, force: bool = False,
                 progress: bool = True) -> MemberOutcome:
    """model.bigger_model (a pretrained body) fine-tuned on all training rows, registered as `<experiment>-bigger`.
    Its base (the body + a seeded head) stays a local folder: it is not the members' base, and task vectors are
    never taken against it."""
    big = cfg.bigger_config()
    key = base_key(big, splits.label_names)
    base_dir = cfg.output_dir / "bigger-base" / key
    if not base_dir.exists() or read_source(base_dir).get("base_key") != key:
        build_base(big.model, splits.label_names, big.finetune.seed, base_dir)
        update_source(base_dir, base_key=key)
    spec = MemberSpec(BIGGER, "full", splits.train, big.finetune.seed, big.finetune.learning_rate)
    return member(big, spec, splits, base_dir, f"{cfg.model.bigger_model}:{key}", parent, store, force=force,
                  progress=progress, role="bigger")


def member(cfg: ExperimentConfig, spec: MemberSpec, splits: SplitData, base_dir: Path, base_version: str,
           parent: str | None, store: Store, *, force: bool = False, progress: bool = True,
           prefix: Any = None, examples: Any = None, role: Role = "member") -> MemberOutcome:
    """Train one member (or reuse the registered version with the same key) and register it (`role`: member, or
    bigger for model.bigger_model)."""
    key = member_key(cfg, spec, base_version, splits.fingerprint, git_sha())
    version = None if force else store.find(role, key)
    if version is not None:
        uri = store.model_uri(role, version.version)
        print(f"finetune {spec.name}: reusing {uri} (same config, data, base and code)")
        return MemberOutcome(spec.name, uri, str(version.version), version.run_id, VersionTags.of(version).val, 0.0,
                             True)
    precision = resolve_precision(cfg.model)
    run_tags = {"mllm.member": spec.name, "mllm.strategy": spec.strategy, "mllm.member_key": key,
                "mllm.base_version": base_version, "mllm.dataset_fingerprint": splits.fingerprint,
                "mllm.precision": precision}
    space = DiskSpace(cfg.output_dir, f"fine-tuning {spec.name}")
    space.need(member_bytes(base_dir))  # before the member's run opens
    with space, store.run(spec.name, stage="finetune-member", parent_run_id=parent, tags=run_tags) as run_:
        result = _train(cfg, spec, splits, base_dir, key, run_, force, progress, prefix, examples)
        update_source(result.model_dir, base_key=base_key(cfg, splits.label_names), base_version=base_version,
                      precision=precision)
        tags = VersionTags(member=spec.name, strategy=spec.strategy, shard=spec.shard, domain=spec.domain,
                           seed=spec.seed, learning_rate=spec.learning_rate, base_version=base_version,
                           dataset_fingerprint=splits.fingerprint, member_key=key, precision=precision,
                           pretrained=cfg.model.name_or_path if role == "bigger" else None,
                           val={k: round(v, 6) for k, v in result.best.items() if k != "step"})
        version = store.register(role, run_, result.model_dir, tags.as_tags(),
                                 description=member_description(cfg, spec, base_version, result.best),
                                 examples=splits.examples(), title=spec.name)
    uri = store.model_uri(role, version.version)
    work = cfg.output_dir / "members" / spec.name
    # Registered: the crash-recovery state has served its purpose (the final weights stay in work/final).
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    (work / "best.safetensors").unlink(missing_ok=True)
    print(f"finetune {spec.name}: val macro-F1 {result.best.get('macro_f1', float('nan')):.4f}, "
          f"{result.wall_s:.1f} s -> {uri}")
    return MemberOutcome(spec.name, uri, str(version.version), run_.id,
                         {k: v for k, v in result.best.items() if k != "step"}, result.wall_s, False)


def member_description(cfg: ExperimentConfig, spec: MemberSpec, base_version: str, best: dict[str, float]) -> str:
    what = {"shards": f"shard {spec.shard}", "seeds": f"seed {spec.seed}", "domains": f"domain {spec.domain}",
            "full": "all training rows"}[spec.strategy]
    source = (f"`{cfg.model.name_or_path}` with a seeded head (the bigger model; not merged)" if spec.name == BIGGER
              else f"`{cfg.name}-base` version {base_version}")
    return (f"**Member {spec.name}** ({what}, {len(spec.rows)} training reviews, learning rate {spec.learning_rate:g}),"
            f" fine-tuned from {source}.\n\n"
            f"- validation macro-F1 {best.get('macro_f1', float('nan')):.4f}, accuracy "
            f"{best.get('accuracy', float('nan')):.4f} (best evaluation, step {int(best.get('step', 0))})")


def member_validation(spec: MemberSpec, splits: SplitData) -> pd.DataFrame:
    """The validation rows a member keeps its best weights on: a domain specialist its own domain's (it is judged
    there, so choosing on other domains would understate it and flatter every merge's retention), every other
    member the whole validation split."""
    if spec.strategy == "domains":
        return splits.validation[splits.validation["domain"] == spec.domain].reset_index(drop=True)
    return splits.validation


def _train(cfg: ExperimentConfig, spec: MemberSpec, splits: SplitData, base_dir: Path, key: str, run_: Any,
           force: bool, progress: bool, prefix: Any, examples: Any = None) -> Any:
    """The member's training inside its run: params, inputs, per-step metrics, summary."""
    run_.params({"member.name": spec.name, "member.seed": spec.seed, "member.shard": spec.shard,
                 "member.learning_rate": spec.learning_rate, "member.domain": spec.domain,
                 "member.train_rows": len(spec.rows), "precision": resolve_precision(cfg.model)})
    validation = member_validation(spec, splits)
    run_.inputs({"train": spec.rows, "validation": validation}, f"{cfg.name}-{spec.name}", splits.fingerprint)
    logger = run_.metric_logger()
    work = cfg.output_dir / "members" / spec.name
    if force:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    result = train_member(
        base_dir, spec.rows["text"].tolist(), spec.rows["label"].to_numpy(), validation["text"].tolist(),
        validation["label"].to_numpy(), cfg.finetune, cfg.model, work, seed=spec.seed,
        learning_rate=spec.learning_rate, key=key, log=logger, progress=progress, name=spec.name, prefix=prefix,
        example_cache=examples,
    )
    logger.flush()
    run_.params({f"member.class_weight.{name}": round(w, 6)
                 for name, w in zip(splits.label_names, result.class_weights, strict=True)})
    run_.metrics({"wall_s": result.wall_s, "train_samples_per_s": result.train_samples_per_s, "steps": result.steps,
                  "resumed_from_step": result.resumed_from, **{f"best_val_{k}": v for k, v in result.best.items()}})
    run_.tags({"mllm.stopped_early": result.stopped_early, "mllm.resumed_from_step": result.resumed_from})
    return result


def bigger_uri(cfg: ExperimentConfig, store: Store) -> str:
    """model.bigger_model as a scoreable URI: a classifier as given (checked), or for a pretrained body the newest
    `<experiment>-bigger` version fine-tuned from it (mllm finetune trains it)."""
    name = cfg.model.bigger_model
    assert name is not None
    if not bigger_needs_training(name):
        store.check_uri(name, "model.bigger_model")
        return name
    precision = resolve_precision(cfg.model)  # a bf16 bigger model is compared in bf16, an fp32 one in fp32
    found = store.newest("bigger", {"pretrained": name, "dataset_fingerprint": load_splits(cfg.data).fingerprint,
                                    "precision": precision})
    if found is None:
        raise MllmError(f"model.bigger_model={name} is a pretrained body that has not been fine-tuned in experiment "
                        f"{cfg.name} at model.precision={precision}", "run mllm finetune (it trains the bigger model "
                        "on all training rows), or give a classifier URI")
    return store.model_uri("bigger", found.version)
