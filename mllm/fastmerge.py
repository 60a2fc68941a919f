"""In-memory merges for search trials: members loaded once, no disk writes, the merged weights copied into
one resident model.

    stack = MemberStack(base_dir, member_dirs, device)
    model = stack.model()                      # a classifier built from the base, kept for every trial
    stack.merge_into(model, MergeConfig(method="dare_ties", density=0.4, seed=1))

A trial through mergekit's `run_merge` reads K+1 checkpoints, writes one and reloads it; here the base and
the K task vectors (member - base) stay in memory (K+2 model copies with the working model) and a merge is a
few tensor operations per weight. mergekit is the reference: tests compare every tensor with `run_merge`
for each method (max abs difference ~1e-6 in fp32), DARE and DELLA with the same seed included. Agreement
for random methods rests on drawing random masks in mergekit's order: weights sorted by name, members in
order, one `torch.bernoulli` per member and weight, after `transformers.set_seed(seed)` (as `run_merge`
does). The per-tensor maths follows mergekit's generalized task arithmetic (sparsify each task vector,
weight, optional sign consensus, optional normalisation by the kept weights, scale by lambda, add to the
base); DELLA's and breadcrumbs' sparsifiers are mergekit's own functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm.config.schema import MergeConfig
from mllm.errors import MllmError
from mllm.methods import IN_MEMORY, RANDOM_SPARSIFIERS, info
from mllm.modeling import load_classifier

# method -> (sparsifier, sign consensus, rescale the kept entries to the task vector's L1 norm): mergekit's
# defaults for each task-vector method, read from its registry (mllm never overrides `rescale`). IN_MEMORY (linear
# and these) is re-exported for the modules that import it from here.
GTA: dict[str, tuple[str | None, bool, bool]] = {
    m: (info(m).sparsifier, info(m).consensus, info(m).rescale) for m in sorted(IN_MEMORY) if info(m).task_vector
}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (one or several .safetensors files), fp32 on the CPU."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MllmError(f"{path} has no .safetensors weights", "merge and search read safetensors only")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def sparsify(delta: torch.Tensor, how: str, recipe: MergeConfig, rescale: bool) -> torch.Tensor:
    """Keep a `recipe.density` share of one task vector's entries (mergekit semantics)."""
    density = recipe.density
    if density >= 1:
        return delta  # mergekit returns the tensor untouched (and draws no random numbers)
    if how == "magnitude":  # the k largest |entries|, k = max(1, int(density * n))
        k = max(1, int(density * delta.numel()))
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[torch.topk(delta.abs().reshape(-1), k, sorted=False).indices] = 1  # topk: no full sort needed
        return _rescaled(delta, mask.reshape_as(delta), rescale)
    if how == "random":  # DARE: keep each entry with probability density
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32))
        return _rescaled(delta, mask, rescale)
    from mergekit.sparsify import RescaleNorm, della_magprune, magnitude_outliers

    norm = RescaleNorm.l1 if rescale else None
    if how == "magnitude_outliers":
        return magnitude_outliers(delta, density=density, rescale_norm=norm, gamma=recipe.gamma)
    return della_magprune(delta, density=density, epsilon=recipe.epsilon, rescale_norm=norm)


