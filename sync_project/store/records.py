"""Guarded writes of records: one :class:`RecordWriter` is one transaction on one (sync, connection).

The writer takes the batch lock first, so the stored state it reads cannot change before it writes,
and the counts it returns are what happened. Checkpoints and inbox acknowledgements are written
through the same transaction (:attr:`RecordWriter.conn`), so a crash loses or repeats nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, bindparam, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from sync_project.store.locks import take_batch_lock
from sync_project.store.merge import (
    Action,
    MergeResult,
    Plan,
    RecordSpec,
    Stored,
    plan_batch,
    prepare_batch,
)
from sync_project.store.schema import records, sync_state

#: Keys per SELECT/UPDATE ... IN (...): well under SQLite's 32,766 bound-parameter limit.
KEY_CHUNK = 5000
_ONE_MICROSECOND = timedelta(microseconds=1)

RecordLike = Mapping[str, Any] | BaseModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RecordWriter:
    """Merges batches into the records of one (sync, connection) inside one locked transaction."""

    def __init__(self, conn: Connection, sync: str, connection_id: str, spec: RecordSpec) -> None:
        self.conn = conn
        self.sync = sync
        self.connection_id = connection_id
        self.spec = spec
        self._last_stamp: datetime | None = None
        take_batch_lock(conn, sync, connection_id)

    # -- batches ------------------------------------------------------------------------------

    def save(
        self, batch: Iterable[RecordLike], *, fetched_at: datetime | None = None, seen_by_run: str | None = None
    ) -> MergeResult:
        """Upsert full records."""
        return self.merge("save", batch, fetched_at=fetched_at, seen_by_run=seen_by_run)

    def update(self, batch: Iterable[RecordLike], *, fetched_at: datetime | None = None) -> MergeResult:
        """Deep-merge partial records into existing live records; unknown keys are skipped."""
        return self.merge("update", batch, fetched_at=fetched_at)

    def delete(self, batch: Iterable[RecordLike], *, fetched_at: datetime | None = None) -> MergeResult:
        """Tombstone records (each needs only its primary key and, if known, its timestamp)."""
        return self.merge("delete", batch, fetched_at=fetched_at)

    def merge(
        self,
        action: Action,
        batch: Iterable[RecordLike],
        *,
        fetched_at: datetime | None = None,
        seen_by_run: str | None = None,
    ) -> MergeResult:
        fetched_at = fetched_at or utcnow()
        if fetched_at.tzinfo is None:
            raise ValueError("fetched_at must be timezone-aware")
        incoming = prepare_batch(action, batch, self.spec, fetched_at)
        result = MergeResult()
        for start in range(0, len(incoming), KEY_CHUNK):
            chunk = incoming[start : start + KEY_CHUNK]
            stored = self._read_stored([item.key for item in chunk], with_data=action == "update")
            plan = plan_batch(action, chunk, stored, self.spec, fetched_at)
            self._apply(plan, seen_by_run)
            result += plan.result
        return result

    def delete_unseen(self, run_id: str, started_at: datetime) -> int:
        """Tombstone live records a full refresh did not see and nobody modified since it started.

        Call it only after the whole fetch succeeded: a failed or partial fetch deletes nothing.
        """
        now = self._stamp()
        source = case(
            (or_(records.c.source_updated_at.is_(None), records.c.source_updated_at < started_at), started_at),
            else_=records.c.source_updated_at,
        )
        statement = (
            update(records)
            .where(
                records.c.sync == self.sync,
                records.c.connection_id == self.connection_id,
                records.c.deleted_at.is_(None),
                or_(records.c.seen_by_run.is_(None), records.c.seen_by_run != run_id),
                records.c.last_modified_at < started_at,
            )
            .values(deleted_at=now, last_modified_at=now, last_action="deleted", source_updated_at=source)
        )
        return self.conn.execute(statement).rowcount

    # -- sync state, in the same transaction as the records it describes ---------------------

    def set_checkpoint(self, checkpoint: Mapping[str, Any] | None) -> None:
        from sync_project.store.state import upsert_state

        upsert_state(
            self.conn,
            self.sync,
            self.connection_id,
            checkpoint=None if checkpoint is None else json.dumps(checkpoint, sort_keys=True),
        )

    # -- internals ----------------------------------------------------------------------------

    def _stamp(self) -> datetime:
        """A last_modified_at strictly after every other in this (sync, connection).

        Writers are serialised by the batch lock, so stamps increase in commit order and a change
        feed reader paging by (last_modified_at, key) can never miss a later commit.
        """
        if self._last_stamp is None:
            self._last_stamp = self.conn.execute(
                select(func.max(records.c.last_modified_at)).where(
                    records.c.sync == self.sync, records.c.connection_id == self.connection_id
                )
            ).scalar()
        now = utcnow()
        if self._last_stamp is not None and now <= self._last_stamp:
            now = self._last_stamp + _ONE_MICROSECOND
        self._last_stamp = now
        return now

    def _read_stored(self, keys: Sequence[str], *, with_data: bool) -> dict[str, Stored]:
        columns = [
            records.c.external_id,
            records.c.data_hash,
            records.c.source_updated_at,
            records.c.last_modified_at,
            records.c.deleted_at,
        ]
        if with_data:
            columns.append(records.c.data)
        rows = self.conn.execute(
            select(*columns).where(
                records.c.sync == self.sync,
                records.c.connection_id == self.connection_id,
                records.c.external_id.in_(keys),
            )
        )
        return {
            row[0]: Stored(row[1], row[2], row[3], row[4], row[5] if with_data else None) for row in rows
        }

    def _apply(self, plan: Plan, seen_by_run: str | None) -> None:
        if plan.writes:
            now = self._stamp()
            content = [w for w in plan.writes if w.data_json is not None]
            tombstones = [w for w in plan.writes if w.data_json is None]
            if content:
                self._upsert(content, now, seen_by_run)
            if tombstones:
                self.conn.execute(
                    update(records)
                    .where(
                        records.c.sync == self.sync,
                        records.c.connection_id == self.connection_id,
                        records.c.external_id == bindparam("k"),
                    )
                    .values(
                        deleted_at=now,
                        last_modified_at=now,
                        last_action="deleted",
                        source_updated_at=bindparam("src"),
                    ),
                    [{"k": w.key, "src": w.source_updated_at} for w in tombstones],
                )
        if seen_by_run and plan.untouched:
            for start in range(0, len(plan.untouched), KEY_CHUNK):
                self.conn.execute(
                    update(records)
                    .where(
                        records.c.sync == self.sync,
                        records.c.connection_id == self.connection_id,
                        records.c.external_id.in_(plan.untouched[start : start + KEY_CHUNK]),
                    )
                    .values(seen_by_run=seen_by_run)
                )

    def _upsert(self, writes: Sequence[Any], now: datetime, seen_by_run: str | None) -> None:
        dialect_insert = postgresql.insert if self.conn.dialect.name == "postgresql" else sqlite.insert
        statement = dialect_insert(records)
        statement = statement.on_conflict_do_update(
            index_elements=[records.c.sync, records.c.connection_id, records.c.external_id],
            set_={
                "data": statement.excluded.data,
                "data_hash": statement.excluded.data_hash,
                "source_updated_at": statement.excluded.source_updated_at,
                "last_modified_at": statement.excluded.last_modified_at,
                "deleted_at": statement.excluded.deleted_at,
                "last_action": statement.excluded.last_action,
                "seen_by_run": func.coalesce(statement.excluded.seen_by_run, records.c.seen_by_run),
            },
        )
        self.conn.execute(
            statement,
            [
                {
                    "sync": self.sync,
                    "connection_id": self.connection_id,
                    "external_id": w.key,
                    "data": w.data_json,
                    "data_hash": w.data_hash,
                    "source_updated_at": w.source_updated_at,
                    "first_seen_at": now,
                    "last_modified_at": now,
                    "deleted_at": now if w.deleted else None,
                    "last_action": w.last_action,
                    "seen_by_run": seen_by_run,
                }
                for w in writes
            ],
        )


def live_filter(sync: str, connection_id: str | None) -> Any:
    clauses = [records.c.sync == sync, records.c.deleted_at.is_(None)]
    if connection_id is not None:
        clauses.append(records.c.connection_id == connection_id)
    return and_(*clauses)



