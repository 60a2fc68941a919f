"""What a pipeline run left on the service stack, normalised so two runs of one config can be compared item by item
(scripts/chaos.py). Names carry the run's experiment name, which is replaced by NAME; run ids, logged-model ids,
times, hosts, heartbeats, trial numbers (a retried trial takes a new number for the same recipe) and reuse keys
(hashes over model URIs, which carry the name) are dropped; what a key covers is compared through the other tags.
"""

from __future__ import annotations

import json
import re
from typing import Any

VOLATILE = re.compile(r"^(mlflow\.|mllm\.(heartbeat|owner|host|ended_by|git_sha|platform|python|trial_source"
                      r"|evaluations|prefix_reused)$|trial$|.*_s$|.*_key$)")
IDS = re.compile(r"\b(m-[0-9a-f]{32}|[0-9a-f]{32})\b")


def _norm(value: Any, name: str) -> Any:
    if isinstance(value, str):
        return IDS.sub("<id>", value.replace(name, "NAME"))
    if isinstance(value, dict):
        return {_norm(k, name): _norm(v, name) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_norm(v, name) for v in value]
    return value


def _tags(tags: dict[str, str], name: str) -> dict[str, str]:
    return _norm({k: v for k, v in tags.items() if not VOLATILE.match(k)}, name)


def snapshot(name: str, stack: dict[str, str], n_trials: int) -> dict[str, Any]:
    """Registered models, report numbers, search trials, invariants and S3 objects of experiment `name`."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = stack["MLLM_STACK_TRACKING_URI"]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return {"missing": f"no experiment {name}"}
    runs = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
    models = {}
    for rm in c.search_registered_models(filter_string=f"name LIKE '{name}-%'"):
        versions = {v.version: {"status": v.status, "tags": _tags(v.tags, name)}
                    for v in c.search_model_versions(f"name='{rm.name}'")}
        models[_norm(rm.name, name)] = {"aliases": dict(sorted(rm.aliases.items())),
                                        "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0])))}
    logged = c.search_logged_models([exp.experiment_id], max_results=1000)
    return {
        "registered models": models,
        "report numbers": _report(c, runs, name),
        "test evaluations": _evaluations(runs, name),
        "search trials": _trials(name, stack),
        "runs RUNNING": sorted(r.info.run_name for r in runs if r.info.status == "RUNNING"),
        "logged models PENDING": sorted(m.name for m in logged if str(m.status).endswith("PENDING")),
        "S3 objects no run or model refers to": _orphans(stack, exp.experiment_id,
                                                         {r.info.run_id for r in runs} | {m.model_id for m in logged}),
    }


def _report(client: Any, runs: list[Any], name: str) -> list[str]:
    """The newest finished test report (report.md, as `mllm report` prints it), line by line, names normalised."""
    import tempfile
    from pathlib import Path

    done = [r for r in runs if r.data.tags.get("mllm.stage") == "report" and r.info.status == "FINISHED"
            and r.data.tags.get("mllm.split") == "test"]
    if not done:
        return []
    newest = max(done, key=lambda r: r.info.start_time)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(newest.info.run_id, "report.md", tmp)
        return [_norm(line, name) for line in Path(path).read_text().splitlines() if line.strip()]


def _evaluations(runs: list[Any], name: str) -> dict[str, dict[str, float]]:
    """Each model's newest finished test evaluation: its metrics."""
    out: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        t = r.data.tags
        if t.get("mllm.stage") == "evaluation" and t.get("mllm.split") == "test" and r.info.status == "FINISHED" \
                and "mllm.model_uri" in t:
            out[_norm(t["mllm.model_uri"], name)] = {k: round(v, 6) for k, v in sorted(r.data.metrics.items())
                                                      if not k.endswith("_s") and "seconds" not in k
                                                      and not k.startswith("system/")}  # MLflow's CPU/disk samples
    return dict(sorted(out.items()))


def _trials(name: str, stack: dict[str, str]) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=f"{name}-search", storage=stack["MLLM_OPTUNA_STORAGE"])
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = sorted(json.dumps({"params": t.params, "values": [round(v, 6) for v in t.values or []]},
                                 sort_keys=True) for t in trials if t.state.name in ("COMPLETE", "PRUNED"))
    return {"finished": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
            "RUNNING": states.get("RUNNING", 0), "WAITING": states.get("WAITING", 0), "recipes": complete}


def _orphans(stack: dict[str, str], experiment_id: str, known: set[str]) -> list[str]:
    """Objects under the experiment's artifact prefix whose run or logged model does not exist."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack["MLLM_STACK_S3_ENDPOINT"])
    orphans: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack["MLLM_STACK_BUCKET"],
                                                             Prefix=f"mlflow/{experiment_id}/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            owner = parts[3] if len(parts) > 3 and parts[2] == "models" else parts[2]
            if owner not in known:
                orphans.add("/".join(parts[:4]))
    return sorted(orphans)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}{k}: only in the drill ({json.dumps(b[k], default=str)[:120]})")
            elif k not in b:
                out.append(f"{path}{k}: missing in the drill (reference {json.dumps(a[k], default=str)[:120]})")
            else:
                out += _diff(a[k], b[k], f"{path}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and a != b:  # lines: the first that differ
        pairs = [(i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        lines = [f"{path}line {i + 1}: reference {x!r}, drill {y!r}"[:300] for i, x, y in pairs[:2]]
        return lines + ([f"{path.rstrip('.')}: {len(a)} lines in the reference, {len(b)} in the drill"]
                        if len(a) != len(b) else [])
    return [] if a == b else [f"{path.rstrip('.')}: reference {a!r}, drill {b!r}"[:300]]


def compare(ref: dict[str, Any], run: dict[str, Any], ref_name: str, run_name: str,
            n_trials: int | None = None) -> list[tuple[str, str]]:
    """(item, "identical" or the differences) for every item; invariants are judged on the drill alone."""
    items = []
    for item in ("registered models", "report numbers", "test evaluations"):
        d = _diff(ref.get(item), run.get(item))
        more = f" (+{len(d) - 6} more)" if len(d) > 6 else ""
        items.append((item, "; ".join(d[:6]) + more if d else "identical"))
    t, tr = ref.get("search trials", {}), run.get("search trials", {})
    items.append(("search trials (finished recipes and values)",
                  "identical" if t.get("recipes") == tr.get("recipes") and tr.get("recipes")
                  else f"reference {len(t.get('recipes', []))}, drill {len(tr.get('recipes', []))} finished; "
                       + "; ".join(_diff(t.get("recipes"), tr.get("recipes"))[:3])))
    if n_trials is not None:
        items.append(("finished trials = search.n_trials", "identical" if tr.get("finished") == n_trials
                      else f"{tr.get('finished')} finished, search.n_trials {n_trials}"))
    items.append(("Optuna trials RUNNING / WAITING", "identical" if tr.get("RUNNING") == 0 and tr.get("WAITING") == 0
                  else f"{tr.get('RUNNING')} RUNNING, {tr.get('WAITING')} WAITING"))
    for item in ("runs RUNNING", "logged models PENDING", "S3 objects no run or model refers to"):
        left = run.get(item, ["(no snapshot)"])
        items.append((item, "identical" if not left else f"{len(left)}: {', '.join(map(str, left[:5]))}"))
    return items
