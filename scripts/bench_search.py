"""Search-trial cost: the original study's trial against mllm's, same recipe and validation set, in one run.

    python scripts/bench_search.py                          # CPU: 256 validation reviews, K=3
    python scripts/bench_search.py --members default-recipe # + members trained with configs/default.yaml's recipe
    python scripts/bench_search.py --reviews 2048           # on a GPU (mllm's trial then merges on the GPU)
    python scripts/bench_search.py --precision fp32         # mllm's trial in fp32 only

Members: K randomly perturbed copies of a randomly initialised GPT-2-124M-sized classifier (12 layers, hidden
768, vocab 50257; no GPT-2 weights exist offline) and the base they share, as safetensors folders. With
`--members default-recipe`, also K members trained from that base with configs/default.yaml's finetune recipe
(class weights, frozen embeddings and the same share of frozen lower blocks, SmolLM2's 16 of 30 being 6 of 12
here; `--train-steps` optimiser steps each, seeds 0..K-1), as users train them: their frozen weights are exactly
the base's, so mllm skips merging them and computes the frozen prefix of the validation set once. Reviews:
the Drugs.com sample, 128 tokens at most. Recipe: TIES, density 0.5, equal weights.

- original: write the mergekit YAML, run the `mergekit-yaml` CLI (merged model written to disk; `--cuda` on a
  GPU), reload it with transformers, `Trainer.evaluate` in fp32 with batch 8 and dynamic padding.
- mllm: `mllm.merging.scorer.Scorer` as a search worker runs it: members resident in memory (loaded once, not
  counted per trial), in-memory merge (`mllm.merging.inmemory`) into one resident model, pre-tokenised length-sorted
  batches, all reviews scored (no pruning); once in fp32 and once in bf16 (model.precision=bf16: autocast, fp32
  weights) where the device has bf16 (a CUDA GPU that supports it, a CPU with avx512_bf16 or AMX), fp32 only
  elsewhere.
Each way (and each precision) runs in its own process, so each peak RSS is its own. Prints seconds per trial, the
ratio, peak RSS, the bf16 / fp32 ratios and the (K+2) x model-size memory bound of a search worker. Wall-clock
numbers: run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def reviews(n: int) -> tuple[list[str], list[int]]:
    from mllm.config import DataConfig
    from mllm.data.splits import load_splits

    splits = load_splits(DataConfig())
    import pandas as pd

    rows = pd.concat([splits.validation, splits.test, splits.train], ignore_index=True)
    rows = pd.concat([rows] * (n // len(rows) + 1), ignore_index=True).head(n)  # repeat the sample if n > 979
    return rows["text"].tolist(), rows["label"].tolist()


def build(root: Path) -> tuple[Path, list[Path], int]:
    """Base + K members (base plus seeded noise), GPT-2-124M-sized, with a BPE tokenizer from the reviews."""
    import json as _json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from mllm.models.tiny import build_tiny_tokenizer

    texts, _ = reviews(979)
    tokenizer = build_tiny_tokenizer("gpt2", vocab_size=8000, corpus=texts)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id, id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2})
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    (base / "mllm-source.json").write_text(_json.dumps({"role": "base", "base_key": "bench"}))
    weights = load_file(base / "model.safetensors")
    members = []
    for i in range(K):
        out = root / f"member-{i}"
        shutil.copytree(base, out)
        g = torch.Generator().manual_seed(i + 1)
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
                  out / "model.safetensors", metadata={"format": "pt"})
        (out / "mllm-source.json").write_text(_json.dumps({"role": "member", "base_key": "bench"}))
        members.append(out)
    return base, members, size


def build_trained(root: Path, base: Path, steps: int) -> tuple[list[Path], dict]:
    """K members trained from `base` with configs/default.yaml's finetune recipe (frozen share scaled to 12 blocks)."""
    import json as _json

    import numpy as np

    from mllm.config import load_config
    from mllm.models.training import train_member

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    frozen = round(cfg.finetune.freeze_layers * 12 / 30)
    ft = cfg.finetune.model_copy(update={"freeze_layers": frozen, "max_steps": steps, "eval_every_steps": steps,
                                         "early_stopping_patience": None})
    texts, labels = reviews(979)
    members = []
    for i in range(K):
        rows = np.random.default_rng(i).permutation(len(texts))[: 8 * steps]
        result = train_member(base, [texts[j] for j in rows], np.array([labels[j] for j in rows]), texts[:64],
                              np.array(labels[:64]), ft, cfg.model.model_copy(update={"device": "cpu",
                                                                                     "precision": "fp32"}),
                              root / f"work-{i}", seed=i, learning_rate=ft.learning_rate, key=f"bench-{i}",
                              progress=False, name=f"trained-{i}")
        out = root / f"trained-{i}"
        result.model_dir.rename(out)
        (out / "mllm-source.json").write_text(_json.dumps({"role": "member", "base_key": "bench"}))
        members.append(out)
    return members, {"freeze_embeddings": ft.freeze_embeddings, "freeze_layers": frozen}


