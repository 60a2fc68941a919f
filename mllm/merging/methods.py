"""What each merge method reads and needs, read from mergekit's own method registry (one place for it).

    from mllm.merging.methods import info, methods_with
    info("ties").uses("density")        # True: a per-member parameter of ties
    info("model_stock").min_members     # 2
    methods_with("gamma")               # frozenset({"breadcrumbs", "breadcrumbs_ties"})

Every method object in `mergekit.merge_methods.registry` has a `spec`: its declared parameters (shared, or
per input / per non-base input) and an input contract (base policy, input counts); the generalized task
arithmetic family (`GeneralizedTaskArithmeticMerge`) also names its sparsifier, sign consensus and default
rescale. mergekit is imported on first use, so importing this module stays light (no torch). regmean is mllm's own
method (mllm.merging.regmean), not in mergekit's registry: its MethodInfo is written here by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, get_args

from mllm.config.schema import MergeMethod
from mllm.errors import MllmError

METHODS: tuple[str, ...] = get_args(MergeMethod)  # the values merge.method accepts
# Sparsifiers that draw random masks: DARE's bernoulli drop, DELLA's probabilistic magnitude pruning.
RANDOM_SPARSIFIERS = frozenset({"random", "della_magprune"})
# Sparsifiers mllm.merging.inmemory implements (None: no sparsification, task arithmetic).
KERNEL_SPARSIFIERS = frozenset({None, "magnitude", "random", "magnitude_outliers", "della_magprune"})
# mllm gives slerp its first member as mergekit's base_model (slerp interpolates from it to the other member),
# so the base slerp's contract requires is one of its two members, not the shared base checkpoint.
BASE_IS_MEMBER = frozenset({"slerp"})


@dataclass(frozen=True)
class MethodInfo:
    """What one merge method reads (parameter names as mergekit spells them) and what inputs it needs."""

    name: str
    model_params: frozenset[str]  # per member: weight, density, gamma, epsilon
    shared_params: frozenset[str]  # global: normalize, lambda, t, ...
    needs_base: bool  # the shared base checkpoint is mergekit's base_model
    task_vector: bool  # merges task vectors (member - base): the generalized task arithmetic family
    sparsifier: str | None  # mergekit's SparsificationMethod value, None without sparsification
    consensus: bool  # TIES sign election
    rescale: bool  # kept entries rescaled to the task vector's norm (mergekit's default; mllm never sets it)
    random: bool  # random masks (DARE, DELLA): the result depends on merge.seed
    exactly_two: bool
    min_members: int

    def uses(self, param: str) -> bool:
        """Whether the method reads `param` (per member or shared)."""
        return param in self.model_params or param in self.shared_params


# Methods mllm implements itself. regmean reads per-member weights (always normalised: only their ratios matter) and
# its two MergeConfig fields; it needs the shared base (unchanged layers and the resident container come from it).
OWN_METHODS: dict[str, MethodInfo] = {
    "regmean": MethodInfo(
        name="regmean", model_params=frozenset({"weight"}), shared_params=frozenset({"regmean_rows", "regmean_alpha"}),
        needs_base=True, task_vector=False, sparsifier=None, consensus=False, rescale=False, random=False,
        exactly_two=False, min_members=1),
}


def _registered(method: str) -> Any:
    from mergekit.merge_methods import registry

    try:
        return registry.get(method)
    except RuntimeError:
        raise MllmError(f"merge.method={method} is not a method of the installed mergekit",
                        "install the mergekit version in pyproject.toml (0.1.5)") from None


@cache
def info(method: str) -> MethodInfo:
    """What `method` reads and needs; a one-line MllmError for a name merge.method does not accept."""
    if method not in METHODS:
        raise MllmError(f"merge.method={method!r} is not a merge method mllm knows", f"use one of {', '.join(METHODS)}")
    if method in OWN_METHODS:
        return OWN_METHODS[method]
    from mergekit.merge_methods.base import BasePolicy, ParameterScope
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    obj = _registered(method)
    spec = obj.spec
    model = {p.name for p in spec.parameters if p.scope in (ParameterScope.INPUT, ParameterScope.NON_BASE)}
    shared = {p.name for p in spec.parameters if p.scope == ParameterScope.SHARED}
    task_vector = isinstance(obj, GeneralizedTaskArithmeticMerge)
    sparsifier: str | None = None
    if task_vector:
        sparsifier = obj.sparsification_method.value if obj.sparsification_method is not None else None
        if sparsifier is None:  # every GTA spec declares density; only a sparsifier reads it (task_arithmetic)
            model.discard("density")
    contract = spec.contract
    needs_base = contract.base == BasePolicy.REQUIRED and method not in BASE_IS_MEMBER
    if contract.min_non_base is not None or contract.max_non_base is not None:
        low, high = contract.min_non_base or 0, contract.max_non_base
    else:  # the input counts include the base: members are the other inputs when the base is the shared one
        low = contract.min_inputs - needs_base
        high = None if contract.max_inputs is None else contract.max_inputs - needs_base
    return MethodInfo(
        name=method, model_params=frozenset(model), shared_params=frozenset(shared), needs_base=needs_base,
        task_vector=task_vector, sparsifier=sparsifier,
        consensus=task_vector and obj.consensus_method is not None,
        rescale=task_vector and bool(obj.default_rescale), random=sparsifier in RANDOM_SPARSIFIERS,
        exactly_two=low == high == 2, min_members=max(1, low),
    )


def methods_where(predicate: Callable[[MethodInfo], bool]) -> frozenset[str]:
    """The merge.method values whose MethodInfo satisfies `predicate`."""
    return frozenset(m for m in METHODS if predicate(info(m)))


def methods_with(param: str) -> frozenset[str]:
    """The merge.method values that read `param` (per member or shared), e.g. "density", "lambda", "t"."""
    return methods_where(lambda i: i.uses(param))


@cache
def in_memory() -> frozenset[str]:
    """Methods mllm.merging.inmemory merges in memory: linear, the task-vector family with a sparsifier it
    implements, and mllm's own methods (regmean)."""
    return (frozenset({"linear", *OWN_METHODS})
            | methods_where(lambda i: i.task_vector and i.sparsifier in KERNEL_SPARSIFIERS))


IN_MEMORY: frozenset[str]  # = in_memory(), computed on first access (PEP 562) so that mergekit loads lazily


def __getattr__(name: str) -> frozenset[str]:
    if name == "IN_MEMORY":
        return in_memory()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
