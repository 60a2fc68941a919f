"""In-memory merges for search trials: members loaded once, no disk writes, the merged weights copied into
one resident model.

    stack = MemberStack(base_dir, member_dirs, device)   # or shared_stack(...): one copy per process
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
base); DELLA's and breadcrumbs' sparsifiers are mergekit's own functions. regmean is mllm's own method
(mllm.merging.regmean): it needs each member's Gram matrices, given once with `set_grams`.

Scorers get their stack from `shared_stack`: the scorers of one process that merge the same members (a study cell's
validation, search and test scorers) share one resident copy, which lives as long as some holder keeps it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm.config.schema import MergeConfig
from mllm.errors import MllmError
from mllm.merging.methods import IN_MEMORY, RANDOM_SPARSIFIERS, info
from mllm.merging.regmean import Grams, merged_tensors
from mllm.models.modeling import load_classifier

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


CHUNK = 1 << 22  # elements per slice of the elementwise tail of a task-vector merge (16 MB in fp32)
LARGE = 1 << 23  # magnitude pruning of a weight above this many entries (embedding matrices) bisects, no topk


def _largest(bits: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of the k largest of non-negative float32 values given as their int32 bit patterns (ordered like
    the values): the k-th largest found by bisection on the bits, so the only temporaries are bool masks (topk
    on the embedding matrix allocates several copies of it in values and int64 indices). Ties at the threshold:
    the first in flat order, as many as k needs (ties at 0 keep nothing: a zero kept or dropped is the same 0)."""
    lo, hi = 0, 0x7F800000  # +inf
    while lo < hi:  # the largest t with count(bits >= t) >= k
        mid = (lo + hi + 1) // 2
        if int((bits >= mid).sum()) >= k:
            lo = mid
        else:
            hi = mid - 1
    keep = bits > lo
    need = k - int(keep.sum())
    if need > 0 and lo > 0:
        keep[torch.nonzero(bits == lo).view(-1)[:need]] = True
    return keep


