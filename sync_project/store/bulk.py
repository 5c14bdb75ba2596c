"""The merge's hot statements, on the raw DBAPI cursor of the writer's transaction.

A merge page is thousands of rows. Through SQLAlchemy each row pays for parameter dictionaries and
type processing, and on psycopg2 an ``INSERT ... ON CONFLICT`` without RETURNING falls back to
``cursor.executemany`` (one round trip per row). Here, on Postgres, a page is read with one
``external_id = ANY(array)`` and written with one ``COPY`` into a session-private staging table plus
one ``INSERT ... SELECT ... ON CONFLICT``; other updates locate their rows by primary key per key.
SQLite gets ``executemany`` on the sqlite3 cursor (one prepared statement, in-process). Everything
runs inside the caller's SQLAlchemy transaction, under its batch lock.

Timestamps on SQLite are written as the exact text SQLAlchemy's ``DateTime`` writes (naive UTC,
``YYYY-MM-DD HH:MM:SS.ffffff``), so rows written here and through :mod:`sync_project.store.schema`
sort and compare alike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from sync_project.store.merge import Stored, Write
from sync_project.store.schema import records

#: Keys per read or marking statement: well under SQLite's 32,766 bound-parameter limit.
KEY_CHUNK = 5000

_TABLE = records.name
_UTC = timezone.utc


class BulkWriter(Protocol):
    """What :class:`~sync_project.store.records.RecordWriter` needs from a backend."""

    def read_state(self, keys: Sequence[str], *, with_data: bool) -> dict[str, Stored]: ...

    def upsert(self, writes: Sequence[Write], now: datetime, seen_by_run: str | None) -> None: ...

    def tombstone(self, writes: Sequence[Write], now: datetime) -> None: ...

    def mark_seen(self, keys: Sequence[str], run_id: str) -> None: ...

    def advance_source(self, stamps: Sequence[tuple[str, datetime]]) -> None: ...


def bulk_writer(conn: Connection, sync: str, connection_id: str) -> BulkWriter:
    if conn.dialect.name == "postgresql":
        return PostgresBulk(conn, sync, connection_id)
    return SqliteBulk(conn, sync, connection_id)


def _state_columns(with_data: bool) -> str:
    columns = "external_id, data_hash, source_updated_at, last_modified_at, deleted_at"
    return columns + ", data" if with_data else columns


_UPSERT_COLUMNS = (
    "sync, connection_id, external_id, data, data_hash, source_updated_at, "
    "first_seen_at, last_modified_at, deleted_at, last_action, seen_by_run"
)
_ON_CONFLICT = f"""
    ON CONFLICT (sync, connection_id, external_id) DO UPDATE SET
        data = excluded.data,
        data_hash = excluded.data_hash,
        source_updated_at = excluded.source_updated_at,
        last_modified_at = excluded.last_modified_at,
        deleted_at = excluded.deleted_at,
        last_action = excluded.last_action,
        seen_by_run = COALESCE(excluded.seen_by_run, {_TABLE}.seen_by_run)
