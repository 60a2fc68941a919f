"""Frozen-prefix reuse gives the logits of a full forward pass, and refuses models whose prefix differs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm.models.modeling import encode, load_classifier, predict_logits
from mllm.models.prefix import PrefixCache, fingerprint_batches, prefix_state
from mllm.models.tiny import build_tiny_classifier

LABELS = ("negative", "neutral", "positive")
TEXTS = ["great drug, no side effects", "terrible headache and nausea", "it was ok I guess",
         "worked for two weeks then stopped", "best thing my doctor ever gave me, really", "meh"] * 3


def trained_above(base, out, depth: int, seed: int):
    """A stand-in member: the base with noise on every weight except the embeddings and blocks < depth."""
    shutil.copytree(base, out)
    model, _ = load_classifier(base)
    frozen = set(prefix_state(model, depth))
    g = torch.Generator().manual_seed(seed)
    weights = load_file(base / "model.safetensors")
    save_file({k: v if k in frozen else v + 0.1 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    (out / "mllm-source.json").write_text(json.dumps({"role": "member"}))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_replay_equals_full_forward(arch: str, tmp_path) -> None:
    base = build_tiny_classifier(arch, tmp_path / "base", LABELS, seed=0, layers=3)
    members = [trained_above(base, tmp_path / f"m{i}", depth=2, seed=i) for i in range(2)]
    cache = PrefixCache(2)
    results = []
    for path in [base, *members]:
        model, tok = load_classifier(path)
        encoded = encode(tok, TEXTS, 32)
        key = fingerprint_batches(encoded, 4)
        replay = cache.matches(model, key)
        with cache.replay(model) if replay else cache.record(model, key):
            got = predict_logits(model, encoded, tok.pad_token_id, 4, torch.device("cpu"))
        full = predict_logits(model, encoded, tok.pad_token_id, 4, torch.device("cpu"))
        np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)
        results.append((replay, got))
    assert [r for r, _ in results] == [False, True, True]
    assert not np.allclose(results[1][1], results[0][1])  # the members really differ from the base


def test_different_prefix_or_batches_run_in_full(tmp_path) -> None:
    base = build_tiny_classifier("gpt2", tmp_path / "base", LABELS, seed=0, layers=3)
    shallow = trained_above(base, tmp_path / "shallow", depth=1, seed=5)  # block 1 trained: prefix differs
    cache = PrefixCache(2)
    model, tok = load_classifier(base)
    encoded = encode(tok, TEXTS, 32)
    with cache.record(model, fingerprint_batches(encoded, 4)):
        predict_logits(model, encoded, tok.pad_token_id, 4, torch.device("cpu"))
    other, _ = load_classifier(shallow)
    assert not cache.matches(other, fingerprint_batches(encoded, 4))
    assert cache.matches(model, fingerprint_batches(encoded, 4))
    assert not cache.matches(model, fingerprint_batches(encoded[:-1], 4))
    assert not cache.matches(model, fingerprint_batches(encoded, 8))


def test_training_validation_with_prefix_reuse_matches_without(tmp_path) -> None:
    """Two members evaluated through one shared cache get the metrics they get without it."""
    from mllm.config import FinetuneConfig, ModelConfig
    from mllm.models.training import train_member

    base = build_tiny_classifier("llama", tmp_path / "base", LABELS, seed=0, layers=3)
    labels = np.array([0, 1, 2] * 6)
    ft = FinetuneConfig(epochs=2, batch_size=4, learning_rate=1e-3, freeze_embeddings=True, freeze_layers=2,
                        early_stopping_patience=None)
    model_cfg = ModelConfig(name_or_path=str(base), max_length=32)
    shared = PrefixCache(2)
    for seed in (1, 2):
        kw = dict(seed=seed, learning_rate=1e-3, key=f"k{seed}", progress=False)
        cached = train_member(base, TEXTS, labels, TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / f"c{seed}",
                              prefix=shared, **kw)
        plain = train_member(base, TEXTS, labels, TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / f"p{seed}", **kw)
        assert [h["macro_f1"] for h in cached.history if "macro_f1" in h] == \
            [h["macro_f1"] for h in plain.history if "macro_f1" in h]
        assert cached.best["nll"] == pytest.approx(plain.best["nll"], rel=1e-5)
    assert len(shared.states) == 2  # 9 reviews in batches of 8, recorded once (member 1, epoch 1)
    assert shared.replays == 3  # member 1 epoch 2, member 2 epochs 1 and 2


def test_training_with_replayed_frozen_states_matches_full_forward(tmp_path) -> None:
    """Epochs after the first replay the frozen layers' per-example output: same metrics, same weights."""
    import torch
    from safetensors.torch import load_file

    from mllm.config import FinetuneConfig, ModelConfig
    from mllm.models.prefix import dropout_free
    from mllm.models.training import train_member

    base = build_tiny_classifier("llama", tmp_path / "base", LABELS, seed=0, layers=3)
    model, _ = load_classifier(base)
    assert dropout_free(model)
    labels = np.array([0, 1, 2] * 6)
    ft = FinetuneConfig(epochs=3, batch_size=4, learning_rate=1e-3, freeze_embeddings=True, freeze_layers=2,
                        early_stopping_patience=None)
    model_cfg = ModelConfig(name_or_path=str(base), max_length=32)
    kw = dict(seed=3, learning_rate=1e-3, key="k", progress=False)
    fast = train_member(base, TEXTS, labels, TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / "fast", **kw)
    full = train_member(base, TEXTS, labels, TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / "full",
                        reuse_frozen=False, **kw)
    assert [h["macro_f1"] for h in fast.history] == [h["macro_f1"] for h in full.history]
    a, b = load_file(fast.model_dir / "model.safetensors"), load_file(full.model_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[n], load_file(base / "model.safetensors")[n]) for n in a)  # it did train


