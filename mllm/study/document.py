"""RESULTS.md of a study: protocol, per-arm tables, comparisons, secondary metrics, wall time and the run-id
appendix, every figure taken from `mllm.study.results` (which reads the study's MLflow runs only)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mllm.basics import redact
from mllm.study.config import StudyConfig, cell_config
from mllm.study.criterion import TIE, pick, policy_table
from mllm.study.perdomain import render_domains, summarise_domains
from mllm.study.results import SECONDARY, ArmSummary, Cell, interval, optimism


def f4(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def ci(lo: float, hi: float, spec: str = ".3f") -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:{spec}}, {hi:{spec}}]"


def signed(x: float) -> str:
    return f"{x:+.4f}"


def md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(map(str, r)) + " |" for r in frame.itertuples(index=False))])


def arm_table(s: ArmSummary) -> str:
    out = []
    for row in s.rows:
        mean, lo, hi = interval(row.values())
        boot = s.boot.get(row.label)
        spread = [f.spread for f in row.folds if f is not None and f.spread is not None]
        out.append({"model": row.label,
                    **{f"fold {fold}": f4(f.macro_f1 if f else None) for fold, f in zip(s.folds, row.folds,
                                                                                    strict=True)},
                    "mean": f4(mean), "95% t-interval": ci(lo, hi),
                    "95% bootstrap": ci(*boot) if boot else "–",
                    "validation": f4(interval(row.metric("val_macro_f1"))[0]),
                    "note": row.note + (f" (mean seed sd {sum(spread) / len(spread):.4f})" if spread else "")})
    return md_table(pd.DataFrame(out))


def comparison_table(s: ArmSummary) -> str:
    out = []
    for words, c, p_holm, text in s.comparisons:
        out.append({"searched merge minus": words, "per fold": ", ".join(signed(x) for x in c.per_fold),
                    "mean": signed(c.point), "95% training variance": ci(*c.train_ci, "+.3f"),
                    "90% training variance": ci(*c.train_ci90, "+.3f"), "Holm p": f"{p_holm:.3g}",
                    "MDE": f"{c.mde:.3f}", "95% hierarchical bootstrap": ci(*c.hier_ci, "+.3f"),
                    "95% corrected t (df " + str(len(c.per_fold) - 1) + ")": ci(*c.nb_ci, "+.3f"),
                    "95% reviews only": ci(*c.boot_ci, "+.3f"), "reading": text})
    return md_table(pd.DataFrame(out)) if out else "(no comparison: a reference model is missing in some fold)"


def optimism_table(s: ArmSummary) -> str:
    """Validation minus test macro-F1 of every model a choice picked, per fold, with the mean's 95% t-interval."""
    out = []
    for label, values in optimism(s):
        mean, lo, hi = interval(values)
        out.append({"chosen on validation": label, **{f"fold {f}": signed(v) for f, v in zip(s.folds, values,
                                                                                            strict=True)},
                    "mean optimism": signed(mean), "95% t-interval": ci(lo, hi, "+.3f")})
    return md_table(pd.DataFrame(out)) if out else "(no chosen model has both figures)"


def policy_section(cells: dict[tuple[str, int], Cell], study: StudyConfig) -> list[str]:
    """The no-test criterion's table over every cell whose search kept its trials (mllm.study.criterion)."""
    kept = [c.trials for (_, _), c in sorted(cells.items()) if c.trials]
    if not kept:
        return []
    table = policy_table(kept)
    default = pick(table)
    configured = cell_config(study, next(a for a in study.arms if not a.reference), 0).search.choice
    rows = [{"policy": r.policy, "cells": r.cells, "held-out macro-F1 (E)": f4(r.held_out),
             "95% t": ci(r.held_out_lo, r.held_out_hi), "optimism (chosen-on − E)": f4(r.optimism),
             "95% t ": ci(r.optimism_lo, r.optimism_hi, "+.3f")} for r in table.itertuples()]
    return ["## How the searched merge is chosen (no test read)", "",
            "Each policy chooses among the same trials of each cell's search, reading only validation; the table "
            "scores its choice on a quarter of validation that nothing chose on (`mllm.study.criterion`: the search "
            "optimised half A; the held-out half is cut into C and E; a policy reads A, crossfit also C, the old "
            "rule best-all A and C; the choice is scored on E, then C and E swap). The rule, fixed before test was "
            f"read: the highest mean held-out macro-F1, ties within {TIE} to the smaller optimism. It picks "
            f"**{default}**; the study's searched merge used `search.choice={configured}`.", "",
            md_table(pd.DataFrame(rows)), ""]


