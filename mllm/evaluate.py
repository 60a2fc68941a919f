"""The evaluate stage: score classifiers (`models:/`, `runs:/` or a folder) on one split, with honest baselines.

    mllm evaluate -c configs/tiny.yaml                             # every merge of the current base + baselines
    mllm evaluate --model models:/drugscom-merged/3 --split validation --no-baselines

Per model, in its own MLflow run nested under the stage's run: accuracy, macro-F1 and per-class precision / recall
/ F1 (the `mllm_classification` metric module), NLL and ECE (`mllm_calibration`), loaded with `evaluate.load` from
`mllm/evaluation/metric_modules` (the hub is unreachable offline); percentile-bootstrap confidence intervals; a
confusion-matrix figure; `predictions.csv` (text, label, prediction, logits). Inference is batched and length-sorted
(longest first, padded to the batch's own longest review), in bf16 on CUDA.

Baselines of a merged model: its members, the logit-average ensemble of the members (K forward passes per
review: K times a merge's inference cost, reported as such), the full-data member (trained on all the rows the
shards split), the majority class, TF-IDF + logistic regression (`mllm.evaluation.baselines`, registered as
`<experiment>-tfidf`), the base classifier, and `model.bigger_model`. Scoring a registered merge or ensemble on
validation records `val_macro_f1`, `val_nll` on the version (what later choices read). An evaluation is reused
when the same version was scored on the same data, split and settings (logits read back from predictions.csv: so
the ensemble costs no extra forward passes here), and its figures are written on the version again if missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mllm.basics import short_hash, slug
from mllm.config.schema import EvaluateConfig, ExperimentConfig
from mllm.data.splits import SplitData, load_splits
from mllm.errors import DiskSpace, MllmError, ModelError
from mllm.evaluation.baselines import ensure_tfidf, majority_logits, register_ensemble
from mllm.evaluation.metrics import bootstrap_ci, confusion, log_softmax
from mllm.finetune import bigger_uri
from mllm.merging.methods import METHODS, info
from mllm.models.modeling import encode, iter_logits, load_classifier
from mllm.models.precision import resolve_device, resolve_precision
from mllm.models.prefix import PrefixCache, fingerprint_batches
from mllm.tracking.registry import note_scores
from mllm.tracking.runs import RunLog
from mllm.tracking.store import Store
from mllm.tracking.tags import VersionTags

METRIC_MODULES = Path(__file__).parent / "evaluation" / "metric_modules"
MODEL_METRICS = {"accuracy", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy_ci_low", "accuracy_ci_high",
                 "nll", "ece"}


@dataclass(frozen=True)
class Candidate:
    """One thing to score: a model URI, or the ensemble of several members (`parts`)."""

    uri: str  # canonical: models:/<name>/<version> for registered models
    role: str  # merged | member | base | ensemble | bigger | model
    method: str = ""
    recipe: str = ""  # the merge parameters (or the member's name), for the report
    reusable: bool = True  # False for local folders, whose contents may change under the same path
    parts: tuple[str, ...] = ()
    val_macro_f1: float | None = None  # recorded at registration (members): how the best member is chosen
    val_nll: float | None = None  # breaks ties in validation macro-F1
    parents: tuple[str, ...] = ()
    base: str | None = None
    model_id: str | None = None  # the MLflow LoggedModel behind a registered version (its metrics go there too)
    label: str = ""  # how run names call it: "merged v5 dare_linear", "member v2 shard-1"


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    split: str
    metrics: dict[str, float]
    logits: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    run_id: str
    reused: bool


@dataclass(frozen=True)
class EvaluateResult:
    split: str
    fingerprint: str
    evaluations: list[Evaluation]
    run_id: str


@cache
def metric_module(name: str) -> Any:
    import evaluate

    return evaluate.load(str(METRIC_MODULES / name), keep_in_memory=True)


def score(logits: np.ndarray, labels: np.ndarray, label_names: tuple[str, ...], cfg: EvaluateConfig
          ) -> dict[str, float]:
    """Flat metrics of one model's logits: point estimates through the evaluate modules, CIs by bootstrap."""
    k = len(label_names)
    preds = logits.argmax(1)
    cls = metric_module("mllm_classification").compute(predictions=preds, references=labels, num_labels=k)
    cal = metric_module("mllm_calibration").compute(predictions=np.exp(log_softmax(logits.astype(np.float64))),
                                                    references=labels, bins=cfg.ece_bins)
    out = {"accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"], "nll": cal["nll"], "ece": cal["ece"],
           "rows": float(len(labels))}
    for name, (lo, hi) in bootstrap_ci(labels, preds, k, cfg.bootstrap_samples, cfg.confidence, cfg.seed).items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    for i, label in enumerate(label_names):
        for what in ("precision", "recall", "f1"):
            out[f"{what}_{label}"] = cls[what][i]
    return out


