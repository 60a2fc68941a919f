"""Merging members into one classifier through mergekit's Python API (`MergeConfiguration`, `run_merge`).

    from mllm.merge import merge_models
    merge_models(cfg.merge, [member_a, member_b, member_c], base_dir, out_dir)

The shared base classifier is mergekit's `base_model` for every method that merges task vectors
(member - base). `normalize` is always passed explicitly (mergekit's default differs by method), paths are
absolute and the model card is off (a relative path makes the card step query the hub), and the merged
folder gets the base's tokenizer. Members are checked before any work: same architecture, hidden size,
layers, vocabulary, labels, and descent from the given base. regmean, mllm's own method, is merged without mergekit
(mllm.merging.regmean: it reads each member's training rows) and saved the same way, with `regmean_config.yml`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.basics import atomic_dir, folder_bytes, publish_dir, short_hash
from mllm.config.schema import ExperimentConfig, MergeConfig, MergeMethod
from mllm.data.splits import load_splits
from mllm.errors import DiskSpace, MllmError, ModelError
from mllm.merging.inmemory import MemberStack
from mllm.merging.methods import OWN_METHODS, info
from mllm.merging.regmean import GramSource, member_grams, member_rows
from mllm.models.modeling import check_classifier, read_source, resolve_device, write_source
from mllm.tracking.runs import git_sha
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

# Config keys that must agree between members and the base (label names are compared separately).
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size",
              "num_attention_heads", "intermediate_size")


def check_members(members: Sequence[Path], base: Path | None, method: MergeMethod, field: str = "--member",
                  base_field: str = "--base") -> None:
    """Refuse, in one line, members that cannot be merged with each other or with the base. `field` and
    `base_field` name where the members and the base came from (CLI options or registered models)."""
    if len(members) < 1:
        raise MllmError("no members to merge", "finetune members first (mllm finetune) or pass --member")
    how = info(method)
    if how.exactly_two and len(members) != 2:
        raise MllmError(f"merge.method={method} merges exactly two members, got {len(members)}",
                        "pass two members or choose another method")
    if len(members) < how.min_members:
        raise MllmError(f"merge.method={method} needs at least {how.min_members} members, got {len(members)}",
                        "add members or choose another method")
    if how.needs_base and base is None:
        raise MllmError(f"merge.method={method} needs the base checkpoint", "pass the base (models:/<exp>-base/N)")
    paths = [*members, *([base] if base is not None else [])]
    fields = [field] * len(members) + [base_field] * (base is not None)
    tokenizer_from = base if base is not None else members[0]  # the merged folder gets this tokenizer
    configs = [check_classifier(p, f, tokenizer=p == tokenizer_from) for p, f in zip(paths, fields, strict=True)]
    names = [p.name for p in paths]
    ref = configs[0]
    for name, f, c in zip(names[1:], fields[1:], configs[1:], strict=True):
        for key in SHAPE_KEYS:
            if ref.get(key) != c.get(key):
                raise ModelError(f"{f}: {name} differs from {names[0]} in {key} ({c.get(key)} vs {ref.get(key)})",
                                 "merge only members fine-tuned from the same base classifier")
        if ref.get("architectures") != c.get("architectures"):
            raise ModelError(f"{f}: {name} is a {c.get('architectures')}, {names[0]} a {ref.get('architectures')}",
                             "merge only members of the same architecture")
        labels = [str(v) for _, v in sorted((int(k), v) for k, v in c.get("id2label", {}).items())]
        ref_labels = [str(v) for _, v in sorted((int(k), v) for k, v in ref.get("id2label", {}).items())]
        if len(labels) != len(ref_labels):
            raise ModelError(f"{f}: {name} has {len(labels)} labels, {names[0]} has {len(ref_labels)}",
                             "merge only members trained for the same label scheme")
        if labels != ref_labels:
            raise ModelError(f"{f}: {name} has labels {labels}, {names[0]} has {ref_labels}",
                             "merge only members trained for the same label scheme")
    base_key = read_source(base).get("base_key") if base is not None else None
    if base_key:  # lineage is known when mllm wrote the folders (mllm-source.json)
        for p in members:
            src = read_source(p)
            if src.get("base_key") not in (None, base_key):
                raise ModelError(f"{field}: {p.name} was fine-tuned from another base ({src.get('base_key')})",
                                 "merge members of one fine-tune stage with their own base")


def check_weights(recipe: MergeConfig, members: int) -> None:
    if recipe.weights is not None and len(recipe.weights) != members:
        raise MllmError(f"merge.weights has {len(recipe.weights)} values for {members} members",
                        "give one weight per member, or leave merge.weights unset for equal weights")
    for group in recipe.groups or []:
        if len(group.weights) != members:
            raise MllmError(f"merge.groups ({group.name}) has {len(group.weights)} weights for {members} members",
                            "give one weight per member in every group")


def merge_configuration(recipe: MergeConfig, members: Sequence[Path], base: Path | None) -> Any:
    """The mergekit `MergeConfiguration` for `recipe` over `members` (absolute paths)."""
    from mergekit.config import MergeConfiguration

    method, how = recipe.method, info(recipe.method)
    check_weights(recipe, len(members))
    weights = recipe.weights or [1.0] * len(members)
    models = []
    for i, (path, weight) in enumerate(zip(members, weights, strict=True)):
        values: dict[str, Any] = {"weight": float(weight), "density": recipe.density, "gamma": recipe.gamma,
                                  "epsilon": recipe.epsilon}
        if recipe.groups:  # layer groups: mergekit's conditional parameters (first filter in the name wins)
            values["weight"] = [{"filter": f, "value": float(g.weights[i])} for g in recipe.groups
                                for f in g.filters] + [{"value": float(weight)}]
            values["density"] = [{"filter": f, "value": g.density} for g in recipe.groups if g.density is not None
                                 for f in g.filters] + [{"value": recipe.density}]
        params = {k: v for k, v in values.items() if how.uses(k)}
        models.append({"model": str(path.resolve()), "parameters": params or None})
    shared: dict[str, Any] = {}
    for key, value in (("normalize", recipe.normalize), ("lambda", recipe.lambda_), ("t", recipe.t)):
        if how.uses(key) and (key != "t" or method == "slerp"):  # nuslerp's t: mergekit's default
            shared[key] = value
    spec: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "float32",
                            "parameters": shared or None}
    if method == "slerp":
        spec["base_model"] = str(members[0].resolve())  # slerp interpolates from its base_model to the other
    elif how.needs_base or (method == "nuslerp" and base is not None):
        assert base is not None  # check_members refused a missing base
        spec["base_model"] = str(base.resolve())
    return MergeConfiguration.model_validate(spec)


def merge_models(recipe: MergeConfig, members: Sequence[Path], base: Path | None, out: Path,
                 device: str = "cpu", grams: GramSource | None = None) -> tuple[Path, str]:
    """Merge with mergekit (regmean: with mllm, from `grams`, the members' training rows) into `out` (complete or
    absent); return the folder and the merge's YAML (mergekit's, or regmean_config.yml)."""
    check_members(members, base, recipe.method)
    if recipe.method == "regmean":
        return merge_regmean(recipe, members, base, out, device, grams)
    import yaml
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = merge_configuration(recipe, members, base)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, trust_remote_code=False, quiet=True,
                           random_seed=recipe.seed if info(recipe.method).random else None, device=device,
                           safe_serialization=True)
    tokenizer_from = base or members[0]
    with atomic_dir(out) as tmp:
        try:
            run_merge(config, tmp, options)
        except (RuntimeError, ValueError) as e:
            raise MllmError(f"mergekit refused the {recipe.method} merge ({str(e).splitlines()[0]})",
                            "check merge.* parameters for this method") from None
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from, trust_remote_code=False).save_pretrained(tmp)
        (Path(tmp) / "mergekit_config.yml").write_text(text)
        write_source(Path(tmp), role="merged", method=recipe.method, members=[str(m) for m in members],
                     base=str(base) if base else None, recipe=recipe.model_dump(mode="json", by_alias=True),
                     base_key=read_source(base).get("base_key") if base else None)
        publish_dir(tmp, out)
    return out, text


def merge_regmean(recipe: MergeConfig, members: Sequence[Path], base: Path | None, out: Path, device: str,
                  grams: GramSource | None) -> tuple[Path, str]:
    """RegMean of `members` into `out`: the members resident around the base (MemberStack), each one's Gram
    matrices (cached), the merged classifier saved with save_pretrained (safetensors, fp32)."""
    import yaml
    from transformers import AutoTokenizer

    if grams is None:
        raise MllmError("merge.method=regmean needs the members' training rows",
                        "merge with mllm merge (merge.run finds each member's rows), or pass grams=GramSource(...)")
    if base is None:
        raise MllmError("merge.method=regmean needs the base checkpoint", "pass the base (models:/<exp>-base/N)")
    check_weights(recipe, len(members))
    stack = MemberStack(base, members, device)
    stack.set_grams(member_grams(members, grams, recipe.regmean_rows, stack.unchanged, stack.device))
    model = stack.model()
    stack.merge_into(model, recipe)
    spec = {"merge_method": "regmean", "regmean_alpha": recipe.regmean_alpha, "regmean_rows": recipe.regmean_rows,
            "weights": [float(w) for w in recipe.weights or [1.0] * len(members)],
            "groups": [g.model_dump(mode="json") for g in recipe.groups] if recipe.groups else None,
            "members": [str(m.resolve()) for m in members], "base": str(base.resolve()), "dtype": "float32"}
    text = yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False)
    with atomic_dir(out) as tmp:
        model.to("cpu").float().save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base, trust_remote_code=False).save_pretrained(tmp)
        (Path(tmp) / "regmean_config.yml").write_text(text)
        write_source(Path(tmp), role="merged", method=recipe.method, members=[str(m) for m in members],
                     base=str(base), recipe=recipe.model_dump(mode="json", by_alias=True),
                     base_key=read_source(base).get("base_key"))
        publish_dir(tmp, out)
    return out, text


@dataclass(frozen=True)
class MergeResult:
    model_uri: str  # models:/<experiment>-merged/<version>
    version: str
    run_id: str
    method: str
    parents: list[str]  # model URIs of the merged members
    base_uri: str | None
    local_dir: Path | None  # None when an identical registered merge was reused
    reused: bool = False


def registered_members(store: Store) -> tuple[str, list[str]]:
    """(base URI, member URIs): the newest base, and the newest version of each member fine-tuned from it
    (the `full` reference member excluded)."""
    base = store.newest("base")
    if base is None:
        raise MllmError(f"no registered {store.model_name('base')} model",
                        f"run mllm finetune for experiment {store.experiment} first")
    newest: dict[str, Any] = {}
    for v in store.find_versions(store.model_name("member"), {"base_version": str(base.version)}):
        newest.setdefault(VersionTags.of(v).member, v)  # versions come newest first
    members = [store.model_uri("member", v.version) for name, v in sorted(newest.items()) if name != "full"]
    if not members:
        raise MllmError(f"no members of {store.model_name('member')} descend from {store.model_name('base')} "
                        f"version {base.version}", "run mllm finetune first, or pass --member URIs")
    return store.model_uri("base", base.version), members


def merge_description(recipe: MergeConfig, members: Sequence[str], base: str | None,
                      tags: dict[str, Any] | None) -> str:
    how = info(recipe.method)
    weights = [round(w, 3) for w in recipe.weights] if recipe.weights else "equal"
    shown = (("density", "density", recipe.density), ("lambda", "lambda", recipe.lambda_),
             ("regmean_alpha", "alpha", recipe.regmean_alpha), ("regmean_rows", "rows per member", recipe.regmean_rows))
    parts = [f"weights {weights}"] + [f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}"
                                      for k, label, v in shown if how.uses(k)]
    engine = "mllm" if recipe.method in OWN_METHODS else "mergekit"
    lines = [f"**{recipe.method} merge** ({', '.join(parts)}; {engine})", "",
             f"- parents: {', '.join(f'`{m}`' for m in members)}", f"- base: `{base}`" if base else ""]
    for g in recipe.groups or []:
        density = f", density {g.density:.3g}" if g.density is not None and how.uses("density") else ""
        lines.append(f"- layer group {g.name}: weights {[round(w, 3) for w in g.weights]}{density}")
    if tags and "trial" in tags:
        lines.append(f"- search: study `{tags.get('study')}` trial {tags['trial']}, validation macro-F1 "
                     f"{tags.get('val_macro_f1')}")
    return "\n".join(line for line in lines if line is not None)


def merge_key(recipe: MergeConfig, members: Sequence[str], base: str | None, code: str,
              inputs: str | None = None) -> str:
    """Identifies a merge: recipe, parents, base and code version (an equal key is an equal merge). regmean's
    fields count for regmean only (a ties merge is the same whatever merge.regmean_alpha says); `inputs`: what else
    the merge read (regmean: a hash of the members' rows and model.max_length)."""
    unread = set() if recipe.method == "regmean" else {"regmean_rows", "regmean_alpha"}
    spec = {"recipe": recipe.model_dump(mode="json", by_alias=True, exclude=unread), "members": list(members),
            "base": base, "code": code, **({"inputs": inputs} if inputs else {})}
    return short_hash(spec, 20)


def version_tags(recipe: MergeConfig, members: Sequence[str], base: str | None, key: str) -> VersionTags:
    """What a merged version records about its recipe (regmean's rows and alpha for regmean merges only)."""
    regmean = recipe.method == "regmean"
    return VersionTags(
        method=recipe.method, parents=tuple(members), base=base or "", weights=recipe.weights,
        density=recipe.density, lambda_=recipe.lambda_, normalize=recipe.normalize, seed=recipe.seed,
        regmean_rows=recipe.regmean_rows if regmean else None, regmean_alpha=recipe.regmean_alpha if regmean else None,
        merge_key=key, groups=[g.model_dump(mode="json", exclude={"filters"}) for g in recipe.groups or []] or None)


def run(cfg: ExperimentConfig, members: list[str] | None = None, base: str | None = None,
        tags: dict[str, Any] | None = None, force: bool = False, store: Store | None = None,
        recipe: MergeConfig | None = None) -> MergeResult:
    """Merge registered (or given) members with `recipe` (by default `cfg.merge`), log the mergekit YAML (regmean:
    regmean_config.yml), register the result. An identical merge (same recipe, parents, base and code version)
    already registered is reused. regmean reads each member's training rows, found before any run is opened."""
    store = store or Store(cfg)
    given, recipe = bool(members), recipe or cfg.merge
    for uri in [*(members or []), *([base] if base else [])]:  # before any download or run (check_members,
        store.check_uri(uri, "--member" if uri != base else "--base", tokenizer=False)  # below: the tokenizer)
    base_uri, members = (base, list(members or [])) if given else registered_members(store)
    base_uri = base or base_uri
    rows = member_rows(cfg, store, members) if recipe.method == "regmean" else None  # refused here, not in a run
    space = DiskSpace(cfg.output_dir, f"merging with {recipe.method}")
    with space:  # downloads land in output_dir too
        member_dirs = [store.download(uri) for uri in members]
        base_dir = store.download(base_uri) if base_uri else None
    # Before a run is opened: bad input leaves no trace.
    check_members(member_dirs, base_dir, recipe.method,
                  "--member" if given else f"{store.model_name('member')} member",
                  "--base" if base else store.model_name("base"))
    check_weights(recipe, len(member_dirs))
    inputs = None if rows is None else short_hash([[r[:recipe.regmean_rows] for r in rows], cfg.model.max_length])
    key = merge_key(recipe, members, base_uri, git_sha(), inputs)
    version = None if force else store.find("merged", key)
    if version is not None:
        print(f"merge {recipe.method}: reusing {store.model_name('merged')} version {version.version} "
              "(same recipe, parents, code)")
        return MergeResult(store.model_uri("merged", version.version), str(version.version), version.run_id,
                           recipe.method, list(members), base_uri, None, reused=True)
    run_tags = {"mllm.merge_method": recipe.method, "mllm.parents": ",".join(members), "mllm.base": base_uri or "",
                **{f"mllm.{k}": v for k, v in (tags or {}).items()}}
    logged = cfg if recipe is cfg.merge else cfg.model_copy(update={"merge": recipe})  # the run's config: its recipe
    space.need(folder_bytes(member_dirs[0]))  # the merged model: a member's size (fp32 weights, tokenizer)
    with space, store.run(f"merge-{recipe.method}", stage="merge", tags=run_tags, config=logged) as run_:
        folder, yaml_text = merge_models(recipe, member_dirs, base_dir, cfg.output_dir / "merged" / run_.id,
                                         device=resolve_device(cfg.model)[0].type,
                                         grams=None if rows is None else GramSource.of(cfg, rows))
        run_.text(yaml_text, "regmean_config.yml" if recipe.method == "regmean" else "mergekit_config.yml")
        written = version_tags(recipe, members, base_uri, key)
        version = store.register("merged", run_, folder, {**written.as_tags(), **(tags or {})},
                                 description=merge_description(recipe, members, base_uri, tags),
                                 examples=load_splits(cfg.data).examples(),  # the input example logged with it
                                 title=recipe.method + (f" trial {tags['trial']}" if tags and "trial" in tags else ""))
    return MergeResult(store.model_uri("merged", version.version), str(version.version), version.run_id,
                       recipe.method, list(members), base_uri, folder)
