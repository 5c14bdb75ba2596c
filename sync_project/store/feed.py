"""Reading records: the change feed (keyset pages with an opaque cursor) and pandas DataFrames.

Writers of one (sync, connection) are serialised and stamp ``last_modified_at`` strictly
increasing in commit order, each entering its stamp and ids in ``feed_entries``, so paging by
``(last_modified_at, external_id)`` never skips a change made while a consumer pages: a record
changed after the consumer passed it comes back, later, with its new content (a record can therefore
appear more than once; consumers upsert by id).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection

from sync_project.store.errors import StoreError
from sync_project.store.resets import FeedReset, removal_after
from sync_project.store.schema import UtcDateTime, feed_entries, records

if TYPE_CHECKING:  # pandas costs 0.5 s of CPU to import: only the readers that build frames pay it
    import pandas as pd

ChangeAction = Literal["added", "updated", "deleted"]
MAX_PAGE = 10_000
METADATA_COLUMNS = (
    "_connection_id",
    "_id",
    "_last_action",
    "_first_seen_at",
    "_last_modified_at",
    "_source_updated_at",
    "_deleted_at",
)


class InvalidCursorError(StoreError, ValueError):
    pass


class Change(BaseModel):
    """One record as the change feed shows it."""

    id: str
    connection_id: str
    data: dict[str, Any]
    last_action: ChangeAction
    first_seen_at: datetime
    last_modified_at: datetime
    source_updated_at: datetime | None = None
    deleted_at: datetime | None = None


class ChangePage(BaseModel):
    records: list[Change]
    #: Resume here next time; present even on the last page, so a consumer can poll for news.
    next_cursor: str | None
    has_more: bool
    #: Set when the connection's records were removed (``syncs reset --empty-records --remove``)
    #: after the cursor (or ``modified_after``): drop what you hold of it, then apply this page.
    reset: FeedReset | None = None


def encode_cursor(last_modified_at: datetime, external_id: str) -> str:
    raw = json.dumps([last_modified_at.isoformat(), external_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, key = json.loads(base64.urlsafe_b64decode(padded.encode()))
        parsed = datetime.fromisoformat(stamp)
        if parsed.tzinfo is None or not isinstance(key, str):
            raise ValueError("malformed")
        return parsed, key
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidCursorError(f"invalid cursor {cursor!r}") from None


_COLUMNS = (
    records.c.external_id,
    records.c.connection_id,
    records.c.data,
    records.c.last_action,
    records.c.first_seen_at,
    records.c.last_modified_at,
    records.c.source_updated_at,
    records.c.deleted_at,
)


def read_changes(
    conn: Connection,
    sync: str,
    connection_id: str,
    *,
    cursor: str | None = None,
    limit: int = 100,
    actions: Sequence[ChangeAction] | None = None,
    modified_after: datetime | None = None,
) -> ChangePage:
    """One page of changes after ``cursor``, in (last_modified_at, id) order.

    Walks ``feed_entries`` (one row per write, its ids) in stamp order and looks each id's record up
    by primary key; an id whose record has moved on to a later stamp is skipped here and shown at
    that stamp. Ids are ordered in Python (code-point order), so the order and the cursor's
    comparison do not depend on the database's collation.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    after: tuple[datetime, str] | None = decode_cursor(cursor) if cursor else None
    if modified_after is not None and (modified_after.tzinfo is None or modified_after.utcoffset() is None):
        raise ValueError(f"modified_after must be timezone-aware (got naive {modified_after.isoformat()})")
    if actions:
        unknown = set(actions) - {"added", "updated", "deleted"}
        if unknown:
            raise ValueError(f"unknown action filter {sorted(unknown)}; use added, updated or deleted")
    lookup = select(*_COLUMNS).where(records.c.sync == sync, records.c.connection_id == connection_id)
    if actions:
        lookup = lookup.where(records.c.last_action.in_(list(actions)))

    wanted = limit + 1  # one more than the page says whether there is more
    found: list[Change] = []
    for stamp, ids in _entries(conn, sync, connection_id, after, modified_after):
        start, size = 0, min(max(wanted - len(found), _LOOKUP_MIN), _LOOKUP_MAX)
        while start < len(ids) and len(found) < wanted:
            chunk = ids[start : start + size]
            start += size
            rows = conn.execute(
                lookup.where(records.c.external_id.in_(chunk), records.c.last_modified_at == stamp)
            ).all()
            found.extend(sorted((_change(row) for row in rows), key=lambda change: change.id))
            if len(rows) < len(chunk):  # ids moved on or filtered out: ask for more at once
                size = min(size * 2, _LOOKUP_MAX)
        if len(found) >= wanted:
            break
    page = found[:limit]
    next_cursor = encode_cursor(page[-1].last_modified_at, page[-1].id) if page else cursor
    # A reader from the start holds nothing to drop; one with a position must hear of a removal.
    since = max(filter(None, (after[0] if after else None, modified_after)), default=None)
    reset = removal_after(conn, sync, connection_id, since) if since is not None else None
    return ChangePage(records=page, next_cursor=next_cursor, has_more=len(found) > limit, reset=reset)


#: Ids looked up per statement: what the page still needs, at least a few, doubling while ids
#: turn out to have moved on or to be filtered out; at most enough to keep an IN list modest.
_LOOKUP_MIN = 64
_LOOKUP_MAX = 2_000
#: feed_entries rows read per statement while walking the feed (a page's write lists 5,000 ids).
_ENTRY_BATCH = 4


