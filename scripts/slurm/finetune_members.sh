#!/usr/bin/env bash
# Fine-tune the members of an experiment in parallel with a Slurm job array, one member per task.
#
#   bash scripts/slurm/finetune_members.sh configs/gpt2-drugs.yaml [--set KEY=VALUE ...]
#
# 1. submits the base job: `mllm finetune --base-only` builds and registers the shared base classifier and
#    opens the experiment-level parent run (its id is written to outputs/<name>/parent_run_id);
# 2. submits an array with one task per member (after the base job succeeded); each task runs
#    `mllm finetune --member <name> --parent-run-id <parent>`, so member runs nest under one parent.
# All tasks must reach the same tracking server and registry: set tracking.tracking_uri to a server
# (http://...) or a shared database, not a node-local SQLite file. A preempted task (SIGTERM) ends its run
# KILLED; requeue it (--requeue below) and it resumes from its newest complete checkpoint, which needs
# output_dir on a shared filesystem.
# Environment: MLLM_VENV (default .venv), SBATCH_EXTRA (extra sbatch flags, e.g. "--partition=gpu").
set -euo pipefail
config=${1:?usage: finetune_members.sh CONFIG [--set KEY=VALUE ...]}
shift
venv=${MLLM_VENV:-.venv}
mllm="$venv/bin/mllm"
members=$("$venv/bin/python" - "$config" "$@" <<'PY'
import sys
from mllm.config import load_config
from mllm.data.splits import load_splits
from mllm.finetune import BIGGER, plan_members
from mllm.models.modeling import bigger_needs_training
args = sys.argv[2:]
sets = [args[i + 1] for i in range(len(args)) if args[i] in ("--set", "-s")]
cfg = load_config(sys.argv[1], sets)
names = [s.name for s in plan_members(cfg, load_splits(cfg.data))]
print(" ".join(names + ([BIGGER] if bigger_needs_training(cfg.model.bigger_model) else [])))
PY
)
read -r -a names <<< "$members"
echo "members: ${names[*]}"
mkdir -p slurm-logs
base_job=$(sbatch --parsable ${SBATCH_EXTRA:-} --job-name=mllm-base --output=slurm-logs/%x-%j.log \
  --wrap="$mllm finetune --config $config $* --base-only | tee /dev/stderr | sed -n 's/^parent run: //p' > slurm-logs/parent_run_id")
echo "base job: $base_job"
array_job=$(sbatch --parsable ${SBATCH_EXTRA:-} --job-name=mllm-member --requeue --array=0-$((${#names[@]} - 1)) \
  --dependency=afterok:"$base_job" --output=slurm-logs/%x-%A_%a.log --export=ALL,MLLM_MEMBERS="${names[*]}" \
  --wrap="read -r -a m <<< \"\$MLLM_MEMBERS\"; exec $mllm finetune --config $config $* \
          --member \${m[\$SLURM_ARRAY_TASK_ID]} --parent-run-id \$(cat slurm-logs/parent_run_id)")
echo "member array job: $array_job (${#names[@]} tasks)"
