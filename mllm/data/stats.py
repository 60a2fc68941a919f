"""`mllm data stats`: per-dataset rows, label distribution, words per review and split sizes.

The word statistics follow the original study's table (whitespace split, mean / median / std), e.g. the full
Drugs.com set: 84.7 / 84 / 45.0 words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm.config.schema import DataConfig, DatasetConfig
from mllm.data.presets import PRESETS
from mllm.data.splits import LABEL_NAMES, SHORT_WORDS, dataset_stats, load_dataset_rows, split_dataset
from mllm.errors import DataError


def select_datasets(cfg: DataConfig, selectors: list[str]) -> list[tuple[int, DatasetConfig]]:
    """Resolve `--dataset` values: a configured name, a preset, or a local file (default: all configured)."""
    if not selectors:
        return list(enumerate(cfg.datasets))
    by_name = {d.name: (i, d) for i, d in enumerate(cfg.datasets)}
    chosen = []
    for i, sel in enumerate(selectors):
        if sel in by_name:
            chosen.append(by_name[sel])
        elif sel in PRESETS:
            chosen.append((i, DatasetConfig(preset=sel)))  # type: ignore[arg-type]
        elif Path(sel).exists():
            chosen.append((i, DatasetConfig(path=Path(sel))))
        else:
            known = ", ".join([*by_name, *(p for p in PRESETS if p not in by_name)])
            raise DataError(f"--dataset {sel}: not a configured dataset, preset or existing file",
                            f"use one of {known}, or a path")
    return chosen


def collect_stats(cfg: DataConfig, selectors: list[str]) -> dict[str, Any]:
    """Statistics of each selected dataset, as the JSON `mllm data stats --format json` prints.

    rows/labels/words describe all normalised rows; splits are what an experiment uses (after dedupe and
    data.max_rows)."""
    names = LABEL_NAMES[cfg.label_scheme]
    out = []
    for index, ds in select_datasets(cfg, selectors):
        if ds.label_kind == "sentiment" and cfg.label_scheme != "sentiment3":
            raise DataError(f"--dataset {ds.name} has sentiment labels; data.label_scheme is {cfg.label_scheme}",
                            "pass --set data.label_scheme=sentiment3")
        rows = load_dataset_rows(ds, cfg, index)
        splits, dropped = split_dataset(rows, cfg)
        out.append({"name": ds.name, "label_scheme": cfg.label_scheme, **dataset_stats(rows, names),
                    "duplicates_dropped": dropped, "splits": {s: len(f) for s, f in splits.items()}})
    return {"seed": cfg.seed, "datasets": out}


def render_table(report: dict[str, Any]) -> None:
    """Print the statistics as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mllm data stats (split seed {report['seed']})")
    for col in ("dataset", "rows", "labels", "words mean", "median", "std", f"< {SHORT_WORDS} words",
                "dupes dropped", "train/val/test"):
        table.add_column(col, justify="left" if col in ("dataset", "labels") else "right")
    for d in report["datasets"]:
        labels = " ".join(f"{k}:{v}" for k, v in d["labels"].items())
        w, s = d["words"], d["splits"]
        table.add_row(d["name"], str(d["rows"]), labels, f"{w['mean']:.1f}", f"{w['median']:g}", f"{w['std']:.1f}",
                      str(d[f"under_{SHORT_WORDS}_words"]), str(d["duplicates_dropped"]),
                      f"{s['train']}/{s['validation']}/{s['test']}")
    console = Console()
    console.width = max(console.width, 130)  # pipes and CI logs report 80 columns
    console.print(table)
