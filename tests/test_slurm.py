"""scripts/slurm/finetune_members.sh against a stand-in `sbatch` that runs each job (and array task) at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Stand-in for sbatch: run --wrap now, once per --array index, with --export variables; print a job id.
array=""; wrap=""
for arg in "$@"; do
  case "$arg" in
    --array=*) array=${arg#--array=} ;;
    --wrap=*) wrap=${arg#--wrap=} ;;
    --export=*) IFS=, read -r -a kv <<< "${arg#--export=ALL,}"; for e in "${kv[@]}"; do export "$e"; done ;;
  esac
done
echo "$*" >> "$SBATCH_LOG"
if [ -n "$array" ]; then
  for i in $(seq "${array%-*}" "${array#*-}"); do SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" || exit 1; done
else
  bash -c "$wrap" || exit 1
fi
echo $((RANDOM + 1000))
"""


@pytest.mark.slow
def test_slurm_array_trains_each_member_under_one_parent(tmp_path: Path) -> None:
    import mlflow

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLLM_VENV": str(venv),
           "SBATCH_LOG": str(tmp_path / "sbatch.log")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "finetune_members.sh"), str(REPO / "configs" /
                           "tiny.yaml"), "--set", f"tracking.tracking_uri={uri}", "--set", f"output_dir={tmp_path}/out",
                           "--set", "data.max_rows=150"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "members: shard-0 shard-1 shard-2 full" in proc.stdout  # the full-data member: one more array task
    log = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(log) == 2 and "--array=0-3" in log[1] and "--dependency=afterok:" in log[1]
    parent = (tmp_path / "slurm-logs" / "parent_run_id").read_text().strip()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    members = [r for r in runs if r.data.tags.get("mllm.stage") == "finetune-member"]
    assert sorted(r.info.run_name for r in members) == ["full", "shard-0", "shard-1", "shard-2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in members} == {parent}
    assert {r.info.status for r in runs} == {"FINISHED"}
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'tiny-finetuned'")) == 4
