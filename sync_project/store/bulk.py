"""The merge's hot statements, on the raw DBAPI cursor of the writer's transaction.

A merge page is thousands of rows. Through SQLAlchemy each row pays for parameter dictionaries and
type processing, and on psycopg2 an ``INSERT ... ON CONFLICT`` without RETURNING falls back to
``cursor.executemany`` (one round trip per row). Here, on Postgres, a page is read with one
statement that looks each key up by primary key, and written with one ``COPY`` into a
session-private staging table plus one ``INSERT ... SELECT ... ON CONFLICT``; other updates locate
their rows by primary key per key. A save may also write first (``save_unread``): the guard moves
into the upsert's ``WHERE`` and only the rows it left are read afterwards. SQLite gets
``executemany`` on the sqlite3 cursor (one prepared statement, in-process). Everything runs inside
the caller's SQLAlchemy transaction, under its batch lock.

Timestamps on SQLite are written as the exact text SQLAlchemy's ``DateTime`` writes (naive UTC,
``YYYY-MM-DD HH:MM:SS.ffffff``), so rows written here and through :mod:`sync_project.store.schema`
sort and compare alike.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from sync_project.store.merge import Incoming, MergeStrategy, Stored, Write, guard_sql
from sync_project.store.schema import records

#: Keys per read or marking statement: well under SQLite's 32,766 bound-parameter limit.
KEY_CHUNK = 5000

_TABLE = records.name
_UTC = timezone.utc


class SaveUnread(Protocol):
    """The set-based execution of a save: the guarded upsert, without reading first. Returns
    (external id, last action, whether the row is new) for each row it wrote."""

    def __call__(
        self,
        items: Sequence[Incoming],
        now: datetime,
        strategy: MergeStrategy,
        fetched_at: datetime,
        seen_by_run: str | None,
    ) -> list[tuple[str, str, bool]]: ...


class BulkWriter(Protocol):
    """What :class:`~sync_project.store.records.RecordWriter` needs from a backend: the Python
    plan's execution (read state, then write what :func:`~sync_project.store.merge.plan_batch`
    decided) and, where the backend has one, the set-based one (``save_unread``, else None)."""

    @property
    def save_unread(self) -> SaveUnread | None: ...

    def read_state(self, keys: Sequence[str], *, with_data: bool, with_modified: bool) -> dict[str, Stored]: ...

    def upsert(self, writes: Sequence[Write], now: datetime, seen_by_run: str | None) -> None: ...

    def tombstone(self, writes: Sequence[Write], now: datetime) -> None: ...

    def mark_seen(self, keys: Sequence[str], run_id: str) -> None: ...

    def advance_source(self, stamps: Sequence[tuple[str, datetime]]) -> None: ...


def bulk_writer(conn: Connection, sync: str, connection_id: str) -> BulkWriter:
    if conn.dialect.name == "postgresql":
        return PostgresBulk(conn, sync, connection_id)
    return SqliteBulk(conn, sync, connection_id)


def _state_columns(with_data: bool, with_modified: bool) -> str:
    """external_id, data_hash, source_updated_at, last_modified_at or NULL, deleted, data or NULL:
    each timestamp column costs the driver a parse per row, so only what the rules use is read."""
    modified = "last_modified_at" if with_modified else "NULL"
    data = "data" if with_data else "NULL"
    return f"external_id, data_hash, source_updated_at, {modified}, deleted_at IS NOT NULL, {data}"


_UPSERT_COLUMNS = (
    "sync, connection_id, external_id, data, data_hash, source_updated_at, "
    "first_seen_at, last_modified_at, deleted_at, last_action, seen_by_run"
)
_CONFLICT_SET = """
    ON CONFLICT (sync, connection_id, external_id) DO UPDATE SET
        data = excluded.data,
        data_hash = excluded.data_hash,
        source_updated_at = excluded.source_updated_at,
        last_modified_at = excluded.last_modified_at,
        deleted_at = {deleted_at},
        last_action = {last_action},
        seen_by_run = COALESCE(excluded.seen_by_run, {table}.seen_by_run)
