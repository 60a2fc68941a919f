"""Frozen-prefix reuse: score many models that share their lowest layers without recomputing those layers.

Members fine-tuned with `finetune.freeze_embeddings` and `freeze_layers: N` (the CPU recipe freezes 16 of
SmolLM2's 30 layers) keep the embeddings and blocks 0..N-1 of the base exactly, and so do their TIES/DARE/
task-arithmetic merges (a zero task vector adds exactly zero). Every such model computes the same hidden
states entering block N for the same batch, so they are computed once (while the first model is scored) and
replayed for the others: blocks 0..N-1 are swapped for a pass-through and a pre-hook on block N feeds the
cached states. A model whose prefix weights are not bit-identical to the first one's (e.g. a linear merge,
whose average of equal tensors may differ in the last bit) or whose token batches differ runs in full.

Causal and bidirectional models alike see the same inputs for block N, so results equal a full forward pass
up to floating-point summation order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mllm.errors import ModelError

MAX_CACHE_BYTES = 2 * 1024**3  # beyond this (large test sets), score in full rather than hold the states


def blocks(model: Any) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = model.config.num_hidden_layers
    found = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    if found is None:
        raise ModelError(f"finetune.freeze_layers: cannot find the {n} transformer layers of {type(model).__name__}",
                         "set finetune.freeze_layers=0 (and freeze_embeddings=false) for this architecture")
    return found


class _PassThrough(torch.nn.Module):
    """Stands in for a block whose output is replaced anyway: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def skipping(model: Any, depth: int, states: Any) -> Iterator[None]:
    """Within the block: blocks below `depth` pass their input through, and block `depth` receives
    `states(its actual input)` instead of its input (the cached hidden states, shaped like it)."""
    layers = blocks(model)
    original = [layers[i] for i in range(depth)]

    def feed(module: torch.nn.Module, args: Any) -> Any:
        return (states(args[0]), *args[1:])

    for i in range(depth):
        layers[i] = _PassThrough()
    handle = layers[depth].register_forward_pre_hook(feed)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(original):
            layers[i] = block


def prefix_state(model: Any, depth: int) -> dict[str, torch.Tensor]:
    """Every weight that can influence the input of block `depth`: the modules run before it (found by
    running the model once on a two-token input and recording which modules were called first)."""
    order: list[torch.nn.Module] = []
    stop = blocks(model)[depth]
    hooks = []

    class _Stop(Exception):
        pass

    def seen(module: torch.nn.Module, args: Any) -> None:
        if module is stop:
            raise _Stop
        order.append(module)

    for module in model.modules():
        if not list(module.children()):  # leaves (embeddings, norms, linears, ...)
            hooks.append(module.register_forward_pre_hook(seen))
    hooks.append(stop.register_forward_pre_hook(seen))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2]], device=next(model.parameters()).device))
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    before = {id(m) for m in order}
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if id(module) in before:
            for name, p in module.named_parameters(recurse=False):
                out[f"{mod_name}.{name}" if mod_name else name] = p.detach()
    return out


def fingerprint_batches(encoded: Sequence[Sequence[int]], batch_size: int) -> str:
    h = hashlib.sha256(str(batch_size).encode())
    for ids in encoded:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(bytes(str(list(ids)), "ascii"))
    return h.hexdigest()


class PrefixCache:
    """Hidden states entering block `depth`, per batch of one fixed batching, from the first model scored."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.reference: dict[str, torch.Tensor] | None = None
        self.batches_key: str | None = None
        self.states: list[torch.Tensor] = []
        self.bytes = 0
        self.usable = depth > 0
        self.replays = 0

    def matches(self, model: Any, batches_key: str) -> bool:
        """True when `model` may replay the cache: same batches, bit-identical prefix weights."""
        if not self.usable or self.reference is None or batches_key != self.batches_key:
            return False
        ours = prefix_state(model, self.depth)
        return ours.keys() == self.reference.keys() and all(torch.equal(ours[k], v) for k, v in
                                                            self.reference.items())

    @contextmanager
    def record(self, model: Any, batches_key: str) -> Iterator[None]:
        """Run `model` in full while keeping the states entering block `depth` (first model only)."""
        if self.usable and self.reference is None:
            self.depth = min(self.depth, len(blocks(model)) - 1)  # all layers frozen: the last still runs
        if not self.usable or self.reference is not None:
            yield
            return
        states: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: Any) -> None:
            if not self.usable:
                return
            self.bytes += args[0].numel() * args[0].element_size()
            if self.bytes > MAX_CACHE_BYTES:  # this split is too large to cache: everything runs in full
                self.usable = False
                states.clear()
                return
            states.append(args[0].detach().clone())

        handle = blocks(model)[self.depth].register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        if not self.usable:
            return
        self.states = states
        self.batches_key = batches_key
        self.reference = {k: v.clone() for k, v in prefix_state(model, self.depth).items()}

    @contextmanager
    def replay(self, model: Any, start: int = 0) -> Iterator[None]:
        """Run `model` with blocks below `depth` skipped and the cached states fed to block `depth`, from
        cached batch `start` on."""
        cursor = iter(self.states[start:])
        self.replays += 1
        with skipping(model, self.depth, lambda like: next(cursor).to(like.dtype)):
            yield


DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "hidden_dropout", "dropout")


def dropout_free(model: Any) -> bool:
    """True when the model has no dropout anywhere (config rates and Dropout modules), so the states below a
    frozen block are a fixed function of the example in training mode too. Conservative: Llama-family models
    (SmolLM2) qualify; GPT-2 and BERT, with dropout 0.1, do not."""
    if any(float(getattr(model.config, k, 0.0) or 0.0) > 0 for k in DROPOUT_KEYS):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class ExampleCache:
    """Training-time reuse: the states entering block `depth` per training example, recorded in the first
    epoch and replayed in later ones (frozen, dropout-free prefix only). Positions beyond an example's length
    are zero-filled: they are padding, masked (bidirectional models) or never attended to by real tokens
    (causal models, right padding), and the classifier pools the last real token. Keyed by `keys` (an example's
    token ids) when given, so members of one base with the same frozen layers share one cache: a seed member, or
    the full-data member after the shards, replays what an earlier member recorded, in its first epoch too."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.states: dict[Any, torch.Tensor] = {}
        self.bytes = 0
        self.replayed_batches = 0

    @contextmanager
    def forward(self, model: Any, index: Sequence[int], lengths: Sequence[int],
                keys: Sequence[Any] | None = None) -> Iterator[None]:
        rows = [int(i) for i in index]
        names = [keys[i] if keys is not None else i for i in rows]
        layers = blocks(model)
        if all(k in self.states for k in names):
            def padded(like: torch.Tensor) -> torch.Tensor:
                out = like.new_zeros(like.shape)
                for r, (i, k) in enumerate(zip(rows, names, strict=True)):
                    out[r, : lengths[i]] = self.states[k].to(like.dtype)
                return out

            self.replayed_batches += 1
            with skipping(model, self.depth, padded):
                yield
            return

        def keep(module: torch.nn.Module, args: Any) -> None:
            for r, (i, k) in enumerate(zip(rows, names, strict=True)):
                state = args[0][r, : lengths[i]]
                if k not in self.states and self.bytes + state.numel() * state.element_size() <= MAX_CACHE_BYTES:
                    self.states[k] = state.detach().clone()
                    self.bytes += state.numel() * state.element_size()

        handle = layers[self.depth].register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()
