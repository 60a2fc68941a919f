"""A study cell's model runs: one MLflow run per scored model, nested under the cell's run, with the recipe (or what
the model is) as params, validation and test metrics (per domain too, with several domains), and `predictions.csv`
(split, row, label, domain, one logit column per class), from which RESULTS.md is computed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from mllm.config.schema import MergeConfig
from mllm.data.splits import SplitData
from mllm.evaluate import score
from mllm.evaluation.metrics import classification_summary
from mllm.study.recipes import SAME
from mllm.study.work import CellWork


def _predictions(frames: dict[str, np.ndarray], data: SplitData) -> pd.DataFrame:
    """split, row, label (+ domain, with several domains) and one logit column per class."""
    several = data.train["domain"].nunique() > 1
    return pd.concat([pd.DataFrame({"split": split, "row": np.arange(len(logits)),
                                    "label": data.split(split)["label"].to_numpy(),
                                    **({"domain": data.split(split)["domain"].to_numpy()} if several else {}),
                                    **{f"logit_{n}": logits[:, j] for j, n in enumerate(data.label_names)}})
                      for split, logits in frames.items()], ignore_index=True)


def domain_metrics(split: str, logits: np.ndarray, data: SplitData) -> dict[str, float]:
    """<val|test>_macro_f1_<domain>, with several domains (what the MLflow UI compares per domain)."""
    frame = data.split(split)
    if frame["domain"].nunique() < 2:
        return {}
    prefix = "test" if split == "test" else "val"
    return {f"{prefix}_macro_f1_{d}": classification_summary(logits[rows.index.to_numpy()],
                                                              rows["label"].to_numpy())["macro_f1"]
            for d, rows in frame.groupby("domain", sort=False)}


def model_params(work: CellWork, name: str, kind: str, recipe: MergeConfig | None) -> dict[str, Any]:
    """A model run's params: what it is (member, baseline or recipe), the trial a policy chose, where it came from."""
    params: dict[str, Any] = {"model": name, "kind": kind}
    if kind == "member":
        index = int(name.split(":")[1])
        params.update(member=work.members[index][0], model_uri=work.members[index][1])
    elif kind == "tfidf":
        params["model_uri"] = work.tfidf
    elif name in work.references:
        params["model_uri"] = work.references[name]
    elif recipe is not None:
        params.update(method=recipe.method, weights=json.dumps(recipe.weights), density=recipe.density,
                      lambda_=recipe.lambda_, seed=recipe.seed)
    if name in work.picks:
        pick = work.picks[name]
        params.update(trial=pick.number, policy=pick.policy, chosen_on=pick.chosen_on,
                      groups=json.dumps([g.model_dump(mode="json") for g in pick.recipe.groups or []]))
    if name in SAME:
        params["scored_as"] = SAME[name]
    if name not in work.picks and kind not in ("ensemble", "majority", "tfidf") and work.taken_over(name):
        params["reused_from"] = work.earlier[name][1]  # the earlier cell's run: same members, same logits
    return params


def log_models(work: CellWork, cell_id: str) -> None:
    """One run per model under the cell's run: params, validation and test metrics, and predictions.csv."""
    study, arm, data, labels = work.study, work.arm, work.data, work.labels
    for name, (kind, recipe) in work.recipes.items():
        val = {"validation": work.val[name]} if name in work.val else {}
        metrics = {f"val_{m}": x for m, x in classification_summary(val["validation"], labels["validation"]).items()
                   } if val else {}
        metrics.update({f"test_{m}": x for m, x in score(work.test[name], labels["test"], data.label_names,
                                                         work.cfg.evaluate).items()})
        for split, logits in {**val, "test": work.test[name]}.items():
            metrics.update(domain_metrics(split, logits, data))
        with work.store.run(f"{arm.name} f{work.fold} {name}", stage="study-model", parent_run_id=cell_id,
                            tags={"mllm.study": study.study, "mllm.arm": arm.name, "mllm.fold": work.fold,
                                  "mllm.study_model": name, "mllm.kind": kind}, log_config=False,
                            system_metrics=False) as run_:
            run_.params(model_params(work, name, kind, recipe))
            run_.metrics(metrics)
            run_.table(_predictions({**val, "test": work.test[name]}, data), "predictions.csv")
