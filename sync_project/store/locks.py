"""Per-(sync, connection) locks held in the store itself, so they bind every process.

Two locks, two lifetimes:
- the *batch* lock, held for one write transaction: batches of one (sync, connection) are applied
  one after another and the read-classify-write of a merge is atomic;
- the *run* lock, held for a whole Dagster run: at most one run per (sync, connection), also for
  launches that bypass Dagster's run queue. Both are released by the database or the kernel when
  the holder dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from sync_project.store.errors import SyncAlreadyRunningError


def lock_ident(kind: str, sync: str, connection_id: str) -> str:
    """What names a lock, unambiguously (JSON, so no separator can be forged by a name)."""
    return json.dumps([kind, sync, connection_id], separators=(",", ":"))


#: The advisory lock key of an ident *in this records table*. Advisory locks are database-wide, so
#: the key includes the table's OID: stores in two schemas of one database (staging and production,
#: or parallel test runs) must not block each other's writers or refuse each other's runs.
_KEY_SQL = "hashtextextended(:ident || '@' || CAST(CAST('records' AS regclass) AS oid)::text, 0)"


def take_batch_lock(conn: Connection, sync: str, connection_id: str) -> None:
    """Serialise this transaction with every other writer of (sync, connection).

    On SQLite the transaction already holds the database write lock (BEGIN IMMEDIATE).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({_KEY_SQL})"), {"ident": lock_ident("batch", sync, connection_id)})


@contextmanager
def run_lock(engine: Engine, sync: str, connection_id: str) -> Iterator[None]:
    """Hold the run lock of (sync, connection) or raise :class:`SyncAlreadyRunningError` at once."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = conn.execute(text(f"SELECT {_KEY_SQL}"), {"ident": lock_ident("run", sync, connection_id)}).scalar()
            if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                raise SyncAlreadyRunningError(f"another run is syncing {sync} for connection {connection_id!r}")
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    with _file_lock(_sqlite_lock_path(engine, sync, connection_id), sync, connection_id):
        yield


def _sqlite_lock_path(engine: Engine, sync: str, connection_id: str) -> Path:
    database = engine.url.database or ""
    if not database or database == ":memory:":
        raise ValueError("run locks need a file-backed SQLite database")
    name = hashlib.blake2b(f"{sync}\0{connection_id}".encode(), digest_size=12).hexdigest()
    return Path(f"{database}.locks") / f"{name}.lock"


@contextmanager
def _file_lock(path: Path, sync: str, connection_id: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SyncAlreadyRunningError(
                f"another run is syncing {sync} for connection {connection_id!r}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
