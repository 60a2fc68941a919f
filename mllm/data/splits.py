"""The data layer: normalise sources to (text, label), split them reproducibly, shard train, fingerprint.

    from mllm.config import load_config
    from mllm.data.splits import load_splits
    splits = load_splits(load_config("configs/default.yaml").data)
    splits.train, splits.validation, splits.test   # DataFrames: text, label (int id), domain

Split rules, in order: exact duplicates (same normalised text and label) are dropped; rows whose
normalised texts are equal form one group that lands in one split, so a review never sits in both train
and test; groups are stratified by label and ordered by a seeded hash of their text, which makes the split
depend on the seed and the rows only, not on the order the rows were read in.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mllm.config.schema import DataConfig, DatasetConfig, LabelScheme
from mllm.data.sources import read_raw
from mllm.errors import DataError

LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "rating10": tuple(str(i) for i in range(1, 11)),
    "stars5": tuple(str(i) for i in range(1, 6)),
    "sentiment3": ("negative", "neutral", "positive"),
}
_RANGES = {"rating10": (1, 10), "stars5": (1, 5)}
SPLITS = ("train", "validation", "test")
SHORT_WORDS = 3  # dataset_stats counts texts with fewer words than this
SELECTION = "selection"  # held out of train when data.selection_fraction > 0: the promotion gate's split


def clean_text(text: str) -> str:
    """HTML-unescape, drop the Drugs.com files' `\"\"\"` wrapping, collapse whitespace."""
    text = html.unescape(html.unescape(text)).strip()  # some reviews are escaped twice (&amp;#039;)
    for _ in range(3):
        if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            text = text[1:-1].strip()
    return " ".join(text.split())


def _key(text: str) -> str:
    """Duplicate key: case- and whitespace-insensitive text."""
    return " ".join(text.casefold().split())


def _order(seed: int, keys: pd.Series) -> pd.Series:
    """A seeded pseudo-random rank per key, independent of row order."""
    return keys.map(lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).hexdigest())


def normalise(frame: pd.DataFrame, ds: DatasetConfig, cfg: DataConfig, where: str) -> pd.DataFrame:
    """Raw source rows -> DataFrame(text, label, domain) with label an id into LABEL_NAMES[scheme]."""
    missing = [c for c in [*ds.text_columns, ds.label_column] if c not in frame.columns]
    if missing:
        columns = ", ".join(c for c in frame.columns if c != "__file")
        field_name = "label_column" if missing == [ds.label_column] else "text_columns"
        raise DataError(f"{where}.{field_name}: no column {', '.join(map(repr, missing))} (the data has: {columns})",
                        f"set {where}.{field_name} to one of those")
    parts = frame[ds.text_columns].fillna("").astype(str)
    text = parts.apply(lambda row: " ".join(p for p in row if p.strip()), axis=1).map(clean_text)
    label, no_label = _labels(frame[ds.label_column], ds, cfg, where)
    empty = text == ""
    bad = no_label | empty
    if bad.any():
        if ds.on_invalid == "error":
            # Name the column at fault: the label column for missing labels, else the text columns.
            which, key = (no_label, "label_column") if no_label.any() else (empty, "text_columns")
            what = "a missing label" if key == "label_column" else "an empty text"
            also = f" (and {int(empty.sum())} an empty text)" if key == "label_column" and empty.any() else ""
            raise DataError(
                f"{where}.{key}: {int(which.sum())} of {len(frame)} rows have {what}{also}, first at row "
                f"{int(np.flatnonzero(which.to_numpy())[0])}",
                f"clean the file or set {where}.on_invalid=drop",
            )
        text, label = text[~bad], label[~bad]
    out = pd.DataFrame({"text": text.to_numpy(), "label": label.to_numpy().astype(np.int64), "domain": ds.name})
    if out.empty:
        raise DataError(f"{where}: no usable rows left", "check the text and label columns")
    return out


