"""In-memory merges against mergekit's run_merge: every tensor, every in-memory method, random ones per seed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import MergeConfig
from mllm.merge import merge_models
from mllm.merging.inmemory import IN_MEMORY, MemberStack

CASES = [
    MergeConfig(method="linear"),
    MergeConfig(method="linear", weights=[0.2, 0.5, 1.3], normalize=False),
    MergeConfig(method="task_arithmetic", weights=[0.3, 0.3, 0.4], **{"lambda": 0.8}),
    MergeConfig(method="ties", density=0.4),
    MergeConfig(method="ties", density=0.7, weights=[1.0, 0.2, 0.6], normalize=False),
    MergeConfig(method="dare_ties", density=0.5, seed=0),
    MergeConfig(method="dare_ties", density=0.3, seed=7, weights=[0.5, 1.0, 0.25], **{"lambda": 1.3}),
    MergeConfig(method="dare_linear", density=0.6, seed=3),
    MergeConfig(method="breadcrumbs", density=0.8, gamma=0.05),
    MergeConfig(method="breadcrumbs_ties", density=0.6, gamma=0.02),
    MergeConfig(method="della", density=0.5, epsilon=0.2, seed=5),
    MergeConfig(method="della_linear", density=0.4, epsilon=0.1, seed=2),
]


def test_cases_cover_every_in_memory_method() -> None:
    # RegMean has no mergekit reference to compare with: tests/test_regmean.py checks its closed form instead.
    assert {c.method for c in CASES} == IN_MEMORY - {"regmean"}


@pytest.fixture(scope="module")
def stack(family) -> MemberStack:
    return MemberStack(family["base"], [family["m0"], family["m1"], family["m2"]])


@pytest.mark.parametrize("recipe", CASES, ids=lambda r: f"{r.method}-{r.density}-{r.seed}")
def test_in_memory_merge_equals_mergekit(family, stack, recipe: MergeConfig, tmp_path) -> None:
    out, _ = merge_models(recipe, [family["m0"], family["m1"], family["m2"]], family["base"], tmp_path / "mk")
    reference = load_file(out / "model.safetensors")
    ours = stack.merged(recipe)
    assert sorted(ours) == sorted(reference)
    worst = max((ours[n] - reference[n]).abs().max().item() for n in reference)
    print(f"{recipe.method}: max abs difference {worst:.2e}")
    assert worst < 2e-6, f"max abs difference {worst}"


def test_merging_into_a_resident_model_changes_its_predictions(family, stack) -> None:
    model = stack.model()
    ids = torch.randint(3, 100, (2, 12))
    before = model(input_ids=ids).logits.detach().clone()
    stack.merge_into(model, MergeConfig(method="ties", density=0.5))
    after = model(input_ids=ids).logits.detach()
    assert not torch.allclose(before, after)
    merged = stack.merged(MergeConfig(method="ties", density=0.5))
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in merged.items())


def test_dare_differs_by_seed_and_repeats_per_seed(stack) -> None:
    a = stack.merged(MergeConfig(method="dare_ties", seed=1))
    b = stack.merged(MergeConfig(method="dare_ties", seed=1))
    c = stack.merged(MergeConfig(method="dare_ties", seed=2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_out_of_memory_methods_are_refused(stack) -> None:
    from mllm.errors import MllmError

    with pytest.raises(MllmError, match="no in-memory merge"):
        stack.merged(MergeConfig(method="slerp"))


@pytest.mark.parametrize("recipe", [c for c in CASES if c.method != "linear"], ids=lambda r: r.method)
def test_members_with_frozen_weights_still_match_mergekit(family, recipe, tmp_path) -> None:
    """Members that left some weights exactly at the base (frozen layers): the shortcut for unchanged weights
    keeps every tensor, and the random masks drawn after it, equal to mergekit's."""
    import shutil

    from safetensors.torch import save_file

    base_w = load_file(family["base"] / "model.safetensors")
    frozen = [n for n in sorted(base_w) if ".h.0." in n or "wte" in n or "wpe" in n]
    members = []
    for name in ("m0", "m1", "m2"):
        out = tmp_path / name
        shutil.copytree(family[name], out)
        w = load_file(out / "model.safetensors")
        save_file({k: base_w[k] if k in frozen else v for k, v in w.items()}, out / "model.safetensors",
                  metadata={"format": "pt"})
        members.append(out)
    stack = MemberStack(family["base"], members)
    assert set(frozen) <= stack.unchanged
    out, _ = merge_models(recipe, members, family["base"], tmp_path / "mk")
    reference = load_file(out / "model.safetensors")
    ours = stack.merged(recipe)
    worst = max((ours[n] - reference[n]).abs().max().item() for n in reference)
    assert worst < 2e-6, f"max abs difference {worst}"


def grouped(stack: MemberStack, recipe: MergeConfig, n: int = 2) -> MergeConfig:
    """`recipe` with per-layer-group weights and densities (search.layer_groups = n) over the tiny family."""
    from mllm.merging.groups import plan_groups

    groups = plan_groups(stack.model(), stack.names, set(stack.names) - stack.unchanged, n)
    return MergeConfig.model_validate({**recipe.model_dump(by_alias=True), "groups": [
        {"name": g.name, "filters": list(g.filters), "weights": [0.9 - 0.2 * j, 0.0 if j == 1 else 0.3 + 0.1 * j,
                                                                  0.5],
         "density": None if j == 0 else round(0.3 + 0.15 * j, 2)}
        for j, g in enumerate(groups)]})


GROUP_CASES = [c for c in CASES if c.method in {"linear", "task_arithmetic", "ties", "dare_ties", "della_linear",
                                                  "breadcrumbs"}]


