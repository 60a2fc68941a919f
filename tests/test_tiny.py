"""The tiny-model factory: real HF checkpoints (safetensors + tokenizer) that load with the Auto classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mllm.models.tiny import TINY_ARCHS, build_tiny_classifier


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_classifier_loads_and_classifies(tiny_models: dict[str, Path], arch: str) -> None:
    path = tiny_models[arch]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    batch = tok(["The side effects were terrible.", "Works well, no problems at all with it"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # Padding must not change a sequence's logits (pad token wired into the config).
    with torch.no_grad():
        alone = model(**tok(["The side effects were terrible."], return_tensors="pt")).logits
    torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-4)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = load_file(build_tiny_classifier("llama", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_classifier("llama", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_classifier("llama", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
