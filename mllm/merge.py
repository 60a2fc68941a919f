"""Merging members into one classifier through mergekit's Python API (`MergeConfiguration`, `run_merge`).

    from mllm.merge import merge_models
    merge_models(cfg.merge, [member_a, member_b, member_c], base_dir, out_dir)

The shared base classifier is mergekit's `base_model` for every method that merges task vectors
(member - base). `normalize` is always passed explicitly (mergekit's default differs by method), paths are
absolute and the model card is off (a relative path makes the card step query the hub), and the merged
folder gets the base's tokenizer. Members are checked before any work: same architecture, hidden size,
layers, vocabulary, labels, and descent from the given base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm.config import MergeConfig, MergeMethod
from mllm.errors import MllmError, ModelError
from mllm.modeling import SOURCE_FILE, atomic_dir, check_local_checkpoint, publish_dir, write_source

# What each method reads, after mergekit 0.1.5's method specs (mergekit/merge_methods/).
TASK_VECTOR = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear"}
USES_DENSITY = TASK_VECTOR - {"task_arithmetic"}
USES_GAMMA = {"breadcrumbs", "breadcrumbs_ties"}
USES_EPSILON = {"della", "della_linear"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
NEEDS_BASE = TASK_VECTOR | {"model_stock", "sce"}
WEIGHTED = TASK_VECTOR | {"linear", "nuslerp"}
HAS_NORMALIZE = TASK_VECTOR | {"linear"}
EXACTLY_TWO = {"slerp", "nuslerp"}
MIN_MEMBERS = {"model_stock": 2}
# Config keys that must agree between members and the base (label names are compared separately).
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size",
              "num_attention_heads", "intermediate_size")


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def check_members(members: Sequence[Path], base: Path | None, method: MergeMethod) -> None:
    """Refuse, in one line, members that cannot be merged with each other or with the base."""
    if len(members) < 1:
        raise MllmError("no members to merge", "finetune members first (mllm finetune) or pass --members")
    if method in EXACTLY_TWO and len(members) != 2:
        raise MllmError(f"merge.method={method} merges exactly two members, got {len(members)}",
                        "pass two members or choose another method")
    if len(members) < MIN_MEMBERS.get(method, 1):
        raise MllmError(f"merge.method={method} needs at least {MIN_MEMBERS[method]} members, got {len(members)}",
                        "add members or choose another method")
    if method in NEEDS_BASE and base is None:
        raise MllmError(f"merge.method={method} needs the base checkpoint", "pass the base (models:/<exp>-base/N)")
    paths = [*members, *([base] if base is not None else [])]
    for p in paths:
        check_local_checkpoint(p, "merge member")
    configs = [read_config(p) for p in paths]
    names = [p.name for p in paths]
    ref = configs[0]
    for name, c in zip(names[1:], configs[1:], strict=True):
        for key in SHAPE_KEYS:
            if ref.get(key) != c.get(key):
                raise ModelError(f"{name} differs from {names[0]} in {key} ({c.get(key)} vs {ref.get(key)})",
                                 "merge only members fine-tuned from the same base classifier")
        if ref.get("architectures") != c.get("architectures"):
            raise ModelError(f"{name} is a {c.get('architectures')}, {names[0]} a {ref.get('architectures')}",
                             "merge only members of the same architecture")
        labels = [str(v) for _, v in sorted((int(k), v) for k, v in c.get("id2label", {}).items())]
        ref_labels = [str(v) for _, v in sorted((int(k), v) for k, v in ref.get("id2label", {}).items())]
        if len(labels) != len(ref_labels):
            raise ModelError(f"{name} has {len(labels)} labels, {names[0]} has {len(ref_labels)}",
                             "merge only members trained for the same label scheme")
        if labels != ref_labels:
            raise ModelError(f"{name} has labels {labels}, {names[0]} has {ref_labels}",
                             "merge only members trained for the same label scheme")
    if base is not None:
        base_src = _source(base)
        for p in members:
            src = _source(p)
            parent = src.get("base")
            if parent is not None and base_src.get("base_key") and src.get("base_key") not in (None,
                                                                                              base_src["base_key"]):
                raise ModelError(f"{p.name} was fine-tuned from another base ({src.get('base_key')})",
                                 "merge members of one fine-tune stage with their own base")


def _source(path: Path) -> dict[str, Any]:
    record = path / SOURCE_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def merge_configuration(recipe: MergeConfig, members: Sequence[Path], base: Path | None) -> Any:
    """The mergekit `MergeConfiguration` for `recipe` over `members` (absolute paths)."""
    from mergekit.config import MergeConfiguration

    method = recipe.method
    weights = recipe.weights or [1.0] * len(members)
    if len(weights) != len(members):
        raise MllmError(f"merge.weights has {len(weights)} values for {len(members)} members",
                        "give one weight per member, or leave merge.weights unset for equal weights")
    models = []
    for path, weight in zip(members, weights, strict=True):
        params: dict[str, Any] = {}
        if method in WEIGHTED:
            params["weight"] = float(weight)
        if method in USES_DENSITY:
            params["density"] = recipe.density
        if method in USES_GAMMA:
            params["gamma"] = recipe.gamma
        if method in USES_EPSILON:
            params["epsilon"] = recipe.epsilon
        models.append({"model": str(path.resolve()), "parameters": params or None})
    shared: dict[str, Any] = {}
    if method in HAS_NORMALIZE:
        shared["normalize"] = recipe.normalize
    if method in TASK_VECTOR:
        shared["lambda"] = recipe.lambda_
    if method == "slerp":
        shared["t"] = recipe.t
    spec: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "float32",
                            "parameters": shared or None}
    if method == "slerp":
        spec["base_model"] = str(members[0].resolve())  # slerp interpolates from its base_model to the other
    elif method in NEEDS_BASE or (method == "nuslerp" and base is not None):
        assert base is not None  # check_members refused a missing base
        spec["base_model"] = str(base.resolve())
    return MergeConfiguration.model_validate(spec)


def merge_models(recipe: MergeConfig, members: Sequence[Path], base: Path | None, out: Path,
                 device: str = "cpu") -> tuple[Path, str]:
    """Merge with mergekit into `out` (complete or absent); return the folder and the mergekit YAML."""
    import yaml
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    check_members(members, base, recipe.method)
    config = merge_configuration(recipe, members, base)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, trust_remote_code=False, quiet=True,
                           random_seed=recipe.seed if recipe.method in RANDOM else None, device=device,
                           safe_serialization=True)
    tokenizer_from = base or members[0]
    with atomic_dir(out) as tmp:
        try:
            run_merge(config, tmp, options)
        except (RuntimeError, ValueError) as e:
            raise MllmError(f"mergekit refused the {recipe.method} merge ({str(e).splitlines()[0]})",
                            "check merge.* parameters for this method") from None
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
        (Path(tmp) / "mergekit_config.yml").write_text(text)
        write_source(Path(tmp), role="merged", method=recipe.method, members=[str(m) for m in members],
                     base=str(base) if base else None, recipe=recipe.model_dump(mode="json", by_alias=True),
                     base_key=_source(base).get("base_key") if base else None)
        publish_dir(tmp, out)
    return out, text
