"""Merging through mergekit: the maths on tiny models, every method end to end, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import MergeConfig
from mllm.errors import MllmError
from mllm.merge import merge_models
from mllm.models.modeling import SOURCE_FILE, load_classifier
from mllm.models.tiny import build_tiny_classifier
from mllm.tracking.store import Store

from .conftest import LABELS, perturbed  # the `family` fixture (a base and three perturbed members) is there too


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def merge(family: dict[str, Path], tmp: Path, members: list[str], **recipe) -> dict[str, torch.Tensor]:
    out, _ = merge_models(MergeConfig(**recipe), [family[m] for m in members], family["base"], tmp / "merged")
    return weights(out)


def test_linear_merge_of_identical_models_is_the_model(family: dict[str, Path], tmp_path: Path) -> None:
    # mergekit refuses one path twice: three copies of the same weights in three folders.
    copies = {f"c{i}": Path(shutil.copytree(family["m0"], tmp_path / f"c{i}")) for i in range(3)}
    merged = merge({**family, **copies}, tmp_path, list(copies), method="linear", weights=[0.2, 0.3, 0.5])
    for k, v in weights(family["m0"]).items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_head_is_the_weighted_sum(family: dict[str, Path], tmp_path: Path, normalize: bool) -> None:
    w = [0.5, 0.3, 0.7]
    merged = merge(family, tmp_path, ["m0", "m1", "m2"], method="linear", weights=w, normalize=normalize)
    heads = [weights(family[m])["score.weight"] for m in ("m0", "m1", "m2")]
    expected = sum(wi * h for wi, h in zip(w, heads, strict=True)) / (sum(w) if normalize else 1)
    torch.testing.assert_close(merged["score.weight"], expected, atol=1e-6, rtol=0)


def test_ties_density_one_single_member_is_that_member(family: dict[str, Path], tmp_path: Path) -> None:
    merged = merge(family, tmp_path, ["m1"], method="ties", density=1.0)
    for k, v in weights(family["m1"]).items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_task_arithmetic_is_base_plus_scaled_task_vectors(family: dict[str, Path], tmp_path: Path) -> None:
    merged = merge(family, tmp_path, ["m0", "m1"], method="task_arithmetic", weights=[1.0, 1.0], normalize=False,
                   **{"lambda": 0.5})
    base, a, b = weights(family["base"]), weights(family["m0"]), weights(family["m1"])
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_is_reproducible_per_seed(family: dict[str, Path], tmp_path: Path, method: str) -> None:
    one = merge(family, tmp_path / "a", ["m0", "m1", "m2"], method=method, density=0.5, seed=7)
    two = merge(family, tmp_path / "b", ["m0", "m1", "m2"], method=method, density=0.5, seed=7)
    other = merge(family, tmp_path / "c", ["m0", "m1", "m2"], method=method, density=0.5, seed=8)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "slerp", "nuslerp", "karcher", "model_stock", "sce"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_gives_a_loadable_classifier(family: dict[str, Path], tmp_path: Path, method: str) -> None:
    members = ["m0", "m1"] if method in ("slerp", "nuslerp") else ["m0", "m1", "m2"]
    out, text = merge_models(MergeConfig(method=method, density=0.7), [family[m] for m in members], family["base"],
                             tmp_path / "merged")
    assert f"merge_method: {method}" in text and (out / "mergekit_config.yml").is_file()
    model, tokenizer = load_classifier(out)
    assert model.config.id2label[2] == "positive"
    batch = tokenizer(["great", "awful side effects"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    merged, m0 = weights(out), weights(family["m0"])
    assert merged.keys() == m0.keys()
    assert any(not torch.equal(merged[k], m0[k]) for k in m0)


def other_model(tmp: Path, arch: str = "gpt2", labels=LABELS, **kw) -> Path:
    return build_tiny_classifier(arch, tmp / f"other-{arch}-{len(labels)}-{kw}", labels, **kw)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: other_model(tmp, "llama"), "differs from .* in model_type"),
        (lambda tmp: other_model(tmp, hidden=64), "in n_embd"),
        (lambda tmp: other_model(tmp, layers=3), "in n_layer"),
        (lambda tmp: other_model(tmp, labels=("a", "b")), "has 2 labels, m0 has 3"),
        (lambda tmp: other_model(tmp, labels=("bad", "meh", "good")), "has labels"),
    ],
    ids=["architecture", "hidden size", "layers", "label count", "label names"],
)
def test_incompatible_members_are_refused(family: dict[str, Path], tmp_path: Path, make, expected: str) -> None:
    odd = make(tmp_path)
    with pytest.raises(MllmError, match=expected) as info:
        merge_models(MergeConfig(method="ties"), [family["m0"], odd], family["base"], tmp_path / "merged")
    assert "\n" not in str(info.value) and "fix:" in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_vocabulary_mismatch_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    odd = perturbed(family["base"], tmp_path / "odd", seed=9)
    config = json.loads((odd / "config.json").read_text())
    config["vocab_size"] += 1
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(MllmError, match="vocab_size"):
        merge_models(MergeConfig(method="linear"), [family["m0"], odd], family["base"], tmp_path / "merged")


def test_member_of_another_base_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    stranger = perturbed(family["base"], tmp_path / "stranger", seed=5)
    (stranger / SOURCE_FILE).write_text(json.dumps({"role": "member", "base": "/x", "base_key": "other"}))
    with pytest.raises(MllmError, match="fine-tuned from another base"):
        merge_models(MergeConfig(method="ties"), [family["m0"], stranger], family["base"], tmp_path / "merged")


@pytest.mark.parametrize(("method", "members", "expected"), [
    ("slerp", ["m0", "m1", "m2"], "exactly two members"),
    ("model_stock", ["m0"], "at least 2 members"),
])
def test_member_counts(family: dict[str, Path], tmp_path: Path, method: str, members: list[str], expected: str) -> None:
    with pytest.raises(MllmError, match=expected):
        merge_models(MergeConfig(method=method), [family[m] for m in members], family["base"], tmp_path / "x")


def test_weights_count_must_match(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="merge.weights has 2 values for 3 members"):
        merge_models(MergeConfig(method="linear", weights=[1, 2]), [family[m] for m in ("m0", "m1", "m2")],
                     family["base"], tmp_path / "x")


def test_pickle_only_member_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(family["m0"], pickled)
    torch.save(weights(pickled), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(MllmError, match="only pickle weights .*safetensors only"):
        merge_models(MergeConfig(method="linear"), [family["m0"], pickled], family["base"], tmp_path / "x")


def test_merge_stage_registers_with_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finetune tiny members, merge the registered ones, and find the merge in the registry with its lineage."""
    import mlflow

    from mllm import finetune, merge
    from mllm.config import load_config

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                                      f"output_dir={tmp_path}/out", "data.max_rows=150"])
    trained = finetune.run(cfg, progress=False)
    result = merge.run(cfg)
    assert result.model_uri == "models:/tiny-merged/1" and result.method == "ties"
    shards = [m.model_uri for m in trained.members if m.name != "full"]  # the full-data member is never merged
    assert result.parents == shards and result.base_uri == trained.base_uri
    version = Store(cfg).client.get_model_version("tiny-merged", "1")
    assert version.tags["parents"] == ",".join(shards)
    assert version.tags["method"] == "ties" and version.tags["density"] == "0.5"
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["merge.method"] == "ties"
    artifacts = {a.path for a in Store(cfg).client.list_artifacts(result.run_id)}
    assert {"mergekit_config.yml", "config.yaml"} <= artifacts
    # The version is an MLflow model (a LoggedModel of the merge run): MLflow loads it, mllm reads its checkpoint.
    model_id = version.source.removeprefix("models:/")
    assert model_id.startswith("m-") and Store.model_id(version) == model_id
    assert Store(cfg).client.get_logged_model(model_id).source_run_id == result.run_id
    assert "**ties merge**" in version.description and trained.members[0].model_uri in version.description
    model, _ = load_classifier(Store(cfg).download(result.model_uri, tmp_path / "dl"))
    assert model.config.num_labels == 3
    served = mlflow.pyfunc.load_model(result.model_uri).predict(["Worked well.", "Terrible headaches."])
    assert len(served) == 2 and set(served[0].probabilities) == {"negative", "neutral", "positive"}

    # Bad input is refused before a run or a version exists.
    runs_before = len(mlflow.search_runs(experiment_names=["tiny"], output_format="list"))
    bad = cfg.model_copy(update={"merge": MergeConfig(method="slerp")})
    with pytest.raises(MllmError, match="exactly two members"):
        merge.run(bad)
    assert len(mlflow.search_runs(experiment_names=["tiny"], output_format="list")) == runs_before
    assert len(Store(cfg).find_versions("tiny-merged", {})) == 1
    linear = merge.run(cfg.model_copy(update={"merge": MergeConfig(method="linear", weights=[1, 2, 3])}),
                       members=[m.model_uri for m in trained.members[:3]])
    assert linear.version == "2" and linear.base_uri is None