def secondary_table(s: ArmSummary) -> str:
    keep = ("best member (validation)", "full-data member", "logit ensemble", "TF-IDF", "uniform soup",
            "greedy soup", "TIES", "searched merge", "bigger model")
    rows = [r for r in s.rows if r.label in keep]
    classes = sorted({k.removeprefix("test_f1_") for r in rows for f in r.folds if f for k in f.metrics
                      if k.startswith("test_f1_")})
    out = []
    for r in rows:
        cells = {}
        for name in [*SECONDARY, *(f"f1_{c}" for c in classes)]:
            mean, lo, hi = interval(r.metric(f"test_{name}"))
            cells[name.replace("_", " ")] = f"{f4(mean)} {ci(lo, hi)}"
        out.append({"model": r.label, **cells})
    return md_table(pd.DataFrame(out))


def appendix(study: StudyConfig, cells: dict[tuple[str, int], Cell], report_run: str, report_experiment: str) -> str:
    lines = [f"Study report run: `{report_run}` (experiment `{report_experiment}`). Each cell is its own experiment "
             f"`{study.study}-<arm>-f<fold>`; in the MLflow UI open the run id, or `mlflow.get_run(id)`.", ""]
    for arm in study.arms:
        mine = {f: c for (a, f), c in cells.items() if a == arm.name}
        if not mine:
            continue
        names = sorted({n for c in mine.values() for n in c.models}, key=_order)
        rows = [{"model": "cell run", **{f"fold {f}": f"`{c.run_id}`" for f, c in sorted(mine.items())}}]
        rows += [{"model": n, **{f"fold {f}": f"`{c.models[n].run_id}`" if n in c.models else "–"
                                 for f, c in sorted(mine.items())}} for n in names]
        lines += [f"### {arm.name}", "", md_table(pd.DataFrame(rows)), ""]
    return "\n".join(lines)


def _order(name: str) -> tuple[int, str]:
    head = name.split(":")[0]
    rank = ["member", "ensemble", "majority", "tfidf", "uniform", "greedy", "ta-1", "ta-k", "ties", "dare_ties",
            "dare_linear", "searched"]
    return (rank.index(head) if head in rank else len(rank), name)


def summary_lines(summaries: list[ArmSummary]) -> list[str]:
    lines = []
    for s in summaries:
        for words, c, p_holm, text in s.comparisons:
            lines.append(f"- **{s.arm.name}**: searched merge minus {words}: {signed(c.point)} macro-F1 "
                         f"(95% with training variance {ci(*c.train_ci, '+.3f')}, reviews only "
                         f"{ci(*c.boot_ci, '+.3f')}; Holm p {p_holm:.3g}; detectable with 80% power: {c.mde:.3f}): "
                         f"{text}.")
        for label, values in optimism(s):
            if label == "searched merge":
                mean, lo, hi = interval(values)
                lines.append(f"- **{s.arm.name}**: the searched merge's optimism (validation − test macro-F1): "
                             f"{signed(mean)} (95% t {ci(lo, hi, '+.3f')}).")
    return lines


