"""Does bf16 scoring change what the scores say? Each classifier scored on validation in fp32 and in bf16.

    python scripts/precision_check.py -c configs/default.yaml outputs/members/*/final

For every classifier folder (a member's `final`, a merged model's folder, a downloaded registered model) it scores the
config's validation split twice with mllm's evaluation path (`mllm.evaluate.model_logits`: weights cast to the
precision, batches of evaluate.batch_size), fp32 first, and prints macro-F1, NLL and accuracy both ways, how many
predictions agree, the largest change of a class probability, and the seconds of each pass with their ratio. The
test split is never read. Refused in one line (exit 2) on a device without bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mllm.config import load_config
from mllm.data.splits import load_splits
from mllm.errors import MllmError
from mllm.evaluate import model_logits
from mllm.evaluation.metrics import classification_summary
from mllm.models.precision import resolve_precision


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def check(config: str, folders: list[Path], overrides: list[str]) -> list[dict[str, float]]:
    """Per folder: the metrics in both precisions, agreement, largest probability change, seconds."""
    base = load_config(config, overrides)
    cfgs = {p: base.model_copy(update={"model": base.model.model_copy(update={"precision": p})})
            for p in ("fp32", "bf16")}
    resolve_precision(cfgs["bf16"].model, role="score")  # refuses bf16 where the device lacks it
    data = load_splits(base.data)
    texts, labels = data.validation["text"].tolist(), data.validation["label"].to_numpy()
    rows = []
    for folder in folders:
        out: dict[str, float] = {}
        logits = {}
        for p, cfg in cfgs.items():
            start = time.perf_counter()
            logits[p] = model_logits(folder, texts, data.label_names, cfg, f"{folder.parent.name} {p}")[0]
            out[f"{p}_s"] = time.perf_counter() - start
            summary = classification_summary(logits[p], labels)
            out |= {f"{p}_{k}": float(summary[k]) for k in ("macro_f1", "nll", "accuracy")}
        out["agree"] = float((logits["fp32"].argmax(1) == logits["bf16"].argmax(1)).mean())
        out["max_dprob"] = float(np.abs(softmax(logits["fp32"]) - softmax(logits["bf16"])).max())
        rows.append(out)
        print(f"{folder}: macro-F1 fp32 {out['fp32_macro_f1']:.4f} bf16 {out['bf16_macro_f1']:.4f} "
              f"(diff {out['bf16_macro_f1'] - out['fp32_macro_f1']:+.4f}); NLL {out['fp32_nll']:.4f} / "
              f"{out['bf16_nll']:.4f}; accuracy {out['fp32_accuracy']:.4f} / {out['bf16_accuracy']:.4f}; "
              f"predictions agree {out['agree']:.1%}, largest probability change {out['max_dprob']:.4f}; "
              f"{out['fp32_s']:.1f} s / {out['bf16_s']:.1f} s = {out['fp32_s'] / out['bf16_s']:.2f}x", flush=True)
    worst = max(abs(r["bf16_macro_f1"] - r["fp32_macro_f1"]) for r in rows)
    print(f"{len(rows)} classifiers on {len(labels)} validation reviews: largest macro-F1 change {worst:.4f}, "
          f"lowest agreement {min(r['agree'] for r in rows):.1%}, bf16 scoring "
          f"{sum(r['fp32_s'] for r in rows) / sum(r['bf16_s'] for r in rows):.2f}x the speed of fp32 (first pass "
          f"of each classifier included)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("folders", nargs="+", type=Path, help="classifier folders (config.json + safetensors)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        check(args.config, args.folders, args.set)
    except MllmError as e:
        print(f"precision_check: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
