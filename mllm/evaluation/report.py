"""`mllm report EXPERIMENT`: the comparison table of one base's and one member set's evaluations on one split, the
paired tests against the best member, and what the numbers allow one to say.

    mllm report drugscom                 # test split, newest evaluation per model
    mllm report tiny -c configs/tiny.yaml --split validation

Reads the evaluation runs the evaluate stage logged (nothing is re-scored): the newest per model on the newest
evaluated data, scoped to the member set (and base) of the newest merge, so evaluations of other member sets that
share the data are never pooled. Two choices are made, both on validation figures recorded before this split was
read (`mllm.evaluation.selection`): the best member, and the selected merge (highest validation macro-F1 among the
merges). Every other model is compared with the best member, and the selected merge with the ensemble and the bigger
model, by a paired bootstrap of the macro-F1 difference (p = (1 + count) / (B + 1)); Holm's correction runs over all of
these comparisons. Below the table, one sentence per question says "better", "worse" or "not distinguishable at
this size", with the non-inferiority reading beside it. A split with several domains adds a per-domain section
(`mllm.evaluation.domains`: macro-F1 per domain, retention of the specialists' scores, its own verdicts). The table
is printed and logged as `report.md` (plus `report.json` and an MLflow table) in a `report` run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from mllm.config.schema import ExperimentConfig
from mllm.errors import DiskSpace, MllmError
from mllm.evaluation import domains
from mllm.evaluation.metrics import PairedTest, holm, paired_from_draws, resampled_draws
from mllm.evaluation.selection import best_member, reading
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

ROLE_ORDER = {"merged": 0, "ensemble": 1, "member": 2, "full": 3, "bigger": 4, "tfidf": 5, "majority": 6, "base": 7,
              "model": 8}
ROLE_NAMES = {"full": "full-data member", "tfidf": "TF-IDF baseline", "majority": "majority baseline",
              "bigger": "bigger model"}


@dataclass(frozen=True)
class Row:
    model: str
    role: str
    method: str
    recipe: str
    metrics: dict[str, float]
    cost: float  # forward-pass parameters per review, relative to one member
    run_id: str
    val_macro_f1: float | None = None
    notes: tuple[str, ...] = ()  # "predicts one class"
    decisions: tuple[str, ...] = ()  # the validation decisions it took part in (none read this split)
    versus_best_member: PairedTest | None = field(default=None, repr=False)
    p_holm: float | None = None

    @property
    def optimism(self) -> float | None:
        """Validation minus this split's macro-F1: for a model a choice picked, how much better it looked where
        it was chosen than elsewhere."""
        f1 = self.metrics.get("macro_f1")
        return None if self.val_macro_f1 is None or f1 is None else self.val_macro_f1 - f1

    @property
    def chosen(self) -> bool:
        """Picked by a choice on validation (best member, selected merge, search winner, greedy soup, TF-IDF's C)."""
        return any(d in ("best member", "selected merge") or d.startswith(("search winner", "greedy soup", "C="))
                   for d in self.decisions)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "versus_best_member"}
        out["optimism"] = self.optimism
        out["versus_best_member"] = self.versus_best_member.summary() if self.versus_best_member else None
        return out


@dataclass(frozen=True)
class ReportResult:
    experiment: str
    split: str
    rows: list[Row]
    best_member: str | None
    markdown: str
    run_id: str | None
    selected_merge: str | None = None
    verdicts: list[str] = field(default_factory=list)
    comparisons: int = 0  # the Holm family's size
    per_domain: domains.DomainReport | None = None  # the split holds several domains
    precisions: tuple[str, ...] = ()  # the resolved model.precision the rows were scored in (mllm.precision tags)


def collect(store: Store, experiment: str, split: str) -> list[Any]:
    """The newest evaluation run per model on `split`, all on the newest evaluated data."""
    runs = store.find_runs({"mllm.stage": "evaluation", "mllm.split": split}, experiment=experiment)
    if not runs:
        raise MllmError(f"experiment {experiment} has no evaluations on the {split} split",
                        "run mllm evaluate first (it scores the merges and their baselines)")
    fingerprint = runs[0].data.tags.get("mllm.dataset_fingerprint")
    newest: dict[str, Any] = {}
    for r in runs:  # newest first
        if r.data.tags.get("mllm.dataset_fingerprint") == fingerprint:
            newest.setdefault(r.data.tags["mllm.model_uri"], r)
    return list(newest.values())


