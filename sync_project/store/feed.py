"""Reading records: the change feed (keyset pages with an opaque cursor) and pandas DataFrames.

Writers of one (sync, connection) are serialised and stamp ``last_modified_at`` strictly
increasing in commit order, so paging by ``(last_modified_at, external_id)`` never skips a change
made while a consumer pages: a record changed after the consumer passed it comes back, later, with
its new content (a record can therefore appear more than once; consumers upsert by id).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel
from sqlalchemy import select, tuple_
from sqlalchemy.engine import Connection

from sync_project.store.errors import StoreError
from sync_project.store.schema import UtcDateTime, records

ChangeAction = Literal["added", "updated", "deleted"]
MAX_PAGE = 10_000
METADATA_COLUMNS = ("_connection_id", "_id", "_last_action", "_first_seen_at", "_last_modified_at",
                    "_source_updated_at", "_deleted_at")


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
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    query = select(*_COLUMNS).where(records.c.sync == sync, records.c.connection_id == connection_id)
    if cursor:
        stamp, key = decode_cursor(cursor)
        query = query.where(
            tuple_(records.c.last_modified_at, records.c.external_id)
            > tuple_(_stamp_param(stamp), key)
        )
    if modified_after is not None:
        if modified_after.tzinfo is None or modified_after.utcoffset() is None:
            raise ValueError(f"modified_after must be timezone-aware (got naive {modified_after.isoformat()})")
        query = query.where(records.c.last_modified_at >= modified_after)
    if actions:
        unknown = set(actions) - {"added", "updated", "deleted"}
        if unknown:
            raise ValueError(f"unknown action filter {sorted(unknown)}; use added, updated or deleted")
        query = query.where(records.c.last_action.in_(list(actions)))
    query = query.order_by(records.c.last_modified_at, records.c.external_id).limit(limit + 1)
    rows = conn.execute(query).all()
    page = [_change(row) for row in rows[:limit]]
    if page:
        next_cursor: str | None = encode_cursor(page[-1].last_modified_at, page[-1].id)
    else:
        next_cursor = cursor
    return ChangePage(records=page, next_cursor=next_cursor, has_more=len(rows) > limit)


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
    return pd.DataFrame({name: pd.Series(dtype="object") for name in METADATA_COLUMNS})
