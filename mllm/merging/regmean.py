"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"): a merge that
reads each member's own training reviews, once, through Gram matrices of its linear layers' inputs.

    rows = member_rows(cfg, store, member_uris)           # each member's training texts, in a seeded order
    grams = member_grams(stack.member_dirs, GramSource.of(cfg, rows), 256, stack.unchanged, stack.device)
    stack.set_grams(grams)                                # mllm.merging.inmemory.MemberStack
    stack.merged(MergeConfig(method="regmean", regmean_alpha=0.6))

For a linear layer y = x W^T, member i's weight W_i and its inputs X_i (one row per real token of its reviews,
fed through member i itself), the W minimising sum_i w_i ||X_i W^T - X_i W_i^T||^2 is

    W*^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T,   G_i = X_i^T X_i   (in x in, summed in float64).

As the paper and FusionBench do, the off-diagonal entries of every G_i are scaled by alpha (merge.regmean_alpha:
G~_i = alpha G_i + (1 - alpha) diag(G_i)); alpha 1 is the exact least-squares merge, alpha 0 a per-input-feature
weighted average, and with equal G_i any alpha gives the uniform soup. Every other tensor (biases, norms,
embeddings, linear layers no member changed) is the weighted average. Which layers are linear: torch.nn.Linear and
transformers' Conv1D (GPT-2), whose weight is stored transposed, (in, out). The classifier head of a decoder
(`score`, GPT-2 and Llama) is read at one position per review, the last real token, the only one its logits
come from. A layer every member left at the base (a frozen lower block) gets no Gram matrix: it stays the base.

Gram matrices are computed once per member and reused: cached as safetensors under `<output_dir>/grams/<key>`,
the key covering the member's weights (sha256), the reviews, model.max_length and the layers left out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.basics import atomic_file, short_hash
from mllm.config.schema import ExperimentConfig
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.finetune import plan_members
from mllm.models.modeling import collate, encode, file_sha256, length_batches, load_classifier
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

GRAM_VERSION = 1  # part of the cache key: raise it when what a Gram matrix holds changes
POOLED_HEADS = frozenset({"score"})  # decoder classifier heads: their logits are read at the last real token
NO_ROWS_FIX = "merge members fine-tuned by mllm finetune with this config, or choose another merge.method"


def member_rows(cfg: ExperimentConfig, store: Store, member_uris: Sequence[str]) -> list[list[str]]:
    """Each member's own training texts, in a seeded order (data.seed; RegMean reads the first merge.regmean_rows):
    the rows `finetune` planned for the member its registered version names, on data whose fingerprint the version
    carries. A member without such rows is refused in one line, naming it."""
    splits = load_splits(cfg.data)
    planned = {spec.name: spec for spec in plan_members(cfg, splits)}
    out = []
    for uri in member_uris:
        _, version = store.resolve(uri, "--member")
        tags = VersionTags.of(version) if version is not None else VersionTags()
        why = None
        if version is None:
            why = "it is not a registered model version"
        elif tags.member is None:
            why = "its version names no member"
        elif tags.dataset_fingerprint != splits.fingerprint:
            why = (f"member {tags.member!r} was fine-tuned on other data: fingerprint {tags.dataset_fingerprint}, "
                   f"this config's {splits.fingerprint}")
        elif tags.member not in planned:
            why = f"member {tags.member!r} is not planned"
        elif planned[tags.member].rows.empty:
            why = f"member {tags.member!r} has no training rows"
        if why:
            raise MllmError(f"merge.method=regmean: {uri} has no training rows in this config ({why})", NO_ROWS_FIX)
        texts = planned[tags.member].rows["text"].tolist()
        out.append([texts[i] for i in np.random.default_rng(cfg.data.seed).permutation(len(texts))])
    return out


@dataclass(frozen=True, eq=False)
class GramSource:
    """What Gram matrices are computed from: each member's texts (seeded order), how they are tokenised and batched,
    and the cache folder."""

    rows: list[list[str]]
    max_length: int
    batch_size: int
    cache_dir: Path

    @classmethod
    def of(cls, cfg: ExperimentConfig, rows: list[list[str]]) -> GramSource:
        return cls(rows, cfg.model.max_length, cfg.evaluate.batch_size, cfg.output_dir / "grams")