def scope(runs: list[Any]) -> list[Any]:
    """Only the member set and base of the newest merge (or ensemble): members outside the set, merges and
    ensembles of other sets, and other bases' full-data members are left out (never pooled)."""
    def parents(r: Any) -> frozenset[str]:
        return frozenset(p for p in r.data.tags.get("mllm.parents", "").split(",") if p)

    anchor = next((r for r in runs if r.data.tags.get("mllm.role") in ("merged", "ensemble")), None)
    if anchor is None:
        return runs
    members, base = parents(anchor), anchor.data.tags.get("mllm.base", "")
    kept = []
    for r in runs:
        role, t = r.data.tags.get("mllm.role"), r.data.tags
        if role in ("merged", "ensemble") and parents(r) != members:
            continue
        if role == "member" and t["mllm.model_uri"] not in members:
            continue
        if role in ("full", "base") and base and (t.get("mllm.base") or t["mllm.model_uri"]) != base:
            continue
        kept.append(r)
    return kept


def _float(tags: dict[str, str], key: str) -> float | None:
    return float(tags[key]) if tags.get(key) else None


def version_tags(uri: str, store: Store) -> VersionTags:
    """A registered version's tags (empty for anything else)."""
    version = store.resolve(uri)[1] if uri.startswith("models:/") else None
    return VersionTags.of(version) if version is not None else VersionTags()


def decisions(role: str, t: VersionTags) -> list[str]:
    """The validation decisions a registered model took part in, from its version's tags."""
    out = []
    if t.trial is not None:
        out.append(f"search winner (trial {t.trial})")
    if t.soup == "greedy":
        out.append("greedy soup (members kept on validation)")
    if t.get("promotion_outcome"):
        out.append(f"promotion gate ({t.get('promotion_split', 'validation')}): {t.get('promotion_outcome')}")
    if role == "tfidf":
        out.append(f"C={t.C} chosen")
    return out


def validation_score(r: Any) -> tuple[str, float | None, float | None]:
    """(model URI, validation macro-F1, validation NLL) of an evaluation run: its own scores on validation, else
    the validation figures it was tagged with."""
    t, m = r.data.tags, r.data.metrics
    if t.get("mllm.split") == "validation" and not t.get("mllm.val_macro_f1"):  # the run is the validation score
        return t["mllm.model_uri"], m.get("macro_f1"), m.get("nll")
    return t["mllm.model_uri"], _float(t, "mllm.val_macro_f1"), _float(t, "mllm.val_nll")


class Scored(NamedTuple):
    """Evaluation runs with their predictions as class indices over one label code."""

    runs: list[Any]
    names: list[str]
    labels: np.ndarray
    predicted: dict[str, np.ndarray]  # run id -> predicted class indices
    classes: dict[str, set[str]]  # run id -> the classes it predicts


def scored(runs: list[Any], work: Path, store: Store) -> Scored:
    preds = {r.info.run_id: pd.read_csv(store.run_artifact(r.info.run_id, "predictions.csv", work / r.info.run_id),
                                        keep_default_na=False) for r in runs}
    names = sorted({x for f in preds.values() for x in (*f["label"], *f["predicted"])})
    code = {n: i for i, n in enumerate(names)}
    labels = np.array([code[x] for x in next(iter(preds.values()))["label"]]) if preds else np.array([], int)
    return Scored(runs, names, labels, {i: np.array([code[x] for x in f["predicted"]]) for i, f in preds.items()},
                  {i: set(f["predicted"]) for i, f in preds.items()})


