"""Classification metrics on numpy arrays, used during training (validation macro-F1 for early stopping).

The evaluate stage reports the same quantities through the `evaluate` package; tests check both agree.
"""

from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts[true, predicted]."""
    return np.bincount(labels * num_labels + preds, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def per_class_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    cm = confusion(labels, preds, num_labels)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)  # predicted + actual: F1 = 2 tp / (2 tp + fp + fn)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def classification_summary(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1 (over all classes, absent ones scoring 0 as in sklearn), nll."""
    num_labels = logits.shape[1]
    preds = logits.argmax(1)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    present = np.union1d(np.unique(labels), np.unique(preds))
    f1 = per_class_f1(labels, preds, num_labels)[present]
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1.mean()),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
    }
