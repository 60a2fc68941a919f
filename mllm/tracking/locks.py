"""A named mutex in a shared SQL database, for decisions several processes or machines must not interleave
(moving the `champion` alias: registry alias updates are last-writer-wins).

    with db_lock("sqlite:///optuna.db", "drugscom-champion"):
        ...  # read the champion, compare, move the alias

The lock is a row in `mllm_locks` (primary key = name): inserting it acquires, deleting it releases. The
database is the search storage, which every promoter already shares (SQLite on one machine, PostgreSQL
across machines). A holder that died leaves its row: a contender on the holder's host removes it at once when the
holder's pid is gone (`mllm.owner`: host, boot id, pid); from another host, once it is older than `stale_s`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mllm.basics import redact
from mllm.errors import MllmError
from mllm.tracking.runs import dead_here
from mllm.tracking.runs import owner as process_owner


@contextmanager
def db_lock(url: str, name: str, timeout_s: float = 600, stale_s: float = 900) -> Iterator[None]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    table = sa.Table("mllm_locks", sa.MetaData(), sa.Column("name", sa.String(255), primary_key=True),
                     sa.Column("owner", sa.String(255), nullable=False),
                     sa.Column("acquired", sa.Float, nullable=False))
    owner = f"{process_owner()}:{uuid.uuid4().hex[:8]}"
    try:
        table.metadata.create_all(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError as e:
        if not _has_table(engine):  # (it may have been created by another process at the same moment)
            raise MllmError(f"cannot use {redact(url)} for locking ({redact(str(e)).splitlines()[0][:200]})",
                            "check search.storage") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with engine.begin() as conn:
                conn.execute(table.insert().values(name=name, owner=owner, acquired=time.time()))
            break
        except sa.exc.IntegrityError:  # held by someone else: gone (its pid dead on this host), or stale?
            with engine.begin() as conn:
                holder = conn.execute(sa.select(table.c.owner).where(table.c.name == name)).scalar()
                if holder is not None and dead_here(holder.rsplit(":", 1)[0]):
                    conn.execute(table.delete().where(table.c.name == name, table.c.owner == holder))
                conn.execute(table.delete().where(table.c.name == name, table.c.acquired < time.time() - stale_s))
        except sa.exc.OperationalError:  # SQLite busy: try again
            pass
        if time.monotonic() > deadline:
            raise MllmError(f"lock {name} is held by another process for over {timeout_s:.0f} s",
                            "wait for the other promoter, or delete its row from mllm_locks if it died")
        time.sleep(0.2)
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(table.delete().where(table.c.name == name, table.c.owner == owner))
        engine.dispose()


def _has_table(engine) -> bool:
    import sqlalchemy as sa

    try:
        return sa.inspect(engine).has_table("mllm_locks")
    except sa.exc.SQLAlchemyError:
        return False