def paired_tests(s: Scored, best: str | None, selected: str | None, others: dict[str, list[Any]],
                 cfg: ExperimentConfig) -> dict[tuple[str, str], PairedTest]:
    """Every model against the best member, and the selected merge against the ensemble and the bigger model. One
    set of resamples serves every pair (`metrics.resampled_draws`: each model scored once on them), the same draws
    a `paired_test` per pair with this seed makes, so the figures are those of a test per pair."""
    e, run_of = cfg.evaluate, {r.data.tags["mllm.model_uri"]: r for r in s.runs}
    pairs: dict[tuple[str, str], tuple[str, str]] = {}  # (A, B) URIs -> their evaluation run ids
    if best:
        for r in s.runs:
            if r.data.tags.get("mllm.role") != "member":
                pairs[(r.data.tags["mllm.model_uri"], best)] = (r.info.run_id, run_of[best].info.run_id)
    if selected:
        for found in others.values():
            if found:
                pairs[(selected, found[0].data.tags["mllm.model_uri"])] = (run_of[selected].info.run_id,
                                                                           found[0].info.run_id)
    used = {i: s.predicted[i] for pair in pairs.values() for i in pair}
    draws = resampled_draws(s.labels, used, len(s.names), e.bootstrap_samples, e.seed) if used else {}
    return {key: paired_from_draws(s.labels, used[a], used[b], draws[a][1], draws[b][1], len(s.names), e.confidence)
            for key, (a, b) in pairs.items()}


def build(runs: list[Any], cfg: ExperimentConfig, work: Path, store: Store, split: str | None = None) -> ReportResult:
    s = scored(scope(runs), work, store)
    by_role: dict[str, list[Any]] = {}
    for r in s.runs:
        by_role.setdefault(r.data.tags.get("mllm.role", "model"), []).append(r)
    tags = {r.data.tags["mllm.model_uri"]: version_tags(r.data.tags["mllm.model_uri"], store) for r in s.runs}
    best, refused = best_member([validation_score(r) for r in by_role.get("member", [])])
    # A "merge" with all its weight on one member is that member: listed, never selected as the merge.
    selected, _ = best_member([validation_score(r) for r in by_role.get("merged", [])
                               if not tags[r.data.tags["mllm.model_uri"]].single_member])
    others = {"ensemble": by_role.get("ensemble", []), "bigger": by_role.get("bigger", [])}
    tests = paired_tests(s, best, selected, others, cfg)
    adjusted = dict(zip(tests, holm([t.bootstrap_p for t in tests.values()]), strict=True))
    unit = next((r.data.metrics.get("num_params") for r in s.runs if r.data.tags["mllm.model_uri"] == best), None)
    rows = [row(r, tags[r.data.tags["mllm.model_uri"]], s.classes[r.info.run_id], best, selected, unit, tests,
                adjusted)
            for r in sorted(s.runs, key=lambda r: (ROLE_ORDER.get(r.data.tags.get("mllm.role", "model"), 9),
                                                   r.data.tags["mllm.model_uri"] != selected,
                                                   -r.data.metrics.get("macro_f1", 0)))]
    verdicts = verdict_lines(selected, best, others, tests, adjusted, cfg)
    scored_data = s.runs[0].data.tags.get("mllm.dataset_fingerprint") if s.runs else None
    per_domain = domains.section(cfg, split or cfg.evaluate.split, scored_data, s.labels, len(s.names), [
        (r.model, r.role, s.predicted[r.run_id], tags[r.model].domain) for r in rows], selected)
    precisions = tuple(sorted({r.data.tags.get("mllm.precision") or "fp32" for r in s.runs}))
    return ReportResult(cfg.name, "", rows, best, "", None, selected, [*refused, *verdicts], len(tests), per_domain,
                        precisions)


def row(r: Any, vt: VersionTags, classes: set[str], best: str | None, selected: str | None, unit: float | None,
        tests: dict[tuple[str, str], PairedTest], adjusted: dict[tuple[str, str], float]) -> Row:
    """One evaluation run's row: its figures, its notes and the validation decisions it took part in."""
    t, m, uri = r.data.tags, r.data.metrics, r.data.tags["mllm.model_uri"]
    role = t.get("mllm.role", "model")
    notes, chosen = [], []
    if len(classes) == 1 and role != "majority":
        notes.append(f"**predicts one class** ({next(iter(classes))})")
    if role == "merged" and vt.single_member:
        notes.append(f"**a single member** (all weight on {vt.single_member}): not a merge, never selected")
    if role == "member":
        chosen.append("best member" if uri == best else "ranked for best member, not chosen")
    if role == "merged" and not vt.single_member:
        chosen.append("selected merge" if uri == selected else "ranked for selected merge, not chosen")
    chosen += decisions(role, vt)
    cost = m.get("num_params", 0.0) / unit if unit else m.get("forward_passes", 1.0)
    return Row(uri, role, t.get("mllm.method", ""), t.get("mllm.recipe", ""), dict(m), cost, r.info.run_id,
               _float(t, "mllm.val_macro_f1"), tuple(notes), tuple(chosen), tests.get((uri, best or "")),
               adjusted.get((uri, best or "")))