def _labels(column: pd.Series, ds: DatasetConfig, cfg: DataConfig, where: str) -> tuple[pd.Series, pd.Series]:
    """Label ids for the target scheme, and a mask of rows whose label is missing."""
    scheme: LabelScheme = cfg.label_scheme
    if ds.label_kind == "sentiment":
        values = column.astype("string").str.strip().str.lower()
        missing = values.isna() | (values == "")
        names = LABEL_NAMES["sentiment3"]
        unknown = sorted(set(values[~missing]) - set(names))
        if unknown:
            raise DataError(f"{where}.label_column: unknown label strings {unknown[:5]} in {ds.label_column!r}",
                            f"map them to {'/'.join(names)}, or set {where}.label_kind to rating10 or stars5")
        return values.map({n: i for i, n in enumerate(names)}).fillna(-1), missing
    numeric = pd.to_numeric(column, errors="coerce")
    words = column[numeric.isna() & column.notna()].astype(str).str.strip()
    words = words[words != ""]
    if len(words):
        raise DataError(f"{where}.label_column: {ds.label_column!r} holds non-numeric labels {sorted(set(words))[:5]} "
                        f"for label_kind {ds.label_kind}",
                        f"set {where}.label_kind=sentiment if they are negative/neutral/positive, else fix the data")
    missing = numeric.isna()
    value = numeric + ds.label_offset
    lo, hi = _RANGES[ds.label_kind]
    wrong = ~missing & ((value < lo) | (value > hi) | (value != value.round()))
    if wrong.any():
        examples = sorted(set(column[wrong].tolist()))[:5]
        raise DataError(f"{where}.label_column: {int(wrong.sum())} labels outside {ds.label_kind}'s {lo}..{hi} "
                        f"(e.g. {examples}, label_offset {ds.label_offset})",
                        f"fix the data, {where}.label_kind or {where}.label_offset")
    value = value.fillna(lo).astype(np.int64)
    if scheme == "sentiment3":
        cut_lo, cut_hi = getattr(cfg.sentiment_cuts, ds.label_kind)
        ids = np.where(value <= cut_lo, 0, np.where(value <= cut_hi, 1, 2))
        return pd.Series(ids, index=column.index), missing
    return value - lo, missing


def load_dataset_rows(ds: DatasetConfig, cfg: DataConfig, index: int) -> pd.DataFrame:
    """Read and normalise one configured dataset (all of its files pooled)."""
    where = f"data.datasets[{index}]"
    return normalise(read_raw(ds, where), ds, cfg, where)


