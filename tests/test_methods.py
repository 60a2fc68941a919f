"""Merge-method knowledge read from mergekit's registry (mllm.merging.methods) against the tables mllm kept by hand."""

from __future__ import annotations

from typing import get_args

import pytest

from mllm.config import MergeMethod
from mllm.errors import MllmError
from mllm.merging import methods
from mllm.merging.methods import IN_MEMORY, info, methods_where, methods_with

# The hand-kept tables of mllm/merge.py and mllm/merging/inmemory.py (after mergekit 0.1.5's method specs): the
# reference.
TASK_VECTOR = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear"}
USES_DENSITY = TASK_VECTOR - {"task_arithmetic"}
USES_GAMMA = {"breadcrumbs", "breadcrumbs_ties"}
USES_EPSILON = {"della", "della_linear"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
NEEDS_BASE = TASK_VECTOR | {"model_stock", "sce", "regmean"}
WEIGHTED = TASK_VECTOR | {"linear", "nuslerp", "regmean"}
HAS_NORMALIZE = TASK_VECTOR | {"linear"}
EXACTLY_TWO = {"slerp", "nuslerp"}
MIN_MEMBERS = {"model_stock": 2}
GTA = {
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, False),
    "dare_ties": ("random", True, True),
    "dare_linear": ("random", False, True),
    "breadcrumbs": ("magnitude_outliers", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False),
    "della": ("della_magprune", True, True),
    "della_linear": ("della_magprune", False, True),
}
ALL = set(get_args(MergeMethod))


def test_every_merge_method_is_registered_in_mergekit() -> None:
    from mergekit.merge_methods import registry

    registered = {m.spec.name for m in registry.registered_methods()}
    assert ALL - set(methods.OWN_METHODS) <= registered, ALL - registered  # regmean is mllm's own
    assert set(methods.METHODS) == ALL


@pytest.mark.parametrize(("derived", "expected"), [
    (lambda: methods_where(lambda i: i.task_vector), TASK_VECTOR),
    (lambda: methods_with("lambda"), TASK_VECTOR),
    (lambda: methods_with("density"), USES_DENSITY),
    (lambda: methods_with("gamma"), USES_GAMMA),
    (lambda: methods_with("epsilon"), USES_EPSILON),
    (lambda: methods_where(lambda i: i.random), RANDOM),
    (lambda: methods_where(lambda i: i.needs_base), NEEDS_BASE),
    (lambda: methods_with("weight"), WEIGHTED),
    (lambda: methods_with("normalize"), HAS_NORMALIZE),
    (lambda: methods_with("t"), {"slerp"}),
    (lambda: methods_where(lambda i: i.exactly_two), EXACTLY_TWO),
], ids=["task_vector", "lambda", "density", "gamma", "epsilon", "random", "needs_base", "weight", "normalize", "t",
        "exactly_two"])
def test_derived_sets_equal_the_hand_kept_tables(derived, expected) -> None:
    got = derived()
    assert isinstance(got, frozenset)
    assert got == expected


def test_min_members() -> None:
    got = {m: info(m).min_members for m in ALL}
    assert {m: n for m, n in got.items() if n > 1 and not info(m).exactly_two} == MIN_MEMBERS
    assert all(got[m] == 2 for m in EXACTLY_TWO)
    assert all(n == 1 for m, n in got.items() if m not in EXACTLY_TWO and m not in MIN_MEMBERS)


def test_per_member_and_shared_parameters() -> None:
    for m in ALL:
        i = info(m)
        assert i.name == m
        assert i.model_params & {"weight", "density", "gamma", "epsilon"} == {
            p for p, table in [("weight", WEIGHTED), ("density", USES_DENSITY), ("gamma", USES_GAMMA),
                               ("epsilon", USES_EPSILON)] if m in table}, m
        assert not i.model_params & {"normalize", "lambda", "t"}, m
        assert ("lambda" in i.shared_params) == (m in TASK_VECTOR), m
    assert info("ties").uses("density") and not info("task_arithmetic").uses("density")
    assert not info("linear").uses("lambda") and info("linear").uses("normalize")


def test_task_vector_family_matches_fastmerge_table() -> None:
    from mllm.merging import inmemory as fastmerge
    derived = {m: (info(m).sparsifier, info(m).consensus, info(m).rescale) for m in ALL if info(m).task_vector}
    assert derived == GTA
    assert fastmerge.GTA == GTA
    for m in ALL - TASK_VECTOR:
        assert (info(m).sparsifier, info(m).consensus, info(m).rescale) == (None, False, False), m


def test_in_memory() -> None:
    from mllm.merging import inmemory as fastmerge
    expected = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "regmean"}
    assert IN_MEMORY == expected
    assert isinstance(IN_MEMORY, frozenset)
    assert fastmerge.IN_MEMORY == expected
    with pytest.raises(AttributeError):
        methods.NOT_A_NAME  # noqa: B018


@pytest.mark.parametrize("name", ["nope", "passthrough", "TIES", ""])
def test_unknown_method_is_one_line_error(name: str) -> None:
    with pytest.raises(MllmError) as e:
        info(name)
    text = str(e.value)
    assert "merge.method" in text and "\n" not in text
    assert "ties" in text and "model_stock" in text  # the choices are listed


def test_info_is_cached_and_frozen() -> None:
    assert info("ties") is info("ties")
    with pytest.raises(AttributeError):
        info("ties").needs_base = False  # type: ignore[misc]