def render(study: StudyConfig, config_path: str, cells: dict[tuple[str, int], Cell], summaries: list[ArmSummary],
           wall: pd.DataFrame, figures: dict[str, Path], report_run: str, code: str, when: str) -> str:
    """RESULTS.md: summary, protocol, a section per arm, the policy table, wall time, scope and the run-id appendix."""
    lines = [*_opening(study, config_path, cells, summaries, code, when), *_protocol(study, cells),
             *_every_cell(study)]
    for s in summaries:
        lines += _arm_section(s, figures[s.arm.name])
        per_domain = summarise_domains(study, s.arm, cells)
        lines += render_domains(per_domain) if per_domain else []
    lines += policy_section(cells, study)
    whole = wall.round(0).astype({c: int for c in wall.columns if c != "arm"})
    lines += ["## Wall time", "", "Seconds on the machine that ran the study, summed over folds (members: their "
              "training runs, whenever they ran).", "", md_table(whole), "",
              f"Total: {wall['total'].sum() / 60:.0f} minutes.", ""]
    if study.notes:
        lines += ["## Scope", "", *study.notes, ""]
    lines += ["## Appendix: run ids", "", appendix(study, cells, report_run, study.study)]
    return "\n".join(lines) + "\n"


def _opening(study: StudyConfig, config_path: str, cells: dict[tuple[str, int], Cell], summaries: list[ArmSummary],
             code: str, when: str) -> list[str]:
    """Title, where the figures come from, a notice when cells are missing, and the summary."""
    where = redact(study.tracking_uri) if study.tracking_uri else (study.store / "mlflow.db").as_posix()
    expected = len(study.arms) * study.folds
    partial = [] if len(cells) == expected else [
        f"**Partial study: {len(cells)} of {expected} cells finished** (folds "
        f"{', '.join(str(f) for f in sorted({f for _, f in cells}))} of {study.folds}); every figure below "
        "covers the finished cells only (cells of an earlier protocol, whose search kept no per-review "
        "trial scores, are left out), and the study resumes where it stopped.", ""]
    return [f"# Study `{study.study}`: can a merge match its members, their ensemble and a bigger model?", "",
            f"Written by `mllm study {config_path}` on {when} (code `{code}`) from the study's MLflow "
            f"runs only (tracking store `{where}`); the appendix lists every run id. "
            "Test macro-F1 unless a column says otherwise.", "",
            *partial,
            "## Summary", "", *summary_lines(summaries), ""]


def _protocol(study: StudyConfig, cells: dict[tuple[str, int], Cell]) -> list[str]:
    """The protocol's data and arms."""
    data = cell_config(study, study.arms[0], 0).data
    own = {a.name: a.experiment for a in study.arms if a.experiment}  # arms with their own data (and folds)

    def rows(arms: Callable[[str], bool]) -> str:
        sizes = sorted({(f, c.sizes["train"], c.sizes["validation"], c.sizes["test"])
                        for (a, f), c in cells.items() if arms(a)})
        return "; ".join(f"fold {f}: {n} / {v} / {t}" for f, n, v, t in sizes)

    by_arm = "".join(f"; arm `{a}` (from `{e}`): {rows(lambda x, a=a: x == a)}" for a, e in own.items()
                     if any(x == a for x, _ in cells))
    lines = ["## Protocol", "",
             f"- **Data**: {', '.join(d.name for d in data.datasets)}, labels `{data.label_scheme}`, "
             f"{study.folds}-fold cross-validation: the text groups of each label (equal texts are one group) are "
             "dealt round-robin in a seeded order, fold k is the test part of cell k, so every review is tested "
             f"exactly once; validation ({data.val_fraction:.0%} of all rows) is carved from the other folds. Rows "
             "per fold (train / validation / test): "
             + rows(lambda a: a not in own) + by_arm + ".",
             f"- **Arms** (each from `{study.experiment}` with the overrides shown):"]
    for arm in study.arms:
        kind = " (reference arm: its members are trained and scored, nothing is merged)" if arm.reference else ""
        own = f" From `{arm.experiment}`." if arm.experiment else ""
        extra = (f" Extra merges: {', '.join(arm.merges)} (RegMean at merge.regmean_rows / merge.regmean_alpha; "
                 "ta-grid: task arithmetic at lambda 0.5 to K, lambda chosen per fold on validation)."
                 if arm.merges else "")
        lines.append(f"  - `{arm.name}`: {arm.title or arm.name}{kind}.{own} Overrides: "
                     + (", ".join(f"`{x}`" for x in [*study.set, *arm.set]) or "none") + f".{extra}")
    return lines


