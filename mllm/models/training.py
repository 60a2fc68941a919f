"""The training loop of one member: length-grouped batches, AdamW with linear warmup/decay, gradient
accumulation, bf16 autocast (model.precision), validation macro-F1 early stopping, crash-safe checkpoints and resume.

A lean loop instead of the Hugging Face Trainer: it pads each batch only to its own longest review (batches
group reviews of similar length), and its checkpoints are written to a temporary folder and renamed when
complete, so a crash mid-save never leaves a checkpoint that looks finished (`get_last_checkpoint` in
transformers does not check that). Resuming restores weights, optimiser, schedule, RNG and the position in
the epoch's batch order (derived from the seed), so a resumed member equals an uninterrupted one.
`scripts/bench_finetune.py` compares it with the original study's Trainer set-up.

`train_member` reads as the loop: set up (`encode_train`, `build_optimizer`, `resume`), `run_epoch` until the last
step or an early stop (`validate` and `save_checkpoint` every `eval_every` steps), then `publish_final`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllm.basics import atomic_dir, atomic_file, publish_dir
from mllm.config.schema import FinetuneConfig, ModelConfig
from mllm.evaluation.metrics import classification_summary
from mllm.models.modeling import collate, encode, length_batches, load_classifier, predict_logits, write_source
from mllm.models.precision import resolve_device
from mllm.models.prefix import ExampleCache, PrefixCache, blocks, dropout_free, fingerprint_batches

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainResult:
    """What one member's training produced."""

    model_dir: Path
    best: dict[str, float]  # validation metrics of the kept (best) weights
    steps: int
    resumed_from: int  # optimizer step the run started at (0: fresh)
    stopped_early: bool
    wall_s: float
    train_samples_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    class_weights: list[float] = field(default_factory=list)  # per label id, as used by the loss


