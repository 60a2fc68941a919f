"""RESULTS.md's per-domain section, for an arm whose cells hold several domains (a domains arm: one specialist per
domain, merged): every model's test macro-F1 on each domain, the mean over domains and the worst, each merge's
retention (macro-F1 on a domain over that domain's specialist's: FusionBench's normalised score), the specialists
across domains, and the verdicts against the specialists, the multi-domain member and the ensemble.

    section = summarise_domains(study, arm, cells)        # None when the arm's cells hold one domain
    lines = render_domains(section)

Every interval is over folds, so it counts training variance (each fold trains its specialists, its multi-domain
member and its merges anew): the corrected resampled t-interval (Nadeau & Bengio 2003), J - 1 degrees of freedom.
The merge the verdicts judge is chosen per fold on validation (the highest mean over domains of validation
macro-F1 among the merges), never on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mllm.evaluation.domains import MEAN_MARGIN, RETENTION_GOAL
from mllm.evaluation.metrics import macro_f1
from mllm.evaluation.selection import difference_word
from mllm.study.config import Arm, StudyConfig
from mllm.study.results import Cell, Model, ta_chosen, val_objective
from mllm.study.stats import corrected_t

MERGES = (("uniform", "uniform soup"), ("greedy", "greedy soup"), ("ties", "TIES"), ("regmean", "RegMean"),
          ("searched", "searched merge"))
OTHERS = (("full", "multi-domain member"), ("ensemble", "logit ensemble"), ("tfidf", "TF-IDF"),
          ("majority", "majority class"))
BEST = "best merge (validation)"
TA = "task arithmetic (lambda on validation)"


@dataclass
class DomainArm:
    arm: Arm
    domains: tuple[str, ...]
    f1: dict[str, np.ndarray]  # model label -> (folds, domains) test macro-F1
    specialists: dict[str, str]  # domain -> its specialist's label
    merges: list[str]  # the labels of the merge rows
    chosen: list[str]  # per fold, the merge BEST stands for
    test_train: float  # test rows / training rows of one fold (the corrected t's ratio)
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)

    def retention(self, label: str) -> np.ndarray:
        """(folds, domains): the model's macro-F1 on each domain over that domain's specialist's there."""
        own = np.stack([self.f1[self.specialists[d]][:, j] for j, d in enumerate(self.domains)], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.f1[label] / own


def _specialist(cell: Cell, domain: str) -> Model | None:
    return next((m for m in cell.models.values() if m.kind == "member" and m.params.get("member") ==
                 f"domain-{domain}"), None)


def _models(cell: Cell, domains: tuple[str, ...]) -> dict[str, Model]:
    """label -> model of one cell: specialists, merges (and the validation-chosen TA lambda), references."""
    out = {f"specialist {d}": m for d in domains if (m := _specialist(cell, d)) is not None}
    out.update({label: cell.models[n] for n, label in MERGES if n in cell.models})
    if any(n.startswith("ta-") and n not in ("ta-1", "ta-k") for n in cell.models):
        out[TA] = ta_chosen(cell)
    out.update({label: cell.models[n] for n, label in OTHERS if n in cell.models})
    return out


def _per_domain(m: Model, cell: Cell, domains: tuple[str, ...]) -> np.ndarray:
    k = m.test.shape[1]
    preds = m.test.argmax(1)
    return np.array([macro_f1(cell.labels[cell.domains == d], preds[cell.domains == d], k) for d in domains])


def summarise_domains(study: StudyConfig, arm: Arm, cells: dict[tuple[str, int], Cell]) -> DomainArm | None:
    """The arm's per-domain figures over its finished folds; None when its cells hold one domain."""
    mine = [cells[(arm.name, f)] for f in range(study.folds) if (arm.name, f) in cells]
    if not mine or any(c.domains is None for c in mine):
        return None
    domains = tuple(dict.fromkeys(mine[0].domains.tolist()))  # type: ignore[union-attr]
    per_cell = [_models(c, domains) for c in mine]
    labels = [lab for lab in per_cell[0] if all(lab in p for p in per_cell)]
    f1 = {lab: np.stack([_per_domain(p[lab], c, domains) for p, c in zip(per_cell, mine, strict=True)])
          for lab in labels}
    merges = [lab for lab in labels if lab in dict(MERGES).values() or lab == TA]
    chosen = [max(merges, key=lambda lab, p=p: val_objective(p[lab])) for p in per_cell]  # validation only
    f1[BEST] = np.stack([f1[lab][i] for i, lab in enumerate(chosen)])
    specialists = {d: f"specialist {d}" for d in domains if f"specialist {d}" in f1}
    ratio = float(np.mean([c.sizes["test"] / c.sizes["train"] for c in mine if c.sizes.get("train")] or [0.0]))
    out = DomainArm(arm, domains, f1, specialists, [*merges, BEST], chosen, ratio, study.alpha)
    if len(specialists) < len(domains):
        out.notes.append("Retention is left out for domains without a specialist: "
                         f"{', '.join(d for d in domains if d not in specialists)}.")
    return out


def _ci(values: np.ndarray, ratio: float, pct: bool = False) -> str:
    mean, lo, hi, _ = corrected_t(values, ratio)
    if pct:
        return f"{mean:.1%} [{lo:.0%}, {hi:.0%}]" if np.isfinite(lo) else f"{mean:.1%}"
    return f"{mean:.4f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{mean:.4f}"


def _tables(s: DomainArm) -> list[str]:
    head = "| model | " + " | ".join(s.domains) + " | mean over domains | worst domain |"
    rule = "| --- |" + " ---: |" * (len(s.domains) + 2)
    lines = [head, rule]
    for label, v in s.f1.items():
        worst = s.domains[int(np.argmin(v.mean(0)))]
        lines.append(f"| {label} | " + " | ".join(_ci(v[:, j], s.test_train) for j in range(len(s.domains)))
                     + f" | {_ci(v.mean(1), s.test_train)} | {worst} {v.mean(0).min():.4f} |")
    lines += ["", "Retention: macro-F1 on a domain over that domain's specialist's macro-F1 there (FusionBench's "
              "normalised score), mean over folds [95% corrected t]:", "",
              "| model | " + " | ".join(s.domains) + " | lowest |", "| --- |" + " ---: |" * (len(s.domains) + 1)]
    if len(s.specialists) == len(s.domains):
        for label in [*s.merges, "multi-domain member", "logit ensemble"]:
            if label in s.f1:
                r = s.retention(label)
                worst = s.domains[int(np.argmin(r.mean(0)))]
                lines.append(f"| {label} | " + " | ".join(_ci(r[:, j], s.test_train, True)
                                                           for j in range(len(s.domains)))
                             + f" | {worst} {r.mean(0).min():.1%} |")
    lines += ["", "Specialists across domains (test macro-F1, mean over folds; own domain in bold):", "",
              "| specialist | " + " | ".join(s.domains) + " |", "| --- |" + " ---: |" * len(s.domains)]
    for d, label in s.specialists.items():
        means = s.f1[label].mean(0)
        lines.append(f"| {d} | " + " | ".join(f"**{x:.4f}**" if o == d else f"{x:.4f}"
                                             for o, x in zip(s.domains, means, strict=True)) + " |")
    return lines


def _verdict(what: str, diffs: np.ndarray, s: DomainArm) -> str:
    mean, lo, hi, p = corrected_t(diffs, s.test_train)
    word = difference_word(mean, p, s.alpha) if np.isfinite(p) else "not distinguishable with one fold"
    return (f"- {what}: {mean:+.4f} macro-F1 (95% corrected t over {len(diffs)} folds [{lo:+.3f}, {hi:+.3f}], "
            f"p {p:.3g}): **{word}**.")


def verdicts(s: DomainArm) -> list[str]:
    """The chosen merge against each specialist on its own domain, the multi-domain member and the ensemble on
    the mean over domains, then the two goals stated before the arm ran."""
    best = s.f1[BEST]
    lines = [f"The merge judged here is chosen per fold on validation (mean over domains): "
             f"{', '.join(f'fold {i}: {c}' for i, c in enumerate(s.chosen))}.", ""]
    for j, d in enumerate(s.domains):
        if d in s.specialists:
            lines.append(_verdict(f"merge minus the {d} specialist on {d}", best[:, j] - s.f1[s.specialists[d]][:, j],
                                  s))
    for label in ("multi-domain member", "logit ensemble"):
        if label in s.f1:
            lines.append(_verdict(f"merge minus the {label} on the mean over domains",
                                  best.mean(1) - s.f1[label].mean(1), s))
    if len(s.specialists) == len(s.domains):
        kept = s.retention(BEST).mean(0)
        short = [f"{d} {x:.1%} ({RETENTION_GOAL - x:.1%} short)" for d, x in zip(s.domains, kept, strict=True)
                 if x < RETENTION_GOAL]
        lines.append(f"- Goal: keep at least {RETENTION_GOAL:.0%} of each specialist's macro-F1 on its own domain: "
                     + (f"**met** (lowest {kept.min():.1%})." if not short else f"**not met**: {'; '.join(short)}."))
    if "multi-domain member" in s.f1:
        gap = float((best.mean(1) - s.f1["multi-domain member"].mean(1)).mean())
        met = gap >= -MEAN_MARGIN
        lines.append(f"- Goal: within {MEAN_MARGIN:g} of the multi-domain member on the mean over domains: "
                     + (f"**met** ({gap:+.4f})." if met else f"**not met** ({gap:+.4f}, "
                        f"{-MEAN_MARGIN - gap:.4f} beyond the margin)."))
    return lines


def render_domains(s: DomainArm) -> list[str]:
    return [f"### Arm `{s.arm.name}` per domain", "",
            f"Test macro-F1 on each domain's reviews, mean over {len(s.chosen)} folds [95% corrected t: training "
            "variance included]; the mean over domains weighs every domain once.", "",
            *_tables(s), "", *verdicts(s), "", *s.notes]