def original_trial(base: Path, members: list[Path], texts: list[str], labels: list[int], work: Path,
                   cuda: bool) -> float:
    import datasets
    import numpy as np
    import torch
    import yaml
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    spec = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in members]}
    (work / "merge.yml").write_text(yaml.safe_dump(spec))
    out = work / "merged"
    cmd = [str(Path(sys.executable).with_name("mergekit-yaml")), str(work / "merge.yml"), str(out),
           "--copy-tokenizer", "--no-write-model-card", "--quiet", *(["--cuda"] if cuda else [])]
    subprocess.run(cmd, check=True, capture_output=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(work / "trainer"), per_device_eval_batch_size=8, report_to=[],
                             disable_tqdm=True)

    def metrics(p):  # noqa: ANN001, ANN202
        from sklearn.metrics import f1_score

        return {"macro_f1": f1_score(p.label_ids, np.argmax(p.predictions, 1), average="macro")}

    Trainer(model=model, args=args, eval_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=metrics).evaluate()
    return time.perf_counter() - start


def run_way(way: str, root: Path, n: int, trials: int, cuda: bool, members_glob: str = "member-*",
            frozen: dict | None = None, precision: str = "fp32") -> dict[str, float]:
    base, members = root / "base", sorted(root.glob(members_glob))
    texts, labels = reviews(n)
    if way == "original":
        times = []
        for t in range(trials):
            work = root / f"original-{members_glob.rstrip('-*')}-{t}"  # one folder per member set and trial
            work.mkdir()
            times.append(original_trial(base, members, texts, labels, work, cuda))
        return {"s_per_trial": min(times), "peak_rss_gb": peak_rss_gb(), "load_s": 0.0}
    import numpy as np

    from mllm.config import ExperimentConfig, MergeConfig
    from mllm.merging.scorer import Scorer

    cfg = ExperimentConfig.model_validate({"model": {"name_or_path": str(base), "device": "cuda" if cuda else "cpu",
                                                     "precision": precision},
                                          "search": {"prune": False}, "finetune": frozen or {},
                                          "evaluate": {"batch_size": 64 if cuda else 32}})
    start = time.perf_counter()
    scorer = Scorer(cfg, base, members, reviews=(texts, np.array(labels)))  # as a search worker builds it
    load_s = time.perf_counter() - start
    recipe = MergeConfig(method="ties", density=0.5)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        *_, (score, _merge_s) = scorer.stages(recipe)
        if cuda:
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"s_per_trial": min(times), "peak_rss_gb": peak_rss_gb(), "load_s": load_s, "macro_f1": score.macro_f1}