def dedupe(rows: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose (normalised text, label) was seen before; keep the first."""
    keys = rows["text"].map(_key)
    return rows[~pd.DataFrame({"k": keys, "l": rows["label"]}).duplicated()].reset_index(drop=True)


def subsample(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded, label-stratified subsample of about n rows."""
    if n >= len(rows):
        return rows
    ranked = rows.assign(_r=_order(seed, rows["text"].map(_key) + "\x00" + rows.index.astype(str)))
    share = n / len(rows)
    parts = [g.sort_values("_r").head(max(1, round(len(g) * share))) for _, g in ranked.groupby("label")]
    return pd.concat(parts).sort_values("_r").drop(columns="_r").reset_index(drop=True)


def split_rows(rows: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
               selection_fraction: float = 0.0, folds: int | None = None, fold: int = 0) -> dict[str, pd.DataFrame]:
    """Seeded, label-stratified train/validation/test (and selection, when `selection_fraction` > 0) split that
    keeps equal texts in one split. The selection rows come out of train: test and validation are the same rows
    with or without it.

    With `folds`, the text groups of each label are dealt round-robin (in seeded order) into that many folds and
    fold `fold` is the test split, so over the folds every review is tested exactly once; validation (and
    selection) are carved, in the same order, from the other folds' groups."""
    keys = rows["text"].map(_key)
    groups = pd.DataFrame({"key": keys, "label": rows["label"]}).drop_duplicates("key")  # first label per text
    groups["rank"] = _order(seed, groups["key"])
    assign: dict[str, str] = {}
    for _, g in groups.groupby("label"):
        ordered = list(g.sort_values("rank")["key"])
        if folds:
            test = [k for i, k in enumerate(ordered) if i % folds == fold]
            rest = [k for i, k in enumerate(ordered) if i % folds != fold]
            ordered, n_test = test + rest, len(test)
        else:
            n_test = round(len(ordered) * test_fraction)
        n_val, n_sel = round(len(ordered) * val_fraction), round(len(ordered) * selection_fraction)
        for i, key in enumerate(ordered):
            assign[key] = ("test" if i < n_test else "validation" if i < n_test + n_val
                           else SELECTION if i < n_test + n_val + n_sel else "train")
    where = keys.map(assign)
    ranked = rows.assign(_r=_order(seed, keys + "\x00" + rows["label"].astype(str)))
    names = (*SPLITS, SELECTION) if selection_fraction > 0 else SPLITS
    return {s: ranked[where == s].sort_values("_r").drop(columns="_r").reset_index(drop=True) for s in names}


def make_shards(train: pd.DataFrame, k: int, seed: int) -> list[pd.DataFrame]:
    """K disjoint, label-stratified shards of train (round-robin over a seeded order within each label)."""
    if k > len(train):
        raise DataError(f"finetune.members={k} shards need at least {k} training rows, got {len(train)}",
                        "lower finetune.members or add data")
    ranked = train.assign(_r=_order(seed + 1, train["text"].map(_key) + "\x00" + train.index.astype(str)))
    shard_of = pd.Series(0, index=train.index)
    offset = 0
    for _, g in ranked.groupby("label"):
        order = g.sort_values("_r").index
        # Continue the round robin across labels so small classes don't all land in shard 0.
        shard_of[order] = (np.arange(len(order)) + offset) % k
        offset += len(order)
    return [train[shard_of == i].reset_index(drop=True) for i in range(k)]


def fingerprint(splits: dict[str, pd.DataFrame], label_names: tuple[str, ...]) -> str:
    """sha256 (16 hex) of the label names and every split's (domain, label, text) rows in order."""
    h = hashlib.sha256(json.dumps(label_names).encode())
    for name in [*SPLITS, *([SELECTION] if SELECTION in splits else [])]:
        h.update(f"\x01{name}\x01".encode())
        for domain, label, text in splits[name][["domain", "label", "text"]].itertuples(index=False):
            h.update(f"{domain}\x00{label}\x00{text}\x02".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SplitData:
    """The three splits of all configured datasets, with their label names and fingerprint."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]
    fingerprint: str
    duplicates_dropped: dict[str, int] = field(default_factory=dict)
    selection: pd.DataFrame | None = None  # data.selection_fraction > 0

    def split(self, name: str) -> pd.DataFrame:
        if name == SELECTION:
            if self.selection is None:
                raise DataError("there is no selection split", "set data.selection_fraction > 0 (e.g. 0.15)")
            return self.selection
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}", f"use one of {', '.join((*SPLITS, SELECTION))}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in (*SPLITS, *([SELECTION] if self.selection is not None else []))}

    def examples(self, n: int = 2) -> list[str]:
        """A few real reviews (from training data): the input example logged with every model."""
        return self.train["text"].head(n).tolist()


def split_dataset(rows: pd.DataFrame, cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], int]:
    """Dedupe, subsample (data.max_rows) and split one dataset's rows; also return how many were duplicates."""
    unique = dedupe(rows)
    dropped = len(rows) - len(unique)
    if cfg.max_rows is not None:
        unique = subsample(unique, cfg.max_rows, cfg.seed)
    return split_rows(unique, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.selection_fraction, cfg.folds,
                      cfg.fold), dropped


def load_splits(cfg: DataConfig) -> SplitData:
    """Read every configured dataset, then dedupe, subsample and split each one; concatenate per split."""
    names = (*SPLITS, SELECTION) if cfg.selection_fraction > 0 else SPLITS
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in names}
    dropped: dict[str, int] = {}
    for i, ds in enumerate(cfg.datasets):
        rows = load_dataset_rows(ds, cfg, i)
        split, dropped[ds.name] = split_dataset(rows, cfg)
        for name, frame in split.items():
            parts[name].append(frame)
    splits = {s: pd.concat(parts[s], ignore_index=True) for s in names}
    labels = LABEL_NAMES[cfg.label_scheme]
    for s in names:
        if splits[s].empty:
            raise DataError(f"the {s} split is empty", "add data or raise data.val_fraction / data.test_fraction")
    return SplitData(**splits, label_names=labels, fingerprint=fingerprint(splits, labels), duplicates_dropped=dropped)


def word_stats(texts: pd.Series) -> dict[str, float]:
    """Words per text (whitespace split): mean, median, sample standard deviation (pandas' ddof=1)."""
    words = texts.str.split().str.len()
    return {"mean": round(float(words.mean()), 1), "median": float(words.median()),
            "std": round(float(words.std()), 1) if len(words) > 1 else 0.0}


def dataset_stats(rows: pd.DataFrame, label_names: tuple[str, ...]) -> dict[str, object]:
    """Rows, label distribution and word-count statistics of normalised rows."""
    counts = rows["label"].value_counts()
    return {
        "rows": len(rows),
        "labels": {name: int(counts.get(i, 0)) for i, name in enumerate(label_names)},
        "words": word_stats(rows["text"]),
        "duplicate_texts": int(rows["text"].map(_key).duplicated().sum()),
        # Kept as they are (a one-word review is still a review), but counted: app reviews are often this short.
        f"under_{SHORT_WORDS}_words": int((rows["text"].str.split().str.len() < SHORT_WORDS).sum()),
    }
