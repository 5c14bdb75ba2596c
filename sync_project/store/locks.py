"""The batch lock: one write transaction at a time per (sync, connection), in every process.

It is held for one transaction only, so batches of one (sync, connection) are applied one after
another and the read-classify-write of a merge is atomic; the database releases it with the
transaction, so a crash never leaves it behind. Who may write a partition at all, across a whole
run, is a fenced lease (:mod:`sync_project.store.leases`), which every such transaction checks
right after taking this lock.
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Connection


def lock_ident(kind: str, sync: str, connection_id: str) -> str:
    """What names a lock, unambiguously (JSON, so no separator can be forged by a name)."""
    return json.dumps([kind, sync, connection_id], separators=(",", ":"))


#: The advisory lock key of an ident *in this records table*. Advisory locks are database-wide, so
#: the key includes the table's OID: stores in two schemas of one database (staging and production,
#: or parallel test runs) must not block each other's writers.
_KEY_SQL = "hashtextextended(:ident || '@' || CAST(CAST('records' AS regclass) AS oid)::text, 0)"


def take_batch_lock(conn: Connection, sync: str, connection_id: str) -> None:
    """Serialise this transaction with every other writer of (sync, connection).

    On SQLite the transaction already holds the database write lock (BEGIN IMMEDIATE).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(f"SELECT pg_advisory_xact_lock({_KEY_SQL})"), {"ident": lock_ident("batch", sync, connection_id)}
        )