"""
_ON_CONFLICT = _CONFLICT_SET.format(deleted_at="excluded.deleted_at", last_action="excluded.last_action", table=_TABLE)
#: A save over a tombstone restores the record: "added" again, as plan_batch counts it.
_ON_CONFLICT_GUARDED = _CONFLICT_SET.format(
    deleted_at="NULL",
    last_action=f"CASE WHEN {_TABLE}.deleted_at IS NULL THEN 'updated' ELSE 'added' END",
    table=_TABLE,
)
#: Each strategy's guard (merge.GUARDS, the one definition) as the condition under which a stored
#: row may be overwritten by the incoming copy (``excluded``).
_GUARDS = {strategy: guard_sql(strategy, _TABLE) for strategy in MergeStrategy}


class PostgresBulk:
    def __init__(self, conn: Connection, sync: str, connection_id: str) -> None:
        self._conn = conn
        self._dbapi = conn.connection.dbapi_connection
        self._sync = sync
        self._connection_id = connection_id
        #: Whether this transaction already made sure the staging table exists. It is created in
        #: the transaction that uses it (so a pooler that hands each transaction another server
        #: session still finds it), once: on a loopback round trip that is half a millisecond
        #: per merge, and a webhook batch makes several small merges.
        self._stage_ready = False
        self._statistics_checked = False

    def _cursor(self) -> Any:
        assert self._dbapi is not None
        return self._dbapi.cursor()

    def _check_statistics(self) -> None:
        if not self._statistics_checked:
            self._statistics_checked = True
            ensure_statistics(self._conn)

    def read_state(self, keys: Sequence[str], *, with_data: bool, with_modified: bool) -> dict[str, Stored]:
        self._check_statistics()
        with self._cursor() as cursor:
            cursor.execute(read_state_sql(with_data, with_modified), self._params(keys=json.dumps(list(keys))))
            rows = cursor.fetchall()
        # psycopg2 answers timestamptz as aware datetimes: comparable as they are.
        return {row[0]: Stored(row[1], row[2], row[3], row[4], row[5]) for row in rows}

    def _params(self, **values: Any) -> dict[str, Any]:
        return {"sync": self._sync, "connection_id": self._connection_id, **values}

    def upsert(self, writes: Sequence[Write], now: datetime, seen_by_run: str | None) -> None:
        with self._cursor() as cursor:
            rows = ((w.key, w.data_json, w.data_hash, w.source_updated_at, w.deleted, w.last_action) for w in writes)
            self._stage(cursor, rows, now)
            cursor.execute(_UPSERT_STAGED, self._params(now=now, seen=seen_by_run))

    @property
    def save_unread(self) -> SaveUnread:
        return self._save_unread

    def _save_unread(
        self,
        items: Sequence[Incoming],
        now: datetime,
        strategy: MergeStrategy,
        fetched_at: datetime,
        seen_by_run: str | None,
    ) -> list[tuple[str, str, bool]]:
        """Save full records without reading their stored state first: one guarded upsert.

        Writes exactly the rows :func:`~sync_project.store.merge.plan_batch` would write for a
        save (new keys; stored rows the strategy's guard lets through whose content differs or
        that are tombstones) and returns each as (key, last_action, is_new). Rows it leaves are
        untouched but locked until commit; the caller reads and plans those. When most of a page
        is written (incremental polls, webhook changes, first loads), this saves the read of the
        whole page: the upsert looks every key up anyway.
        """
        # The upsert needs no statistics, but the reads to come do: checked here as well, a first
        # load that writes first has them gathered while the table is small (ANALYZE samples up to
        # 30,000 rows: ~0.4 s at 200k rows, charged to whichever read came first).
        self._check_statistics()
        with self._cursor() as cursor:
            rows = ((i.key, i.data_json, i.data_hash, i.source_updated_at, False, "added") for i in items)
            self._stage(cursor, rows, now)
            cursor.execute(_SAVE_UNREAD[strategy], self._params(now=now, seen=seen_by_run, fetched_at=fetched_at))
            return cursor.fetchall()

    def _stage(
        self, cursor: Any, rows: Iterable[tuple[str, str | None, str | None, datetime | None, bool, str]], now: datetime
    ) -> None:
        """COPY rows of (key, data, hash, source_updated_at, deleted, last_action) into the staging
        table: the server parses COPY text far faster than thousands of VALUES literals, and Python
        builds one line per row instead of quoting every value through mogrify."""
        if not self._stage_ready:
            cursor.execute(_CREATE_STAGE)
            self._stage_ready = True
        deleted = now.isoformat()
        lines = (
            "\t".join(
                (
                    _copy_text(key),
                    data_json.replace("\\", "\\\\") if data_json else "\\N",
                    data_hash or "\\N",
                    "\\N" if source is None else source.isoformat(),
                    deleted if is_deleted else "\\N",
                    last_action,
                )
            )
            + "\n"
            for key, data_json, data_hash, source, is_deleted, last_action in rows
        )
        cursor.copy_expert(f"COPY {_STAGE} FROM STDIN", CopyText(lines), size=_COPY_READ)

    def tombstone(self, writes: Sequence[Write], now: datetime) -> None:
        self._update_located(
            "deleted_at = %(now)s, last_modified_at = %(now)s, last_action = 'deleted', source_updated_at = v.source",
            [(w.key, w.source_updated_at) for w in writes],
            now=now,
        )

    def advance_source(self, stamps: Sequence[tuple[str, datetime]]) -> None:
        self._update_located("source_updated_at = v.source", stamps)

    def _update_located(self, assignments: str, sources: Sequence[tuple[str, datetime | None]], **params: Any) -> None:
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
                f"SELECT r.ctid FROM {_KEYS} CROSS JOIN LATERAL ({_ONE_ROW.format(columns='ctid')}) AS r))",
                self._params(keys=json.dumps(list(keys)), run_id=run_id),
            )


def read_state_sql(with_data: bool, with_modified: bool) -> str:
    """The page read: parameters ``keys`` (a JSON array of strings), ``sync`` and ``connection_id``."""
    columns = ", ".join(
        name if name == "NULL" else f"r.{name}" for name in _state_columns(with_data, with_modified).split(", ")
    )
    return f"SELECT {columns} FROM {_KEYS} CROSS JOIN LATERAL ({_ONE_ROW.format(columns='*')}) AS r"


_HAS_STATISTICS = "records_has_statistics"


def ensure_statistics(conn: Connection) -> None:
    """Analyze the records table if it holds rows but Postgres has no statistics on it yet.

    Without column statistics (a table never analyzed, e.g. autovacuum off or within its first
    minute, or analyzed while empty), the planner assumes any (sync, connection) is a sliver of the
    table, and the per-key lookups below may pick the feed index, whose ``external_id`` is not a
    boundary column: every key then scans the whole sync, and a first full load turns quadratic
    (measured: a 200k-record load stalled for minutes). Statistics from even one page fix the
    choice for good. Checked once per pooled connection until statistics exist.
    """
    info = conn.connection.info
    if info.get(_HAS_STATISTICS):
        return
    dbapi: Any = conn.connection.dbapi_connection  # psycopg2's: its cursor is a context manager
    assert dbapi is not None
    with dbapi.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stats s JOIN pg_class c ON c.relname = s.tablename "
            "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname "
            f"WHERE c.oid = '{_TABLE}'::regclass AND s.attname = 'sync'), "
            f"EXISTS (SELECT 1 FROM {_TABLE})"
        )
        has_statistics, has_rows = cursor.fetchone()
    if has_statistics:
        info[_HAS_STATISTICS] = True
        return
    if has_rows:
        # On a connection of its own, in autocommit: ANALYZE's lock is then held for moments,
        # not for the rest of this writer's transaction. It sees what earlier writers committed.
        with conn.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as analyzer:
            analyzer.exec_driver_sql(f"ANALYZE {_TABLE}")


#: A page's keys, passed as one JSON array: one string to quote and parse instead of thousands of
#: array literals (measured: 11% off a page read).
_KEYS = "json_array_elements_text(%(keys)s::json) AS k(id)"

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
#: The stage's rows into records (the INSERT empties the stage as it reads it, so the next merge of
#: this transaction finds it empty without a TRUNCATE: a catalog change and another round trip).
_INSERT_STAGED = (
    f"WITH staged AS (DELETE FROM {_STAGE} RETURNING *) INSERT INTO {_TABLE} ({_UPSERT_COLUMNS}) "
    "SELECT %(sync)s, %(connection_id)s, external_id, data, data_hash, source_updated_at, "
    "%(now)s, %(now)s, {deleted_at}, {last_action}, %(seen)s FROM staged"
)
_UPSERT_STAGED = _INSERT_STAGED.format(deleted_at="deleted_at", last_action="last_action") + _ON_CONFLICT
#: Per strategy: the guarded upsert of save_unread. A row is overwritten when the guard lets it
#: through and it is a tombstone or its content differs (plan_batch's rules for a save).
_SAVE_UNREAD = {
    strategy: _INSERT_STAGED.format(deleted_at="NULL", last_action="'added'")
    + _ON_CONFLICT_GUARDED
    + f"WHERE {guard} AND ({_TABLE}.deleted_at IS NOT NULL OR {_TABLE}.data_hash IS DISTINCT FROM excluded.data_hash) "
    "RETURNING external_id, last_action, first_seen_at = %(now)s"
    for strategy, guard in _GUARDS.items()
}
#: Characters psycopg2 asks CopyText for at a time: each read takes the GIL back once.
_COPY_READ = 65536


class CopyText(io.TextIOBase):
    """COPY text formatted as psycopg2 reads it, so the server parses and stores a page's first
    rows while Python is still formatting the rest (measured: 5% off a 5,000-record change page).
    Chunks may end mid-line: COPY data is one stream, however the messages carrying it are cut."""

    def __init__(self, lines: Iterable[str]) -> None:
        super().__init__()
        self._lines = iter(lines)
        self._rest = ""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        if size is None or size < 0:
            text, self._rest = self._rest + "".join(self._lines), ""
            return text
        parts = [self._rest]
        length = len(self._rest)
        for line in self._lines:
            parts.append(line)
            length += len(line)
            if length >= size:
                break
        text = "".join(parts)
        self._rest = text[size:]
        return text[:size]


_COPY_SPECIALS = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """``value`` as a field of COPY's text format (canonical JSON never holds raw control
    characters, so record data only needs its backslashes doubled; keys may hold anything)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_SPECIALS)
    return value