def merge_tensor(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                 recipe: MergeConfig, all_zero: bool = False) -> torch.Tensor:
    """One merged weight from the base and the members' task vectors (member - base), in member order.
    `all_zero`: every task vector is exactly zero (a frozen layer), so a task-vector merge is the base."""
    if all_zero and recipe.method in GTA:
        # Any sparsified, weighted, normalised sum of zeros is zero: base + 0 is the base exactly. Random
        # methods still draw their masks, so the random stream stays aligned with mergekit's for later weights.
        how = GTA[recipe.method][0]
        if how in RANDOM_SPARSIFIERS:
            for d in deltas:
                sparsify(d, how, recipe, rescale=False)
        return base
    w = torch.tensor(list(weights), dtype=base.dtype, device=base.device)
    if recipe.method == "linear":  # sum_i w_i * member_i (/ sum_i w_i)
        out = torch.zeros_like(base)
        for d, wi in zip(deltas, w, strict=True):
            out.add_(base + d, alpha=float(wi))
        return out / w.sum() if recipe.normalize else out
    how, consensus, rescale = GTA[recipe.method]
    # One (K, *shape) buffer of weighted, sparsified task vectors; the sign election then works member by member
    # in place, so the temporaries stay one weight's size rather than K times it (worker memory).
    stacked = torch.empty((len(deltas), *base.shape), dtype=base.dtype, device=base.device)
    for i, d in enumerate(deltas):
        stacked[i] = sparsify(d, how, recipe, rescale) if how else d
    w = w.reshape(-1, *([1] * base.dim()))
    stacked.mul_(w)
    if consensus:  # TIES sign election: keep entries agreeing with the sign of the weighted sum
        majority = (stacked.sum(0) >= 0).to(base.dtype) * 2 - 1
        divisor = torch.zeros_like(base)
        for i in range(len(deltas)):
            agree = (stacked[i].sign() == majority).to(base.dtype)
            stacked[i].mul_(agree)
            divisor.add_(agree.mul_(w[i]))
        del majority
        mixed = stacked.sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if recipe.normalize:
        mixed = mixed / divisor
    if recipe.lambda_ != 1:
        mixed = mixed * recipe.lambda_
    return base + mixed


class MemberStack:
    """The base and the K members' task vectors, resident on one device, ready to be merged many times."""

    def __init__(self, base_dir: Path, member_dirs: Sequence[Path], device: Any = "cpu") -> None:
        self.base_dir, self.member_dirs, self.device = base_dir, list(member_dirs), torch.device(device)
        base = load_weights(base_dir)
        self.names = sorted(base)  # mergekit merges weights in name order: the order random masks are drawn
        self.base = {n: base[n].to(self.device) for n in self.names}
        self.deltas: list[dict[str, torch.Tensor]] = []
        for path in self.member_dirs:
            member = load_weights(path)
            if sorted(member) != self.names:
                raise MllmError(f"{path.name} has other weights than the base", "merge members of one base")
            # The loaded tensor becomes the task vector in place: no second copy of a member is ever held.
            self.deltas.append({n: member.pop(n).to(self.device).sub_(self.base[n]) for n in self.names})
            del member
        # Weights no member changed (frozen embeddings and layers): merging them is skipped (see merge_tensor).
        self.unchanged = {n for n in self.names if not any(bool(d[n].any()) for d in self.deltas)}

    def iter_merged(self, recipe: MergeConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged weight) for `recipe`, one weight at a time, in name order."""
        if recipe.method not in IN_MEMORY:
            raise MllmError(f"merge.method={recipe.method} has no in-memory merge",
                            f"search over {', '.join(sorted(IN_MEMORY))}")
        k = len(self.deltas)
        weights = recipe.weights or [1.0] * k
        if len(weights) != k:
            raise MllmError(f"merge.weights has {len(weights)} values for {k} members", "give one per member")
        if info(recipe.method).random:
            from transformers.trainer_utils import set_seed

            set_seed(recipe.seed)  # as run_merge does with MergeOptions.random_seed
        with torch.no_grad():
            for n in self.names:
                yield n, merge_tensor(self.base[n], [d[n] for d in self.deltas], weights, recipe,
                                      all_zero=n in self.unchanged)

    def merged(self, recipe: MergeConfig) -> dict[str, torch.Tensor]:
        return dict(self.iter_merged(recipe))

    def model(self) -> Any:
        """A classifier built from the base folder, on the stack's device: the container trials merge into."""
        model, _ = load_classifier(self.base_dir, "search base")
        return model.to(self.device).eval()

    def merge_into(self, model: Any, recipe: MergeConfig) -> None:
        """Overwrite `model`'s weights with the merge of `recipe` (no allocation beyond one merged weight)."""
        state = model.state_dict()
        missing = [n for n in self.names if n not in state]
        if missing:
            raise MllmError(f"model has no weight {missing[0]}", "build the container with MemberStack.model()")
        with torch.no_grad():
            for name, tensor in self.iter_merged(recipe):
                state[name].copy_(tensor)