def test_layer_groups_cover_blocks_embeddings_and_head(stack) -> None:
    from mllm.merging.groups import plan_groups

    groups = plan_groups(stack.model(), stack.names, set(stack.names) - stack.unchanged, 2)
    assert [g.name for g in groups] == ["embeddings", "block 0", "block 1", "head"]
    assert groups[1].filters == ("transformer.h.0.",)
    covered = [n for n in stack.names if any(f in n for g in groups for f in g.filters)]
    assert covered == stack.names  # every trained tensor is in exactly one group
    assert all(sum(any(f in n for f in g.filters) for g in groups) == 1 for n in stack.names)
    # Only blocks some member trained get a group; more groups than trained blocks: one block each.
    frozen = {n for n in stack.names if ".h.0." in n or "wte" in n or "wpe" in n}
    groups = plan_groups(stack.model(), stack.names, set(stack.names) - frozen, 5)
    assert [g.name for g in groups] == ["block 1", "head"]


@pytest.mark.parametrize("recipe", GROUP_CASES, ids=lambda r: f"{r.method}-{r.seed}")
def test_layer_group_merge_equals_mergekit(family, stack, recipe: MergeConfig, tmp_path) -> None:
    """Per-layer-group weights and densities: in memory, tensor for tensor equal to mergekit's conditional
    (filtered) parameters, DARE's masks included."""
    recipe = grouped(stack, recipe)
    out, text = merge_models(recipe, [family["m0"], family["m1"], family["m2"]], family["base"], tmp_path / "mk")
    assert "filter: transformer.h.1." in text
    reference = load_file(out / "model.safetensors")
    ours = stack.merged(recipe)
    worst = max((ours[n] - reference[n]).abs().max().item() for n in reference)
    assert worst < 2e-6, f"max abs difference {worst}"
    # The groups matter: the same recipe without them is another merge.
    plain = stack.merged(recipe.model_copy(update={"groups": None}))
    assert any(not torch.equal(plain[n], ours[n]) for n in ours)


def test_a_zero_weight_leaves_the_member_out(family, stack) -> None:
    """Weights [1, 0, 0] merge to member 0 itself (linear, and TIES at density 1 with lambda 1): single members
    are in the search space."""
    m0 = load_file(family["m0"] / "model.safetensors")
    for recipe in (MergeConfig(method="linear", weights=[1.0, 0.0, 0.0]),
                   MergeConfig(method="ties", weights=[1.0, 0.0, 0.0], density=1.0)):
        ours = stack.merged(recipe)
        assert max((ours[n] - m0[n]).abs().max().item() for n in m0) < 1e-5


def test_task_arithmetic_at_lambda_1_is_the_uniform_soup(stack) -> None:
    """Normalised task arithmetic at lambda 1 is base + mean(task vectors) = the members' average, which is why a
    study scores it once under both names (mllm.study.recipes.SAME); at lambda K it is the sum, another merge."""
    uniform = stack.merged(MergeConfig(method="linear"))
    ta1 = stack.merged(MergeConfig(method="task_arithmetic", **{"lambda": 1.0}))
    ta3 = stack.merged(MergeConfig(method="task_arithmetic", **{"lambda": 3.0}))
    assert max((uniform[n] - ta1[n]).abs().max().item() for n in uniform) < 1e-6
    assert max((uniform[n] - ta3[n]).abs().max().item() for n in uniform) > 1e-3


def test_magnitude_pruning_of_large_weights_keeps_the_same_entries(monkeypatch) -> None:
    """Weights above LARGE entries find the k largest by bisection on the float bits (no topk copies): the same
    entries as topk, ties at the threshold and runs of zeros included."""
    from mllm.merging import inmemory as fastmerge
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(300, 70, generator=g)
    delta[0, :10] = 0.5  # ties
    delta[1, :10] = -0.5
    delta[5:40] = 0  # a frozen block of rows: zeros
    recipe = MergeConfig(method="ties", density=0.3)
    small = fastmerge.sparsify(delta, "magnitude", recipe, rescale=False)
    monkeypatch.setattr(fastmerge, "LARGE", 100)
    large = fastmerge.sparsify(delta, "magnitude", recipe, rescale=False)
    assert int((large != 0).sum()) == int((small != 0).sum()) == int(0.3 * delta.numel())
    assert torch.equal(large, small)
    for density in (0.9, 0.05):  # k beyond the non-zero entries: zeros fill the rest either way
        r = MergeConfig(method="ties", density=density)
        monkeypatch.setattr(fastmerge, "LARGE", 1 << 30)
        a = fastmerge.sparsify(delta, "magnitude", r, rescale=True)
        monkeypatch.setattr(fastmerge, "LARGE", 100)
        assert torch.equal(fastmerge.sparsify(delta, "magnitude", r, rescale=True), a)
    # k ends inside a run of ties: the same number kept and the same multiset of values (which tied entry is kept
    # is arbitrary in topk and in mergekit's argsort alike).
    tied = torch.tensor([3.0, -2.0, 2.0, 2.0, -2.0, 1.0, 0.5, 0.0] * 40)
    r = MergeConfig(method="ties", density=0.3)  # k = 96: the 40 threes and 56 of the 160 twos
    monkeypatch.setattr(fastmerge, "LARGE", 100)
    kept = fastmerge.sparsify(tied, "magnitude", r, rescale=False)
    monkeypatch.setattr(fastmerge, "LARGE", 1 << 30)
    reference = fastmerge.sparsify(tied, "magnitude", r, rescale=False)
    assert torch.equal(kept.abs().sort().values, reference.abs().sort().values) and int((kept != 0).sum()) == 96