def compare(root: Path, args: argparse.Namespace, members_glob: str, frozen: dict | None, precisions: list[str]
            ) -> dict[str, dict]:
    """Both ways on one member set (mllm's once per precision), each in its own process (its own peak RSS)."""
    results = {}
    for way, precision in [("original", "fp32"), *(("mllm", p) for p in precisions)]:
        proc = subprocess.run([sys.executable, __file__, "--way", way, "--root", str(root), "--reviews",
                               str(args.reviews), "--trials", str(args.trials), "--members-glob", members_glob,
                               "--frozen", json.dumps(frozen or {}), "--precision", precision],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{way} {precision} failed:\n{proc.stderr[-3000:]}")
        results[way if way == "original" else f"mllm {precision}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def precisions(asked: str) -> tuple[list[str], str | None]:
    """The precisions to run in, and why bf16 is left out (None: it is not): mllm.models.precision's rule."""
    from mllm.errors import MllmError
    from mllm.models.precision import bench_precisions

    try:
        return bench_precisions(asked)  # type: ignore[return-value]
    except MllmError as e:
        sys.exit(str(e))


def report(sets: dict[str, dict], size: int, no_bf16: str | None) -> None:
    bound = 1.5 * (K + 2) * size / 1e9
    for name, results in sets.items():
        o = results["original"]
        print(f"{name}:")
        print(f"  original (mergekit-yaml to disk, reload, Trainer.evaluate fp32 batch 8): {o['s_per_trial']:.2f} "
              f"s/trial, peak RSS {o['peak_rss_gb']:.2f} GB")
        for way, m in results.items():
            if way == "original":
                continue
            print(f"  {way} (in-memory merge, resident model, length-sorted batches): {m['s_per_trial']:.2f} s/trial "
                  f"(+ {m['load_s']:.1f} s once per worker), peak RSS {m['peak_rss_gb']:.2f} GB")
            print(f"    ratio original / {way}: {o['s_per_trial'] / m['s_per_trial']:.1f}x; worker RSS bound 1.5 x "
                  f"(K+2) x size = {bound:.2f} GB ({'within' if m['peak_rss_gb'] <= bound else 'ABOVE'})")
        if "mllm fp32" in results and "mllm bf16" in results:
            f, b = results["mllm fp32"], results["mllm bf16"]
            print(f"  bf16 / fp32 (mllm): s/trial {b['s_per_trial'] / f['s_per_trial']:.2f}x, peak RSS "
                  f"{b['peak_rss_gb'] / f['peak_rss_gb']:.2f}x, macro-F1 {f['macro_f1']:.4f} -> {b['macro_f1']:.4f}")
    if no_bf16:
        print(f"bf16: not measured ({no_bf16})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3, help="trials per way (the fastest is reported)")
    parser.add_argument("--members", choices=["random", "default-recipe"], default="random",
                        help="default-recipe: also members trained with configs/default.yaml's recipe")
    parser.add_argument("--train-steps", type=int, default=6, help="optimiser steps per trained member")
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both",
                        help="mllm's trial in fp32 and bf16 side by side (bf16 only where the device has it)")
    parser.add_argument("--way", choices=["original", "mllm"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--members-glob", default="member-*", help=argparse.SUPPRESS)
    parser.add_argument("--frozen", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if args.way:  # a child process: one way, JSON on the last line
        print(json.dumps(run_way(args.way, args.root, args.reviews, args.trials, cuda, args.members_glob,
                                 json.loads(args.frozen), args.precision)))
        return
    runs, no_bf16 = precisions(args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, _, size = build(root)
        sets = {"random members": compare(root, args, "member-*", None, runs)}
        if args.members == "default-recipe":
            _, frozen = build_trained(root, root / "base", args.train_steps)
            sets[f"trained members ({frozen})"] = compare(root, args, "trained-*", frozen, runs)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {device}; K={K} GPT-2-124M-sized members ({size / 1e9:.2f} GB each in fp32); "
          f"{args.reviews} reviews; ties density 0.5; fastest of {args.trials} trials per way")
    report(sets, size, no_bf16)


if __name__ == "__main__":
    main()
