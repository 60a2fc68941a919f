"""Fine-tuning throughput: the original study's way against mllm's, same model and data, in one run.

    python scripts/bench_finetune.py                     # CPU: 96 reviews each way
    python scripts/bench_finetune.py --samples 4096      # on a GPU (mllm's way then uses bf16, --batch-size)

Model: a randomly initialised GPT-2-124M-sized classifier (12 layers, hidden 768, vocab 50257; no GPT-2
weights exist offline) with a byte-level BPE tokenizer trained on the reviews themselves, so review lengths
in tokens are close to GPT-2's. Data: the Drugs.com sample's training reviews, 128 tokens at most.

- original: Hugging Face Trainer, fp32, batch 8, random order, dynamic padding (DataCollatorWithPadding).
- mllm: mllm.models.training.train_member, the stage's own loop: length-grouped batches padded to a multiple of 8,
  bf16 autocast and a bigger batch on CUDA.
Prints samples/s of each and the ratio (mllm / original). Wall-clock numbers: run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
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
             out: Path) -> float:
    """mllm's member training loop, as `mllm finetune` runs it."""
    import numpy as np

    from mllm.config import FinetuneConfig, ModelConfig
    from mllm.models.training import train_member

    ft = FinetuneConfig(epochs=1, batch_size=batch_size, learning_rate=2e-5, weight_decay=0.01,
                        early_stopping_patience=None)
    result = train_member(model_dir, texts, np.array(labels), texts[:8], np.array(labels[:8]), ft,
                          ModelConfig(name_or_path=str(model_dir), max_length=max_length), out, seed=0,
                          learning_rate=2e-5, key="bench", progress=False)
    return result.train_samples_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="training reviews per way")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="mllm's batch (default: 8 on CPU, 32 on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from mllm.config import DataConfig
    from mllm.data.splits import load_splits

    cuda = torch.cuda.is_available()
    batch = args.batch_size or (32 if cuda else 8)
    train = load_splits(DataConfig()).train
    reps = -(-args.samples // len(train))
    texts = (train["text"].tolist() * reps)[: args.samples]
    labels = (train["label"].tolist() * reps)[: args.samples]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "gpt2-124m-random", train["text"].tolist(), vocab=8000)
        t0 = time.perf_counter()
        original = original_way(model_dir, texts, labels, args.max_length, Path(tmp) / "trainer")
        t1 = time.perf_counter()
        ours = mllm_way(model_dir, texts, labels, args.max_length, batch, Path(tmp) / "mllm")
        t2 = time.perf_counter()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    figures = {"device": device, "samples": args.samples, "max_length": args.max_length,
               "original_samples_per_s": round(original, 2), "mllm_samples_per_s": round(ours, 2),
               "mllm_batch_size": batch, "mllm_bf16": cuda, "ratio": round(ours / original, 2),
               "wall_s": {"original": round(t1 - t0, 1), "mllm": round(t2 - t1, 1)}}
    print(f"device: {device}; {args.samples} reviews, <= {args.max_length} tokens, GPT-2-124M-sized random model")
    print(f"original (Trainer, fp32, batch 8, random order): {original:8.2f} samples/s")
    print(f"mllm (length-grouped, batch {batch}{', bf16' if cuda else ', fp32'}):      {ours:8.2f} samples/s")
    print(f"ratio mllm / original: {ours / original:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
