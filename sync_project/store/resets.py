"""Resetting one (sync, connection): forget the checkpoint, optionally empty the records.

What Nango's ``triggerSync`` does with ``reset`` and ``emptyCache``, as a store operation that a
command, a run (``mode: reset``) or the control API calls. A reset runs under the partition's poll
lease, so it can never interleave with a poll: a poll holding the lease would otherwise store its
next page's checkpoint right after the reset cleared it, and the reset would have done nothing.

What consumers of the change feed see:

- ``kept``: nothing changes in the records; the next poll fetches everything again (no
  checkpoint), and what it finds unchanged stays unchanged.
- ``tombstoned``: every live record is tombstoned in one write of the feed, so a consumer reading
  the feed sees each of them deleted. The tombstones are weak (they keep the last provider
  timestamp), so the next poll restores what the provider still has, as new changes.
- ``removed``: the rows and their feed entries are deleted. The feed can show no record that is not
  there, so a page read with a cursor older than the removal carries ``reset`` (when, how many):
  the consumer drops what it holds of that connection and reads on.

Every reset is kept in ``sync_resets``, as a record of who emptied what and when.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from sync_project.core.sync import RECORDS_ACTIONS, RecordsAction
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.schema import sync_resets, sync_state

#: What ``sync_resets.records`` says of each action.
_OUTCOME = {"keep": "kept", "tombstone": "tombstoned", "remove": "removed"}


class ResetResult(BaseModel):
    """What a reset did, as the command, the run's metadata and the control API report it."""

    sync: str
    connection_id: str
    reset_at: datetime
    #: 'kept', 'tombstoned' or 'removed'.
    records: str
    #: Live records tombstoned (``tombstoned``).
    tombstoned: int = 0
    #: Rows deleted, tombstones included (``removed``).
    removed: int = 0
    #: Whether there was a checkpoint to clear (the next poll fetches everything either way).
    checkpoint_cleared: bool
    requested_by: str

    def describe(self) -> str:
        done = "checkpoint cleared" if self.checkpoint_cleared else "no checkpoint to clear"
        if self.records == "tombstoned":
            done += f"; {self.tombstoned} records tombstoned (the change feed shows each as deleted)"
        elif self.records == "removed":
            done += f"; {self.removed} records removed (the change feed tells readers it was emptied)"
        else:
            done += "; records kept"
        return f"reset {self.sync} for connection {self.connection_id!r}: {done}. The next poll fetches everything."


class FeedReset(BaseModel):
    """On a change-feed page: the partition's records were removed after the reader's cursor."""

    reset_at: datetime
    removed: int


def check_action(action: str) -> RecordsAction:
    if action not in RECORDS_ACTIONS:
        raise ValueError(f"unknown records action {action!r}; use one of {', '.join(RECORDS_ACTIONS)}")
    return action


def had_checkpoint(conn: Connection, sync: str, connection_id: str) -> bool:
    row = conn.execute(
        select(sync_state.c.checkpoint).where(sync_state.c.sync == sync, sync_state.c.connection_id == connection_id)
    ).first()
    return row is not None and row.checkpoint is not None


def record_reset(conn: Connection, result: ResetResult) -> None:
    conn.execute(
        insert(sync_resets).values(
            sync=result.sync,
            connection_id=result.connection_id,
            reset_at=result.reset_at,
            records=result.records,
            tombstoned=result.tombstoned,
            removed=result.removed,
            checkpoint_cleared=result.checkpoint_cleared,
            requested_by=result.requested_by[:64],
        )
    )


def outcome(action: RecordsAction) -> str:
    return _OUTCOME[action]


def removal_after(conn: Connection, sync: str, connection_id: str, after: datetime) -> FeedReset | None:
    """The newest reset of the partition after ``after`` that removed its records, if any."""
    row = conn.execute(
        select(sync_resets.c.reset_at, sync_resets.c.removed)
        .where(
            sync_resets.c.sync == sync,
            sync_resets.c.connection_id == connection_id,
            sync_resets.c.reset_at > after,
            sync_resets.c.records == "removed",
        )
        .order_by(sync_resets.c.reset_at.desc())
        .limit(1)
    ).first()
    return None if row is None else FeedReset(reset_at=row.reset_at, removed=int(row.removed))


class Resets:
    """The record of past resets."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def list(self, sync: str | None = None, connection_id: str | None = None) -> list[ResetResult]:
        query = select(sync_resets).order_by(sync_resets.c.reset_at)
        if sync is not None:
            query = query.where(sync_resets.c.sync == sync)
        if connection_id is not None:
            query = query.where(sync_resets.c.connection_id == connection_id)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [ResetResult.model_validate(dict(row)) for row in conn.execute(query).mappings()]
