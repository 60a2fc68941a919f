"""The chaos drill: SIGKILL mllm at random moments, N times, then compare what is left with an uninterrupted run.

    bash scripts/stack.sh up && source /tmp/mllm-stack/env          # PostgreSQL, S3 (moto), mlflow server
    .venv-test/bin/python scripts/chaos.py --kills 20 --seed 0       # the drill (about half an hour on 2 cores)
    .venv-test/bin/python scripts/chaos.py --kills 0 --faults        # the three service faults, no kills

On the service stack, with two search workers, the tiny pipeline (configs/tiny.yaml with the drill's settings
below) runs once uninterrupted (the reference) and once under fire: the drill picks a stage (first every stage in
pipeline order, so each is hit while doing its real work, then a seeded shuffle), waits for the pipeline to enter
it, sleeps a random part of that stage's reference duration and SIGKILLs one mllm process of the pipeline's tree
(the pipeline or a search worker), then restarts the pipeline, until N kills have landed and a run completes.
With --faults a third run gets the service faults: the MLflow server killed and restarted while the merges
upload, PostgreSQL restarted during the search, S3 unreachable during the final
evaluation; an attempt a fault stops must end with one line naming the service, and the next attempt continues.

Then, item by item, the state both runs left is compared: registered models, their versions' tags and aliases,
the report's numbers, the search's complete trials (recipes and values), and the invariants (no run RUNNING, no
logged model PENDING, no Optuna trial RUNNING, search.n_trials finished trials, no S3 object that no run or model
refers to). It prints the kills by stage and moment and, per item, "identical" or the difference; exit 1 if any.

The drill's search stays in its seeded start-up phase (startup_trials = n_trials): those proposals depend on the
trial's index only (mllm.tracking.sampling), so the reference is exactly reproducible however the two workers
interleave; model-phase proposals read the trials finished so far, which two workers order differently.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MLLM = str(Path(sys.executable).with_name("mllm"))
STACK = REPO / "scripts" / "stack.sh"
STAGES = ("finetune", "merge", "validate", "search", "promote", "evaluate", "report")
N_TRIALS = 12  # the standard merges enter as 5 finished trials; the two workers run the other 7
DRILL = {"search.workers": 2, "search.n_trials": N_TRIALS, "search.startup_trials": N_TRIALS,
         "search.heartbeat_s": 2, "search.grace_s": 8, "tracking.heartbeat_s": 5, "tracking.lease_s": 30}
VOLATILE_TAG = re.compile(r"^(mlflow\.|mllm\.(heartbeat|owner|host|ended_by|source_run|run_id)|.*_s$|.*seconds)")
FAULT_AT = {"merge": "mlflow", "search": "postgres", "evaluate": "s3"}  # stage: service faulted while it runs


@dataclass
class Attempt:
    """One `mllm pipeline` process (its own session, so the whole tree can be found and waited for)."""

    cmd: list[str]
    log: Path
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, monotonic time it started)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)  # the config names the store
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                out.write(raw)
                for line in re.split(r"[\r\n]", raw.decode(errors="replace")):
                    if m := re.match(r"pipeline: (\w+) started", line):
                        self.stages.append((m.group(1), time.monotonic()))
                    if line.strip():
                        self.lines.append(line.strip())

    def stage(self) -> tuple[str, float]:
        """The stage running now and the seconds since it started."""
        name, at = self.stages[-1] if self.stages else ("start", self.started)
        return name, time.monotonic() - at

    def wait_stage(self, stage: str, timeout: float) -> bool:
        """Wait until `stage` starts (True) or the pipeline exits / `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if any(s == stage for s, _ in self.stages):
                return True
            time.sleep(0.1)
        return any(s == stage for s, _ in self.stages)

    def tree(self) -> list[Any]:
        """The pipeline's live mllm processes (the pipeline first, then its search workers by start time); helper
        processes (multiprocessing's resource tracker, a short-lived `git`) are not mllm's to kill."""
        import psutil

        def ours(p: Any) -> bool:
            try:
                cmd = " ".join(p.cmdline())
                return "python" in cmd and "resource_tracker" not in cmd and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        try:
            root = psutil.Process(self.proc.pid)
            kids = [p for p in root.children(recursive=True) if ours(p)]
            return [root] + sorted(kids, key=lambda p: p.create_time())
        except psutil.Error:
            return []

    def finish(self, timeout: float = 1800) -> int:
        """Wait for the pipeline and every process of its session (orphaned workers finish their trials)."""
        rc = self.proc.wait(timeout=timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end and session_alive(self.proc.pid):
            time.sleep(0.5)
        self.reader.join(timeout=10)
        return rc


def session_alive(sid: int) -> bool:
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def stack_env() -> dict[str, str]:
    env = {k: os.environ.get(k, "") for k in ("MLLM_STACK_TRACKING_URI", "MLLM_OPTUNA_STORAGE",
                                               "MLLM_STACK_S3_ENDPOINT", "MLLM_STACK_BUCKET")}
    if not all(env.values()):
        sys.exit("chaos: the service stack is not up here; run `bash scripts/stack.sh up && "
                 "source /tmp/mllm-stack/env` first")
    return env


