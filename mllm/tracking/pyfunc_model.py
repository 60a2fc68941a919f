"""The MLflow model behind every version mllm registers: a pyfunc over Hugging Face sequence classifiers.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/drugscom-merged@champion")
    model.predict(["Worked within a week, no side effects.", "Gave me migraines."])
    # [Prediction(label='positive', probabilities={'negative': 0.04, 'neutral': 0.08, 'positive': 0.88}), ...]

    mlflow models serve -m models:/drugscom-merged@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": ["Great drug."]}'
    # {"predictions": [{"label": "positive", "probabilities": {"negative": ..., "neutral": ..., "positive": ...}}]}

`predict`'s type hints are the model's signature (MLflow validates input against them): a list of review strings
(a one-column DataFrame, e.g. `frame[["text"]]`, is turned into that list by MLflow; `{"inputs": [...]}` over
HTTP), an empty list gives an empty answer, a non-string is refused in one line naming it. A pandas Series is
not converted by MLflow: pass `series.tolist()`.

This file is logged as "model from code" (MLflow copies it into the model; nothing is pickled): it imports only
mlflow, numpy, pandas, torch and transformers (scikit-learn for TF-IDF), so a served model needs no mllm installed.
Three kinds:
- a single classifier: its Hugging Face folder is the model's `checkpoint` artifact (the one copy of the weights,
  which mllm's own stages read too);
- the logit-average ensemble of registered members: `model_config["members"]` lists their model URIs, which are
  downloaded when the ensemble loads (their weights are not copied into it);
- the TF-IDF + logistic-regression baseline: its `tfidf` artifact holds `tfidf.json` (vocabulary, settings,
  labels) and `tfidf.safetensors` (idf, coefficients, intercepts); features are rebuilt with scikit-learn's
  CountVectorizer on the fixed vocabulary, then sublinear tf, idf and L2 norm, as TfidfVectorizer computes them.
Inference mirrors `mllm evaluate`: right padding (pad = EOS when the tokenizer has none), truncation to
`max_length`, length-sorted batches, fp32 on the CPU; weights from safetensors only, never remote code.
"""

# (No `from __future__ import annotations`: MLflow reads predict's type hints at run time as the signature.)
from typing import Any

import mlflow
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel


class Prediction(BaseModel):
    """One review's answer: the predicted label and the probability of each class."""

    label: str
    probabilities: dict[str, float]


def _checkpoint(model_dir: str) -> str:
    """The Hugging Face folder inside a downloaded mllm model (its MLmodel names the `checkpoint` artifact)."""
    import os

    import yaml

    with open(os.path.join(model_dir, "MLmodel")) as f:
        meta = yaml.safe_load(f)
    return os.path.join(model_dir, meta["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"])


def load_tfidf(folder: str) -> dict[str, Any]:
    """A saved TF-IDF + logistic-regression model: settings and vocabulary (JSON), arrays (safetensors)."""
    import json
    import os

    from safetensors.numpy import load_file

    with open(os.path.join(folder, "tfidf.json")) as f:
        model = json.load(f)
    return {**model, **load_file(os.path.join(folder, "tfidf.safetensors"))}


def tfidf_logits(model: dict[str, Any], texts: list[str]) -> np.ndarray:
    """Class scores (softmax gives the probabilities) of a saved TF-IDF model: TfidfVectorizer's features
    (counts on the fixed vocabulary, 1 + log tf, times idf, L2-normalised rows), then the linear layer."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    counts = CountVectorizer(vocabulary=model["vocabulary"], ngram_range=tuple(model["ngram_range"]),
                             lowercase=model["lowercase"], dtype=np.float64).transform(texts).tocsr()
    if model["sublinear_tf"]:
        counts.data = 1.0 + np.log(counts.data)
    features = normalize(counts.multiply(model["idf"].astype(np.float64)).tocsr())
    return np.asarray(features @ model["coef"].astype(np.float64).T + model["intercept"], dtype=np.float32)


class ReviewClassifier(PythonModel):
    """Review text -> label and class probabilities (the logit average of several classifiers for an ensemble)."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        config = context.model_config or {}
        self.max_length = int(config.get("max_length", 128))
        self.batch_size = int(config.get("batch_size", 32))
        artifacts = context.artifacts or {}  # None while MLflow runs the input example at logging time
        self.tfidf: dict[str, Any] | None = None
        if "tfidf" in artifacts:
            self.tfidf = load_tfidf(artifacts["tfidf"])
            self.labels = list(self.tfidf["labels"])
            return
        if "checkpoint" in artifacts:
            folders = [context.artifacts["checkpoint"]]
        else:  # an ensemble: its members are registered model versions
            folders = [_checkpoint(mlflow.artifacts.download_artifacts(uri)) for uri in config["members"]]
        self.models, self.tokenizers = [], []
        for folder in folders:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            self.models.append(model.eval())
            self.tokenizers.append(tokenizer)
        id2label = self.models[0].config.id2label
        self.labels = [str(id2label[i]) for i in sorted(id2label)]

    def _logits(self, model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
        import torch

        ids = tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort(-np.array([len(x) for x in ids]), kind="stable")  # longest first, as mllm evaluate
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                width = -(-max(len(ids[i]) for i in index) // 8) * 8
                batch = torch.full((len(index), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(index), width), dtype=torch.long)
                for row, i in enumerate(index):
                    batch[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                out[index] = model(input_ids=batch, attention_mask=mask).logits.float().numpy()
        return out

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[Prediction]:
        if not model_input:
            return []
        if self.tfidf is not None:
            logits = tfidf_logits(self.tfidf, list(model_input))
        else:
            logits = np.mean([self._logits(m, t, list(model_input))
                              for m, t in zip(self.models, self.tokenizers, strict=True)], axis=0)
        shifted = logits - logits.max(1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
        return [Prediction(label=self.labels[i], probabilities={n: float(p[j]) for j, n in enumerate(self.labels)})
                for i, p in zip(logits.argmax(1), probs, strict=True)]


set_model(ReviewClassifier())