def verdict_lines(selected: str | None, best: str | None, others: dict[str, list[Any]],
                  tests: dict[tuple[str, str], PairedTest], adjusted: dict[tuple[str, str], float],
                  cfg: ExperimentConfig) -> list[str]:
    """One sentence per question: the selected merge against the best member, the ensemble, a bigger model."""
    if selected is None:
        return ["No merge with a validation score is in this report, so none was selected and no question is "
                "answered."]
    alpha, margin, conf = cfg.evaluate.alpha, cfg.promote.non_inferiority_margin, cfg.evaluate.confidence
    targets = [("the best member", best), *((f"the {ROLE_NAMES.get(k, k)}" if k != "ensemble" else
                                             "the logit ensemble", v[0].data.tags["mllm.model_uri"] if v else None)
                                            for k, v in others.items())]
    lines = []
    for name, uri in targets:
        if uri is None:
            why = ("no member has a validation score" if name == "the best member" else
                   "none was evaluated" + (" (set model.bigger_model)" if "bigger" in name else ""))
            lines.append(f"Merge vs {name}: not answered, {why}.")
            continue
        read = reading(tests[(selected, uri)], adjusted[(selected, uri)], alpha, margin, conf)
        lines.append(f"Merge vs {name} ({uri}): the selected merge is {read.sentence}.")
    return lines


def optimism_line(result: ReportResult, split: str) -> str:
    """The optimism of every choice the table shows: validation minus this split's macro-F1 of the model it chose."""
    picked = [(r, "; ".join(d for d in r.decisions if not d.startswith(("ranked", "promotion"))))
              for r in result.rows if r.chosen and r.optimism is not None]
    if not picked:
        return f"Optimism (validation − {split} macro-F1 of what a choice picked): no chosen model has both figures."
    parts = [f"{why} {r.model}: {r.optimism:+.4f}" for r, why in picked]
    return (f"Optimism (validation − {split} macro-F1 of what a choice picked; positive: it looked better where it was "
            f"chosen): " + "; ".join(parts) + ".")


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None or np.isnan(value) else format(value, spec)


