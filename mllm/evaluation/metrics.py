"""Classification metrics and their uncertainty, on numpy arrays.

Used during training (validation macro-F1 for early stopping) and by the evaluate stage for what the
`evaluate` metric modules do not cover: bootstrap confidence intervals and paired tests, which resample
rows thousands of times and so need a vectorised confusion matrix. The point estimates the evaluate stage
reports come from the modules in `mllm/metric_modules`; tests check both implementations agree.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts[true, predicted]."""
    return np.bincount(labels * num_labels + preds, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def per_class_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    cm = confusion(labels, preds, num_labels)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)  # predicted + actual: F1 = 2 tp / (2 tp + fp + fn)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    """Mean F1 over the classes present in labels or predictions (scikit-learn's average="macro")."""
    present = np.union1d(np.unique(labels), np.unique(preds))
    return float(per_class_f1(labels, preds, num_labels)[present].mean())


def domain_macro_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int, groups: np.ndarray | None
                    ) -> tuple[float, float]:
    """(mean over domains of each domain's macro-F1, the worst domain's): what a multi-domain search optimises.
    `groups` holds a domain id per row; None (one domain) gives (macro-F1, macro-F1)."""
    if groups is None:
        f1 = macro_f1(labels, preds, num_labels)
        return f1, f1
    scores = [macro_f1(labels[groups == g], preds[groups == g], num_labels) for g in np.unique(groups)]
    return float(np.mean(scores)), float(min(scores))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def classification_summary(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1 (over the classes present in labels or predictions, as sklearn does), nll."""
    preds = logits.argmax(1)
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": macro_f1(labels, preds, logits.shape[1]),
        "nll": float(-log_softmax(logits)[np.arange(len(labels)), labels].mean()),
    }


def _macro_f1_rows(cms: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in a (B, k, k) stack (classes absent from both axes skipped)."""
    tp = np.diagonal(cms, axis1=1, axis2=2).astype(float)
    denom = cms.sum(1) + cms.sum(2)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def resampled_scores(labels: np.ndarray, preds: np.ndarray, num_labels: int, index: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, macro-F1) for each row of `index` (B, n), a resample of the rows."""
    codes = labels[index] * num_labels + preds[index]  # (B, n)
    b = index.shape[0]
    offsets = (np.arange(b) * num_labels * num_labels)[:, None]
    cms = np.bincount((codes + offsets).ravel(), minlength=b * num_labels * num_labels)
    cms = cms.reshape(b, num_labels, num_labels)
    accuracy = np.trace(cms, axis1=1, axis2=2) / index.shape[1]
    return accuracy, _macro_f1_rows(cms)


def _resamples(n: int, samples: int, seed: int, chunk: int = 200):
    """Bootstrap index matrices, `chunk` resamples at a time (bounded memory for large test sets)."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, chunk):
        yield rng.integers(0, n, size=(min(chunk, samples - start), n))


def resampled_draws(labels: np.ndarray, preds: Mapping[K, np.ndarray], num_labels: int, samples: int = 1000,
                    seed: int = 0) -> dict[K, tuple[np.ndarray, np.ndarray]]:
    """key -> (accuracy, macro-F1) on each of `samples` bootstrap resamples of the rows, every model on the same
    resamples: each index matrix is drawn once (the draws `bootstrap_ci` and `paired_test` make with this seed) and
    scores every model. A model's interval and its paired differences with any other model then read these draws,
    so n models compared in any number of pairs cost n sets of resampled scores and one set of index draws."""
    acc: dict[K, list[np.ndarray]] = {key: [] for key in preds}
    f1: dict[K, list[np.ndarray]] = {key: [] for key in preds}
    for index in _resamples(len(labels), samples, seed):
        for key, p in preds.items():
            a, f = resampled_scores(labels, p, num_labels, index)
            acc[key].append(a)
            f1[key].append(f)
    return {key: (np.concatenate(acc[key]), np.concatenate(f1[key])) for key in preds}


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap draws."""
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(labels: np.ndarray, preds: np.ndarray, num_labels: int, samples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (rows resampled with replacement) for accuracy and macro-F1."""
    acc, f1 = resampled_draws(labels, {0: preds}, num_labels, samples, seed)[0]
    return {"accuracy": percentile_interval(acc, confidence), "macro_f1": percentile_interval(f1, confidence)}


def bootstrap_p(count: int, samples: int) -> float:
    """A bootstrap p-value: (1 + resamples at least as extreme) / (B + 1), never 0 (Davison & Hinkley 1997)."""
    return min(1.0, (1 + count) / (samples + 1))


@dataclass(frozen=True)
class PairedTest:
    """Model A against model B on the same rows. `diffs` holds the B resampled macro-F1 differences (A - B), from
    which the one-sided readings (`p_at_most`, `lower_bound`) come."""

    macro_f1_diff: float  # A - B
    macro_f1_diff_ci: tuple[float, float]  # two-sided percentile interval at the requested confidence
    bootstrap_p: float  # two-sided, H0: equal macro-F1; (1 + count) / (B + 1)
    mcnemar_p: float  # exact two-sided, H0: equal accuracy
    a_only_correct: int
    b_only_correct: int
    diffs: np.ndarray = field(repr=False, compare=False)

    @property
    def samples(self) -> int:
        return len(self.diffs)

    def p_at_most(self, threshold: float) -> float:
        """One-sided p-value of H0: difference <= threshold (small: A beats B by more than `threshold`)."""
        return bootstrap_p(int((self.diffs <= threshold).sum()), self.samples)

    def p_at_least(self, threshold: float) -> float:
        """One-sided p-value of H0: difference >= threshold (small: A is worse than B by more than -threshold)."""
        return bootstrap_p(int((self.diffs >= threshold).sum()), self.samples)

    def lower_bound(self, alpha: float) -> float:
        """The one-sided (1 - alpha) lower confidence bound of the difference (percentile bootstrap)."""
        return float(np.percentile(self.diffs, alpha * 100))

    def upper_bound(self, alpha: float) -> float:
        return float(np.percentile(self.diffs, 100 - alpha * 100))

    def summary(self) -> dict[str, float | int | list[float]]:
        """JSON-ready figures (the resampled differences left out)."""
        return {"macro_f1_diff": self.macro_f1_diff, "macro_f1_diff_ci": list(self.macro_f1_diff_ci),
                "bootstrap_p": self.bootstrap_p, "mcnemar_p": self.mcnemar_p, "a_only_correct": self.a_only_correct,
                "b_only_correct": self.b_only_correct, "samples": self.samples}


def paired_test(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, num_labels: int,
                samples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedTest:
    """Paired bootstrap of the macro-F1 difference (same resampled rows for both) and McNemar's exact test."""
    draws = resampled_draws(labels, {"a": preds_a, "b": preds_b}, num_labels, samples, seed)
    return paired_from_draws(labels, preds_a, preds_b, draws["a"][1], draws["b"][1], num_labels, confidence)


def paired_from_draws(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, f1_a: np.ndarray,
                      f1_b: np.ndarray, num_labels: int, confidence: float = 0.95) -> PairedTest:
    """`paired_test` from both models' macro-F1 on the same resamples (`resampled_draws`)."""
    from scipy.stats import binomtest

    d = f1_a - f1_b
    lo, hi = percentile_interval(d, confidence)
    # Two-sided: twice the smaller tail beyond zero, each tail counted as (1 + count) / (B + 1).
    p_boot = min(1.0, 2 * bootstrap_p(int(min((d <= 0).sum(), (d >= 0).sum())), len(d)))
    point = (_macro_f1_rows(confusion(labels, preds_a, num_labels)[None])
             - _macro_f1_rows(confusion(labels, preds_b, num_labels)[None]))[0]
    a_right, b_right = preds_a == labels, preds_b == labels
    only_a, only_b = int((a_right & ~b_right).sum()), int((b_right & ~a_right).sum())
    p_mcnemar = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return PairedTest(float(point), (lo, hi), p_boot, p_mcnemar, only_a, only_b, d)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): control the family-wise error rate over the
    comparisons; reject those with adjusted p < alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