"""


class PostgresBulk:
    def __init__(self, conn: Connection, sync: str, connection_id: str) -> None:
        self._dbapi = conn.connection.dbapi_connection
        self._sync = sync
        self._connection_id = connection_id
        #: Whether this transaction already filled the staging table (which empties on commit).
        self._stage_used = False

    def _cursor(self) -> Any:
        assert self._dbapi is not None
        return self._dbapi.cursor()

    def read_state(self, keys: Sequence[str], *, with_data: bool) -> dict[str, Stored]:
        columns = ", ".join(f"r.{name}" for name in _state_columns(with_data).split(", "))
        with self._cursor() as cursor:
            cursor.execute(
                f"SELECT {columns} FROM unnest(%(keys)s::text[]) AS k(id) "
                f"CROSS JOIN LATERAL ({_ONE_ROW.format(columns='*')}) AS r",
                self._params(keys=list(keys)),
            )
            rows = cursor.fetchall()
        # psycopg2 answers timestamptz as aware datetimes: comparable as they are.
        if with_data:
            return {row[0]: Stored(row[1], row[2], row[3], row[4], row[5]) for row in rows}
        return {row[0]: Stored(row[1], row[2], row[3], row[4]) for row in rows}

    def _params(self, **values: Any) -> dict[str, Any]:
        return {"sync": self._sync, "connection_id": self._connection_id, **values}

    def upsert(self, writes: Sequence[Write], now: datetime, seen_by_run: str | None) -> None:
        # COPY into a session-private staging table, then one INSERT ... SELECT ... ON CONFLICT:
        # the server parses COPY text far faster than thousands of VALUES literals, and Python
        # builds one string instead of quoting every value through mogrify.
        with self._cursor() as cursor:
            cursor.execute(_CREATE_STAGE)
            if self._stage_used:
                cursor.execute(f"TRUNCATE {_STAGE}")
            self._stage_used = True
            deleted = now.isoformat()
            lines = [
                "\t".join(
                    (
                        _copy_text(w.key),
                        w.data_json.replace("\\", "\\\\") if w.data_json else "\\N",
                        w.data_hash or "\\N",
                        "\\N" if w.source_updated_at is None else w.source_updated_at.isoformat(),
                        deleted if w.deleted else "\\N",
                        w.last_action,
                    )
                )
                for w in writes
            ]
            lines.append("")
            cursor.copy_expert(f"COPY {_STAGE} FROM STDIN", io.StringIO("\n".join(lines)))
            cursor.execute(
                f"INSERT INTO {_TABLE} ({_UPSERT_COLUMNS}) "
                "SELECT %(sync)s, %(connection_id)s, external_id, data, data_hash, source_updated_at, "
                f"%(now)s, %(now)s, deleted_at, last_action, %(seen)s FROM {_STAGE} {_ON_CONFLICT}",
                {"sync": self._sync, "connection_id": self._connection_id, "now": now, "seen": seen_by_run},
            )

    def tombstone(self, writes: Sequence[Write], now: datetime) -> None:
        self._update_located(
            "deleted_at = %(now)s, last_modified_at = %(now)s, last_action = 'deleted', source_updated_at = v.source",
            [(w.key, w.source_updated_at) for w in writes],
            now=now,
        )

    def advance_source(self, stamps: Sequence[tuple[str, datetime]]) -> None:
        self._update_located("source_updated_at = v.source", stamps)

    def _update_located(
        self, assignments: str, sources: Sequence[tuple[str, datetime | None]], **params: Any
    ) -> None:
        """``UPDATE ... SET {assignments}`` on the rows of the given keys, each with its ``v.source``."""
        with self._cursor() as cursor:
            cursor.execute(
                f"UPDATE {_TABLE} AS t SET {assignments} FROM ("
                "SELECT r.ctid AS row_id, k.source "
                "FROM unnest(%(keys)s::text[], %(sources)s::timestamptz[]) AS k(id, source) "
                f"CROSS JOIN LATERAL ({_ONE_ROW.format(columns='ctid')}) AS r"
                ") AS v WHERE t.ctid = v.row_id",
                self._params(
                    keys=[key for key, _ in sources],
                    sources=[None if source is None else source.isoformat() for _, source in sources],
                    **params,
                ),
            )

    def mark_seen(self, keys: Sequence[str], run_id: str) -> None:
        with self._cursor() as cursor:
            cursor.execute(
                f"UPDATE {_TABLE} SET seen_by_run = %(run_id)s WHERE ctid = ANY(ARRAY("
                "SELECT r.ctid FROM unnest(%(keys)s::text[]) AS k(id) "
                f"CROSS JOIN LATERAL ({_ONE_ROW.format(columns='ctid')}) AS r))",
                self._params(keys=list(keys), run_id=run_id),
            )


#: One key's row, found through the primary key. Joined LATERAL to the page's keys, it makes every
#: page statement a nested loop of index lookups: O(page), whatever the size of the sync. A plain
#: ``external_id = ANY(...)`` lets the planner scan every row of the (sync, connection) instead
#: once a page is a few percent of it (measured: 59 ms vs 18 ms at 100k rows), and a plain join on
#: the keys gets flattened into a hash join over the same scan; ``LIMIT 1`` keeps it a subquery.
_ONE_ROW = (
    "SELECT {columns} FROM " + _TABLE + " WHERE sync = %(sync)s AND connection_id = %(connection_id)s "
    "AND external_id = k.id LIMIT 1"
)


_STAGE = "sync_merge_stage"
_CREATE_STAGE = f"""
    CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (
        external_id text, data text, data_hash text, source_updated_at timestamptz,
        deleted_at timestamptz, last_action text
    ) ON COMMIT DELETE ROWS
