"""The criterion that picks the default choice policy (search.choice) without reading test: every policy measured
between validation parts, over a study's cells, from the trials each cell's search kept (`trials.json`).

    table = policy_table([cell.trials for cell in cells])      # one row per policy
    default = pick(table)                                      # the rule below, applied to that table

In each cell the search optimised its search rows (A) only. The held-out rows are cut once more, stratified, into
two quarters C and E. A policy chooses with what it may read (A; crossfit also C, where it re-scores its top
trials; the old rule, best-all, A and C together), and the chosen trial is scored on E, which nothing chose on.
C and E then swap and the cell's two figures are averaged. Per policy: the mean over cells of E's macro-F1 (how
good the choice is out of sample) and of optimism (macro-F1 where it was chosen minus on E), each with a 95%
t-interval over cells; the uniform soup (which chooses nothing) is the reference row.

The rule, stated before any test figure of a new policy was read: the default is the policy with the highest mean
held-out (E) macro-F1; a policy within 0.005 of it whose mean optimism is smaller in size wins instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mllm.config.schema import MergeConfig
from mllm.evaluation.choice import POLICIES, Candidate, choose, complexity, split_rows
from mllm.evaluation.metrics import macro_f1
from mllm.study.stats import t_interval

TIE = 0.005  # held-out macro-F1 within this of the best counts as a tie, broken by lower optimism


def _candidates(trials: dict[str, Any]) -> list[Candidate]:
    return [Candidate(t["number"], MergeConfig.model_validate(t["recipe"]), np.asarray(t["pred"]),
                      np.asarray(t["nll"], dtype=np.float64)) for t in trials["trials"]]


def cell_figures(trials: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """policy -> (held-out E macro-F1, optimism), each the mean over the two C/E swaps of one cell."""
    labels = np.asarray(trials["labels"])
    a, held = np.asarray(trials["search_rows"]), np.asarray(trials["holdout_rows"])
    k = int(trials["num_labels"])
    candidates = _candidates(trials)
    by_number = {c.number: c for c in candidates}
    first, second = split_rows(labels[held], 0.5, int(trials["seed"]))
    parts = (held[first], held[second])
    best = trials.get("best_member")
    reference = float(np.asarray(trials["member_nll"][best])[a].mean()) if best is not None else None
    uniform = [c for c in candidates if complexity(c.recipe, len(trials["member_nll"])) == (0, 0.0)]
    out: dict[str, list[tuple[float, float]]] = {}
    for c_rows, e_rows in (parts, parts[::-1]):
        def f1(c: Candidate, rows: np.ndarray) -> float:
            return macro_f1(labels[rows], c.pred[rows], k)

        for policy in POLICIES:
            pick = choose(candidates, labels, a, c_rows, k, policy, int(trials["top_k"]),
                          float(trials["se_multiplier"]), trials["nll_guard"], reference, int(trials["seed"]))
            where = c_rows if policy == "crossfit" else a
            chosen = by_number[pick.number]
            out.setdefault(policy, []).append((f1(chosen, e_rows), f1(chosen, where) - f1(chosen, e_rows)))
        both = np.concatenate([a, c_rows])
        old = by_number[choose(candidates, labels, both, np.zeros(0, dtype=np.int64), k, "best").number]
        out.setdefault("best-all", []).append((f1(old, e_rows), f1(old, both) - f1(old, e_rows)))
        if uniform:
            out.setdefault("uniform soup", []).append((f1(uniform[0], e_rows), float("nan")))
    return {p: (float(np.mean([x for x, _ in v])), float(np.mean([y for _, y in v]))) for p, v in out.items()}


def policy_table(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per policy over the cells: mean held-out macro-F1 and optimism with 95% t-intervals."""
    figures = [cell_figures(t) for t in cells]
    rows = []
    for policy in [*POLICIES, "best-all", "uniform soup"]:
        held = [f[policy][0] for f in figures if policy in f]
        opt = [f[policy][1] for f in figures if policy in f and np.isfinite(f[policy][1])]
        if not held:
            continue
        h, h_lo, h_hi = t_interval(held)
        o, o_lo, o_hi = t_interval(opt) if opt else (float("nan"),) * 3
        rows.append({"policy": policy, "cells": len(held), "held_out": h, "held_out_lo": h_lo, "held_out_hi": h_hi,
                     "optimism": o, "optimism_lo": o_lo, "optimism_hi": o_hi})
    return pd.DataFrame(rows)


def pick(table: pd.DataFrame) -> str | None:
    """The module's rule on a policy table (the uniform soup is a reference, not a policy)."""
    policies = table[table["policy"].isin(POLICIES)]
    if policies.empty:
        return None
    top = policies["held_out"].max()
    near = policies[policies["held_out"] >= top - TIE].assign(size=lambda f: f["optimism"].abs())
    return str(near.sort_values(["size", "held_out"], ascending=[True, False]).iloc[0]["policy"])
