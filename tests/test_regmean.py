"""RegMean (mllm.merging.regmean): the closed form against autograd on recorded layer inputs, the uniform soup it
reduces to, Gram matrices computed once per member, a registered regmean merge, and its refusals."""

from __future__ import annotations

import types
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from mllm.config import MergeConfig
from mllm.errors import MllmError
from mllm.merging import regmean
from mllm.merging.inmemory import MemberStack
from mllm.merging.regmean import GramSource, member_grams, member_rows
from mllm.models.modeling import collate, encode, length_batches, load_classifier
from mllm.tracking.tags import VersionTags

from .conftest import TINY, tiny_cfg

# Review-like texts of different lengths (padding inside every batch), a different set per member.
WORDS = ("the pain is much better now but the nausea and headache were terrible at first and i could not sleep "
         "great food friendly staff the service was slow worst app ever it crashes every time five stars").split()


def texts_for(seed: int, n: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(n)]


ROWS = [texts_for(i) for i in range(3)]


def source(tmp: Path, rows: list[list[str]] = ROWS) -> GramSource:
    return GramSource(rows, max_length=64, batch_size=8, cache_dir=tmp / "grams")


@pytest.fixture(scope="module")
def stack(family) -> MemberStack:
    return MemberStack(family["base"], [family["m0"], family["m1"], family["m2"]])


@pytest.fixture(scope="module")
def grams(stack, tmp_path_factory) -> list[regmean.Grams]:
    """Each member's Gram matrices from its own ROWS, set on the stack."""
    computed = member_grams(stack.member_dirs, source(tmp_path_factory.mktemp("grams")), 256, stack.unchanged)
    stack.set_grams(computed)
    return computed


def recorded_inputs(member: Path, texts: list[str], module: str) -> torch.Tensor:
    """The layer's inputs on the member itself, one row per real token (the classifier head: per review, at the
    last real token, where the logits are read), recorded with a plain forward hook."""
    model, tokenizer = load_classifier(member)
    encoded = encode(tokenizer, texts, 64)
    seen: list[torch.Tensor] = []
    mask: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, _output) -> None:
        x, m = inputs[0], mask["m"]
        seen.append(x[torch.arange(len(x)), m.sum(1) - 1] if module == "score" else x[m.bool()])

    handle = dict(model.named_modules())[module].register_forward_hook(hook)
    with torch.no_grad():
        for index in length_batches([len(e) for e in encoded], 8, seed=None):
            batch = collate(encoded, index, tokenizer.pad_token_id, "cpu")
            mask["m"] = batch["attention_mask"]
            model(**batch)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("module", ["transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_proj", "score"])
