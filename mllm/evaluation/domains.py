"""Per-domain figures of a multi-domain evaluation: each model's macro-F1 on each domain's rows, the retention of
the specialists' scores (FusionBench's normalised score), and the paired tests the report's per-domain verdicts read.

    s = domain_scores(preds, labels, domains, num_labels, samples=10_000, seed=0)   # one model, every domain
    s.by_domain, s.interval("yelp"), s.mean, s.interval(), s.worst
    retention(merge.by_domain, {"yelp": spec_yelp.of("yelp"), ...})                 # {domain: ratio}
    domain_mean_test(labels, preds_a, preds_b, domains, num_labels)                 # PairedTest on the domain mean
    own_domain_test(labels, preds_a, preds_b, domains, "yelp", num_labels)          # PairedTest on yelp's rows

Every bootstrap resamples each domain's rows within the domain (the mean over domains weighs each domain once), and
two models scored with the same seed on the same rows get the same resamples: a difference or ratio of their draws
is a paired bootstrap. `section` builds the report's part (`mllm.evaluation.report`); `render`, `metrics` and
`DomainReport.summary` lay it out as markdown, MLflow metrics and JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from mllm.config.schema import DataConfig, ExperimentConfig
from mllm.data.splits import load_splits
from mllm.evaluation.metrics import PairedTest, bootstrap_p, holm, macro_f1, paired_test, resampled_scores
from mllm.evaluation.selection import Reading, reading

RETENTION_GOAL = 0.95  # keep at least 95% of each specialist's macro-F1 on its own domain
MEAN_MARGIN = 0.02  # within 0.02 macro-F1 of the multi-domain (full-data) member on the mean over domains
CHUNK = 200  # resamples per vectorised batch: bounded memory on large domains
RETAINED_ROLES = ("merged", "ensemble", "full")  # the models that stand in for the specialists


def _classes(predictions: np.ndarray) -> np.ndarray:
    """Class indices from (n,) indices or (n, k) logits."""
    predictions = np.asarray(predictions)
    return predictions.argmax(1) if predictions.ndim == 2 else predictions.astype(np.int64)


def domain_order(domains: np.ndarray) -> tuple[str, ...]:
    """The domains in order of first appearance (the config's dataset order: splits are concatenated in it)."""
    return tuple(str(d) for d in dict.fromkeys(np.asarray(domains).tolist()))


@dataclass(frozen=True)
class DomainScores:
    """One model's macro-F1 on each domain's rows, with the bootstrap draws behind its intervals."""

    domains: tuple[str, ...]
    macro_f1: tuple[float, ...]  # point estimates, one per domain
    rows: tuple[int, ...]
    draws: np.ndarray = field(repr=False, compare=False)  # (B, D): each domain's rows resampled within the domain
    confidence: float = 0.95
    seed: int = 0  # same seed, same rows: the same resamples (paired draws)

    @property
    def by_domain(self) -> dict[str, float]:
        return dict(zip(self.domains, self.macro_f1, strict=True))

    def of(self, domain: str) -> float:
        return self.macro_f1[self.domains.index(domain)]

    @property
    def mean(self) -> float:
        """The unweighted mean over domains (every domain counts once, whatever its size)."""
        return float(np.mean(self.macro_f1))

    @property
    def worst(self) -> tuple[str, float]:
        """(domain, macro-F1) of the lowest-scoring domain."""
        i = int(np.argmin(self.macro_f1))
        return self.domains[i], self.macro_f1[i]

    def interval(self, domain: str | None = None) -> tuple[float, float]:
        """Percentile bootstrap interval of one domain's macro-F1, or of the mean over domains (None)."""
        values = self.draws.mean(1) if domain is None else self.draws[:, self.domains.index(domain)]
        tail = (1 - self.confidence) / 2 * 100
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    def summary(self) -> dict[str, Any]:
        return {"macro_f1": {d: {"value": f, "ci": list(self.interval(d)), "rows": n}
                             for d, f, n in zip(self.domains, self.macro_f1, self.rows, strict=True)},
                "mean": self.mean, "mean_ci": list(self.interval()),
                "worst": {"domain": self.worst[0], "macro_f1": self.worst[1]}}


def domain_scores(predictions: np.ndarray, labels: np.ndarray, domains: np.ndarray, num_labels: int,
                  samples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> DomainScores:
    """One model's macro-F1 per domain (point estimates on each domain's rows, as `metrics.macro_f1` computes
    them) with percentile-bootstrap draws resampled within each domain. `predictions`: (n,) class indices or (n, k)
    logits, rows aligned with `labels` and `domains` (a domain name per row). Domain j's rows are resampled by the
    generator seeded (seed, j): the same resamples for every model."""
    preds, labels, domains = _classes(predictions), np.asarray(labels), np.asarray(domains).astype(str)
    names = domain_order(domains)
    draws = np.empty((samples, len(names)))
    for j, d in enumerate(names):
        rows, rng = np.flatnonzero(domains == d), np.random.default_rng([seed, j])
        for start in range(0, samples, CHUNK):
            index = rows[rng.integers(0, len(rows), size=(min(CHUNK, samples - start), len(rows)))]
            draws[start:start + len(index), j] = resampled_scores(labels, preds, num_labels, index)[1]
    points = tuple(macro_f1(labels[domains == d], preds[domains == d], num_labels) for d in names)
    return DomainScores(names, points, tuple(int((domains == d).sum()) for d in names), draws, confidence, seed)


def retention(model: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """FusionBench's normalised score: per domain d, the model's macro-F1 on d over the d specialist's macro-F1 on d
    (`own[d]`). Domains without a specialist are left out; a specialist scoring 0 gives NaN."""
    return {d: (f / own[d] if own[d] > 0 else float("nan")) for d, f in model.items() if d in own}


def retention_interval(model: DomainScores, specialist: DomainScores, domain: str) -> tuple[float, float]:
    """Percentile interval of the retention on `domain` from paired draws (both scored with the same seed)."""
    _check_paired(model, specialist)
    j = model.domains.index(domain)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = model.draws[:, j] / np.where(specialist.draws[:, j] > 0, specialist.draws[:, j], np.nan)
    tail = (1 - model.confidence) / 2 * 100
    lo, hi = np.nanpercentile(ratio, [tail, 100 - tail]) if np.isfinite(ratio).any() else (np.nan, np.nan)
    return float(lo), float(hi)


def lowest(values: Mapping[str, float]) -> tuple[str, float] | None:
    """(domain, value) of the smallest finite value (the minimum retention), or None."""
    finite = {d: v for d, v in values.items() if np.isfinite(v)}
    return min(finite.items(), key=lambda kv: kv[1]) if finite else None


def _check_paired(a: DomainScores, b: DomainScores) -> None:
    if a.domains != b.domains or a.rows != b.rows or a.seed != b.seed or a.draws.shape != b.draws.shape:
        raise ValueError("unpaired domain scores: score both models on the same rows with the same seed and samples")


def mean_difference_test(a: DomainScores, b: DomainScores, correct_a: np.ndarray, correct_b: np.ndarray
                         ) -> PairedTest:
    """A - B on the mean over domains, from paired draws (each domain resampled within itself, the per-domain
    macro-F1s averaged). `correct_*`: per-row correctness, for McNemar's exact test on the pooled rows."""
    from scipy.stats import binomtest

    _check_paired(a, b)
    d = (a.draws - b.draws).mean(1)
    tail = (1 - a.confidence) / 2 * 100
    lo, hi = np.percentile(d, [tail, 100 - tail])
    p_boot = min(1.0, 2 * bootstrap_p(int(min((d <= 0).sum(), (d >= 0).sum())), len(d)))
    only_a, only_b = int((correct_a & ~correct_b).sum()), int((correct_b & ~correct_a).sum())
    p_mcnemar = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return PairedTest(a.mean - b.mean, (float(lo), float(hi)), p_boot, p_mcnemar, only_a, only_b, d)


def domain_mean_test(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, domains: np.ndarray,
                     num_labels: int, samples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedTest:
    """Paired bootstrap of the difference A - B in mean-over-domains macro-F1: each resample draws every domain's
    rows within the domain (the same rows for A and B) and averages the per-domain macro-F1s. Predictions: (n,)
    class indices or (n, k) logits. Read it with `mllm.evaluation.selection.reading` like any `PairedTest`."""
    pa, pb, labels = _classes(preds_a), _classes(preds_b), np.asarray(labels)
    a = domain_scores(pa, labels, domains, num_labels, samples, confidence, seed)
    b = domain_scores(pb, labels, domains, num_labels, samples, confidence, seed)
    return mean_difference_test(a, b, pa == labels, pb == labels)


def own_domain_test(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, domains: np.ndarray,
                    domain: str, num_labels: int, samples: int = 10_000, confidence: float = 0.95, seed: int = 0
                    ) -> PairedTest:
    """`metrics.paired_test` of A - B on `domain`'s rows only (e.g. a merge against that domain's specialist)."""
    rows = np.asarray(domains).astype(str) == domain
    return paired_test(np.asarray(labels)[rows], _classes(preds_a)[rows], _classes(preds_b)[rows], num_labels,
                       samples, confidence, seed)


def row_domains(cfg: DataConfig, split: str, rows: int, fingerprint: str | None) -> tuple[np.ndarray | None, str]:
    """The domain of each evaluated row (the split's `domain` column, in the order evaluate scored the rows), or
    (None, why not). One configured dataset: (None, "") without reading any data."""
    if len(cfg.datasets) < 2:
        return None, ""
    data = load_splits(cfg)
    if fingerprint and fingerprint != data.fingerprint:
        return None, (f"the evaluations scored data {fingerprint}, this config's data is {data.fingerprint} "
                      "(report with the config the evaluations ran with)")
    frame = data.split(split)
    if len(frame) != rows:
        return None, f"the evaluations scored {rows} rows, this config's {split} split has {len(frame)}"
    domains = frame["domain"].astype(str).to_numpy()
    return (domains, "") if len(domain_order(domains)) > 1 else (None, "")


class Comparison(NamedTuple):
    """The selected merge against one model: on one domain's rows (a specialist) or on the mean over domains."""

    target: str  # the other model's URI
    domain: str | None  # None: the mean over domains
    test: PairedTest
    p_holm: float  # over this section's comparisons
    reading: Reading  # margin: (1 - RETENTION_GOAL) x the specialist's macro-F1 on its domain, else MEAN_MARGIN


@dataclass(frozen=True)
class DomainReport:
    """The report's per-domain section: every model's per-domain scores, the retention of the specialists' scores,
    the specialists' cross-domain matrix, and the selected merge's comparisons (Holm over this section's family)."""

    domains: tuple[str, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)  # model URI -> role, in the report table's order
    scores: dict[str, DomainScores] = field(default_factory=dict)
    specialists: dict[str, str] = field(default_factory=dict)  # domain -> its specialist's URI
    retained: dict[str, dict[str, float]] = field(default_factory=dict)  # URI -> domain -> retention
    retained_ci: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    selected: str | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # "specialist <d>", "full", "ensemble"
    verdicts: list[str] = field(default_factory=list)
    goals: dict[str, bool | None] = field(default_factory=dict)  # "retention", "full_mean": met, or None (unanswered)
    note: str = ""  # why the section was left out

    def summary(self) -> dict[str, Any]:
        return {"domains": list(self.domains), "note": self.note, "selected_merge": self.selected,
                "specialists": self.specialists, "goals": self.goals, "verdicts": self.verdicts,
                "models": {u: {"role": self.roles[u], **s.summary(), "retention": self.retained.get(u),
                               "retention_ci": {d: list(ci) for d, ci in self.retained_ci.get(u, {}).items()},
                               "min_retention": lowest(self.retained.get(u, {}))} for u, s in self.scores.items()},
                "comparisons": {k: {"target": c.target, "domain": c.domain, "p_holm": c.p_holm, **c.test.summary()}
                                for k, c in self.comparisons.items()}}


def section(cfg: ExperimentConfig, split: str, fingerprint: str | None, labels: np.ndarray, num_labels: int,
            models: list[tuple[str, str, np.ndarray, str | None]], selected: str | None) -> DomainReport | None:
    """The per-domain section of a report on `split`, or None when the split holds one domain. `models`: (URI,
    role, predicted class indices, the `domain` a specialist member was trained on) per model, in table order;
    `selected`: the merge the report selected on validation (never chosen here)."""
    domains, note = row_domains(cfg.data, split, len(labels), fingerprint)
    if domains is None:
        return DomainReport(note=note) if note else None
    e = cfg.evaluate
    scores = {u: domain_scores(p, labels, domains, num_labels, e.bootstrap_samples, e.confidence, e.seed)
              for u, _, p, _ in models}
    roles = {u: role for u, role, _, _ in models}
    specialists: dict[str, str] = {}
    for u, role, _, trained_on in models:
        if role == "member" and trained_on in domain_order(domains):
            specialists.setdefault(trained_on, u)
    own = {d: scores[u].of(d) for d, u in specialists.items()}
    retained = {u: retention(scores[u].by_domain, own) for u in roles if roles[u] in RETAINED_ROLES}
    retained_ci = {u: {d: retention_interval(scores[u], scores[specialists[d]], d) for d in r}
                   for u, r in retained.items()}
    preds = {u: p for u, _, p, _ in models}
    comparisons = compare_selected(selected, labels, preds, domains, num_labels, scores, specialists, roles, cfg)
    out = DomainReport(domain_order(domains), roles, scores, specialists, retained, retained_ci, selected,
                       comparisons)
    lines, goals = verdict_lines(out, cfg)
    return replace(out, verdicts=lines, goals=goals)


def compare_selected(selected: str | None, labels: np.ndarray, preds: dict[str, np.ndarray], domains: np.ndarray,
                     num_labels: int, scores: dict[str, DomainScores], specialists: dict[str, str],
                     roles: dict[str, str], cfg: ExperimentConfig) -> dict[str, Comparison]:
    """The selected merge against each specialist on its own domain, and against the full-data member and the
    ensemble on the mean over domains; Holm over these comparisons, read in the report's vocabulary (against a
    specialist, non-inferiority within (1 - RETENTION_GOAL) of its macro-F1 there is the retention goal)."""
    if selected is None:
        return {}
    e = cfg.evaluate
    tests: dict[str, tuple[str, str | None, PairedTest, float]] = {}
    for d, u in specialists.items():
        tests[f"specialist {d}"] = (u, d, own_domain_test(labels, preds[selected], preds[u], domains, d, num_labels,
                                                          e.bootstrap_samples, e.confidence, e.seed),
                                    round((1 - RETENTION_GOAL) * scores[u].of(d), 4))
    for role in ("full", "ensemble"):
        u = next((u for u, r in roles.items() if r == role), None)
        if u is not None:
            tests[role] = (u, None, mean_difference_test(scores[selected], scores[u], preds[selected] == labels,
                                                         preds[u] == labels), MEAN_MARGIN)
    adjusted = holm([t.bootstrap_p for _, _, t, _ in tests.values()])
    return {k: Comparison(u, d, t, p, reading(t, p, e.alpha, margin, e.confidence))
            for (k, (u, d, t, margin)), p in zip(tests.items(), adjusted, strict=True)}


def pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1%}"


def verdict_lines(r: DomainReport, cfg: ExperimentConfig) -> tuple[list[str], dict[str, bool | None]]:
    """One sentence per question (the selected merge against each specialist on its own domain, against the
    full-data member and the ensemble on the mean over domains), then the two goals, met or not."""
    if r.selected is None:
        return (["No merge was selected on validation, so no per-domain question is answered."],
                {"retention": None, "full_mean": None})
    conf = f"{cfg.evaluate.confidence:.0%}"
    lines = []
    for d in r.domains:
        c = r.comparisons.get(f"specialist {d}")
        if c is None:
            lines.append(f"Merge vs the {d} specialist: not answered, no member trained on {d} alone was evaluated.")
            continue
        lo, hi = r.retained_ci[r.selected][d]
        lines.append(f"Merge vs the {d} specialist ({c.target}) on {d}'s {r.scores[c.target].rows[r.domains.index(d)]}"
                     f" reviews: the selected merge is {c.reading.sentence}; it keeps "
                     f"{pct(r.retained[r.selected][d])} of the specialist's macro-F1 ({conf} CI {pct(lo)}-{pct(hi)}).")
    for key, name in (("full", "the multi-domain (full-data) member"), ("ensemble", "the logit ensemble")):
        c = r.comparisons.get(key)
        lines.append(f"Merge vs {name} on the mean over domains: not answered, none was evaluated." if c is None else
                     f"Merge vs {name} ({c.target}) on the mean over the {len(r.domains)} domains: the selected "
                     f"merge is {c.reading.sentence}.")
    retained, met_r = retention_goal(r, conf)
    mean, met_m = mean_goal(r)
    return [*lines, retained, mean], {"retention": met_r, "full_mean": met_m}


def retention_goal(r: DomainReport, conf: str) -> tuple[str, bool | None]:
    """The goal "keeps at least 95% of each specialist's macro-F1 on its own domain", met or not on the point
    estimates, by how much on the worst domain, and where the one-sided lower bounds show it."""
    goal = f'Goal "keeps at least {RETENTION_GOAL:.0%} of each specialist\'s macro-F1 on its own domain"'
    kept = r.retained.get(r.selected or "", {})
    missing = [d for d in r.domains if d not in kept]
    worst = lowest(kept)
    if missing or worst is None:
        return f"{goal}: not answered, no specialist of {', '.join(missing) or 'any domain'} scores above 0.", None
    d, value = worst
    met = value >= RETENTION_GOAL
    lo, hi = r.retained_ci[r.selected or ""][d]
    shown = [x for x in r.domains if r.comparisons[f"specialist {x}"].reading.non_inferior]
    bounds = ("the one-sided lower bounds show it on every domain" if len(shown) == len(r.domains) else
              f"the one-sided lower bounds show it on {', '.join(shown) or 'no domain'}")
    return (f"{goal}: **{'met' if met else 'not met'}** on the point estimates; the worst domain, {d}, keeps "
            f"{pct(value)} ({conf} CI {pct(lo)}-{pct(hi)}), {abs(value - RETENTION_GOAL) * 100:.1f} points "
            f"{'above' if met else 'short of'} {RETENTION_GOAL:.0%}; {bounds}.", met)


def mean_goal(r: DomainReport) -> tuple[str, bool | None]:
    """The goal "within 0.02 of the multi-domain member on the mean over domains" (not worse by more than 0.02),
    met or not on the point estimate, and whether the one-sided lower bound shows it."""
    goal = f'Goal "within {MEAN_MARGIN:g} of the multi-domain member on the mean over domains"'
    c = r.comparisons.get("full")
    if c is None:
        return f"{goal}: not answered, no full-data member was evaluated.", None
    diff = c.test.macro_f1_diff
    met = diff >= -MEAN_MARGIN
    return (f"{goal}: **{'met' if met else 'not met'}** on the point estimate (Δ mean macro-F1 {diff:+.4f}, "
            f"{abs(diff + MEAN_MARGIN):.4f} {'to spare' if met else 'beyond the margin'}); the interval "
            f"{'shows' if c.reading.non_inferior else 'does not show'} it.", met)


def render(r: DomainReport, split: str, confidence: float) -> list[str]:
    """The section as markdown lines: per-domain table, retention, the specialists' cross-domain matrix, verdicts."""
    if not r.domains:
        return ["", f"Per-domain figures left out: {r.note}."] if r.note else []
    conf, ds, sel = f"{confidence:.0%}", r.domains, r.selected
    own = {u: d for d, u in r.specialists.items()}
    sizes = ", ".join(f"{d} {n}" for d, n in zip(ds, next(iter(r.scores.values())).rows, strict=True))
    out = ["", f"## Per domain ({split} split: {sizes} reviews)", "",
           f"| model | role | {' | '.join(f'{d}: macro-F1 ({conf} CI)' for d in ds)} | mean over domains | worst |",
           "| --- | --- |" + " --- |" * (len(ds) + 2)]
    for u, s in r.scores.items():
        cells = [f"{s.of(d):.4f} ({s.interval(d)[0]:.3f}-{s.interval(d)[1]:.3f})" for d in ds]
        role = f"specialist ({own[u]})" if u in own else r.roles[u] + (" (selected)" if u == sel else "")
        out.append(f"| {u} | {role} | {' | '.join(cells)} | {s.mean:.4f} ({s.interval()[0]:.3f}-"
                   f"{s.interval()[1]:.3f}) | {s.worst[0]} {s.worst[1]:.4f} |")
    out += ["", f"Retention (FusionBench's normalised score): macro-F1 on a domain over that domain's specialist's "
            f"macro-F1 there ({conf} CI from the same paired resamples).", "",
            f"| model | role | {' | '.join(ds)} | min retention |", "| --- | --- |" + " ---: |" * (len(ds) + 1)]
    for u, kept in r.retained.items():
        cells = [f"{pct(kept[d])} ({pct(r.retained_ci[u][d][0])}-{pct(r.retained_ci[u][d][1])})" if d in kept
                 else "no specialist" for d in ds]
        low = lowest(kept)
        out.append(f"| {u} | {r.roles[u]}{' (selected)' if u == sel else ''} | {' | '.join(cells)} | "
                   f"{f'{pct(low[1])} ({low[0]})' if low else ''} |")
    out += ["", "Specialists across domains (macro-F1; own domain in bold):", "",
            f"| specialist | {' | '.join(ds)} |", "| --- |" + " ---: |" * len(ds)]
    out += [f"| {d0} ({u}) | " + " | ".join(f"**{r.scores[u].of(d):.4f}**" if d == d0 else f"{r.scores[u].of(d):.4f}"
                                            for d in ds) + " |" for d0, u in r.specialists.items()]
    out += ["", f"Every interval resamples each domain's reviews within the domain; the mean weighs every domain "
            f"once. Tests: paired bootstrap of the macro-F1 difference, Holm-adjusted over the {len(r.comparisons)} "
            f"per-domain comparisons; against a specialist the non-inferiority margin is {1 - RETENTION_GOAL:.0%} "
            "of its macro-F1 on its domain (the retention goal). The merge is the one selected on validation.",
            "", "### What the per-domain numbers allow", "", *(f"- {v}" for v in r.verdicts)]
    return out


def metrics(r: DomainReport) -> dict[str, float]:
    """MLflow metrics of the report run: the selected merge's `domain_<d>_macro_f1`, `domain_mean_macro_f1`,
    `domain_worst_macro_f1`, `retention_<d>`, `retention_min`; the same prefixed `full_` / `ensemble_`; each
    specialist's `specialist_<d>_macro_f1` on its domain; `goal_<name>_met` (1 or 0)."""
    out: dict[str, float] = {}
    key = lambda d: re.sub(r"[^\w.\-/ ]", "_", d)  # noqa: E731  (MLflow's metric-name characters)
    for prefix, role in (("", "merged"), ("full_", "full"), ("ensemble_", "ensemble")):
        u = r.selected if role == "merged" else next((u for u, x in r.roles.items() if x == role), None)
        if u is None or u not in r.scores:
            continue
        s = r.scores[u]
        out |= {f"{prefix}domain_{key(d)}_macro_f1": f for d, f in s.by_domain.items()}
        out |= {f"{prefix}domain_mean_macro_f1": s.mean, f"{prefix}domain_worst_macro_f1": s.worst[1]}
        out |= {f"{prefix}retention_{key(d)}": v for d, v in r.retained.get(u, {}).items() if np.isfinite(v)}
        if (low := lowest(r.retained.get(u, {}))) is not None:
            out[f"{prefix}retention_min"] = low[1]
    out |= {f"specialist_{key(d)}_macro_f1": r.scores[u].of(d) for d, u in r.specialists.items()}
    return out | {f"goal_{k}_met": float(v) for k, v in r.goals.items() if v is not None}