def _entries(
    conn: Connection,
    sync: str,
    connection_id: str,
    after: tuple[datetime, str] | None,
    modified_after: datetime | None,
) -> Iterator[tuple[datetime, list[str]]]:
    """The feed's writes from the cursor on, oldest first: (stamp, its ids after the cursor, sorted)."""
    query = (
        select(feed_entries.c.modified_at, feed_entries.c.external_ids)
        .where(feed_entries.c.sync == sync, feed_entries.c.connection_id == connection_id)
        .order_by(feed_entries.c.modified_at)
        .limit(_ENTRY_BATCH)
    )
    if modified_after is not None:
        query = query.where(feed_entries.c.modified_at >= _stamp_param(modified_after))
    if after is not None:
        query = query.where(feed_entries.c.modified_at >= _stamp_param(after[0]))
    while True:
        batch = conn.execute(query).all()
        for stamp, ids_json in batch:
            ids = sorted(json.loads(ids_json))
            if after is not None and stamp == after[0]:
                ids = ids[bisect.bisect_right(ids, after[1]) :]
            if ids:
                yield stamp, ids
        if len(batch) < _ENTRY_BATCH:
            return
        query = query.where(feed_entries.c.modified_at > _stamp_param(batch[-1][0]))


#: Writers compact a connection's entries once this many listed ids are superseded...
COMPACT_MIN_SUPERSEDED = 10_000
#: ...and at least this share of all its listed ids (so each compaction, a pass over the
#: connection's records, is paid for by as many changes as the connection has records).
COMPACT_SUPERSEDED_SHARE = 0.5


def should_compact(ids_listed: int, ids_superseded: int) -> bool:
    return ids_superseded >= COMPACT_MIN_SUPERSEDED and ids_superseded >= COMPACT_SUPERSEDED_SHARE * ids_listed


def compact(conn: Connection, sync: str, connection_id: str) -> int:
    """Rewrite one connection's feed entries as one per stamp still held by a record; returns the
    ids they list (the connection's records). Call it under the connection's batch lock, so no
    writer adds an entry meanwhile; readers see the old entries or the new, both correct."""
    conn.execute(delete(feed_entries).where(feed_entries.c.sync == sync, feed_entries.c.connection_id == connection_id))
    ids = "json_agg(external_id)::text" if conn.dialect.name == "postgresql" else "json_group_array(external_id)"
    conn.execute(
        text(
            "INSERT INTO feed_entries (sync, connection_id, modified_at, external_ids, ids_listed, ids_superseded) "
            f"SELECT sync, connection_id, last_modified_at, {ids}, sum(count(*)) OVER (), 0 FROM records "
            "WHERE sync = :sync AND connection_id = :connection_id GROUP BY sync, connection_id, last_modified_at"
        ),
        {"sync": sync, "connection_id": connection_id},
    )
    listed = conn.execute(
        select(feed_entries.c.ids_listed)
        .where(feed_entries.c.sync == sync, feed_entries.c.connection_id == connection_id)
        .limit(1)
    ).scalar()
    return int(listed or 0)


def _stamp_param(stamp: datetime) -> Any:
    from sqlalchemy import literal

    return literal(stamp, UtcDateTime())


def _change(row: Any) -> Change:
    return Change(
        id=row.external_id,
        connection_id=row.connection_id,
        data=json.loads(row.data),
        last_action=row.last_action,
        first_seen_at=row.first_seen_at,
        last_modified_at=row.last_modified_at,
        source_updated_at=row.source_updated_at,
        deleted_at=row.deleted_at,
    )


def iter_dataframes(
    conn: Connection,
    sync: str,
    connection_id: str | None = None,
    *,
    include_deleted: bool = False,
    chunk_size: int = 50_000,
) -> Iterator[pd.DataFrame]:
    """The records as DataFrames of at most ``chunk_size`` rows: one column per top-level field,
    plus metadata columns prefixed with ``_``. Streams, so a large sync never sits in memory whole.
    """
    query = select(*_COLUMNS).where(records.c.sync == sync)
    if connection_id is not None:
        query = query.where(records.c.connection_id == connection_id)
    if not include_deleted:
        query = query.where(records.c.deleted_at.is_(None))
    query = query.order_by(records.c.connection_id, records.c.external_id)
    result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(query)
    for rows in result.partitions(chunk_size):
        yield _frame(rows)


def _frame(rows: Sequence[Any]) -> pd.DataFrame:
    import pandas as pd

    data = pd.DataFrame.from_records([json.loads(row.data) for row in rows], index=range(len(rows)))
    meta = pd.DataFrame(
        {
            "_connection_id": [row.connection_id for row in rows],
            "_id": [row.external_id for row in rows],
            "_last_action": [row.last_action for row in rows],
            "_first_seen_at": pd.to_datetime([row.first_seen_at for row in rows], utc=True),
            "_last_modified_at": pd.to_datetime([row.last_modified_at for row in rows], utc=True),
            "_source_updated_at": pd.to_datetime([row.source_updated_at for row in rows], utc=True),
            "_deleted_at": pd.to_datetime([row.deleted_at for row in rows], utc=True),
        },
        index=range(len(rows)),
    )
    return pd.concat([data, meta], axis=1)


def empty_frame() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({name: pd.Series(dtype="object") for name in METADATA_COLUMNS})