@dataclass(frozen=True)
class Grams:
    """One member's Gram matrices X^T X (float64, in x in) by module name; layers that read the very same input
    (Llama's q/k/v, gate/up projections) share one tensor."""

    matrices: dict[str, torch.Tensor]
    conv1d: frozenset[str]  # layers whose weight is stored (in, out): transformers' Conv1D
    rows: int  # reviews read

    def to(self, device: Any) -> Grams:
        moved: dict[int, torch.Tensor] = {}
        for g in self.matrices.values():
            if id(g) not in moved:
                moved[id(g)] = g.to(device)
        return Grams({n: moved[id(g)] for n, g in self.matrices.items()}, self.conv1d, self.rows)


def layer_rows(x: torch.Tensor, mask: torch.Tensor, pooled: bool) -> torch.Tensor:
    """The rows of a layer's input (batch, tokens, in) the regression covers: one per real token (padding
    excluded); one per review for a pooled head (the last real token: batches are right-padded) and for inputs
    that hold one vector per review already (BERT's pooler and classifier)."""
    if x.dim() == 2:
        return x
    if pooled:
        return x[torch.arange(x.shape[0], device=x.device), mask.sum(1) - 1]
    return x[mask.bool()]


class GramRecorder:
    """Forward hooks adding X^T X of each chosen layer's input to a float64 sum; `mask` is the current batch's
    attention mask."""

    def __init__(self, model: Any, layers: Collection[str]) -> None:
        self.model, self.layers = model, list(layers)
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # layer -> the layer whose input (the same tensor) it reads
        self.mask: torch.Tensor | None = None
        self._last: tuple[Any, str | None] = (None, None)
        self._handles: list[Any] = []

    def __enter__(self) -> GramRecorder:
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = (None, None)

    def _hook(self, name: str) -> Any:
        def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            self.add(name, inputs[0])
        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        last, last_name = self._last
        self._last = (x, name)  # one reference at a time: aliasing layers run back to back
        if name in self.alias:
            return
        if x is last and last_name is not None and name not in self.sums:
            self.alias[name] = self.alias.get(last_name, last_name)
            return
        assert self.mask is not None  # set by compute_grams before every forward
        rows = layer_rows(x, self.mask, name in POOLED_HEADS).to(torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        self.sums[name].addmm_(rows.T, rows)

    def matrices(self) -> dict[str, torch.Tensor]:
        return {**self.sums, **{n: self.sums[c] for n, c in self.alias.items()}}


def compute_grams(member_dir: Path, texts: Sequence[str], skip: Collection[str], max_length: int,
                  batch_size: int, device: Any) -> Grams:
    """Gram matrices of every linear layer of the member whose weight is not in `skip` (weights no member changed),
    from `texts` tokenised to `max_length`, fed through the member in inference mode (fp32)."""
    from tqdm.auto import tqdm
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = load_classifier(member_dir, "regmean member")
    model = model.to(device).eval()
    linear = {n: isinstance(m, Conv1D) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear | Conv1D) and f"{n}.weight" not in skip}
    encoded = encode(tokenizer, texts, max_length)
    with (GramRecorder(model, linear) as recorder, torch.inference_mode(),
          tqdm(total=len(texts), desc=f"regmean grams {member_dir.name}", unit="review", leave=False) as bar):
        for index in length_batches([len(e) for e in encoded], batch_size, seed=None):
            batch = collate(encoded, index, tokenizer.pad_token_id, device)
            recorder.mask = batch["attention_mask"]
            model(**batch)
            bar.update(len(index))
    matrices = recorder.matrices()
    return Grams(matrices, frozenset(n for n in matrices if linear[n]), len(texts))