def balanced_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (classes x count_c) for each class seen in `labels` (scikit-learn's "balanced"); 1 for an unseen class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.ones(n_classes)
    seen = counts > 0
    weights[seen] = counts.sum() / (n_classes * counts[seen])
    return weights


def freeze(model: Any, embeddings: bool, layers: int) -> None:
    """Freeze token/position embeddings and the lowest `layers` transformer blocks."""
    import torch

    if embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.requires_grad_(False)
    if layers:
        for block in list(blocks(model))[: min(layers, model.config.num_hidden_layers)]:
            block.requires_grad_(False)


@dataclass
class TrainState:
    """Where a member's training stands: a checkpoint's `state.json` holds its fields (these keys, in this order)."""

    step: int = 0  # optimiser steps taken
    best: float = -1.0  # best validation macro-F1 so far
    best_metrics: dict[str, float] = field(default_factory=dict)  # its validation metrics, with its step
    bad_evals: int = 0  # evaluations since the last gain: early-stopping patience used
    history: list[dict[str, float]] = field(default_factory=list)  # every evaluation: step and metrics
    samples: int = 0  # training examples stepped through (for samples/s)
    train_s: float = 0.0  # seconds spent in optimiser steps
    stopped_early: bool = False
    key: str = ""  # the member key: a checkpoint resumes only the member that wrote it


@dataclass(frozen=True)
class Steps:
    """The run's length in optimiser steps, when it evaluates and how long the learning rate warms up."""

    per_epoch: int
    total: int
    eval_every: int
    warmup: int

    @classmethod
    def plan(cls, n_train: int, ft: FinetuneConfig) -> Steps:
        """One step per `grad_accum` batches; `max_steps` (when set) overrides `epochs`; an evaluation per epoch
        unless `eval_every_steps` says otherwise."""
        per_epoch = math.ceil(math.ceil(n_train / ft.batch_size) / ft.grad_accum)
        total = ft.max_steps or max(1, math.ceil(ft.epochs * per_epoch))
        return cls(per_epoch, total, ft.eval_every_steps or per_epoch, int(ft.warmup_ratio * total))


@dataclass(frozen=True)
class TrainSet:
    """The training reviews as token ids, with their labels and the loss's class weights."""

    encoded: list[list[int]]
    lengths: list[int]
    labels: Any  # torch.long (n,)
    keys: list[tuple[int, ...]]  # an example's token ids: its key in a cache other members share
    class_weights: np.ndarray  # per label id
    loss_weight: Any  # the same as torch.float32 (classes,) on the device
    pad: int


def encode_train(tokenizer: Any, texts: Sequence[str], labels: np.ndarray, n_classes: int, ft: FinetuneConfig,
                 max_length: int, device: Any) -> TrainSet:
    """Token ids per review (unpadded), labels as a tensor, class weights as `ft.class_weights` says."""
    import torch

    encoded = encode(tokenizer, texts, max_length)
    weights = balanced_weights(np.asarray(labels), n_classes) if ft.class_weights == "balanced" else np.ones(n_classes)
    return TrainSet(encoded, [len(e) for e in encoded], torch.tensor(np.array(labels), dtype=torch.long),
                    [tuple(e) for e in encoded], weights, torch.tensor(weights, dtype=torch.float32, device=device),
                    tokenizer.pad_token_id)


@dataclass(frozen=True)
class Loop:
    """What one member's loop reads and steps: model, optimiser and schedule, training and validation data, steps."""

    model: Any
    optimizer: Any  # torch.optim.AdamW
    schedule: Any  # torch.optim.lr_scheduler.LambdaLR
    params: list[Any]  # the trainable parameters, clipped together
    device: Any
    amp: Any  # the autocast dtype (bf16), or None (fp32); weights and AdamW state stay float32 either way
    ft: FinetuneConfig
    steps: Steps
    seed: int
    data: TrainSet
    val_encoded: list[list[int]]  # the validation reviews every evaluation scores
    val_labels: np.ndarray
    val_key: str  # batches' fingerprint + autocast dtype (the resolved precision): whose states a prefix cache holds
    prefix: PrefixCache | None  # shared by the stage's members, or None
    examples: ExampleCache | None  # the frozen prefix's output per training example, or None
    work: Path
    log: LogFn | None

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    @property
    def best_file(self) -> Path:
        return self.work / "best.safetensors"


def build_optimizer(model: Any, ft: FinetuneConfig, learning_rate: float, steps: Steps, device: Any
                    ) -> tuple[list[Any], Any, Any]:
    """(trainable parameters, AdamW, schedule): linear warmup over `steps.warmup`, then linear decay to 0."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=ft.weight_decay,
                                  fused=device.type == "cuda")
    warmup, total = steps.warmup, steps.total
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    return params, optimizer, schedule


def frozen_examples(model: Any, ft: FinetuneConfig, reuse_frozen: bool, shared: ExampleCache | None
                    ) -> ExampleCache | None:
    """Frozen embeddings + lowest layers with no dropout in them: their output per example is fixed, so it is
    recorded in the first epoch and replayed afterwards (mllm.models.prefix.ExampleCache); `shared` when its
    depth fits."""
    depth = min(ft.freeze_layers, model.config.num_hidden_layers - 1) if ft.freeze_embeddings else 0
    if reuse_frozen and depth > 0 and dropout_free(model):
        return shared if shared is not None and shared.depth == depth else ExampleCache(depth)
    return None


def _latest_checkpoint(root: Path, key: str) -> Path | None:
    """Newest complete checkpoint written for the same member key (temporary folders are ignored)."""
    for path in sorted(root.glob("step-*"), reverse=True):
        state = path / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("key") == key:
            return path
    return None


def resume(loop: Loop, key: str) -> TrainState:
    """The state of this member's newest complete checkpoint, its weights, optimiser, schedule and RNG restored
    into `loop`; a fresh state when there is none. Folders a crash left half-written are removed first."""
    import torch
    from safetensors.torch import load_model

    for partial in loop.checkpoints.glob(".step-*.tmp"):  # a save that a crash cut short: never a checkpoint
        shutil.rmtree(partial, ignore_errors=True)
    for partial in loop.work.glob(f".{loop.best_file.name}.*.tmp"):  # (atomic_file's; a kill leaves it)
        partial.unlink(missing_ok=True)
    found = _latest_checkpoint(loop.checkpoints, key)
    if found is None:
        return TrainState(key=key)
    load_model(loop.model, found / "model.safetensors", device=str(loop.device))
    loop.optimizer.load_state_dict(torch.load(found / "optimizer.pt", map_location=loop.device, weights_only=True))
    loop.schedule.load_state_dict(torch.load(found / "schedule.pt", weights_only=True))
    torch.set_rng_state(torch.load(found / "rng.pt", weights_only=True))
    return TrainState(**json.loads((found / "state.json").read_text()))


def save_checkpoint(loop: Loop, state: TrainState) -> None:
    """Write step-N into a temporary folder, `state.json` last, and rename it when complete; keep the newest only."""
    import torch
    from safetensors.torch import save_model

    final = loop.checkpoints / f"step-{state.step:08d}"
    with atomic_dir(final) as tmp:
        save_model(loop.model, f"{tmp}/model.safetensors")
        for name, value in (("optimizer", loop.optimizer.state_dict()), ("schedule", loop.schedule.state_dict()),
                            ("rng", torch.get_rng_state())):
            with open(f"{tmp}/{name}.pt", "wb") as f:  # through Python: a full disk is OSError(ENOSPC), not
                torch.save(value, f)  # torch's own writer's "unexpected pos"
        (Path(tmp) / "state.json").write_text(json.dumps(asdict(state)))  # last: marks the folder complete
        publish_dir(tmp, final)
    for old in sorted(loop.checkpoints.glob("step-*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_step(loop: Loop, group: list[np.ndarray]) -> tuple[float, int]:
    """One optimiser step over a group of `grad_accum` batches; (summed loss, examples in the group)."""
    import torch

    data, model, device, amp = loop.data, loop.model, loop.device, loop.amp
    n_group = sum(len(b) for b in group)
    loss_sum = 0.0
    for index in group:
        inputs = collate(data.encoded, index, data.pad, device)
        with (loop.examples.forward(model, index, data.lengths, data.keys) if loop.examples else nullcontext()), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), data.labels[index].to(device),
                                                 weight=data.loss_weight, reduction="sum")
        (loss / n_group).backward()  # the group's mean, however its batches split it
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(loop.params, 1.0)
    loop.optimizer.step()
    loop.schedule.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_group


def evaluate(loop: Loop) -> dict[str, float]:
    """Validation metrics of the current weights; the model is left in training mode."""
    # With frozen embeddings + lowest layers, the states entering the first trained block are the same for
    # every evaluation of every member: `prefix` (a PrefixCache shared by the stage) computes them once.
    model, prefix, key = loop.model, loop.prefix, loop.val_key
    replay = prefix is not None and prefix.matches(model, key)
    context = (prefix.replay(model) if replay else prefix.record(model, key)) if prefix else nullcontext()
    with context:
        logits = predict_logits(model, loop.val_encoded, loop.data.pad, loop.ft.batch_size * 2, loop.device, loop.amp)
    model.train()
    return classification_summary(logits, loop.val_labels)


def validate(loop: Loop, state: TrainState) -> None:
    """Score validation; keep the weights when macro-F1 gains, else spend patience (early stopping)."""
    from safetensors.torch import save_model

    metrics = evaluate(loop)
    step = state.step
    state.history.append({"step": step, **metrics})
    if loop.log:
        loop.log({f"val_{k}": v for k, v in metrics.items()}, step)
    if metrics["macro_f1"] > state.best + 1e-9:
        state.best, state.best_metrics, state.bad_evals = metrics["macro_f1"], {**metrics, "step": step}, 0
        with atomic_file(loop.best_file) as tmp:
            save_model(loop.model, str(tmp))
    else:
        state.bad_evals += 1
        patience = loop.ft.early_stopping_patience
        if patience and state.bad_evals >= patience:
            state.stopped_early = True


def run_epoch(loop: Loop, state: TrainState, bar: Any) -> None:
    """The rest of the epoch `state.step` lies in. Its batch order comes from the seed and the epoch, so a resumed
    run skips the groups it already stepped through; it evaluates and checkpoints every `eval_every` steps."""
    steps = loop.steps
    epoch, position = divmod(state.step, steps.per_epoch)
    batches = length_batches(loop.data.lengths, loop.ft.batch_size, seed=loop.seed * 100_003 + epoch)
    groups = [batches[i : i + loop.ft.grad_accum] for i in range(0, len(batches), loop.ft.grad_accum)]
    for group in groups[position:]:
        tick = time.perf_counter()
        loss_sum, n_group = optimizer_step(loop, group)
        state.step += 1
        state.samples += n_group
        state.train_s += time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / n_group:.4f}")
        if loop.log:
            loop.log({"train_loss": loss_sum / n_group, "learning_rate": loop.schedule.get_last_lr()[0],
                      "epoch": state.step / steps.per_epoch}, state.step)
        if state.step % steps.eval_every == 0 or state.step == steps.total:
            validate(loop, state)
            save_checkpoint(loop, state)
        if state.step >= steps.total or state.stopped_early:
            break


def publish_final(loop: Loop, tokenizer: Any, state: TrainState, base_dir: Path, name: str, key: str) -> Path:
    """Write the best weights, the tokenizer and where they came from to `work/final`; return it."""
    from safetensors.torch import load_model

    load_model(loop.model, loop.best_file, device=str(loop.device))
    final = loop.work / "final"
    with atomic_dir(final) as tmp:
        loop.model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_source(Path(tmp), role="member", name=name, key=key, base=str(base_dir), steps=state.step,
                     best=state.best_metrics)
        publish_dir(tmp, final)
    return final


def train_member(
    base_dir: Path,
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    val_texts: Sequence[str],
    val_labels: np.ndarray,
    ft: FinetuneConfig,
    model_cfg: ModelConfig,
    work: Path,
    *,
    seed: int,
    learning_rate: float,
    key: str,
    log: LogFn | None = None,
    progress: bool = True,
    name: str = "member",
    prefix: PrefixCache | None = None,
    reuse_frozen: bool = True,
    example_cache: ExampleCache | None = None,
) -> TrainResult:
    """Fine-tune the base classifier at `base_dir` on (texts, labels); write the best weights to `work/final`.
    `example_cache`: frozen-prefix states shared with other members of the same base (same freeze settings)."""
    import torch
    from tqdm.auto import tqdm

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, tokenizer = load_classifier(base_dir, "base checkpoint")
    device, amp = resolve_device(model_cfg)
    freeze(model, ft.freeze_embeddings, ft.freeze_layers)
    model.to(device)
    data = encode_train(tokenizer, train_texts, train_labels, int(model.config.num_labels), ft, model_cfg.max_length,
                        device)
    enc_val = encode(tokenizer, val_texts, model_cfg.max_length)
    steps = Steps.plan(len(data.encoded), ft)
    params, optimizer, schedule = build_optimizer(model, ft, learning_rate, steps, device)
    loop = Loop(model, optimizer, schedule, params, device, amp, ft, steps, seed, data, enc_val, np.asarray(val_labels),
                fingerprint_batches(enc_val, ft.batch_size * 2) + str(amp), prefix,
                frozen_examples(model, ft, reuse_frozen, example_cache), work, log)
    state = resume(loop, key)
    resumed_from = state.step

    model.train()
    bar = tqdm(total=steps.total, initial=state.step, desc=f"finetune {name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while state.step < steps.total and not state.stopped_early:
            run_epoch(loop, state, bar)
    finally:  # an error's one line starts on a line of its own
        bar.close()

    final = publish_final(loop, tokenizer, state, base_dir, name, key)
    return TrainResult(
        model_dir=final, best={k: float(v) for k, v in state.best_metrics.items()}, steps=state.step,
        resumed_from=resumed_from, stopped_early=state.stopped_early, wall_s=time.perf_counter() - start,
        train_samples_per_s=state.samples / max(state.train_s, 1e-9), history=state.history,
        class_weights=[float(w) for w in data.class_weights],
    )