def confusion_figure(labels: np.ndarray, preds: np.ndarray, label_names: tuple[str, ...], title: str) -> Any:
    """Counts with row-normalised shading (recall per true class), as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(label_names)
    cm = confusion(labels, preds, k)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(k), label_names, rotation=30, ha="right")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def predictions_frame(frame: pd.DataFrame, logits: np.ndarray, label_names: tuple[str, ...]) -> pd.DataFrame:
    preds = logits.argmax(1)
    out = pd.DataFrame({"row": np.arange(len(frame)), "text": frame["text"].to_numpy(),
                        "label": [label_names[i] for i in frame["label"]],
                        "predicted": [label_names[i] for i in preds], "correct": preds == frame["label"].to_numpy()})
    for i, name in enumerate(label_names):
        out[f"logit_{name}"] = logits[:, i]
    return out


def logits_from_frame(frame: pd.DataFrame, label_names: tuple[str, ...]) -> np.ndarray:
    return frame[[f"logit_{n}" for n in label_names]].to_numpy(dtype=np.float32)


def describe(uri: str, store: Store, role: str | None = None) -> Candidate:
    """A candidate for a URI: registered versions carry their role, method, recipe and lineage in tags."""
    canonical, version = store.resolve(uri)
    if version is None:
        return Candidate(uri, role or "model", reusable=not Path(uri).exists(),  # runs:/ URIs are immutable
                         label=f"{role or 'model'} {Path(uri).name or uri}")
    t = VersionTags.of(version)
    found = store.role_of(version.name)
    role = role or found
    if found == "tfidf":
        return Candidate(canonical, "tfidf", "tf-idf + logistic regression", f"C={t.C if t.C is not None else '?'}",
                         val_macro_f1=t.val.get("macro_f1"), model_id=store.model_id(version),
                         label=f"tfidf v{version.version}")
    if found == "ensemble":  # scored from its members' logits, like the ensemble the report always has
        return Candidate(canonical, "ensemble", "logit average", f"{len(t.members)} members", parts=t.members,
                         model_id=store.model_id(version), label=f"ensemble v{version.version}")
    recipe = merge_recipe(t) if found == "merged" else (t.member or "") if found == "member" else ""
    method = t.method or {"member": "fine-tuned"}.get(found, "")
    base = t.base or (store.model_uri("base", t.base_version) if t.base_version else None)
    return Candidate(canonical, role, method, recipe, val_macro_f1=t.val.get("macro_f1"), val_nll=t.val.get("nll"),
                     parents=t.parents, base=base, model_id=store.model_id(version),
                     label=f"{role} v{version.version} {t.member or method}".strip())


def merge_recipe(t: VersionTags) -> str:
    """A merge's recipe in one line, from its version's tags (what the report's `parameters` column shows)."""
    how = info(t.method) if t.method in METHODS else None
    parts = [f"weights={[round(w, 3) for w in t.weights] if t.weights else 'equal'}",
             f"density={t.density:.3g}" if t.density is not None and how and how.uses("density") else "",
             f"lambda={t.lambda_:.3g}" if t.lambda_ is not None and how and how.task_vector else "",
             f"(search trial {t.trial})" if t.trial is not None else ""]
    recipe = " ".join(p for p in parts if p)
    return f"{t.soup} soup: {recipe}" if t.soup else recipe


def plan(cfg: ExperimentConfig, models: list[str] | None, baselines: bool, store: Store) -> list[Candidate]:
    """What to score: the given models (default: every merge of the experiment's newest base), then for the
    merges their members, the members' ensemble, the full-data member, the base, and with any baselines the
    majority class, TF-IDF and model.bigger_model. Members come before the ensemble, which is computed from their
    logits."""
    for m in models or []:  # before any run is opened: unknown names, versions, runs, unusable folders
        store.check_uri(m, "--model")
    bigger = bigger_uri(cfg, store) if baselines and cfg.model.bigger_model else None
    if models:
        chosen = [describe(m, store) for m in models]
    else:
        base = store.newest("base")
        merged = store.find_versions(store.model_name("merged"), {}) if base else []
        newest_base = store.model_uri("base", base.version) if base else None
        chosen = [describe(store.model_uri("merged", v.version), store) for v in reversed(merged)
                  if VersionTags.of(v).base == newest_base]
        if not chosen:
            raise MllmError(f"no merged models of experiment {cfg.name} to evaluate",
                            "run mllm merge first, or pass --model URI")
    out: list[Candidate] = [describe(p, store, "member") for c in chosen for p in c.parts]  # before an ensemble
    if baselines:
        for c in [c for c in chosen if c.role == "merged"]:
            out += [describe(p, store, "member") for p in c.parents]
            if len(c.parents) > 1:
                out.append(Candidate("ensemble:" + ",".join(c.parents), "ensemble", "logit average",
                                     f"{len(c.parents)} members", parts=c.parents,
                                     label=f"ensemble of {len(c.parents)}"))
            if c.base:
                full = store.find_versions(store.model_name("member"), {"member": "full",
                                                                         "base_version": c.base.rsplit("/", 1)[-1]})
                if full:
                    out.append(describe(store.model_uri("member", full[0].version), store, "full"))
                out.append(describe(c.base, store, "base"))
    out += chosen
    if baselines:
        out += [Candidate("majority", "majority", "majority class", label="majority class"),
                Candidate("tfidf", "tfidf", "tf-idf + logistic regression", label="tfidf")]  # fitted when scored
    if bigger:
        out.append(describe(bigger, store, "bigger"))
    unique: dict[str, Candidate] = {}
    for c in out:
        unique.setdefault(c.uri, c)  # a member shared by several merges is scored once
    return list(unique.values())


def new_prefix_cache(cfg: ExperimentConfig) -> PrefixCache:
    return PrefixCache(cfg.finetune.freeze_layers if cfg.finetune.freeze_embeddings else 0)


def eval_key(c: Candidate, split: str, fingerprint: str, cfg: ExperimentConfig, precision: str) -> str:
    """Identifies an evaluation whose results can be reused: model, data, split, scoring settings, precision."""
    settings = {"model": c.uri, "split": split, "data": fingerprint, "max_length": cfg.model.max_length,
                "precision": precision, "evaluate": cfg.evaluate.model_dump(exclude={"split", "baselines", "alpha"})}
    return short_hash(settings, 20)


def model_logits(model_dir: Path, texts: list[str], label_names: tuple[str, ...], cfg: ExperimentConfig,
                 desc: str, prefix: PrefixCache | None = None) -> tuple[np.ndarray, int, bool]:
    """(logits in row order, parameter count, whether the frozen-prefix cache was replayed) of the classifier
    in `model_dir`."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    model, tokenizer = load_classifier(model_dir, "--model")
    check_labels(model.config.to_dict(), model_dir.name, label_names, "--model")
    device, dtype = resolve_device(cfg.model)
    model.to(device)  # bf16 (model.precision) is autocast, as in training and search trials: fp32 weights
    encoded = encode(tokenizer, texts, cfg.model.max_length)
    logits = np.zeros((len(texts), len(label_names)), dtype=np.float32)
    key = fingerprint_batches(encoded, cfg.evaluate.batch_size) + str(dtype)  # + the resolved precision
    replay = prefix is not None and prefix.matches(model, key)
    context = (prefix.replay(model) if replay else prefix.record(model, key)) if prefix else nullcontext()
    with context, tqdm(total=len(texts), desc=desc, unit="review", leave=False) as bar:
        for index, batch in iter_logits(model, encoded, tokenizer.pad_token_id, cfg.evaluate.batch_size, device,
                                        dtype):
            logits[index] = batch
            bar.update(len(index))
    return logits, sum(p.numel() for p in model.parameters()), replay


def check_labels(config: dict[str, Any], name: str, label_names: tuple[str, ...], field: str) -> None:
    """Refuse a classifier (its config.json as a dict) whose labels are not the data's."""
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    names = tuple(id2label[i] for i in sorted(id2label))
    if names != label_names:
        raise ModelError(f"{field}: {name} predicts {list(names)}, the data has {list(label_names)}",
                         "evaluate models trained for this config's data.label_scheme")


def run(cfg: ExperimentConfig, models: list[str] | None = None, split: str | None = None,
        baselines: bool | None = None, prefix: PrefixCache | None = None, store: Store | None = None
        ) -> EvaluateResult:
    """Score `models` (and their baselines) on `split`; each evaluation is an MLflow run under one stage run.
    `prefix`: a frozen-prefix cache to share with later calls on the same split (the pipeline passes one)."""
    resolve_precision(cfg.model)  # refuses bf16 on a device without it, before any run opens
    store = store or Store(cfg)
    split = split or cfg.evaluate.split
    data = load_splits(cfg.data)
    frame = data.split(split).reset_index(drop=True)
    candidates = plan(cfg, models, cfg.evaluate.baselines if baselines is None else baselines, store)
    for c in candidates:  # local folders: their labels are known before anything is loaded or a run opened
        if not c.parts and c.role not in ("majority", "tfidf") and Path(c.uri).is_dir():
            check_labels(json.loads((Path(c.uri) / "config.json").read_text()), Path(c.uri).name, data.label_names,
                         "model.bigger_model" if c.role == "bigger" else "--model")
    done: dict[str, Evaluation] = {}
    # Members trained with frozen embeddings + lowest layers share those layers with the base and with most
    # merges: their hidden states at the first trained block are computed once (mllm.models.prefix).
    prefix = prefix or new_prefix_cache(cfg)
    with DiskSpace(cfg.output_dir, f"evaluating on {split}"), store.run(f"evaluate-{split}", stage="evaluate",
            tags={"mllm.split": split, "mllm.dataset_fingerprint": data.fingerprint}) as parent:
        for c in candidates:
            done[c.uri] = evaluate_one(cfg, c, split, data, frame, done, prefix, store)
        parent.tags({"mllm.evaluations": ",".join(e.run_id for e in done.values())})
    return EvaluateResult(split, data.fingerprint, list(done.values()), parent.id)




def evaluate_one(cfg: ExperimentConfig, c: Candidate, split: str, data: SplitData, frame: pd.DataFrame,
                 done: dict[str, Evaluation], prefix: PrefixCache, store: Store) -> Evaluation:
    """One candidate's evaluation run, or the finished run with the same key (its logits read back)."""
    labels = frame["label"].to_numpy()
    precision = resolve_precision(cfg.model)
    c = registered(c, cfg, data, store)
    key = eval_key(c, split, data.fingerprint, cfg, precision)
    found = store.find_evaluation(key) if c.reusable else None
    if found is not None:
        path = store.run_artifact(found.info.run_id, "predictions.csv", store.downloads / "eval" / key)
        logits = logits_from_frame(pd.read_csv(path, keep_default_na=False), data.label_names)
        print(f"evaluate {c.role} {c.uri}: reused run {found.info.run_id}")
        note_scores(store, c.uri, c.role, split, found.data.metrics, len(labels))  # a killed run may not have
        # Same key, same settings: the logged metrics are what scoring these logits gives.
        return Evaluation(c, split, dict(found.data.metrics), logits, labels, found.info.run_id, True)
    tags = {"mllm.eval_key": key, "mllm.model_uri": c.uri, "mllm.role": c.role, "mllm.method": c.method,
            "mllm.recipe": c.recipe, "mllm.split": split, "mllm.dataset_fingerprint": data.fingerprint,
            "mllm.parents": ",".join(c.parts or c.parents), "mllm.base": c.base or "", "mllm.precision": precision,
            **({"mllm.val_macro_f1": str(c.val_macro_f1)} if c.val_macro_f1 is not None else {}),
            **({"mllm.val_nll": str(c.val_nll)} if c.val_nll is not None else {})}
    with store.run(f"eval {c.label or slug(c.uri)} on {split}"[:250], stage="evaluation", tags=tags,
                   log_config=False) as run_:
        start = time.perf_counter()
        logits, params, passes = candidate_logits(c, cfg, data, frame, done, prefix, store, run_)
        wall = time.perf_counter() - start
        metrics = score(logits, labels, data.label_names, cfg.evaluate)
        metrics.update(num_params=float(params), forward_passes=float(passes), wall_s=wall,
                       reviews_per_s=len(labels) / wall if wall > 0 else 0.0)
        log_evaluation(run_, c, split, cfg, precision, metrics, logits, frame, data.label_names)
    print(f"evaluate {c.role} {c.uri}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
          f" ({wall:.1f} s)")
    note_scores(store, c.uri, c.role, split, metrics, len(labels))
    return Evaluation(c, split, metrics, logits, labels, run_.id, False)



def registered(c: Candidate, cfg: ExperimentConfig, data: SplitData, store: Store) -> Candidate:
    """The candidate as a registered version: the ensemble of its members and the TF-IDF baseline of this data
    are registered (once) so they are served and compared like every other model."""
    if c.parts and c.model_id is None:
        version = register_ensemble(list(c.parts), data, store)
        return dataclasses.replace(c, uri=store.model_uri("ensemble", version.version),
                                   model_id=store.model_id(version), label=f"ensemble v{version.version}")
    if c.uri == "tfidf":
        return describe(store.model_uri("tfidf", ensure_tfidf(cfg, data, store).version), store, "tfidf")
    return c


def candidate_logits(c: Candidate, cfg: ExperimentConfig, data: SplitData, frame: pd.DataFrame,
                     done: dict[str, Evaluation], prefix: PrefixCache, store: Store,
                     run_: RunLog) -> tuple[np.ndarray, int, int]:
    """(logits, parameters, forward passes per review) of one candidate on `frame`."""
    if c.parts:  # the ensemble: average of its members' logits, K forward passes per review
        missing = [p for p in c.parts if p not in done]
        if missing:
            raise ModelError(f"ensemble member {missing[0]} was not evaluated", "evaluate its members")
        logits = np.mean([done[p].logits for p in c.parts], axis=0).astype(np.float32)
        return logits, int(sum(done[p].metrics["num_params"] for p in c.parts)), len(c.parts)
    if c.role == "majority":  # the most frequent training label for every review
        return majority_logits(data.train["label"].to_numpy(), len(data.label_names), len(frame)), 0, 0
    if c.role == "tfidf":  # through its MLflow model, as a user would load it
        probs = store.predict_proba(c.uri, frame["text"].tolist())
        params = VersionTags.of(store.resolve(c.uri)[1]).num_params or 0
        return np.log(np.clip(probs, 1e-30, None)).astype(np.float32), params, 1
    logits, params, replayed = model_logits(store.download(c.uri), frame["text"].tolist(), data.label_names, cfg,
                                            f"{c.role} {c.uri}", prefix)
    run_.tags({"mllm.prefix_reused": replayed})
    return logits, params, 1


def log_evaluation(run_: RunLog, c: Candidate, split: str, cfg: ExperimentConfig, precision: str,
                   metrics: dict[str, float], logits: np.ndarray, frame: pd.DataFrame,
                   label_names: tuple[str, ...]) -> None:
    """An evaluation run's params, metrics, model metrics (the Models tab), predictions and confusion matrix."""
    labels = frame["label"].to_numpy()
    run_.params({"model_uri": c.uri, "split": split, "role": c.role, "batch_size": cfg.evaluate.batch_size,
                 "max_length": cfg.model.max_length, "precision": precision})
    run_.metrics(metrics)
    if c.model_id:  # the Models tab: the model's own metrics on this dataset
        run_.model_metrics({f"{split}_{k}": v for k, v in metrics.items() if k in MODEL_METRICS
                            or k.startswith("f1_")}, c.model_id, frame, f"{cfg.name}-{split}")
    run_.json({"model": c.uri, "split": split, "metrics": metrics}, "metrics.json")
    run_.table(predictions_frame(frame, logits, label_names), "predictions.csv")
    run_.figure(confusion_figure(labels, logits.argmax(1), label_names, f"{c.uri} on {split}"),
                "confusion_matrix.png")