def test_alpha_one_solves_the_regression(family, stack, grams, module: str) -> None:
    """alpha 1: the merged weight zeroes the gradient of sum_i ||X_i W - X_i W_i||^2 (Conv1D weights are (in, out);
    the head is an nn.Linear, y = x W^T)."""
    name = f"{module}.weight"
    merged = stack.merged(MergeConfig(method="regmean", regmean_alpha=1.0))[name].double()
    conv1d = module != "score"
    members = [stack.base[name] + (d[name] if d[name] is not None else 0) for d in stack.deltas]
    xs = [recorded_inputs(family[f"m{i}"], ROWS[i], module) for i in range(3)]

    def gradient(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().double().requires_grad_(True)
        loss = sum(((x @ (w if conv1d else w.T)) - (x @ (m.double() if conv1d else m.double().T))).pow(2).sum()
                   for x, m in zip(xs, members, strict=True))
        loss.backward()
        return w.grad

    at_average = gradient(sum(members) / 3).norm()
    at_regmean = gradient(merged).norm()
    assert at_average > 1e-3, "the uniform soup must not already solve the regression"
    assert at_regmean < 1e-4 * at_average, f"gradient {at_regmean:.3e} vs {at_average:.3e} at the average"


@pytest.mark.parametrize(("alpha", "weights"), [(0.0, None), (0.6, None), (0.0, [1.0, 2.0, 3.0])])
def test_identical_grams_give_the_uniform_soup(stack, grams, alpha: float, weights) -> None:
    stack.set_grams([grams[0]] * 3)
    try:
        ours = stack.merged(MergeConfig(method="regmean", regmean_alpha=alpha, weights=weights))
    finally:
        stack.set_grams(grams)
    soup = stack.merged(MergeConfig(method="linear", weights=weights))
    assert sorted(ours) == sorted(soup)
    worst = max((ours[n] - soup[n]).abs().max().item() for n in soup)
    assert worst < 1e-5, worst
    linear = [n for n in soup if n.removesuffix(".weight") in grams[0].matrices]
    assert len(linear) == 9  # 4 Conv1D layers per block x 2 blocks + the head: all went through the solve


@pytest.mark.parametrize("module", ["transformer.h.1.mlp.c_proj", "score"])
def test_alpha_zero_averages_each_input_feature_by_its_energy(stack, grams, module: str) -> None:
    """alpha 0 keeps only the Gram diagonals: the weights reading input feature j are the members' weights averaged
    with w_i * G_i[j, j] (the off-diagonal scale is alpha; the diagonal is never scaled)."""
    name, w = f"{module}.weight", [1.0, 2.0, 0.5]
    merged = stack.merged(MergeConfig(method="regmean", regmean_alpha=0.0, weights=w))[name].double()
    members = [(stack.base[name] + d[name]).double() for d in stack.deltas]
    if module == "score":  # nn.Linear (out, in): input features are columns
        members, merged = [m.T for m in members], merged.T
    energy = torch.stack([wi * g.matrices[module].diagonal() for wi, g in zip(w, grams, strict=True)])  # (K, in)
    expected = sum(e[:, None] * m for e, m in zip(energy, members, strict=True)) / energy.sum(0)[:, None]
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_regmean_differs_from_the_soup_and_keeps_frozen_layers(family, grams, tmp_path) -> None:
    """Members that kept the embeddings and block 0 at the base: no Gram matrices there, those tensors stay the
    base; the trained layers move away from the soup."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = load_file(family["base"] / "model.safetensors")
    frozen = [n for n in base if n.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    dirs = []
    for i in range(3):
        out = Path(shutil.copytree(family[f"m{i}"], tmp_path / f"f{i}"))
        weights = load_file(out / "model.safetensors")
        save_file({**weights, **{n: base[n] for n in frozen}}, out / "model.safetensors", metadata={"format": "pt"})
        dirs.append(out)
    frozen_stack = MemberStack(family["base"], dirs)
    assert set(frozen) == frozen_stack.unchanged
    frozen_grams = member_grams(dirs, source(tmp_path), 256, frozen_stack.unchanged)
    assert not any(m.startswith("transformer.h.0.") for m in frozen_grams[0].matrices)
    frozen_stack.set_grams(frozen_grams)
    ours = frozen_stack.merged(MergeConfig(method="regmean"))
    soup = frozen_stack.merged(MergeConfig(method="linear"))
    assert all(torch.equal(ours[n], base[n]) for n in frozen)
    assert (ours["score.weight"] - soup["score.weight"]).abs().max() > 1e-4


def test_grams_are_computed_once_per_member(family, stack, tmp_path, monkeypatch) -> None:
    calls: list[Path] = []
    compute = regmean.compute_grams
    monkeypatch.setattr(regmean, "compute_grams", lambda path, *a: calls.append(path) or compute(path, *a))
    first = member_grams(stack.member_dirs, source(tmp_path), 256, stack.unchanged)
    again = member_grams(stack.member_dirs, source(tmp_path), 256, stack.unchanged)
    assert calls == stack.member_dirs  # the second call read the cache
    assert all(torch.equal(a.matrices[n], b.matrices[n]) for a, b in zip(first, again, strict=True) for n in a.matrices)
    assert len(list((tmp_path / "grams").glob("*.safetensors"))) == 3
    assert not [p for p in (tmp_path / "grams").iterdir() if p.name.startswith(".")]  # no temporary file left
    member_grams(stack.member_dirs, source(tmp_path), 10, stack.unchanged)  # other rows: other matrices
    assert len(calls) == 6 and all(g.rows == 10 for g in member_grams(stack.member_dirs, source(tmp_path), 10,
                                                                      stack.unchanged))
    broken = sorted((tmp_path / "grams").glob("*.safetensors"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # a damaged cache file is computed again, never read as complete
    member_grams(stack.member_dirs, source(tmp_path), 256, stack.unchanged)
    member_grams(stack.member_dirs, source(tmp_path), 10, stack.unchanged)
    assert len(calls) == 7


def test_a_scorer_computes_grams_once_for_all_regmean_recipes(family, tmp_path, monkeypatch) -> None:
    from mllm.merging.scorer import Scorer

    calls: list[Path] = []
    compute = regmean.compute_grams
    monkeypatch.setattr(regmean, "compute_grams", lambda path, *a: calls.append(path) or compute(path, *a))
    cfg = tiny_cfg(tmp_path, "search.prune=false")
    members = [family["m0"], family["m1"], family["m2"]]
    reviews = (texts_for(9, 12), np.arange(12) % 3)
    scorer = Scorer(cfg, family["base"], members, reviews=reviews, member_rows=ROWS)
    one = scorer.logits(MergeConfig(method="regmean", regmean_alpha=0.3))
    two = scorer.logits(MergeConfig(method="regmean", regmean_alpha=0.9, weights=[1.0, 0.5, 0.2]))
    [(score, _)] = list(scorer.stages(MergeConfig(method="regmean")))
    assert len(calls) == 3 and not np.allclose(one, two) and score.rows == 12
    scorer.logits(MergeConfig(method="ties"))  # other methods are untouched by the grams
    bare = Scorer(cfg, family["base"], members, reviews=reviews)
    with pytest.raises(MllmError, match="no training rows") as e:
        bare.logits(MergeConfig(method="regmean"))
    assert "\n" not in str(e.value)
    with pytest.raises(MllmError, match="Gram matrices"):
        MemberStack(family["base"], members).merged(MergeConfig(method="regmean"))
    with pytest.raises(MllmError, match="sum to 0"):
        scorer.logits(MergeConfig(method="regmean", weights=[1.0, -1.0, 0.0]))


# ---- registered members: the merge stage and its refusals ----------------------------------------------------


@pytest.fixture(scope="module")
def registry(family, tmp_path_factory) -> dict:
    """The family registered as a base and three members shard-0..2 of the tiny config's data (no training: the
    perturbed weights stand in), plus a member `shard-9` this config does not plan."""
    from mllm.data.splits import load_splits
    from mllm.tracking.store import Store

    tmp = tmp_path_factory.mktemp("regmean-registry")
    cfg = tiny_cfg(tmp, "merge.method=regmean", "merge.regmean_rows=16", "merge.regmean_alpha=0.5")
    store, fingerprint = Store(cfg), load_splits(cfg.data).fingerprint
    with store.run("fake-members", stage="finetune") as run_:
        store.register("base", run_, family["base"], {"base_key": "tiny-base"}, examples=["ok"], title="base")
        uris = {}
        for name, folder in (("shard-0", "m0"), ("shard-1", "m1"), ("shard-2", "m2"), ("shard-9", "m0")):
            tags = VersionTags(member=name, dataset_fingerprint=fingerprint, base_version="1", member_key=name)
            version = store.register("member", run_, family[folder], tags.as_tags(), examples=["ok"], title=name)
            uris[name] = store.model_uri("member", version.version)
    return {"cfg": cfg, "tmp": tmp, "base": store.model_uri("base", 1), **uris}


def test_regmean_merge_is_registered_with_its_recipe(registry, tmp_path) -> None:
    from mllm import merge
    from mllm.tracking.store import Store

    cfg, members = registry["cfg"], [registry[f"shard-{i}"] for i in range(3)]
    result = merge.run(cfg, members=members, base=registry["base"])
    store = Store(cfg)
    version = store.client.get_model_version("tiny-merged", result.version)
    tags = VersionTags.of(version)
    assert (tags.method, tags.regmean_rows, tags.regmean_alpha) == ("regmean", 16, 0.5)
    assert tags.parents == tuple(members) and tags.base == registry["base"]
    run = store.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["merge.regmean_rows"] == "16" and run.data.params["merge.regmean_alpha"] == "0.5"
    assert "regmean_config.yml" in {a.path for a in store.client.list_artifacts(result.run_id)}
    assert "**regmean merge**" in version.description and "alpha 0.5" in version.description
    assert len(list((cfg.output_dir / "grams").glob("*.safetensors"))) == 3
    model, tokenizer = load_classifier(store.download(result.model_uri, tmp_path / "dl"))
    with torch.no_grad():
        logits = model(**tokenizer(["Worked well.", "Terrible headaches."], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    served = mlflow.pyfunc.load_model(result.model_uri).predict(["Worked well.", "Terrible headaches."])
    assert len(served) == 2
    assert merge.run(cfg, members=members, base=registry["base"]).reused  # same recipe: the same version


def cli(args: list[str], capsys) -> tuple[int, str]:
    from mllm.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0), capsys.readouterr().err


def runs_and_merges(cfg) -> tuple[list, int]:
    """Every run of the tiny experiment, and how many merged versions are registered (an explicit client: the
    fluent tracking URI is reset between tests)."""
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    return (list(client.search_runs([experiment.experiment_id], max_results=1000)),
            len(client.search_model_versions("name = 'tiny-merged'")))


def test_regmean_without_training_rows_is_refused_by_the_cli(registry, family, capsys) -> None:
    cfg, tmp = registry["cfg"], registry["tmp"]
    runs, versions = runs_and_merges(cfg)
    common = ["merge", "-c", str(TINY), "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
              "--set", f"output_dir={tmp}/out", "--set", "data.max_rows=150", "--method", "regmean",
              "--base", registry["base"], "--member", registry["shard-0"]]
    for member, expected in ((registry["shard-9"], "member 'shard-9' is not planned"),
                             (str(family["m1"]), "it is not a registered model version")):
        code, err = cli([*common, "--member", member], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"merge.method=regmean: {member} has no training rows in this config ({expected})" in err
        assert "fix: merge members fine-tuned by mllm finetune with this config" in err
    found, merges = runs_and_merges(cfg)
    assert merges == versions and len(found) == len(runs)
    assert not [r for r in found if r.info.status == "RUNNING"]


def test_member_rows_reads_the_planned_rows_and_names_what_is_missing(registry) -> None:
    from mllm.data.splits import load_splits
    from mllm.finetune import plan_members

    cfg = registry["cfg"]
    fingerprint = load_splits(cfg.data).fingerprint
    versions = {"models:/x/1": {"member": "shard-1", "dataset_fingerprint": fingerprint},
                "models:/x/2": {"dataset_fingerprint": fingerprint},
                "models:/x/3": {"member": "shard-0", "dataset_fingerprint": "0123"},
                "models:/x/4": {"member": "shard-9", "dataset_fingerprint": fingerprint}}
    store = types.SimpleNamespace(resolve=lambda uri, field: (uri, types.SimpleNamespace(tags=versions[uri])))
    [rows] = member_rows(cfg, store, ["models:/x/1"])
    planned = next(s for s in plan_members(cfg, load_splits(cfg.data)) if s.name == "shard-1")
    assert sorted(rows) == sorted(planned.rows["text"]) and rows != planned.rows["text"].tolist()
    assert member_rows(cfg, store, ["models:/x/1"]) == [rows]  # seeded: the same order every time
    for uri, expected in (("models:/x/2", "names no member"), ("models:/x/3", "fine-tuned on other data"),
                          ("models:/x/4", "'shard-9' is not planned")):
        with pytest.raises(MllmError, match=expected) as e:
            member_rows(cfg, store, [uri])
        assert uri in str(e.value) and "\n" not in str(e.value)