def save_grams(grams: Grams, path: Path) -> None:
    """Write atomically (a temporary file, then renamed): a file under `path` is always complete."""
    from safetensors.torch import save_file

    names: dict[int, str] = {}
    tensors, alias = {}, {}
    for n, g in sorted(grams.matrices.items()):
        if id(g) in names:
            alias[n] = names[id(g)]
        else:
            names[id(g)] = n
            tensors[n] = g.detach().to("cpu").contiguous()
    meta = {"aliases": json.dumps(alias), "conv1d": json.dumps(sorted(grams.conv1d)), "rows": str(grams.rows),
            "version": str(GRAM_VERSION)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a failed write (a full disk) leaves no partial file behind
        save_file(tensors, str(tmp), metadata=meta)


def read_grams(path: Path) -> Grams | None:
    """The cached Gram matrices at `path`, or None (absent or unreadable: computed again)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            matrices = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118 (not a mapping)
        aliases, conv1d = json.loads(meta["aliases"]), json.loads(meta["conv1d"])
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    return Grams({**matrices, **{n: matrices[c] for n, c in aliases.items()}}, frozenset(conv1d), int(meta["rows"]))


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))  # size and mtime only key the memo; the identity is the content


def weights_identity(member_dir: Path) -> list[tuple[str, str]]:
    """(file name, sha256) of each safetensors file of a checkpoint folder."""
    files = sorted(member_dir.glob("*.safetensors"))
    return [(f.name, _sha256(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)) for f in files]


def member_grams(member_dirs: Sequence[Path], source: GramSource, rows: int, skip: Collection[str],
                 device: Any = "cpu") -> list[Grams]:
    """Each member's Gram matrices from its first `rows` texts, read from the cache or computed once and cached;
    `skip`: weights no member changed (their layers get none)."""
    if len(source.rows) != len(member_dirs):
        raise MllmError(f"regmean: training rows for {len(source.rows)} members, {len(member_dirs)} members",
                        "give each member its rows (mllm.merging.regmean.member_rows)")
    skipped = short_hash(sorted(skip))
    out = []
    for path, texts in zip(member_dirs, source.rows, strict=True):
        texts = list(texts[:rows])
        key = short_hash({"version": GRAM_VERSION, "weights": weights_identity(path), "texts": texts,
                          "max_length": source.max_length, "skip": skipped}, 20)
        file = source.cache_dir / f"{key}.safetensors"
        grams = read_grams(file)
        if grams is None:
            start = time.perf_counter()
            grams = compute_grams(path, texts, skip, source.max_length, source.batch_size, device)
            save_grams(grams, file)
            print(f"regmean: Gram matrices of {path.name} from {len(texts)} reviews in "
                  f"{time.perf_counter() - start:.1f} s ({file.name})")
        out.append(grams.to(device))
    return out


def regmean_weight(members: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float],
                   alpha: float, conv1d: bool) -> torch.Tensor:
    """RegMean's weight of one linear layer from the members' weights ((out, in); (in, out) when `conv1d`) and Gram
    matrices (in, in), in float64. Solved as the weighted average plus a correction: where the summed Gram matrix
    is singular (inputs no review reached), the pseudo-inverse leaves the average in place."""
    total = float(sum(weights))
    a = b = mean = None
    for w_t, g, wi in zip(members, grams, weights, strict=True):
        x = (w_t if conv1d else w_t.T).to(torch.float64)  # (in, out)
        scaled = g * (alpha * wi)
        scaled.diagonal().copy_(g.diagonal() * wi)  # alpha diag + (1 - alpha) diag: the diagonal, unscaled
        a = scaled if a is None else a.add_(scaled)
        b = scaled @ x if b is None else b.add_(scaled @ x)
        mean = x * (wi / total) if mean is None else mean.add_(x, alpha=wi / total)
    assert a is not None and b is not None and mean is not None  # at least one member (check_members)
    rhs = b - a @ mean
    delta, info = torch.linalg.solve_ex(a, rhs)
    if int(info) != 0 or not bool(torch.isfinite(delta).all()):
        delta = torch.linalg.pinv(a, hermitian=True) @ rhs
    merged = mean + delta
    return (merged if conv1d else merged.T).to(members[0].dtype)


def average(base: torch.Tensor, deltas: Sequence[torch.Tensor | None], weights: Sequence[float]) -> torch.Tensor:
    """The weighted average of the members (base + task vector; None: the base), always normalised."""
    total = float(sum(weights))
    out = base.clone()
    for d, wi in zip(deltas, weights, strict=True):
        if d is not None and wi:
            out.add_(d, alpha=wi / total)
    return out


def merged_tensors(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor | None]],
                   grams: Sequence[Grams], names: Sequence[str], unchanged: Collection[str], recipe: Any
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in `names` order for a regmean `recipe` (a MergeConfig): RegMean for linear weights with
    Gram matrices, the weighted average for every other tensor, the base for tensors no member changed."""
    k = len(deltas)
    for given in [recipe.weights, *(g.weights for g in recipe.groups or [])]:  # before any tensor is written
        if given is not None and abs(sum(given)) < 1e-12:
            raise MllmError(f"merge.weights {given} sum to 0", "regmean normalises the weights: give a non-zero sum")
    for n in names:
        weights = recipe.at(n)[0] or [1.0] * k
        module = n.removesuffix(".weight")
        if n in unchanged:
            yield n, base[n]
        elif n.endswith(".weight") and all(module in g.matrices for g in grams):
            members = [base[n] if d[n] is None else base[n] + d[n] for d in deltas]
            yield n, regmean_weight(members, [g.matrices[module] for g in grams], weights, recipe.regmean_alpha,
                                    module in grams[0].conv1d)
        else:
            yield n, average(base[n], [d[n] for d in deltas], weights)
