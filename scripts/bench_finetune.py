"""Fine-tuning throughput: the original study's way against mllm's, same model and data, in one run.

    python scripts/bench_finetune.py                     # CPU: 96 reviews each way
    python scripts/bench_finetune.py --samples 4096      # on a GPU (--batch-size)
    python scripts/bench_finetune.py --precision fp32    # mllm's way in fp32 only

Model: a randomly initialised GPT-2-124M-sized classifier (12 layers, hidden 768, vocab 50257; no GPT-2
weights exist offline) with a byte-level BPE tokenizer trained on the reviews themselves, so review lengths
in tokens are close to GPT-2's. Data: the Drugs.com sample's training reviews, 128 tokens at most.

- original: Hugging Face Trainer, fp32, batch 8, random order, dynamic padding (DataCollatorWithPadding).
- mllm: mllm.models.training.train_member, the stage's own loop: length-grouped batches padded to a multiple of 8,
  a bigger batch on CUDA; once in fp32 and once in bf16 (model.precision=bf16: autocast, fp32 weights) where the
  device has bf16 (a CUDA GPU that supports it, a CPU with avx512_bf16 or AMX), in fp32 only elsewhere.
Prints samples/s of each, the ratio mllm / original per precision and bf16 / fp32. Wall-clock numbers: run on an
idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_model(out: Path, texts: list[str], vocab: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from mllm.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("gpt2", vocab_size=vocab, corpus=texts)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def original_way(model_dir: Path, texts: list[str], labels: list[int], max_length: int, out: Path) -> float:
    """The original study's fine-tuning: Trainer, fp32, batch 8, no length grouping."""
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=2e-5, weight_decay=0.01, save_strategy="no", report_to=[],
                             logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
    return float(trainer.train().metrics["train_samples_per_second"])


def mllm_way(model_dir: Path, texts: list[str], labels: list[int], max_length: int, batch_size: int,
             out: Path, precision: str) -> float:
    """mllm's member training loop, as `mllm finetune` runs it, in `precision` (fp32 or bf16)."""
    import numpy as np

    from mllm.config import FinetuneConfig, ModelConfig
    from mllm.models.training import train_member

    ft = FinetuneConfig(epochs=1, batch_size=batch_size, learning_rate=2e-5, weight_decay=0.01,
                        early_stopping_patience=None)
    result = train_member(model_dir, texts, np.array(labels), texts[:8], np.array(labels[:8]), ft,
                          ModelConfig(name_or_path=str(model_dir), max_length=max_length, precision=precision), out,
                          seed=0,
                          learning_rate=2e-5, key="bench", progress=False)
    return result.train_samples_per_s


def precisions(asked: str) -> tuple[list[str], str | None]:
    """The precisions to run in, and why bf16 is left out (None: it is not): mllm.models.precision's rule."""
    from mllm.errors import MllmError
    from mllm.models.precision import bench_precisions

    try:
        return bench_precisions(asked)  # type: ignore[return-value]
    except MllmError as e:
        sys.exit(str(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="training reviews per way")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="mllm's batch (default: 8 on CPU, 32 on CUDA)")
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both",
                        help="mllm's way in fp32 and bf16 side by side (bf16 only where the device has it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from mllm.config import DataConfig
    from mllm.data.splits import load_splits

    cuda = torch.cuda.is_available()
    batch = args.batch_size or (32 if cuda else 8)
    runs, no_bf16 = precisions(args.precision)
    train = load_splits(DataConfig()).train
    reps = -(-args.samples // len(train))
    texts = (train["text"].tolist() * reps)[: args.samples]
    labels = (train["label"].tolist() * reps)[: args.samples]
    ours, wall = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "gpt2-124m-random", train["text"].tolist(), vocab=8000)
        t0 = time.perf_counter()
        original = original_way(model_dir, texts, labels, args.max_length, Path(tmp) / "trainer")
        wall["original"] = round(time.perf_counter() - t0, 1)
        for p in runs:
            t0 = time.perf_counter()
            ours[p] = mllm_way(model_dir, texts, labels, args.max_length, batch, Path(tmp) / f"mllm-{p}", p)
            wall[f"mllm_{p}"] = round(time.perf_counter() - t0, 1)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    figures = {"device": device, "samples": args.samples, "max_length": args.max_length,
               "original_samples_per_s": round(original, 2), "mllm_batch_size": batch,
               **{f"mllm_{p}_samples_per_s": round(v, 2) for p, v in ours.items()},
               **{f"ratio_{p}": round(v / original, 2) for p, v in ours.items()},
               "bf16_over_fp32": round(ours["bf16"] / ours["fp32"], 2) if len(ours) == 2 else None,
               "no_bf16": no_bf16, "wall_s": wall}
    print(f"device: {device}; {args.samples} reviews, <= {args.max_length} tokens, GPT-2-124M-sized random model")
    print(f"original (Trainer, fp32, batch 8, random order): {original:8.2f} samples/s")
    for p, v in ours.items():
        print(f"mllm {p} (length-grouped, batch {batch}):        {v:8.2f} samples/s   mllm / original "
              f"{v / original:.2f}x")
    if len(ours) == 2:
        print(f"ratio bf16 / fp32 (mllm): {ours['bf16'] / ours['fp32']:.2f}x")
    if no_bf16:
        print(f"bf16: not measured ({no_bf16})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
