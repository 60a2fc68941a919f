"""The baselines a reviewer tries first: the majority class, TF-IDF + logistic regression, the logit ensemble.

    from mllm.evaluation.baselines import fit_tfidf, majority_logits
    model, history = fit_tfidf(splits, cs=[0.1, 1, 10])   # C chosen by validation macro-F1
    save_tfidf(model, folder)                              # tfidf.json + tfidf.safetensors, no pickle

The majority class predicts the most frequent training label for every review; its scores are the smoothed
log class frequencies of the training split, so its NLL is that of the class prior. TF-IDF: word unigrams and
bigrams, sublinear tf, L2-normalised rows (scikit-learn's TfidfVectorizer), then class-balanced multinomial
logistic regression fitted on the training split for each C in `evaluate.tfidf_c`; the C with the best validation
macro-F1 is kept (ties: the better validation NLL, then the smaller C). The test split is never read here.
`ensure_tfidf` registers it as `<experiment>-tfidf` (an MLflow model served by `mllm/tracking/pyfunc_model.py`) once per
data fingerprint and settings. `register_ensemble` registers the logit-average ensemble of a member set as
`<experiment>-ensemble` (served by the same code, its members downloaded when it loads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllm import __version__
from mllm.basics import atomic_dir, publish_dir, short_hash
from mllm.config.schema import ExperimentConfig
from mllm.data.splits import SplitData
from mllm.evaluation.metrics import classification_summary
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

NGRAMS = (1, 2)


def majority_logits(train_labels: np.ndarray, num_labels: int, rows: int) -> np.ndarray:
    """(rows, num_labels) scores of the majority-class baseline: log of add-one-smoothed training frequencies."""
    counts = np.bincount(train_labels, minlength=num_labels).astype(np.float64)
    prior = np.log((counts + 1) / (counts.sum() + num_labels))
    return np.broadcast_to(prior.astype(np.float32), (rows, num_labels)).copy()


@dataclass(frozen=True)
class TfidfModel:
    vocabulary: dict[str, int]
    idf: np.ndarray  # (V,)
    coef: np.ndarray  # (k, V)
    intercept: np.ndarray  # (k,)
    labels: tuple[str, ...]
    c: float

    @property
    def num_params(self) -> int:
        return int(self.idf.size + self.coef.size + self.intercept.size)

    def settings(self) -> dict[str, Any]:
        return {"ngram_range": list(NGRAMS), "lowercase": True, "sublinear_tf": True, "C": self.c,
                "class_weight": "balanced", "labels": list(self.labels), "vocabulary_size": len(self.vocabulary)}


def _linear(clf: Any, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef (k, V), intercept (k,)) of a fitted LogisticRegression, one row per label id (a binary model's single
    row becomes [0, w]; a label absent from training gets a row that never wins)."""
    coef = np.zeros((num_labels, clf.coef_.shape[1]))
    intercept = np.full(num_labels, -1e4)
    classes = list(clf.classes_)
    if len(classes) == 2:
        coef[classes[1]], intercept[classes[0]], intercept[classes[1]] = clf.coef_[0], 0.0, clf.intercept_[0]
    else:
        for row, c in enumerate(classes):
            coef[c], intercept[c] = clf.coef_[row], clf.intercept_[row]
    return coef, intercept


def fit_tfidf(splits: SplitData, cs: list[float], seed: int = 0) -> tuple[TfidfModel, list[dict[str, float]]]:
    """Fit on train for every C, keep the best by validation macro-F1; (model, validation figures per C)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    k = len(splits.label_names)
    vectorizer = TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, lowercase=True)
    x_train = vectorizer.fit_transform(splits.train["text"])
    x_val = vectorizer.transform(splits.validation["text"])
    y_train, y_val = splits.train["label"].to_numpy(), splits.validation["label"].to_numpy()
    history, fits = [], []
    for c in cs:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(x_train, y_train)
        coef, intercept = _linear(clf, k)
        summary = classification_summary(np.asarray(x_val @ coef.T + intercept, dtype=np.float64), y_val)
        history.append({"C": c, "val_macro_f1": summary["macro_f1"], "val_nll": summary["nll"],
                        "val_accuracy": summary["accuracy"]})
        fits.append((coef, intercept))
    best = max(range(len(cs)), key=lambda i: (history[i]["val_macro_f1"], -history[i]["val_nll"], -cs[i]))
    vocabulary = {str(t): int(i) for t, i in vectorizer.vocabulary_.items()}
    coef, intercept = fits[best]
    return TfidfModel(vocabulary, vectorizer.idf_.astype(np.float32), coef.astype(np.float32),
                      intercept.astype(np.float32), splits.label_names, cs[best]), history


def save_tfidf(model: TfidfModel, out: Path) -> Path:
    """Write `tfidf.json` (settings, labels, vocabulary) and `tfidf.safetensors` (idf, coef, intercept) into `out`
    (complete or absent)."""
    from safetensors.numpy import save_file

    with atomic_dir(out) as tmp:
        (Path(tmp) / "tfidf.json").write_text(json.dumps({**model.settings(), "vocabulary": model.vocabulary}))
        save_file({"idf": model.idf, "coef": model.coef, "intercept": model.intercept},
                  str(Path(tmp) / "tfidf.safetensors"))
        publish_dir(tmp, out)
    return out


def tfidf_key(splits: SplitData, cs: list[float]) -> str:
    """Identity of a TF-IDF baseline: data, the C grid, the feature settings and mllm's version."""
    return short_hash([splits.fingerprint, sorted(cs), list(NGRAMS), "sublinear", "balanced", __version__])


