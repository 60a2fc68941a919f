"""The whole flow (`mllm pipeline`, MLproject entry point `main`): fine-tune, merge, evaluate, search,
promote, report, in one parent MLflow run.

    mllm pipeline                              # configs/default.yaml's values: SmolLM2-135M on the Drugs.com sample
    mlflow run . -e main -P config=configs/tiny.yaml --env-manager local

Finished stages are reused, not redone, when their inputs and the code version match: registered members
(by member key), merges (by merge key), evaluations (by evaluation key), the study (a rerun continues it up
to search.n_trials finished trials) and the promoted merge (by merge key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mllm.config import ExperimentConfig


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    report_markdown: str
    champion: str | None
    stage_seconds: dict[str, float]


def run(cfg: ExperimentConfig, standard_methods: list[str] | None = None) -> PipelineResult:
    from mllm import evaluate, finetune, merge, promote, report, search, tracking

    methods = standard_methods or ["linear", "ties", "dare_ties", "dare_linear"]
    seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        took = time.perf_counter() - start
        seconds[stage] = seconds.get(stage, 0.0) + took
        print(f"pipeline: {stage} done in {took:.0f} s")
        return out

    with tracking.tracked_run(cfg, "pipeline", stage="pipeline") as parent:
        timed("finetune", finetune.run, cfg)
        for method in methods:
            timed("merge", merge.run, cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"method": method})}))
        # One frozen-prefix cache for every test-split scoring of the run (baselines, merges, the promoted one).
        prefix = evaluate.new_prefix_cache(cfg)
        timed("evaluate", evaluate.run, cfg, prefix=prefix)
        timed("search", search.run, cfg)
        promoted = timed("promote", promote.run, cfg, prefix=prefix)
        rep = timed("report", report.run, cfg)
        tracking.log_metrics({f"{k}_s": v for k, v in seconds.items()})
        tracking.set_tags({"mllm.champion": f"models:/{cfg.name}-merged/{promoted.champion_after}"
                           if promoted.champion_after else ""})
    champion = f"models:/{cfg.name}-merged@champion" if promoted.champion_after else None
    return PipelineResult(parent.info.run_id, rep.markdown, champion, seconds)
