"""model.precision (auto, fp32, bf16): the old model.dtype key, auto per device, the one-line refusal of bf16 on a
device without it, float32 checkpoints after bf16 training, and reuse keys that tell the precisions apart.

Device capabilities are monkeypatched (`cpu_bf16`, `cuda_bf16`, `torch.cuda.is_available`), so every case runs on
any CPU; only the test that really trains and scores in bf16 needs a CPU with avx512_bf16 or AMX.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from mllm.config import ModelConfig, load_config
from mllm.data.splits import load_splits
from mllm.errors import ModelError
from mllm.models import precision
from mllm.tracking.store import Store

from .conftest import TINY, tiny_cfg


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns lands here
    return tmp_path


def device(monkeypatch: pytest.MonkeyPatch, kind: str, bf16: bool) -> None:
    """Pretend to run on `kind` (cpu or cuda) with or without bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "cuda")
    monkeypatch.setattr(precision, "cuda_bf16", lambda: kind == "cuda" and bf16)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16" if kind == "cpu" and bf16 else None)


@pytest.mark.parametrize(("old", "new"), [("float32", "fp32"), ("bfloat16", "bf16"), ("auto", "auto")])
def test_model_dtype_is_read_as_precision(tmp_path: Path, old: str, new: str) -> None:
    assert ModelConfig.model_validate({"dtype": old}).precision == new
    file = tmp_path / "old.yaml"
    file.write_text(TINY.read_text().replace("model:\n", f"model:\n  dtype: {old}\n", 1))
    cfg = load_config(file)
    assert cfg.model.precision == new and "dtype" not in cfg.to_dict()["model"]  # written back as precision
    assert load_config(file, [f"model.precision={new}"]).model.precision == new  # agreeing: fine
    with pytest.raises(ValidationError, match="contradicts model.precision"):
        ModelConfig.model_validate({"dtype": old, "precision": "bf16" if new != "bf16" else "fp32"})
    with pytest.raises(ValidationError, match="precision"):
        ModelConfig.model_validate({"dtype": "float16"})


@pytest.mark.parametrize(("kind", "bf16", "on_cpu", "expected"), [
    ("cuda", True, False, "bf16"), ("cuda", False, True, "fp32"),
    ("cpu", True, True, "bf16"), ("cpu", True, False, "fp32"), ("cpu", False, True, "fp32"),
])
def test_auto_resolves_per_device(monkeypatch: pytest.MonkeyPatch, kind: str, bf16: bool, on_cpu: bool,
                                  expected: str) -> None:
    device(monkeypatch, kind, bf16)
    monkeypatch.setattr(precision, "AUTO_BF16_ON_CPU", on_cpu)
    assert precision.resolve_precision(ModelConfig(precision="auto")) == expected
    assert precision.resolve_precision(ModelConfig(precision="fp32")) == "fp32"
    dev, amp = precision.resolve_device(ModelConfig(precision="auto"))
    assert dev.type == kind and amp == (torch.bfloat16 if expected == "bf16" else None)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", info)
    for flags, expected in [("fpu avx2 avx512f", None), ("fpu avx512f avx512_bf16", "avx512_bf16"),
                            ("amx_tile amx_bf16 avx512_bf16", "amx_bf16"), (None, None)]:
        info.unlink(missing_ok=True)
        if flags is not None:  # None: no /proc/cpuinfo (macOS, Windows)
            info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        precision.cpu_bf16.cache_clear()
        assert precision.cpu_bf16() == expected, flags
    precision.cpu_bf16.cache_clear()


@pytest.mark.parametrize(("kind", "says"), [
    ("cpu", "model.precision=bf16: this CPU has no bf16 support (no avx512_bf16 or AMX flag); "
            "fix: use model.precision=fp32 (it has fp32)"),
    ("cuda", "model.precision=bf16: this GPU has no bf16 support"),
])
def test_bf16_without_support_is_refused(monkeypatch: pytest.MonkeyPatch, kind: str, says: str) -> None:
    device(monkeypatch, kind, bf16=False)
    with pytest.raises(ModelError) as info:
        precision.resolve_device(ModelConfig(precision="bf16"))
    assert str(info.value).startswith(says) and "\n" not in str(info.value)


