"""`evaluate` metric module shipped with mllm: accuracy, macro-F1 and per-class precision / recall / F1.

The hub's "accuracy" and "f1" modules cannot be fetched offline, so mllm ships its own and loads them with
`evaluate.load(<this folder>)`. Computed with scikit-learn, independently of `mllm.evaluation.metrics` (tests compare).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro-F1 and per-class precision, recall and F1 of a single-label classifier."
_INPUTS = """
predictions: predicted class ids. references: true class ids.
num_labels: the number of classes (per-class lists have this length; classes never seen score 0).
Returns accuracy, macro_f1 (over the classes present in references or predictions, as scikit-learn does),
precision, recall, f1 (lists indexed by class id) and support.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MllmClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None):
        preds, refs = np.asarray(predictions), np.asarray(references)
        k = int(num_labels) if num_labels is not None else int(max(preds.max(), refs.max()) + 1)
        precision, recall, f1, support = precision_recall_fscore_support(
            refs, preds, labels=list(range(k)), average=None, zero_division=0)
        return {
            "accuracy": float(accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, average="macro", zero_division=0)),
            "precision": [float(v) for v in precision],
            "recall": [float(v) for v in recall],
            "f1": [float(v) for v in f1],
            "support": [int(v) for v in support],
        }