"""
_COPY_SPECIALS = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """``value`` as a field of COPY's text format (canonical JSON never holds raw control
    characters, so record data only needs its backslashes doubled; keys may hold anything)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_SPECIALS)
    return value


class SqliteBulk:
    def __init__(self, conn: Connection, sync: str, connection_id: str) -> None:
        self._dbapi = conn.connection.dbapi_connection
        self._sync = sync
        self._connection_id = connection_id

    def read_state(self, keys: Sequence[str], *, with_data: bool) -> dict[str, Stored]:
        assert self._dbapi is not None
        state: dict[str, Stored] = {}
        for start in range(0, len(keys), KEY_CHUNK):
            chunk = list(keys[start : start + KEY_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = self._dbapi.execute(
                f"SELECT {_state_columns(with_data)} FROM {_TABLE} "
                f"WHERE sync = ? AND connection_id = ? AND external_id IN ({marks})",
                (self._sync, self._connection_id, *chunk),
            ).fetchall()
            for row in rows:
                state[row[0]] = Stored(
                    row[1],
                    _from_sqlite(row[2]),
                    _from_sqlite(row[3]),  # type: ignore[arg-type]  # NOT NULL column
                    _from_sqlite(row[4]),
                    row[5] if with_data else None,
                )
        return state

    def upsert(self, writes: Sequence[Write], now: datetime, seen_by_run: str | None) -> None:
        assert self._dbapi is not None
        stamp = to_sqlite(now)
        sync, connection_id = self._sync, self._connection_id
        self._dbapi.executemany(
            f"INSERT INTO {_TABLE} ({_UPSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) {_ON_CONFLICT}",
            [
                (
                    sync,
                    connection_id,
                    w.key,
                    w.data_json,
                    w.data_hash,
                    to_sqlite(w.source_updated_at),
                    stamp,
                    stamp,
                    stamp if w.deleted else None,
                    w.last_action,
                    seen_by_run,
                )
                for w in writes
            ],
        )

    def tombstone(self, writes: Sequence[Write], now: datetime) -> None:
        assert self._dbapi is not None
        stamp = to_sqlite(now)
        self._dbapi.executemany(
            f"UPDATE {_TABLE} SET deleted_at = ?, last_modified_at = ?, last_action = 'deleted', "
            "source_updated_at = ? WHERE sync = ? AND connection_id = ? AND external_id = ?",
            [
                (stamp, stamp, to_sqlite(w.source_updated_at), self._sync, self._connection_id, w.key)
                for w in writes
            ],
        )

    def advance_source(self, stamps: Sequence[tuple[str, datetime]]) -> None:
        assert self._dbapi is not None
        self._dbapi.executemany(
            f"UPDATE {_TABLE} SET source_updated_at = ? WHERE sync = ? AND connection_id = ? AND external_id = ?",
            [(to_sqlite(source), self._sync, self._connection_id, key) for key, source in stamps],
        )

    def mark_seen(self, keys: Sequence[str], run_id: str) -> None:
        assert self._dbapi is not None
        for start in range(0, len(keys), KEY_CHUNK):
            chunk = list(keys[start : start + KEY_CHUNK])
            marks = ",".join("?" * len(chunk))
            self._dbapi.execute(
                f"UPDATE {_TABLE} SET seen_by_run = ? "
                f"WHERE sync = ? AND connection_id = ? AND external_id IN ({marks})",
                (run_id, self._sync, self._connection_id, *chunk),
            )


def to_sqlite(value: datetime | None) -> str | None:
    """The text SQLAlchemy's SQLite ``DateTime`` stores for an aware datetime (as naive UTC)."""
    if value is None:
        return None
    utc = value.astimezone(_UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} "
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}"
    )


def _from_sqlite(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=_UTC)
