"""Layer groups of a searched merge: the trained transformer blocks cut into N contiguous groups, plus the
embeddings and the head when some member trained them, each with its own weight per member and density.

    groups = plan_groups(model, stack.names, changed, n=3)
    # [LayerGroup("blocks 16-20", ("model.layers.16.", ...)), ..., LayerGroup("head", ("model.norm.weight", ...))]

A group's filters are mergekit conditional-parameter filters (a tensor takes the first group with a filter that
is a substring of its name): a block's prefix with its trailing dot ("model.layers.16." never matches block 160),
and the exact names of embedding and head tensors. Blocks and tensors no member changed (frozen layers) get no
group: every merge leaves them at the base, so a weight there would be a dimension with no effect.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.models.prefix import blocks


@dataclass(frozen=True)
class LayerGroup:
    name: str
    filters: tuple[str, ...]


def block_prefix(model: Any) -> str:
    """The qualified name of the model's transformer block list, e.g. model.layers, transformer.h."""
    target = blocks(model)
    return next(name for name, module in model.named_modules() if module is target)


def plan_groups(model: Any, names: Sequence[str], changed: Collection[str], n: int) -> list[LayerGroup]:
    """The groups for `n` block groups over the weights `names` (state-dict order) of which `changed` differ from
    the base in some member."""
    if n <= 0:
        return []
    prefix = block_prefix(model) + "."
    ordered = [name for name, _ in model.named_parameters()] + [x for x in names if x not in
                                                                dict(model.named_parameters())]
    index = {name: int(name[len(prefix):].split(".", 1)[0]) for name in ordered if name.startswith(prefix)}
    trained = sorted({index[name] for name in index if name in changed})
    groups = []
    for chunk in np.array_split(np.array(trained, dtype=int), min(n, len(trained))) if trained else []:
        lo, hi = int(chunk[0]), int(chunk[-1])
        groups.append(LayerGroup(f"blocks {lo}-{hi}" if hi > lo else f"block {lo}",
                                 tuple(f"{prefix}{i}." for i in chunk)))
    positions = [i for i, name in enumerate(ordered) if name in index]
    first, last = (positions[0], positions[-1]) if positions else (len(ordered), len(ordered))
    outside = [(i, name) for i, name in enumerate(ordered) if name not in index and name in changed]
    embeddings = tuple(name for i, name in outside if i < first)
    head = tuple(name for i, name in outside if i > last)
    if embeddings:
        groups.insert(0, LayerGroup("embeddings", embeddings))
    if head:
        groups.append(LayerGroup("head", head))
    return groups
