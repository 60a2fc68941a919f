"""RESULTS.md of a study: protocol, per-arm tables, comparisons, secondary metrics, wall time and the run-id
appendix, every figure taken from `mllm.results` (which reads the study's MLflow runs only)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mllm.basics import redact
from mllm.results import SECONDARY, ArmSummary, Cell, interval
from mllm.studyconf import StudyConfig, cell_config


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
                    "mean": signed(c.point), "95% t (df " + str(len(c.per_fold) - 1) + ")": ci(*c.t_ci, "+.3f"),
                    "p (t)": f"{c.p_t:.3g}" if math.isfinite(c.p_t) else "–",
                    "95% bootstrap": ci(*c.boot_ci, "+.3f"), "90% bootstrap": ci(*c.boot_ci90, "+.3f"),
                    "p (bootstrap)": f"{c.p_boot:.3g}", "Holm p": f"{p_holm:.3g}", "MDE": f"{c.mde:.3f}",
                    "reading": text})
    return md_table(pd.DataFrame(out)) if out else "(no comparison: a reference model is missing in some fold)"


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
                         f"(95% bootstrap {ci(*c.boot_ci, '+.3f')}, Holm p {p_holm:.3g}; detectable with 80% power: "
                         f"{c.mde:.3f}): {text}.")
    return lines


def render(study: StudyConfig, config_path: str, cells: dict[tuple[str, int], Cell], summaries: list[ArmSummary],
           wall: pd.DataFrame, figures: dict[str, Path], report_run: str, code: str, when: str) -> str:
    first = cell_config(study, study.arms[0], 0)
    data = first.data
    where = redact(study.tracking_uri) if study.tracking_uri else (study.store / "mlflow.db").as_posix()
    sizes = sorted({(f, c.sizes["train"], c.sizes["validation"], c.sizes["test"]) for (_, f), c in cells.items()})
    lines = [f"# Study `{study.study}`: can a merge match its members, their ensemble and a bigger model?", "",
             f"Written by `python scripts/study.py {config_path}` on {when} (code `{code}`) from the study's MLflow "
             f"runs only (tracking store `{where}`); the appendix lists every run id. "
             "Test macro-F1 unless a column says otherwise.", "",
             *([] if len(cells) == len(study.arms) * study.folds else [
                 f"**Partial study: {len(cells)} of {len(study.arms) * study.folds} cells finished** (folds "
                 f"{', '.join(str(f) for f in sorted({f for _, f in cells}))} of {study.folds}); every figure below "
                 "covers the finished cells only, and the study resumes where it stopped.", ""]),
             "## Summary", "", *summary_lines(summaries), "",
             "## Protocol", "",
             f"- **Data**: {', '.join(d.name for d in data.datasets)}, labels `{data.label_scheme}`, "
             f"{study.folds}-fold cross-validation: the text groups of each label (equal texts are one group) are "
             "dealt round-robin in a seeded order, fold k is the test part of cell k, so every review is tested "
             f"exactly once; validation ({data.val_fraction:.0%} of all rows) is carved from the other folds. Rows "
             "per fold (train / validation / test): "
             + "; ".join(f"fold {f}: {a} / {b} / {c}" for f, a, b, c in sizes) + ".",
             f"- **Arms** (each from `{study.experiment}` with the overrides shown):"]
    for arm in study.arms:
        kind = " (reference arm: its members are trained and scored, nothing is merged)" if arm.reference else ""
        lines.append(f"  - `{arm.name}`: {arm.title or arm.name}{kind}. Overrides: "
                     + (", ".join(f"`{x}`" for x in [*study.set, *arm.set]) or "none") + ".")
    lines += [
        "- **In every cell**: each member; the best member by validation macro-F1 (then NLL); the mean member; the "
        "members' logit ensemble; majority class; TF-IDF + logistic regression (C chosen on validation); the uniform "
        "soup; the greedy soup (members added best-first while validation macro-F1 does not drop); task arithmetic "
        "with lambda 1 and lambda K on normalised weights (lambda 1 is base + the mean task vector: the uniform "
        "soup's merge, scored once and listed under both names; lambda K is base + their sum); TIES, DARE-TIES and "
        f"DARE-linear at merge.density {first.merge.density:g} and lambda {first.merge.lambda_:g}, DARE over "
        f"{study.mask_seeds} mask seeds (scored on test only: their validation counterparts are the search's "
        f"enqueued trials); the searched recipe, the best of {study.trials} Optuna trials ({first.search.sampler}, "
        f"methods {', '.join(first.search.methods)}, {first.search.startup_trials or max(4, study.trials // 4)} "
        f"start-up trials after the enqueued standard merges, DARE trials scored over {first.search.mask_seeds} "
        "mask seed(s)) on validation.",
        "- **The test split decides nothing**: every choice above reads validation; each cell scores test once, "
        "after its search.",
        f"- **Statistics**: per fold, the searched merge's macro-F1 minus each reference's. Over folds: the mean, a "
        f"95% t-interval ({study.folds - 1} degrees of freedom) and a bootstrap over reviews stratified by fold "
        f"({study.bootstrap_samples} resamples, the same resample for both models). p-values are the bootstrap's, "
        "two-sided; Holm adjusts them within each arm's family (best member, ensemble, and the full-data member or "
        f"the bigger model where the arm has one). Equivalence margin, stated before the study: "
        f"{study.equivalence_margin:g} macro-F1; a difference is 'equivalent' when the 90% bootstrap interval lies "
        "inside the margin (two one-sided tests at 5%). MDE: the true difference this study detects with 80% power "
        "at 5% two-sided (2.8 bootstrap standard errors).",
        "- **Caveats**: folds share training rows, so fold-to-fold spread understates the variance of a new "
        "training set (Nadeau & Bengio 2003); the bootstrap treats the fine-tuned members as fixed.", ""]
    for s in summaries:
        lines += [f"## Arm `{s.arm.name}`: {s.arm.title or s.arm.name}", "",
                  f"![{s.arm.name}]({figures[s.arm.name].as_posix()})", "",
                  f"Test macro-F1 per fold, mean, 95% t-interval over the {len(s.folds)} folds and 95% bootstrap "
                  "over reviews (stratified by fold); 'validation' is the mean validation macro-F1.", "",
                  arm_table(s), "", "Comparisons of the searched merge:", "", comparison_table(s), "",
                  "Secondary figures (mean over folds and 95% t-interval):", "", secondary_table(s), ""]
    whole = wall.round(0).astype({c: int for c in wall.columns if c != "arm"})
    lines += ["## Wall time", "", "Seconds on the machine that ran the study, summed over folds (members: their "
              "training runs, whenever they ran).", "", md_table(whole), "",
              f"Total: {wall['total'].sum() / 60:.0f} minutes.", ""]
    if study.notes:
        lines += ["## Scope", "", *study.notes, ""]
    lines += ["## Appendix: run ids", "", appendix(study, cells, report_run, study.study)]
    return "\n".join(lines) + "\n"

