"""The tags of a registered version, typed: the stage that registers a version writes them through `VersionTags`
(`as_tags`), every later stage reads them back through it (`VersionTags.of`), so no stage parses tag strings by hand.

A registry stores strings only: `str(value)`, lists as JSON, tuples comma-joined, fields left at None not written
(an older mllm wrote them as "None", which reads back as None). Keys that are not fields here (promotion notes,
an ensemble's `member_<i>` lines, a search's `trial` notes) stay in `extra`, written and read as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

LISTS = {"weights", "groups"}  # JSON in the registry
TUPLES = {"parents": ",", "members": ",", "labels": ","}  # joined in the registry


@dataclass(frozen=True)
class VersionTags:
    """What a registered version says about itself: lineage, recipe, reuse key and validation scores."""

    # lineage
    member: str | None = None  # a member's name (shard-0, seed-1, full, bigger)
    strategy: str | None = None
    shard: int | None = None
    domain: str | None = None
    seed: int | None = None
    learning_rate: float | None = None
    base_version: str | None = None
    dataset_fingerprint: str | None = None
    pretrained: str | None = None
    precision: str | None = None  # a member's resolved model.precision: fp32 or bf16 (autocast; weights stay fp32)
    parents: tuple[str, ...] = ()  # a merge's members
    base: str | None = None  # a merge's base URI
    members: tuple[str, ...] = ()  # an ensemble's members
    labels: tuple[str, ...] = ()
    # a merge's recipe
    method: str | None = None
    weights: list[float] | None = None
    density: float | None = None
    lambda_: float | None = None
    normalize: bool | None = None
    groups: list[Any] | None = None
    regmean_rows: int | None = None  # regmean: training reviews per member behind its Gram matrices
    regmean_alpha: float | None = None  # regmean: scale of the Gram matrices' off-diagonal entries
    trial: int | None = None  # the search trial it materialises
    soup: str | None = None  # uniform / greedy
    # TF-IDF
    C: float | None = None
    vocabulary_size: int | None = None
    num_params: int | None = None
    # reuse keys (one per role)
    base_key: str | None = None
    member_key: str | None = None
    merge_key: str | None = None
    ensemble_key: str | None = None
    tfidf_key: str | None = None
    # validation scores (val_macro_f1, val_nll, ...) without the prefix
    val: dict[str, float] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, tags: Mapping[str, str] | Any) -> VersionTags:
        """Read a version's tags (a mapping, or anything with `.tags`: a ModelVersion)."""
        values: dict[str, Any] = {"val": {}, "extra": {}}
        for key, text in dict(getattr(tags, "tags", tags) or {}).items():
            name = "val" if key.startswith("val_") else _FIELD_OF.get(key)
            value = _read(key, text, _KIND.get(name, "float")) if name else _NOTE
            if value is _NOTE or value is None and name == "val":  # not a field, or a note under a field's name
                # ("weights": "not in the light store"; a score that is no number)
                values["extra"][key] = text
            elif name == "val":
                values["val"][key.removeprefix("val_")] = value
            else:
                values[name] = value
        return cls(**values)

    def as_tags(self) -> dict[str, str]:
        """The registry's strings: fields that are set (and every `extra` key), in mllm's historical format."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("val", "extra") or value is None or value == ():
                continue
            key = _KEY_OF[f.name]
            out[key] = (json.dumps(value) if f.name in LISTS else TUPLES[f.name].join(value) if f.name in TUPLES
                        else str(value))
        out |= {f"val_{k}": str(v) for k, v in self.val.items()}
        return out | dict(self.extra)

    def get(self, key: str, default: str | None = None) -> str | None:
        """A tag that is not a field (promotion notes and the like), as written."""
        return self.extra.get(key, default)

    @property
    def single_member(self) -> str | None:
        """The one parent a merge's weights keep (all other weights zero), or None."""
        kept = [p for p, w in zip(self.parents, self.weights or [], strict=False) if w]
        return kept[0] if self.weights and len(kept) == 1 else None


_NOTE = object()  # what `_read` gives for a text its field cannot hold
_KIND = {f.name: str(f.type) for f in fields(VersionTags) if f.name not in ("val", "extra")}  # name -> annotation
_KEY_OF = {name: "lambda" if name == "lambda_" else name for name in _KIND}  # field name -> registry key
_FIELD_OF = {key: name for name, key in _KEY_OF.items()}


def _read(key: str, text: str, kind: str) -> Any:
    """The value of a tag's text, or _NOTE when the text is not one its field can hold."""
    try:
        return _parse(key, text, kind)
    except ValueError:  # json.JSONDecodeError is one
        return _NOTE


def _parse(key: str, text: str, kind: str) -> Any:
    if text == "None":
        return None
    if key in LISTS:
        return json.loads(text) if text else None
    if key in TUPLES:
        return tuple(p for p in text.split(TUPLES[key]) if p)
    if "bool" in kind:
        return text == "True"
    if "int" in kind:
        return int(float(text))
    if "float" in kind:
        return float(text)
    return text