def pipeline_cmd(config: Path, name: str, out: Path, stack: dict[str, str]) -> list[str]:
    sets = {"name": name, "output_dir": str(out), "tracking.tracking_uri": stack["MLLM_STACK_TRACKING_URI"],
            "search.storage": "${MLLM_OPTUNA_STORAGE}", **DRILL}
    return [MLLM, "pipeline", "-c", str(config), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def reference(config: Path, name: str, work: Path, stack: dict[str, str]) -> dict[str, float]:
    """The uninterrupted run; returns each stage's duration (summed where a stage runs several times: merge)."""
    a = Attempt(pipeline_cmd(config, name, work / name, stack), work / f"{name}.log")
    rc = a.finish()
    if rc != 0:
        sys.exit(f"chaos: the reference run failed (exit {rc}); see {a.log}")
    ends = [t for _, t in a.stages[1:]] + [time.monotonic()]
    durations: dict[str, float] = {}
    for (stage, start), end in zip(a.stages, ends, strict=True):
        durations[stage] = durations.get(stage, 0.0) + end - start
    print(f"chaos: reference {name} done in {time.monotonic() - a.started:.0f} s; stages "
          + ", ".join(f"{s} {d:.0f} s" for s, d in durations.items()))
    return durations


def service(action: str) -> None:
    subprocess.run(["bash", str(STACK), action], cwd=REPO, check=True, capture_output=True)


def fault(kind: str, outage_s: float) -> None:
    """One service fault: PostgreSQL stopped and started, the MLflow server killed and restarted, S3 paused."""
    stop, start = {"postgres": ("pg-stop", "pg-start"), "mlflow": ("mlflow-stop", "mlflow-start"),
                   "s3": ("s3-pause", "s3-resume")}[kind]
    service(stop)
    time.sleep(outage_s)
    service(start)


def drill(config: Path, name: str, work: Path, stack: dict[str, str], durations: dict[str, float], kills: int,
          seed: int, faults: bool, outage_s: float, max_attempts: int) -> tuple[list[dict], list[dict], list[str]]:
    """The run under fire: returns (kills, faults, one-line endings of attempts)."""
    rng = random.Random(seed)
    # first one kill per stage in pipeline order, so every stage is hit while it does its real work (a later
    # attempt mostly reuses what an earlier one finished), then the rest on a seeded shuffle of the stages
    rest = [STAGES[i % len(STAGES)] for i in range(max(kills - len(STAGES), 0))]
    rng.shuffle(rest)
    plan = list(STAGES[:kills]) + rest
    pending = dict(FAULT_AT) if faults else {}
    landed: list[dict] = []
    faulted: list[dict] = []
    endings: list[str] = []
    completed: set[str] = set()  # stages some attempt finished
    for attempt in range(1, max_attempts + 1):
        a = Attempt(pipeline_cmd(config, name, work / name, stack), work / f"{name}.log")
        if pending and not plan:  # the faults, each a third into its stage (at most 10 s), in one attempt if it lives
            for aimed in list(pending):
                if not a.wait_stage(aimed, 1800):
                    break
                time.sleep(min(10.0, durations.get(aimed, 3.0) / 3))
                if a.proc.poll() is not None:
                    break
                kind, (stage, into) = pending.pop(aimed), a.stage()
                fault(kind, outage_s)
                faulted.append({"attempt": attempt, "stage": stage, "into_s": round(into, 1), "service": kind,
                                "outage_s": outage_s})
                print(f"chaos: attempt {attempt}: {kind} down for {outage_s:.0f} s, {into:.1f} s into {stage}")
        elif plan:
            target = plan[0]
            if a.wait_stage(target, 1800):
                # a stage an earlier attempt finished is mostly reused now (seconds): aim inside that
                window = durations.get(target, 1.0) if target not in completed else min(durations.get(target, 1.0), 3.0)
                time.sleep(rng.uniform(0, max(window, 0.5)))
                for _ in range(20):  # a process that exits as it is picked: pick again
                    procs = a.tree()
                    if not procs or a.proc.poll() is not None:
                        break
                    victim = rng.randrange(len(procs))
                    stage, into = a.stage()
                    try:
                        os.kill(procs[victim].pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    else:
                        plan.pop(0)
                        landed.append({"kill": len(landed) + 1, "attempt": attempt, "aimed": target, "stage": stage,
                                       "into_s": round(into, 1), "process": "pipeline" if victim == 0
                                       else f"child {victim}"})
                        print(f"chaos: kill {len(landed)}/{kills}: {landed[-1]['process']} in {stage} "
                              f"after {into:.1f} s (aimed at {target})")
                        break
        rc = a.finish()
        completed |= {m.group(1) for ln in a.lines if (m := re.match(r"pipeline: (\w+) done in", ln))}
        if rc != 0:
            tail = [ln for ln in a.lines if not re.search(r"\d+%\|", ln)]
            endings.append(f"attempt {attempt} exit {rc}: {tail[-1] if tail else '(no output)'}")
        if rc == 0 and not plan and not pending:
            print(f"chaos: {name} completed on attempt {attempt}")
            return landed, faulted, endings
        if rc == 0 and plan:  # it finished before the kill: the rest would land on reuse only; say so
            print(f"chaos: the pipeline completed before kill {len(landed) + 1} ({plan[0]}); "
                  f"{len(plan)} kill(s) did not land")
            plan.clear()
            if not pending:
                return landed, faulted, endings
    sys.exit(f"chaos: {name} did not complete in {max_attempts} attempts; see {work / name}.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", action="store_true", help="also restart PostgreSQL, the MLflow server and S3")
    ap.add_argument("--outage-s", type=float, default=15.0, help="how long each service is down")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mllm-chaos"))
    ap.add_argument("--json", type=Path, help="write the kills, faults and comparison here")
    args = ap.parse_args()
    stack = stack_env()
    from chaos_compare import compare, snapshot  # scripts/chaos_compare.py

    tag = f"{int(time.time())}-{args.seed}"
    ref = f"chaos-ref-{tag}"
    args.work.mkdir(parents=True, exist_ok=True)
    durations = reference(args.config, ref, args.work, stack)
    phases = [(f"chaos-kills-{tag}", args.kills, False)] if args.kills else []
    phases += [(f"chaos-faults-{tag}", 0, True)] if args.faults else []
    report: dict[str, Any] = {}
    verdicts = []
    for name, kills, faults in phases:
        start = time.monotonic()
        landed, faulted, endings = drill(args.config, name, args.work, stack, durations, kills, args.seed, faults,
                                         args.outage_s, max_attempts=kills + 10)
        print(f"chaos: {name}: {len(landed)} kill(s), {len(faulted)} service fault(s), "
              f"{time.monotonic() - start:.0f} s under fire")
        for line in endings:
            print(f"  {line}")
        by_stage: dict[str, int] = {}
        for k in landed:
            by_stage[k["stage"]] = by_stage.get(k["stage"], 0) + 1
        if landed:
            print("chaos: kills by stage: " + ", ".join(f"{s} {n}" for s, n in by_stage.items()))
        items = compare(snapshot(ref, stack, N_TRIALS), snapshot(name, stack, N_TRIALS), ref, name, N_TRIALS)
        width = max(len(i) for i, _ in items)
        print(f"chaos: {name} against the uninterrupted {ref}:")
        for item, verdict in items:
            print(f"  {item:<{width}}  {verdict}")
        verdicts += [v for _, v in items]
        report[name] = {"kills": landed, "faults": faulted, "endings": endings, "items": dict(items)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(v == "identical" for v in verdicts) else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