def test_members_sharing_one_example_cache_train_as_if_alone(tmp_path) -> None:
    """Seed members of one base see the same examples: with one ExampleCache (keyed by token ids) the second
    member replays the first one's frozen states from its first epoch on, and ends with the weights it gets alone."""
    import torch
    from safetensors.torch import load_file

    from mllm.config import FinetuneConfig, ModelConfig
    from mllm.models.prefix import ExampleCache
    from mllm.models.training import train_member

    base = build_tiny_classifier("llama", tmp_path / "base", LABELS, seed=0, layers=3)
    labels = np.array([0, 1, 2] * 6)
    ft = FinetuneConfig(epochs=2, batch_size=4, learning_rate=1e-3, freeze_embeddings=True, freeze_layers=2,
                        early_stopping_patience=None)
    model_cfg = ModelConfig(name_or_path=str(base), max_length=32)
    kw = dict(learning_rate=1e-3, key="k", progress=False)
    cache = ExampleCache(2)
    train_member(base, TEXTS, labels, TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / "a", seed=1,
                 example_cache=cache, **kw)
    recorded = len(cache.states)
    assert recorded == len(set(TEXTS))
    before = cache.replayed_batches
    shared = train_member(base, TEXTS[::-1], labels[::-1], TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / "b",
                          seed=2, example_cache=cache, **kw)
    assert len(cache.states) == recorded and cache.replayed_batches - before == shared.steps  # every batch replayed
    alone = train_member(base, TEXTS[::-1], labels[::-1], TEXTS[:9], labels[:9], ft, model_cfg, tmp_path / "c",
                         seed=2, **kw)
    a, b = load_file(shared.model_dir / "model.safetensors"), load_file(alone.model_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_gpt2_with_dropout_does_not_cache_training_states(tmp_path) -> None:
    from mllm.models.prefix import dropout_free

    model, _ = load_classifier(build_tiny_classifier("gpt2", tmp_path / "g", LABELS, seed=0))
    assert not dropout_free(model)