def _l1(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum()  # as mergekit sums (a fused norm would differ in the last bits)


def _rescaled(delta: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`kept` (delta with dropped entries zeroed), scaled in place to delta's L1 norm when `rescale`."""
    if not rescale:
        return kept
    before, after = _l1(delta), _l1(kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept.mul_(before / after)


def sparsify(delta: torch.Tensor, how: str, recipe: MergeConfig, rescale: bool,
             density: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep a `density` (default `recipe.density`) share of one task vector's entries (mergekit semantics), into
    `out` when given (a contiguous buffer shaped like delta: no further copy of the weight is allocated)."""
    density = recipe.density if density is None else density
    if density >= 1:  # mergekit returns the tensor untouched (and draws no random numbers)
        return delta if out is None else out.copy_(delta)
    buf = out if out is not None else torch.empty_like(delta)
    if how == "magnitude":  # the k largest |entries|, k = max(1, int(density * n))
        k = max(1, int(density * delta.numel()))
        torch.abs(delta, out=buf)
        if delta.numel() > LARGE:
            keep = _largest(buf.view(-1).view(torch.int32), k).view_as(delta)
            torch.mul(delta, keep, out=buf)
            del keep
            return _rescaled(delta, buf, rescale)
        index = torch.topk(buf.view(-1), k, sorted=False).indices  # topk: no full sort needed
        buf.zero_().view(-1).index_copy_(0, index, delta.reshape(-1).index_select(0, index))
        del index
        return _rescaled(delta, buf, rescale)
    if how == "random":  # DARE: keep each entry with probability density (the draw bernoulli(full_like) makes)
        buf.fill_(density)
        mask = torch.bernoulli(buf)
        torch.mul(delta, mask, out=buf)
        del mask
        return _rescaled(delta, buf, rescale)
    from mergekit.sparsify import RescaleNorm, della_magprune, magnitude_outliers

    norm = RescaleNorm.l1 if rescale else None
    if how == "magnitude_outliers":
        return buf.copy_(magnitude_outliers(delta, density=density, rescale_norm=norm, gamma=recipe.gamma))
    return buf.copy_(della_magprune(delta, density=density, epsilon=recipe.epsilon, rescale_norm=norm))


def merge_tensor(base: torch.Tensor, deltas: Sequence[torch.Tensor | None], weights: Sequence[float],
                 recipe: MergeConfig, all_zero: bool = False, density: float | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One merged weight from the base and the members' task vectors (member - base), in member order.
    `all_zero`: every task vector is exactly zero (a frozen layer; None stands for such a delta), so a
    task-vector merge is the base. `density`: this tensor's density (a layer group's), default `recipe.density`.
    `out`: where to write the result (the resident model's weight), else a new tensor."""
    if all_zero and recipe.method in GTA:
        # Any sparsified, weighted, normalised sum of zeros is zero: base + 0 is the base exactly. Random
        # methods still draw their masks, so the random stream stays aligned with mergekit's for later weights.
        how = GTA[recipe.method][0]
        if how in RANDOM_SPARSIFIERS:
            zeros = torch.zeros_like(base)
            for _ in deltas:
                sparsify(zeros, how, recipe, rescale=False, density=density, out=zeros.clone())
        return base if out is None else out.copy_(base)
    full = [torch.zeros_like(base) if d is None else d for d in deltas]
    if recipe.method == "linear":  # sum_i w_i * member_i (/ sum_i w_i)
        w = torch.tensor(list(weights), dtype=base.dtype, device=base.device)
        mixed = torch.zeros_like(base)
        for d, wi in zip(full, w, strict=True):
            mixed.add_(base + d, alpha=float(wi))
        mixed = mixed / w.sum() if recipe.normalize else mixed
        return mixed if out is None else out.copy_(mixed)
    how, consensus, rescale = GTA[recipe.method]
    # One (K, *shape) buffer of sparsified task vectors, written in place; the weighting, sign election and sum then
    # run slice by slice, so beyond it the temporaries stay a slice's size (worker memory: the embedding matrix).
    stacked = torch.empty((len(full), *base.shape), dtype=base.dtype, device=base.device)
    for i, d in enumerate(full):
        if how:
            sparsify(d, how, recipe, rescale, density, out=stacked[i])
        else:
            stacked[i].copy_(d)
    del full
    w = torch.tensor(list(weights), dtype=base.dtype, device=base.device).reshape(-1, 1)
    result = out if out is not None and out.is_contiguous() else torch.empty_like(base)
    flat, base_flat, result_flat = stacked.view(len(deltas), -1), base.reshape(-1), result.view(-1)
    for lo in range(0, base.numel(), CHUNK):
        part = flat[:, lo:lo + CHUNK].mul(w)
        if consensus:  # TIES sign election: keep entries agreeing with the sign of the weighted sum
            majority = (part.sum(0) >= 0).to(base.dtype) * 2 - 1
            agree = (part.sign() == majority).to(base.dtype)
            part.mul_(agree)
            divisor = (agree * w).sum(0)
            mixed = part.sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = part.sum(0)
            divisor = w.sum(0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if recipe.normalize:
            mixed = mixed / divisor
        if recipe.lambda_ != 1:
            mixed = mixed * recipe.lambda_
        torch.add(base_flat[lo:lo + CHUNK], mixed, out=result_flat[lo:lo + CHUNK])
    return result if out is None or result is out else out.copy_(result)


class MemberStack:
    """The base and the K members' task vectors, resident on one device, ready to be merged many times."""

    def __init__(self, base_dir: Path, member_dirs: Sequence[Path], device: Any = "cpu") -> None:
        self.base_dir, self.member_dirs, self.device = base_dir, list(member_dirs), torch.device(device)
        base = load_weights(base_dir)
        self.names = sorted(base)  # mergekit merges weights in name order: the order random masks are drawn
        self.base = {n: base[n].to(self.device) for n in self.names}
        self.deltas: list[dict[str, torch.Tensor | None]] = []
        for path in self.member_dirs:
            self.deltas.append(self._task_vector(path))
        # Weights no member changed (frozen embeddings and layers): merging them is skipped (see merge_tensor).
        self.unchanged = {n for n in self.names if all(d[n] is None for d in self.deltas)}
        self.grams: list[Grams] | None = None  # regmean: each member's Gram matrices (set_grams)

    def set_grams(self, grams: Sequence[Grams] | None) -> None:
        """Each member's Gram matrices (mllm.merging.regmean.member_grams), in member order, for merge.method=regmean;
        kept on the stack's device until replaced."""
        if grams is not None and len(grams) != len(self.deltas):
            raise MllmError(f"regmean: Gram matrices for {len(grams)} members, the stack has {len(self.deltas)}",
                            "compute them for these members, in their order")
        self.grams = None if grams is None else [g.to(self.device) for g in grams]

    def _task_vector(self, path: Path) -> dict[str, torch.Tensor | None]:
        """member - base, read tensor by tensor (never a whole second copy of a member); None where the member
        left a weight exactly at the base (a frozen layer holds no memory)."""
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MllmError(f"{path} has no .safetensors weights", "merge and search read safetensors only")
        delta: dict[str, torch.Tensor | None] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for n in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    d = handle.get_tensor(n).float().to(self.device).sub_(self.base.get(n, torch.zeros(())))
                    delta[n] = d if bool(d.any()) else None
        if sorted(delta) != self.names:
            raise MllmError(f"{path.name} has other weights than the base", "merge members of one base")
        return delta

    def iter_merged(self, recipe: MergeConfig, into: dict[str, torch.Tensor] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged weight) for `recipe`, one weight at a time, in name order; written into `into[name]`
        (a resident model's state) when given."""
        if recipe.method not in IN_MEMORY:
            raise MllmError(f"merge.method={recipe.method} has no in-memory merge",
                            f"search over {', '.join(sorted(IN_MEMORY))}")
        k = len(self.deltas)
        for weights in [recipe.weights, *(g.weights for g in recipe.groups or [])]:
            if weights is not None and len(weights) != k:
                raise MllmError(f"merge.weights has {len(weights)} values for {k} members", "give one per member")
        if recipe.method == "regmean":
            yield from self._regmean(recipe, into)
            return
        if info(recipe.method).random:
            from transformers.trainer_utils import set_seed

            set_seed(recipe.seed)  # as run_merge does with MergeOptions.random_seed
        with torch.no_grad():
            for n in self.names:
                weights, density = recipe.at(n)  # a layer group's, else the recipe's own
                yield n, merge_tensor(self.base[n], [d[n] for d in self.deltas], weights or [1.0] * k, recipe,
                                      all_zero=n in self.unchanged, density=density,
                                      out=None if into is None else into[n])

    def _regmean(self, recipe: MergeConfig, into: dict[str, torch.Tensor] | None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        if self.grams is None:
            raise MllmError("merge.method=regmean needs each member's Gram matrices, and none were given",
                            "merge through mllm merge or search with members fine-tuned by mllm finetune (they find "
                            "each member's training rows), or call MemberStack.set_grams")
        with torch.no_grad():
            for n, tensor in merged_tensors(self.base, self.deltas, self.grams, self.names, self.unchanged, recipe):
                yield n, tensor if into is None else into[n].copy_(tensor)

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
            for name, tensor in self.iter_merged(recipe, state):
                if tensor is not state[name]:
                    state[name].copy_(tensor)


# (base, members, device) -> the stack resident in this process: weak, so it is freed with its last holder (a scorer,
# or a study cell keeping it between its validation and test scoring) exactly as an unshared stack would be.
_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], MemberStack] = weakref.WeakValueDictionary()


def _identity(path: Path) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """A checkpoint folder and the size and modification time of its weights (a folder rewritten in place is not
    taken for the one already loaded)."""
    path = Path(path).resolve()
    files = sorted(path.glob("*.safetensors"))
    return str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def shared_stack(base_dir: Path, member_dirs: Sequence[Path], device: Any = "cpu") -> MemberStack:
    """The MemberStack of these members on `device`: the one some holder in this process already keeps, else loaded
    now. Merging only reads a stack (the Gram matrices a regmean scorer sets are set again before each of its merges),
    so sharing it changes no merge; it saves reading every member again and a second resident copy."""
    key = (_identity(base_dir), tuple(_identity(d) for d in member_dirs), str(torch.device(device)))
    stack = _SHARED.get(key)
    if stack is None:
        stack = MemberStack(base_dir, member_dirs, device)
        _SHARED[key] = stack
    return stack
