"""Tiny, randomly initialised sequence classifiers (GPT-2, Llama, BERT) built from configs, for tests and smoke runs.

    from mllm.models.tiny import build_tiny_classifier
    path = build_tiny_classifier("gpt2", tmp_dir, label_names=("negative", "neutral", "positive"))

Each directory holds safetensors weights, a config with label names and pad token, and a small tokenizer
trained on the fly (no hub access), so it loads with `AutoModelForSequenceClassification` and
`AutoTokenizer` like any real checkpoint. The same seed gives bit-identical weights and tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

TinyArch = Literal["gpt2", "llama", "bert"]
TINY_ARCHS: tuple[TinyArch, ...] = ("gpt2", "llama", "bert")

# A few hundred words of review-like English: enough for a tokenizer that splits real reviews sensibly.
_CORPUS = """
I have been taking this medication for three months and my pain is much better. The side effects were
terrible at first: nausea, headache, dizziness and I could not sleep. My doctor changed the dose and now it
works well. This drug saved my life. It did nothing for my anxiety, I gained weight and felt tired all day.
Great food, friendly staff, the service was slow but the pizza was amazing. Worst app ever, it crashes every
time I open it and the driver never came. Five stars, easy to use, cheap rides. The birth control pill gave me
acne and mood swings. After two weeks my blood pressure dropped. I would not recommend it to anyone.
Highly effective with mild side effects; the depression lifted and I finally feel like myself again.
The restaurant was clean, prices were fair, we will come back. Customer support refunded my money quickly.
""".split()


def _training_text(extra: Iterable[str] | None) -> list[str]:
    lines = [" ".join(_CORPUS[i : i + 12]) for i in range(0, len(_CORPUS), 12)]
    return lines + list(extra or [])


def build_tiny_tokenizer(arch: TinyArch, vocab_size: int = 512, corpus: Iterable[str] | None = None):
    """A fast tokenizer trained on a small built-in corpus: byte-level BPE (GPT-2, Llama) or WordPiece (BERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = _training_text(corpus)
    if arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<pad>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")


def tiny_config(arch: TinyArch, vocab_size: int, pad_token_id: int, label_names: tuple[str, ...],
                hidden: int = 32, layers: int = 2, max_positions: int = 512):
    """A 2-layer config of the given architecture with a sequence-classification head for `label_names`."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    labels = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=max_positions,
                          pad_token_id=pad_token_id, bos_token_id=0, eos_token_id=0, **labels)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=max_positions, pad_token_id=pad_token_id,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **labels)
    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                          pad_token_id=pad_token_id, **labels)
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHS}")


def build_tiny_classifier(arch: TinyArch, out_dir: Path, label_names: tuple[str, ...] = ("0", "1", "2"),
                          seed: int = 0, hidden: int = 32, layers: int = 2,
                          corpus: Iterable[str] | None = None) -> Path:
    """Save a randomly initialised classifier and its tokenizer to `out_dir` (safetensors); return the path."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_tiny_tokenizer(arch, corpus=corpus)
    config = tiny_config(arch, len(tokenizer), tokenizer.pad_token_id, tuple(label_names), hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
