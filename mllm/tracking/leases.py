"""Run leases: every open run of this process carries a heartbeat, so a run whose process died anywhere (another
host, another boot) can be ended by whichever mllm process looks next.

    with lease(client, run_id, every_s=30):        # tag mllm.heartbeat = now, refreshed every 30 s until exit
        ...
    expired(run, lease_s=300)                       # True: heartbeat older than the lease (its process is gone)

One daemon thread per process refreshes the heartbeats of all its open runs (a search opens a run per trial: they
share the thread). A beat that fails (the tracking server is down for a while) is retried at the next one; the lease
(tracking.lease_s, several heartbeats) is what a run may go without one before another process may end it. A run
without a heartbeat tag (one of an older mllm) is never ended by its lease: only the same-host check of
`mllm.tracking.runs.end_orphaned_runs` applies to it. Heartbeats are the writers' clocks: hosts whose clocks differ
by more than the lease minus the interval would misjudge each other, which is why the default lease is generous.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HEARTBEAT_TAG = "mllm.heartbeat"  # seconds since the epoch, the owner's clock, refreshed every tracking.heartbeat_s


class _Heart:
    """The process's heartbeat thread: beats for every open run, started on first use, idle when none is open."""

    def __init__(self) -> None:
        self.runs: dict[str, tuple[Any, float]] = {}  # run id -> (client, interval)
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, client: Any, run_id: str, every_s: float) -> None:
        beat(client, run_id)
        with self.lock:
            self.runs[run_id] = (client, every_s)
            self.last[run_id] = time.time()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="mllm-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)
            self.last.pop(run_id, None)

    def _loop(self) -> None:
        while True:
            with self.lock:
                due = [(r, c) for r, (c, every) in self.runs.items() if time.time() - self.last[r] >= every]
                wait = min((every for _, every in self.runs.values()), default=5.0)
            for run_id, client in due:
                if beat(client, run_id):
                    with self.lock:
                        if run_id in self.last:
                            self.last[run_id] = time.time()
            self.wake.wait(max(0.2, wait / 4))


_HEART = _Heart()


def beat(client: Any, run_id: str) -> bool:
    """Write the heartbeat now; False when the tracking store cannot be reached (retried at the next beat)."""
    try:
        client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.1f}")
        return True
    except Exception:  # noqa: BLE001 - an outage must not kill the stage: its lease covers several missed beats
        return False


@contextmanager
def lease(client: Any, run_id: str, every_s: float) -> Iterator[None]:
    """Keep `run_id`'s heartbeat fresh while the block runs."""
    _HEART.add(client, run_id, every_s)
    try:
        yield
    finally:
        _HEART.remove(run_id)


def heartbeat_age(run: Any, now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat (None: it has none)."""
    value = run.data.tags.get(HEARTBEAT_TAG)
    try:
        return (time.time() if now is None else now) - float(value)
    except (TypeError, ValueError):
        return None


def expired(run: Any, lease_s: float, now: float | None = None) -> bool:
    """Whether the run's lease ran out: a heartbeat older than `lease_s` (never for a run without heartbeats)."""
    age = heartbeat_age(run, now)
    return age is not None and age > lease_s