def _every_cell(study: StudyConfig) -> list[str]:
    """The protocol's models scored in every cell, the test split's place, the statistics and their caveats."""
    first = cell_config(study, study.arms[0], 0)
    return [
        "- **In every cell**: each member; the best member by validation macro-F1 (then NLL); the mean member; the "
        "members' logit ensemble; majority class; TF-IDF + logistic regression (C chosen on validation); the uniform "
        "soup; the greedy soup (members added best-first while validation macro-F1 does not drop); task arithmetic "
        "with lambda 1 and lambda K on normalised weights (lambda 1 is base + the mean task vector: the uniform "
        "soup's merge, scored once and listed under both names; lambda K is base + their sum); TIES, DARE-TIES and "
        f"DARE-linear at merge.density {first.merge.density:g} and lambda {first.merge.lambda_:g}, DARE over "
        f"{study.mask_seeds} mask seeds (scored on test only: their validation counterparts are the search's "
        f"enqueued trials); the searched recipe: {study.trials} Optuna trials ({first.search.sampler}, "
        f"methods {', '.join(first.search.methods)}, {first.search.startup_trials or max(4, study.trials // 4)} "
        f"start-up trials after the enqueued standard merges, DARE trials scored over {first.search.mask_seeds} "
        f"mask seed(s)) whose objective reads {first.search.crossfit_fraction:.0%} of validation, chosen by "
        f"`search.choice={first.search.choice}` (top {first.search.top_k}, NLL guard {first.search.nll_guard} nats "
        "over the best member); every other policy's choice among the same trials is listed too (`searched: ...`).",
        "- **The test split decides nothing**: every choice above reads validation; each cell scores test once, "
        "after its search.",
        f"- **Statistics**: per fold, the searched merge's macro-F1 minus each reference's (a reference trained at "
        f"several seeds, the full-data member and the bigger model: the mean over its seeds). The verdicts read an "
        "interval that counts training variance: the hull of a hierarchical bootstrap "
        f"({study.bootstrap_samples} resamples: folds with replacement, then the reference's seeds, then each "
        "fold's test reviews, the same reviews for both models) and the corrected resampled t-interval over folds "
        f"(Nadeau & Bengio 2003: variance (1/J + n_test/n_train) s^2, {study.folds - 1} degrees of freedom), since "
        "3 folds are too few to trust either alone; beside it, the bootstrap over reviews only (every trained model "
        "fixed). p-values: the larger of the two, two-sided; Holm adjusts them within each arm's family (best "
        "member, ensemble, uniform soup, greedy soup, and the full-data member or the bigger model where the arm "
        "has one). Equivalence margin, stated before the study: "
        f"{study.equivalence_margin:g} macro-F1; 'equivalent' only when the 90% training-variance interval lies "
        "inside the margin (two one-sided tests at 5%). MDE: the true difference this study detects with 80% power "
        "at 5% two-sided (2.8 training-variance standard errors). Optimism: validation minus test macro-F1 of each "
        "model a choice picked on validation.",
        "- **Caveats**: folds share training rows, so fold-to-fold spread understates the variance of a new "
        "training set (Nadeau & Bengio 2003), and resampling 3 folds understates it by a further (J - 1) / J.", ""]


def _arm_section(s: ArmSummary, figure: Path) -> list[str]:
    """One arm: its figure, the table of models, the comparisons, the optimism and the secondary figures."""
    return [f"## Arm `{s.arm.name}`: {s.arm.title or s.arm.name}", "",
            f"![{s.arm.name}]({figure.as_posix()})", "",
            f"Test macro-F1 per fold, mean, 95% t-interval over the {len(s.folds)} folds and 95% bootstrap "
            "over reviews (stratified by fold); 'validation' is the mean validation macro-F1.", "",
            arm_table(s), "", "Comparisons of the searched merge:", "", comparison_table(s), "",
            "Optimism of what was chosen on validation (validation minus test macro-F1; positive: it looked "
            "better where it was chosen):", "", optimism_table(s), "",
            "Secondary figures (mean over folds and 95% t-interval):", "", secondary_table(s), ""]