class SqliteBulk:
    #: In-process, a read costs SQLite no round trip and no parse: it always reads first, and has
    #: no set-based execution.
    save_unread: None = None

    def __init__(self, conn: Connection, sync: str, connection_id: str) -> None:
        self._dbapi = conn.connection.dbapi_connection
        self._sync = sync
        self._connection_id = connection_id

    def read_state(self, keys: Sequence[str], *, with_data: bool, with_modified: bool) -> dict[str, Stored]:
        assert self._dbapi is not None
        state: dict[str, Stored] = {}
        columns = _state_columns(with_data, with_modified)
        for start in range(0, len(keys), KEY_CHUNK):
            chunk = list(keys[start : start + KEY_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = self._dbapi.execute(
                f"SELECT {columns} FROM {_TABLE} WHERE sync = ? AND connection_id = ? AND external_id IN ({marks})",
                (self._sync, self._connection_id, *chunk),
            ).fetchall()
            # A page's rows share their last_modified_at (one stamp per write): parse each text once.
            parsed: dict[str | None, datetime | None] = {None: None}
            for key, data_hash, source, modified, deleted, data in rows:
                times = []
                for text in (source, modified):
                    value = parsed.get(text, _MISSING)
                    if value is _MISSING:
                        value = parsed[text] = datetime.fromisoformat(text + "+00:00")
                    times.append(value)
                state[key] = Stored(data_hash, times[0], times[1], bool(deleted), data)
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
            [(stamp, stamp, to_sqlite(w.source_updated_at), self._sync, self._connection_id, w.key) for w in writes],
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
    """The text SQLAlchemy's SQLite ``DateTime`` stores for an aware datetime: naive UTC,
    ``YYYY-MM-DD HH:MM:SS.ffffff`` (always six digits, so text order is time order)."""
    if value is None:
        return None
    return value.astimezone(_UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


_MISSING: Any = object()
