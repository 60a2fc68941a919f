"""The training loop of one member: length-grouped batches, AdamW with linear warmup/decay, gradient
accumulation, bf16 autocast on CUDA, validation macro-F1 early stopping, crash-safe checkpoints and resume.

A lean loop instead of the Hugging Face Trainer: it pads each batch only to its own longest review (batches
group reviews of similar length), and its checkpoints are written to a temporary folder and renamed when
complete, so a crash mid-save never leaves a checkpoint that looks finished (`get_last_checkpoint` in
transformers does not check that). Resuming restores weights, optimiser, schedule, RNG and the position in
the epoch's batch order (derived from the seed), so a resumed member equals an uninterrupted one.
`scripts/bench_finetune.py` compares it with the original study's Trainer set-up.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllm.config.schema import FinetuneConfig, ModelConfig
from mllm.evaluation.metrics import classification_summary
from mllm.models.modeling import (
    atomic_dir,
    collate,
    encode,
    length_batches,
    load_classifier,
    predict_logits,
    publish_dir,
    resolve_device,
    write_source,
)
from mllm.models.prefix import ExampleCache, blocks, dropout_free, fingerprint_batches

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


def _latest_checkpoint(root: Path, key: str) -> Path | None:
    """Newest complete checkpoint written for the same member key (temporary folders are ignored)."""
    for path in sorted(root.glob("step-*"), reverse=True):
        state = path / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("key") == key:
            return path
    return None


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
    prefix: Any = None,
    reuse_frozen: bool = True,
    example_cache: ExampleCache | None = None,
) -> TrainResult:
    """Fine-tune the base classifier at `base_dir` on (texts, labels); write the best weights to `work/final`.
    `example_cache`: frozen-prefix states shared with other members of the same base (same freeze settings)."""
    import torch
    from safetensors.torch import load_model, save_model
    from tqdm.auto import tqdm

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, tokenizer = load_classifier(base_dir, "base checkpoint")
    device, amp = resolve_device(model_cfg)
    freeze(model, ft.freeze_embeddings, ft.freeze_layers)
    model.to(device)
    pad = tokenizer.pad_token_id
    enc_train = encode(tokenizer, train_texts, model_cfg.max_length)
    enc_val = encode(tokenizer, val_texts, model_cfg.max_length)
    lengths = [len(e) for e in enc_train]
    labels_t = torch.tensor(np.array(train_labels), dtype=torch.long)
    n_classes = int(model.config.num_labels)
    class_weights = (balanced_weights(np.asarray(train_labels), n_classes) if ft.class_weights == "balanced"
                     else np.ones(n_classes))
    loss_weight = torch.tensor(class_weights, dtype=torch.float32, device=device)

    batches_per_epoch = math.ceil(len(enc_train) / ft.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / ft.grad_accum)
    total = ft.max_steps or max(1, math.ceil(ft.epochs * steps_per_epoch))
    eval_every = ft.eval_every_steps or steps_per_epoch
    warmup = int(ft.warmup_ratio * total)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=ft.weight_decay,
                                  fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    state: dict[str, Any] = {"step": 0, "best": -1.0, "best_metrics": {}, "bad_evals": 0, "history": [],
                             "samples": 0, "train_s": 0.0, "stopped_early": False, "key": key}
    checkpoints, best_file = work / "checkpoints", work / "best.safetensors"
    for partial in checkpoints.glob(".step-*.tmp"):  # a save that a crash cut short: never a checkpoint
        _rmtree(partial)
    resume = _latest_checkpoint(checkpoints, key)
    if resume is not None:
        load_model(model, resume / "model.safetensors", device=str(device))
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", map_location=device, weights_only=True))
        schedule.load_state_dict(torch.load(resume / "schedule.pt", weights_only=True))
        torch.set_rng_state(torch.load(resume / "rng.pt", weights_only=True))
        state = json.loads((resume / "state.json").read_text())
    resumed_from = state["step"]

    val_key = fingerprint_batches(enc_val, ft.batch_size * 2) + str(amp)

    def evaluate() -> dict[str, float]:
        # With frozen embeddings + lowest layers, the states entering the first trained block are the same for
        # every evaluation of every member: `prefix` (a PrefixCache shared by the stage) computes them once.
        replay = prefix is not None and prefix.matches(model, val_key)
        context = (prefix.replay(model) if replay else prefix.record(model, val_key)) if prefix else nullcontext()
        with context:
            logits = predict_logits(model, enc_val, pad, ft.batch_size * 2, device, amp)
        model.train()
        return classification_summary(logits, np.asarray(val_labels))

    def checkpoint() -> None:
        with atomic_dir(checkpoints / f"step-{state['step']:08d}") as tmp:
            save_model(model, f"{tmp}/model.safetensors")
            torch.save(optimizer.state_dict(), f"{tmp}/optimizer.pt")
            torch.save(schedule.state_dict(), f"{tmp}/schedule.pt")
            torch.save(torch.get_rng_state(), f"{tmp}/rng.pt")
            (Path(tmp) / "state.json").write_text(json.dumps(state))  # last: marks the folder complete
            publish_dir(tmp, checkpoints / f"step-{state['step']:08d}")
        for old in sorted(checkpoints.glob("step-*"))[:-1]:  # keep the newest only
            _rmtree(old)

    # Frozen embeddings + lowest layers with no dropout in them: their output per example is fixed, so it is
    # recorded in the first epoch and replayed afterwards (mllm.models.prefix.ExampleCache).
    depth = min(ft.freeze_layers, model.config.num_hidden_layers - 1) if ft.freeze_embeddings else 0
    examples = None
    if reuse_frozen and depth > 0 and dropout_free(model):
        examples = example_cache if example_cache is not None and example_cache.depth == depth else ExampleCache(depth)
    keys = [tuple(e) for e in enc_train]  # an example's token ids: its key in a cache other members share
    model.train()
    bar = tqdm(total=total, initial=state["step"], desc=f"finetune {name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    while state["step"] < total and not state["stopped_early"]:
        epoch, position = divmod(state["step"], steps_per_epoch)
        batches = length_batches(lengths, ft.batch_size, seed=seed * 100_003 + epoch)
        groups = [batches[i : i + ft.grad_accum] for i in range(0, len(batches), ft.grad_accum)]
        for group in groups[position:]:
            tick = time.perf_counter()
            n_group = sum(len(b) for b in group)
            loss_sum = 0.0
            for index in group:
                inputs = collate(enc_train, index, pad, device)
                with (examples.forward(model, index, lengths, keys) if examples else nullcontext()), \
                        torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = model(**inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels_t[index].to(device),
                                                       weight=loss_weight, reduction="sum")
                (loss / n_group).backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["samples"] += n_group
            state["train_s"] += time.perf_counter() - tick
            step = state["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n_group:.4f}")
            if log:
                log({"train_loss": loss_sum / n_group, "learning_rate": schedule.get_last_lr()[0],
                     "epoch": step / steps_per_epoch}, step)
            if step % eval_every == 0 or step == total:
                metrics = evaluate()
                state["history"].append({"step": step, **metrics})
                if log:
                    log({f"val_{k}": v for k, v in metrics.items()}, step)
                if metrics["macro_f1"] > state["best"] + 1e-9:
                    state.update(best=metrics["macro_f1"], best_metrics={**metrics, "step": step}, bad_evals=0)
                    save_model(model, f"{best_file}.tmp")
                    Path(f"{best_file}.tmp").replace(best_file)
                else:
                    state["bad_evals"] += 1
                    if ft.early_stopping_patience and state["bad_evals"] >= ft.early_stopping_patience:
                        state["stopped_early"] = True
                checkpoint()
            if step >= total or state["stopped_early"]:
                break
    bar.close()

    load_model(model, best_file, device=str(device))
    final = work / "final"
    with atomic_dir(final) as tmp:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_source(Path(tmp), role="member", name=name, key=key, base=str(base_dir), steps=state["step"],
                     best=state["best_metrics"])
        publish_dir(tmp, final)
    return TrainResult(
        model_dir=final, best={k: float(v) for k, v in state["best_metrics"].items()}, steps=state["step"],
        resumed_from=resumed_from, stopped_early=state["stopped_early"], wall_s=time.perf_counter() - start,
        train_samples_per_s=state["samples"] / max(state["train_s"], 1e-9), history=state["history"],
        class_weights=[float(w) for w in class_weights],
    )


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