def c_figure(history: list[dict[str, float]], chosen: float) -> Any:
    """Validation macro-F1 and NLL against C (log scale), the chosen C marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    cs = [h["C"] for h in history]
    ax.semilogx(cs, [h["val_macro_f1"] for h in history], "o-", label="validation macro-F1")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen C={chosen:g}")
    ax.set_xlabel("C (inverse regularisation)")
    ax.set_ylabel("macro-F1")
    ax.legend(fontsize=8)
    ax.set_title("TF-IDF + logistic regression: C chosen on validation", fontsize=9)
    fig.tight_layout()
    return fig


def ensure_tfidf(cfg: ExperimentConfig, splits: SplitData, store: Store) -> Any:
    """The registered `<experiment>-tfidf` version for this data and C grid: reused by key, else fitted (train),
    C chosen (validation), logged and registered."""
    cs = list(cfg.evaluate.tfidf_c)
    key = tfidf_key(splits, cs)

    version = store.find("tfidf", key)
    if version is not None:
        return version
    model, history = fit_tfidf(splits, cs, cfg.evaluate.seed)
    folder = save_tfidf(model, cfg.output_dir / "tfidf" / key)
    best = next(h for h in history if h["C"] == model.c)
    with store.run("tfidf", stage="tfidf", tags={"mllm.tfidf_key": key, "mllm.dataset_fingerprint": splits.fingerprint},
                   log_config=False) as run_:
        run_.params({"C_grid": json.dumps(cs), "chosen_C": model.c, "ngram_range": "1,2", "sublinear_tf": True,
                     "class_weight": "balanced", "vocabulary_size": len(model.vocabulary),
                     "train_rows": len(splits.train)})
        for step, h in enumerate(history):
            run_.metrics(h, step=step)
        run_.metrics({"best_val_macro_f1": best["val_macro_f1"], "best_val_nll": best["val_nll"]})
        run_.figure(c_figure(history, model.c), "tfidf_c_search.png")
        tags = VersionTags(tfidf_key=key, dataset_fingerprint=splits.fingerprint, C=model.c,
                           vocabulary_size=len(model.vocabulary), num_params=model.num_params,
                           val={"macro_f1": round(best["val_macro_f1"], 6), "nll": round(best["val_nll"], 6)})
        version = store.register(
            "tfidf", run_, folder, tags.as_tags(), examples=splits.examples(), labels=splits.label_names,
            description=f"**TF-IDF + logistic regression** (word 1-2-grams, sublinear tf, class-balanced, "
            f"C={model.c:g} chosen on validation from {cs}), fitted on {len(splits.train)} training reviews.\n\n"
            f"- validation macro-F1 {best['val_macro_f1']:.4f}, NLL {best['val_nll']:.3f}")
    print(f"tfidf: C={model.c} (validation macro-F1 {best['val_macro_f1']:.4f}) -> "
          f"{store.model_uri('tfidf', version.version)}")
    return version


def register_ensemble(members: list[str], data: SplitData, store: Store) -> Any:
    """The `<experiment>-ensemble` version averaging these members' logits (registered once per member set)."""
    key = short_hash(members)
    version = store.find("ensemble", key)
    if version is not None:
        return version
    tags = VersionTags(members=tuple(members), ensemble_key=key,
                       extra={f"member_{i}": m for i, m in enumerate(members)})
    with store.run(f"ensemble of {len(members)}", stage="ensemble", tags={"mllm.parents": ",".join(members)},
                   log_config=False) as run_:
        return store.register("ensemble", run_, None, tags.as_tags(),
                              description=f"**Logit-average ensemble** of {len(members)} members (K forward "
                              "passes per review): " + ", ".join(f"`{m}`" for m in members),
                              examples=data.examples(), members=members, labels=data.label_names)