def render(result: ReportResult, experiment: str, split: str, cfg: ExperimentConfig) -> str:
    e = cfg.evaluate
    conf = f"{e.confidence:.0%}"
    n = int(result.rows[0].metrics.get("rows", 0)) if result.rows else 0
    lines = [f"# {experiment}: {split} split ({n} reviews)", "",
             f"| model | role | method | parameters | accuracy ({conf} CI) | macro-F1 ({conf} CI) | NLL | ECE | cost "
             f"| vs best member: Δ macro-F1 ({conf} CI), Holm p | validation − {split} | notes | decisions it took "
             f"part in (validation only) |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    for r in result.rows:
        m, v = r.metrics, r.versus_best_member
        versus = "" if v is None else (
            f"{v.macro_f1_diff:+.4f} ({v.macro_f1_diff_ci[0]:+.3f}, {v.macro_f1_diff_ci[1]:+.3f}), p={r.p_holm:.4g}"
            + (" **differs**" if r.p_holm is not None and r.p_holm < e.alpha else ""))
        lines.append(
            f"| {r.model} | {r.role} | {r.method} | {r.recipe} | {fmt(m.get('accuracy'))} "
            f"({fmt(m.get('accuracy_ci_low'), '.3f')}-{fmt(m.get('accuracy_ci_high'), '.3f')}) | "
            f"{fmt(m.get('macro_f1'))} ({fmt(m.get('macro_f1_ci_low'), '.3f')}-{fmt(m.get('macro_f1_ci_high'), '.3f')})"
            f" | {fmt(m.get('nll'), '.3f')} | {fmt(m.get('ece'), '.3f')} | {r.cost:.2g}x | {versus} | "
            f"{fmt(r.optimism, '+.4f')} | {'; '.join(r.notes)} | {'; '.join(r.decisions) or 'none'} |")
    lines += ["", "cost: parameters run per review relative to one member (the ensemble runs every member: K forward "
              "passes; the majority baseline runs none).",
              f"Scored in {' and '.join(result.precisions) or 'fp32'} (model.precision; weights are stored in fp32).",
              f"best member: {result.best_member or 'none'}, chosen by validation macro-F1 (ties: validation NLL), "
              f"never by this split; selected merge: {result.selected_merge or 'none'}, chosen the same way among "
              "the merges.",
              f"Tests: paired bootstrap of the macro-F1 difference over these {n} reviews ({e.bootstrap_samples} "
              f"resamples, p = (1 + count) / (B + 1), two-sided); p-values are Holm-adjusted over the "
              f"{result.comparisons} comparisons of this report (each row against the best member, and the selected "
              f"merge against the ensemble and the bigger model). **differs**: adjusted p < {e.alpha}. "
              f"Non-inferiority margin: {cfg.promote.non_inferiority_margin:g} macro-F1.",
              optimism_line(result, split),
              f"Decisions: every choice in the last column read validation"
              f" (the promotion gate: its {cfg.promote.split} split, rows the search never optimised); no "
              f"decision read the {split} split. The CIs are per comparison (not adjusted); the p-values are."
              if split == "test" else
              f"Decisions: the last column's choices read validation ({cfg.promote.split} for the promotion gate).",
              "", "## What the numbers allow",
              ""]
    lines += [f"- {v}" for v in result.verdicts]
    lines += domains.render(result.per_domain, split, e.confidence) if result.per_domain else []
    return "\n".join(lines) + "\n"


def run(cfg: ExperimentConfig, experiment: str | None = None, split: str | None = None,
        log: bool = True, store: Store | None = None, evaluations: list[str] | None = None) -> ReportResult:
    """Build the comparison table; print-ready markdown, also logged in a `report` run when `log`.
    `evaluations`: the evaluation run ids to compare (the pipeline hands over its own); by default the newest
    evaluation of each model on the newest evaluated data."""
    store = store or Store(cfg)
    experiment = experiment or cfg.name
    split = split or cfg.evaluate.split
    runs = collect(store, experiment, split) if not evaluations else sorted(  # newest first, as collect gives them
        (store.get_run(i) for i in evaluations), key=lambda r: r.info.start_time, reverse=True)
    with DiskSpace(cfg.output_dir, f"writing the {split} report"):  # the evaluations' predictions, downloaded
        result = replace(build(runs, cfg, cfg.output_dir / "report", store, split), experiment=experiment,
                         split=split)
    markdown = render(result, experiment, split, cfg)
    run_id = None
    if log:
        with store.run(f"report-{split}", stage="report", tags={"mllm.split": split}, experiment=experiment) as r:
            r.text(markdown, "report.md")
            r.mlflow_table(table_frame(result.rows, result.best_member), "report_table.json")
            r.json(summary(result), "report.json")
            if result.per_domain:
                r.metrics(domains.metrics(result.per_domain))
            run_id = r.id
    return replace(result, markdown=markdown, run_id=run_id)


def table_frame(rows: list[Row], best: str | None) -> pd.DataFrame:
    """The comparison table as a frame (the MLflow table logged with the report)."""
    out = []
    for r in rows:
        v = r.versus_best_member
        out.append({"model": r.model, "role": r.role, "method": r.method, "recipe": r.recipe,
                    **{k: r.metrics.get(k) for k in ("accuracy", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high",
                                                     "nll", "ece")},
                    "cost": r.cost, "best_member": r.model == best, "val_macro_f1": r.val_macro_f1,
                    "diff_vs_best_member": v.macro_f1_diff if v else None, "p_holm": r.p_holm,
                    "optimism": r.optimism, "chosen": r.chosen,
                    "notes": "; ".join(r.notes), "decisions": "; ".join(r.decisions) or "none",
                    "evaluation_run": r.run_id})
    return pd.DataFrame(out)


def summary(result: ReportResult) -> dict[str, Any]:
    return {"experiment": result.experiment, "split": result.split, "best_member": result.best_member,
            "selected_merge": result.selected_merge, "verdicts": result.verdicts,
            "rows": [r.summary() for r in result.rows],
            "per_domain": result.per_domain.summary() if result.per_domain else None}


def to_json(result: ReportResult) -> str:
    return json.dumps(summary(result), indent=2, default=str)
