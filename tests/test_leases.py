"""Run leases: every open run refreshes a heartbeat, and a RUNNING run whose heartbeat is older than the lease is
ended KILLED by the next mllm process, on whatever host it started; a run with a fresh heartbeat never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mllm.errors import ConfigError
from mllm.tracking.leases import HEARTBEAT_TAG, expired, heartbeat_age

from .conftest import REPO, tiny_cfg

# A process that opens a run in the tiny experiment (as host $MLLM_HOST), prints its id, then waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from mllm.config import load_config
    from mllm.tracking.store import Store
    cfg = load_config({tiny!r}, {overrides!r})
    with Store(cfg).run("holder", stage="lease-test") as run:
        print(run.id, flush=True)
        time.sleep(600)
""")


def _holder(tmp: Path, host: str, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    code = HOLDER.format(repo=str(REPO), tiny=str(REPO / "configs" / "tiny.yaml"), overrides=overrides)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp,
                            env={**os.environ, "MLLM_HOST": host})
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert len(line) == 32, line
    return proc, line


class _Run:
    def __init__(self, tags: dict[str, str]) -> None:
        self.data = type("D", (), {"tags": tags})()


def test_expiry_reads_the_heartbeat_and_never_ends_a_run_without_one() -> None:
    now = 1_000_000.0
    assert heartbeat_age(_Run({HEARTBEAT_TAG: str(now - 12)}), now) == pytest.approx(12)
    assert expired(_Run({HEARTBEAT_TAG: str(now - 301)}), 300, now)
    assert not expired(_Run({HEARTBEAT_TAG: str(now - 299)}), 300, now)
    assert not expired(_Run({}), 300, now) and not expired(_Run({HEARTBEAT_TAG: "soon"}), 300, now)


def test_a_lease_shorter_than_two_heartbeats_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.lease_s=3 is under two heartbeats"):
        tiny_cfg(tmp_path, "tracking.heartbeat_s=2", "tracking.lease_s=3")


@pytest.mark.slow
def test_runs_of_a_dead_host_expire_and_a_live_hosts_run_does_not(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from mllm.tracking import runs
    from mllm.tracking.store import Store

    overrides = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"output_dir={tmp_path}/out",
                 "tracking.heartbeat_s=1", "tracking.lease_s=4"]
    dead, dead_run = _holder(tmp_path, "host-a", overrides)
    live, live_run = _holder(tmp_path, "host-b", overrides)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        first = float(client.get_run(live_run).data.tags[HEARTBEAT_TAG])
        deadline = time.time() + 60
        while float(client.get_run(live_run).data.tags[HEARTBEAT_TAG]) <= first:  # the heartbeat is refreshed
            assert time.time() < deadline, "no heartbeat refresh within 60 s"
            time.sleep(0.5)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        # Host a's run outlives its process: its last heartbeat is pushed back past the lease (instead of waiting).
        client.set_tag(dead_run, HEARTBEAT_TAG, f"{time.time() - 10:.1f}")
        runs._swept.clear()  # this test process sweeps as a third host
        os.environ["MLLM_HOST"] = "host-c"
        runs._owner_prefix.cache_clear()
        with Store(tiny_cfg(tmp_path, "tracking.heartbeat_s=1", "tracking.lease_s=4")).run("sweeper", stage="x"):
            pass
        ended = client.get_run(dead_run)
        assert ended.info.status == "KILLED"
        assert ended.data.tags["mllm.ended_by"].startswith("lease expired: heartbeat")
        assert client.get_run(live_run).info.status == "RUNNING"  # a fresh heartbeat on another host: alive
    finally:
        os.environ.pop("MLLM_HOST", None)
        runs._owner_prefix.cache_clear()
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=60)
    assert client.get_run(live_run).info.status == "KILLED"  # SIGTERM: it ended its own run


def test_a_lock_whose_holder_died_on_this_host_is_taken_at_once(tmp_path: Path) -> None:
    """A promoter SIGKILLed inside the champion lock leaves its row; the next one must not wait `stale_s` for it
    (found by scripts/chaos.py), while a live holder's lock, or one of another host, still holds."""
    import sqlalchemy as sa

    from mllm.errors import MllmError
    from mllm.tracking.locks import db_lock
    from mllm.tracking.runs import owner

    url = f"sqlite:///{tmp_path / 'locks.db'}"
    with db_lock(url, "warm-up", timeout_s=5):  # creates the table
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = owner().rsplit("/", 1)[0] + "/" + dead.stdout.strip()
    engine = sa.create_engine(url)
    rows = [("dead", f"{gone}:abcd1234"), ("live", f"{owner()}:abcd1234"), ("elsewhere", "otherhost/boot/1:abcd1234")]
    with engine.begin() as conn:
        for name, holder in rows:
            conn.execute(sa.text("INSERT INTO mllm_locks VALUES (:n, :o, :t)"), {"n": name, "o": holder,
                                                                                 "t": time.time()})
    start = time.monotonic()
    with db_lock(url, "dead", timeout_s=5):
        assert time.monotonic() - start < 5
    for name in ("live", "elsewhere"):
        with pytest.raises(MllmError, match=f"lock {name} is held"):
            with db_lock(url, name, timeout_s=0.5):
                pass
