"""Pilot of member recipes: which training recipe lifts every member to the TF-IDF baseline on validation?

    python scripts/pilot_members.py -c configs/default.yaml \
        --setting "now:class_weights=none" \
        --setting "weighted:class_weights=balanced" \
        --setting "seeds:strategy=seeds,epochs=1,learning_rates=[1e-4,2e-4,3e-4]"

Each --setting is NAME:KEY=VALUE,... over the config's `finetune` section (values are YAML). For every setting
it trains the members that `finetune.strategy` plans (not the full-data member) from one shared base with
mllm's own loop, without MLflow, and prints per member the validation macro-F1 and wall time beside the
TF-IDF baseline's validation macro-F1 on the same split (C chosen on validation, as evaluate does). The test
split is never read. `--out` writes the table as JSON. Wall times: run on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

import yaml


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    if not name or not body:
        raise SystemExit(f"--setting {text!r}: write NAME:KEY=VALUE,... (e.g. weighted:class_weights=balanced)")
    pairs = re.split(r",(?![^\[]*\])", body)  # commas outside [...]
    return name, {k.strip(): yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/default.yaml")
    parser.add_argument("--setting", action="append", required=True, help="NAME:KEY=VALUE,... over finetune")
    parser.add_argument("--members", default=None, help="comma-separated member names to train (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mllm.config.loader import load_config
    from mllm.data.splits import load_splits
    from mllm.evaluation.baselines import fit_tfidf
    from mllm.finetune import plan_members, select
    from mllm.models.modeling import build_base
    from mllm.models.prefix import ExampleCache, PrefixCache
    from mllm.models.training import train_member

    cfg = load_config(Path(args.config))
    splits = dataclasses.replace(load_splits(cfg.data), test=None)  # the pilot decides: it never reads test
    _, c_history = fit_tfidf(splits, cfg.evaluate.tfidf_c, cfg.evaluate.seed)
    tfidf = max(c_history, key=lambda h: (h["val_macro_f1"], -h["val_nll"]))
    print(f"TF-IDF baseline: validation macro-F1 {tfidf['val_macro_f1']:.4f} (C={tfidf['C']:g}), "
          f"{len(splits.validation)} validation reviews")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(cfg.model, splits.label_names, cfg.finetune.seed, Path(tmp) / "base")
        for text in args.setting:
            name, changes = parse_setting(text)
            ft = cfg.finetune.model_validate({**cfg.finetune.model_dump(), **changes, "include_full": False})
            scfg = cfg.model_copy(update={"finetune": ft})
            specs = select(plan_members(scfg, splits), args.members.split(",") if args.members else None)
            depth = ft.freeze_layers if ft.freeze_embeddings else 0
            prefix, examples = PrefixCache(depth), ExampleCache(depth)  # shared by the members, as in the stage
            start = time.perf_counter()
            for spec in specs:
                result = train_member(
                    base, spec.rows["text"].tolist(), spec.rows["label"].to_numpy(),
                    splits.validation["text"].tolist(), splits.validation["label"].to_numpy(), ft, cfg.model,
                    Path(tmp) / name / spec.name, seed=spec.seed, learning_rate=spec.learning_rate,
                    key=f"{name}-{spec.name}", progress=False, name=spec.name, prefix=prefix,
                    example_cache=examples)
                row = {"setting": name, "changes": changes, "member": spec.name, "train_rows": len(spec.rows),
                       "val_macro_f1": result.best["macro_f1"], "val_accuracy": result.best["accuracy"],
                       "best_step": int(result.best["step"]), "steps": result.steps, "wall_s": result.wall_s,
                       "tfidf_val_macro_f1": tfidf["val_macro_f1"],
                       "reaches_tfidf": result.best["macro_f1"] >= tfidf["val_macro_f1"]}
                rows.append(row)
                print(f"{name:>16} {spec.name:>8}: val macro-F1 {row['val_macro_f1']:.4f} "
                      f"(acc {row['val_accuracy']:.4f}, best step {row['best_step']}/{row['steps']}) "
                      f"{row['wall_s']:6.1f} s {'>= TF-IDF' if row['reaches_tfidf'] else '< TF-IDF'}", flush=True)
            mine = [r for r in rows if r["setting"] == name]
            print(f"{name:>16} all members: min {min(r['val_macro_f1'] for r in mine):.4f}, "
                  f"{sum(r['reaches_tfidf'] for r in mine)}/{len(mine)} reach TF-IDF, "
                  f"{time.perf_counter() - start:.1f} s ({changes})", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"tfidf": tfidf, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
