"""`evaluate` metric module shipped with mllm: negative log-likelihood and expected calibration error.

predictions are class-probability vectors (softmax of the logits), references the true class ids.
ECE: rows binned by confidence (the top probability) into `bins` equal-width bins; the mean over rows of
|accuracy - confidence| per bin, weighted by the bin's share of rows (Guo et al., 2017).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Negative log-likelihood and expected calibration error of predicted class probabilities."
_INPUTS = """
predictions: per-row class probabilities (each row sums to 1). references: true class ids.
bins: number of equal-width confidence bins for ECE (default 15).
Returns nll (mean -log p(true class)) and ece.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MllmCalibration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, bins=15):
        probs, refs = np.asarray(predictions, dtype=np.float64), np.asarray(references)
        true_p = np.clip(probs[np.arange(len(refs)), refs], 1e-300, None)
        confidence, predicted = probs.max(1), probs.argmax(1)
        correct = (predicted == refs).astype(np.float64)
        # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a softmax.
        which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
        ece = 0.0
        for b in range(bins):
            rows = which == b
            if rows.any():
                ece += rows.mean() * abs(correct[rows].mean() - confidence[rows].mean())
        return {"nll": float(-np.log(true_p).mean()), "ece": float(ece)}
