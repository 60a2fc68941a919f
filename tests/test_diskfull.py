"""A full disk under output_dir: refused up front when a stage will not fit, and a write that still runs out of
space stops the stage in one line (exit 2) with nothing registered for it, no run left RUNNING and nothing
half-written that a rerun would take for complete; the rerun, once space is freed, completes.

The end-to-end test mounts a small tmpfs as the tiny config's output_dir (it needs root; skipped otherwise). Sizes
of the tiny config (gpt2, 2 layers, hidden 32): model.safetensors 236 kB, the base folder about 270 kB on tmpfs, a
member's checkpoint (weights + AdamW's two moments) about 720 kB, so a 600 kB disk holds the base and a member's
best weights but not its first checkpoint.
"""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mllm.basics import atomic_dir, atomic_file
from mllm.cli import main, run_guarded
from mllm.errors import DiskFullError, DiskSpace, disk_full

from .conftest import TINY

# --- the translation, without a disk ------------------------------------------------------------------------


def test_enospc_names_output_dir_the_file_the_space_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "out"
    e = OSError(errno.ENOSPC, "No space left on device", str(root / "merged" / "abc"))
    problem = disk_full(e, root, needs=2_100_000_000, doing="merging with ties")
    assert isinstance(problem, DiskFullError)
    line = str(problem)
    assert line.startswith(f"output_dir {root}: no space left on device writing merged/abc while merging with ties "
                           "(needs about 2.1 GB, "), line
    assert line.endswith(" free); fix: free space there or set output_dir to a larger disk"), line


@pytest.mark.parametrize("error", [
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
])
def test_disk_full_is_recognised_however_a_library_words_it(tmp_path: Path, error: Exception) -> None:
    with pytest.raises(DiskFullError, match=f"^output_dir {re.escape(str(tmp_path))}: no space left on device while "
                       "saving "):
        with DiskSpace(tmp_path, "saving"):
            try:
                raise error
            except Exception as inner:  # wrapped, as torch's writer wraps the OSError of a Python file
                raise RuntimeError("unexpected pos 704 vs 598") from inner


def test_other_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), DiskSpace(tmp_path, "saving"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
    assert disk_full(ValueError("bad value")) is None


def test_preflight_refuses_with_the_numbers(tmp_path: Path) -> None:
    space = DiskSpace(tmp_path, "fine-tuning shard-0")
    space.need(1)
    with pytest.raises(DiskFullError, match=rf"^output_dir {re.escape(str(tmp_path))}: not enough free space for "
                       r"fine-tuning shard-0 "
                       r"\(needs about 1000000\.0 GB, [0-9.]+ [kMG]?B free\); fix: free space there"):
        space.need(10**15)


def test_a_failed_atomic_write_leaves_nothing_and_names_its_target(tmp_path: Path) -> None:
    final = tmp_path / "checkpoints" / "step-00000012"
    with pytest.raises(OSError) as info, atomic_dir(final) as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(final)
    assert list(final.parent.iterdir()) == []
    with pytest.raises(OSError), atomic_file(tmp_path / "best.safetensors") as path:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write() -> None:  # a full disk that no stage guarded (the cache, the temporary folder)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.zip"))

    with pytest.raises(SystemExit) as info:
        run_guarded(write)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mllm: error: {tmp_path / 'cache'}: no space left on device writing x.zip ("), err
    assert " free); fix: free space on that disk (output_dir, MLLM_CACHE_DIR, " in err, err


# --- the fine-tune stage on a small tmpfs ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 kB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def store_state(db: Path) -> tuple[set[str], list[str], dict[str, str]]:
    """(registered versions as name/version, ids of RUNNING runs, status by run name) of the SQLite store `db`."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    versions = {f"{v.name}/{v.version}" for v in client.search_model_versions()}
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL, order_by=["attributes.start_time ASC"])
    return (versions, [r.info.run_id for r in runs if r.info.status == "RUNNING"],
            {r.info.run_name: r.info.status for r in runs})


def half_written(out: Path) -> list[Path]:
    """What a rerun must never take for complete: temporaries, checkpoints without their state, a member's final
    model that was never registered."""
    return [*out.rglob(".*.tmp"), *(p for p in out.glob("members/*/checkpoints/step-*")
                                     if not (p / "state.json").is_file())]


def finetune(tmp: Path, out: Path, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`mllm finetune` on the tiny config in-process: (exit code, the `mllm:` lines on stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["finetune", "-c", str(TINY), "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", "--set",
              f"tracking.artifact_location={tmp}/artifacts", "--set", f"output_dir={out}", "--set",
              "data.max_rows=150"])
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    with capfd.disabled():  # pytest -s shows the lines
        print(*(line for line in err.splitlines() if line.startswith("mllm:")), sep="\n")
    return int(info.value.code or 0), "\n".join(line for line in err.splitlines() if line.startswith("mllm:"))


@pytest.mark.slow
def test_finetune_on_a_full_disk(small_disk: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out, db = small_disk / "out", tmp_path / "mlflow.db"
    fix = "; fix: free space there or set output_dir to a larger disk"

    # 1. The preflight: the base is built (its size is the unit), a member's training will not fit: refused
    #    before the base is registered or a member's run opens.
    code, line = finetune(tmp_path, out, capfd)
    assert code == 2 and "\n" not in line, line
    assert line.startswith(f"mllm: error: output_dir {out}: not enough free space for fine-tuning a member "
                           "(needs about ") and line.endswith(fix), line
    versions, running, _ = store_state(db)
    assert versions == set() and running == []
    assert half_written(out) == []

    # 2. Past the preflight (as when something else fills the disk meanwhile): the first checkpoint runs out of
    #    space mid-member; its run ends FAILED, nothing of it is registered, nothing half-written is left.
    monkeypatch.setattr("mllm.finetune.member_bytes", lambda base_dir: 0)
    code, line = finetune(tmp_path, out, capfd)
    assert code == 2 and "\n" not in line, line
    assert line.startswith(f"mllm: error: output_dir {out}: no space left on device writing "
                           "members/shard-0/checkpoints/step-") and line.endswith(fix), line
    assert "while fine-tuning shard-0 (" in line and " free)" in line, line
    versions, running, status = store_state(db)
    assert versions == {"tiny-base/1"}, versions  # the complete base, reused by the rerun
    assert running == [] and status["shard-0"] == "FAILED" and status["finetune"] == "FAILED", status
    assert half_written(out) == [] and not (out / "members" / "shard-0" / "final").exists()
    monkeypatch.undo()

    # 3. Space freed: the rerun completes, reusing the base.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    code, line = finetune(tmp_path, out, capfd)
    assert code == 0, line
    versions, running, status = store_state(db)
    assert versions == {"tiny-base/1", *(f"tiny-finetuned/{i}" for i in range(1, 5))}, versions
    assert running == [] and half_written(out) == []
