"""In-memory merges against mergekit's run_merge: every tensor, every in-memory method, random ones per seed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import MergeConfig
from mllm.fastmerge import IN_MEMORY, MemberStack
from mllm.merge import merge_models

from .test_merge import family  # noqa: F401  (module-scoped fixture: a tiny base and three perturbed members)

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
    assert {c.method for c in CASES} == IN_MEMORY


@pytest.fixture(scope="module")
def stack(family) -> MemberStack:  # noqa: F811
    return MemberStack(family["base"], [family["m0"], family["m1"], family["m2"]])


@pytest.mark.parametrize("recipe", CASES, ids=lambda r: f"{r.method}-{r.density}-{r.seed}")
def test_in_memory_merge_equals_mergekit(family, stack, recipe: MergeConfig, tmp_path) -> None:  # noqa: F811
    out, _ = merge_models(recipe, [family["m0"], family["m1"], family["m2"]], family["base"], tmp_path / "mk")
    reference = load_file(out / "model.safetensors")
    ours = stack.merged(recipe)
    assert sorted(ours) == sorted(reference)
    worst = max((ours[n] - reference[n]).abs().max().item() for n in reference)
    print(f"{recipe.method}: max abs difference {worst:.2e}")
    assert worst < 2e-6, f"max abs difference {worst}"


def test_merging_into_a_resident_model_changes_its_predictions(family, stack) -> None:  # noqa: F811
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
def test_members_with_frozen_weights_still_match_mergekit(family, recipe, tmp_path) -> None:  # noqa: F811
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