@pytest.mark.parametrize("stage", [["finetune"], ["evaluate", "--model", "models:/tiny-finetuned/1"]])
def test_the_cli_refuses_bf16_in_one_line_before_any_run(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd,
                                                        stage: list[str]) -> None:
    from mllm.cli import main

    device(monkeypatch, "cpu", bf16=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*stage, "-c", str(TINY), "--set", f"tracking.tracking_uri=sqlite:///{in_tmp}/mlflow.db", "--set",
              f"output_dir={in_tmp}/out", "--set", "model.precision=bf16"])
    err = capfd.readouterr().err
    assert info.value.code == 2 and err.strip().splitlines() == [
        "mllm: error: model.precision=bf16: this CPU has no bf16 support (no avx512_bf16 or AMX flag); "
        "fix: use model.precision=fp32 (it has fp32)"], err
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "out").exists()  # no run, no store, no folder


def test_reuse_keys_tell_precisions_apart(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mllm.evaluate import Candidate, eval_key
    from mllm.finetune import member_key, plan_members

    device(monkeypatch, "cpu", bf16=True)
    monkeypatch.setattr(precision, "AUTO_BF16_ON_CPU", True)
    spec = plan_members(tiny_cfg(in_tmp), load_splits(tiny_cfg(in_tmp).data))[0]
    keys = {p: member_key(tiny_cfg(in_tmp, f"model.precision={p}"), spec, "1", "fp", "sha")
            for p in ("fp32", "bf16", "auto")}
    assert keys["fp32"] != keys["bf16"] == keys["auto"]  # auto keys as what it resolves to
    monkeypatch.setattr(precision, "AUTO_BF16_ON_CPU", False)
    assert member_key(tiny_cfg(in_tmp), spec, "1", "fp", "sha") == keys["fp32"]
    c, cfg = Candidate("models:/tiny-finetuned/1", "member"), tiny_cfg(in_tmp)
    assert eval_key(c, "test", "fp", cfg, "fp32") != eval_key(c, "test", "fp", cfg, "bf16")


@pytest.mark.skipif(precision.cpu_bf16() is None,
                    reason="this CPU has no avx512_bf16 or AMX flag, so bf16 training is refused here")
def test_a_bf16_member_trains_scores_and_saves_float32(in_tmp: Path) -> None:
    """A bf16 member next to an fp32 one of the same recipe: a new version (not reused), tagged and logged as bf16,
    its checkpoint float32 (autocast leaves weights alone); scoring it in bf16 gives finite metrics."""
    from mllm import evaluate, finetune

    base = ("finetune.members=1", "finetune.include_full=false", "finetune.max_steps=3", "model.device=cpu")
    fp32 = finetune.run(tiny_cfg(in_tmp, *base, "model.precision=fp32"), progress=False)
    cfg = tiny_cfg(in_tmp, *base, "model.precision=bf16")
    bf16 = finetune.run(cfg, progress=False)
    (a,), (b,) = fp32.members, bf16.members
    assert (a.version, b.version, b.reused) == ("1", "2", False)  # same recipe, other precision: another member
    store = Store(cfg)
    version = store.client.get_model_version("tiny-finetuned", b.version)
    assert version.tags["precision"] == "bf16"
    assert store.client.get_model_version("tiny-finetuned", a.version).tags["precision"] == "fp32"
    member_run = store.client.get_run(version.run_id).data
    assert member_run.params["precision"] == "bf16" and member_run.params["model.precision"] == "bf16"
    assert member_run.tags["mllm.precision"] == "bf16"
    weights = load_file(store.download(b.model_uri, in_tmp / "bf16") / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert 0 <= b.val_metrics["macro_f1"] <= 1 and b.val_metrics["nll"] > 0

    result = evaluate.run(cfg, [b.model_uri], split="validation", baselines=False)
    (evaluation,) = result.evaluations
    assert 0 <= evaluation.metrics["macro_f1"] <= 1 and torch.isfinite(torch.tensor(evaluation.logits)).all()
    assert store.client.get_run(evaluation.run_id).data.params["precision"] == "bf16"
