"""Read-only health figures of a sync, for asset checks: inbox backlog, dead letters, last successes.

Every query here is meant to run after every sync run and on a schedule, so each one is an
indexed read that touches only the rows it reports on: the backlog reads the work queue
(``inbox_pending``, by its ``(sync, connection_id, id)`` index) joined to those rows of the inbox
by primary key; dead letters filter on ``(status, sync[, connection_id])``, the leading columns
of ``ix_inbox_parked``, which holds no queued or done row; the state query reads one sync's rows
by primary-key prefix.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel
from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from sync_project.core.clock import utcnow
from sync_project.store.engine import unavailable_as_store_error
from sync_project.store.inbox import MAX_ERROR_CHARS, PARKED
from sync_project.store.schema import inbox, inbox_pending, sync_state


class PartitionBacklog(BaseModel):
    """The pending inbox events of one (sync, connection)."""

    connection_id: str
    pending: int
    #: Pending events whose handler failed at least once and that wait for their retry.
    retrying: int
    #: Pending events a webhook run could claim right now (no retry delay in the way).
    due: int
    oldest_pending_received_at: datetime | None = None
    #: Since when the longest-waiting due event has been claimable: its receipt, or the end of
    #: its retry delay. Only this age says the webhook path is stuck; a retrying event waits
    #: on purpose.
    oldest_due_since: datetime | None = None

    def oldest_due_age_s(self, now: datetime) -> float | None:
        return None if self.oldest_due_since is None else max(0.0, (now - self.oldest_due_since).total_seconds())

    def oldest_pending_age_s(self, now: datetime) -> float | None:
        if self.oldest_pending_received_at is None:
            return None
        return max(0.0, (now - self.oldest_pending_received_at).total_seconds())


class PartitionDeadLetters(BaseModel):
    """The dead-lettered inbox events of one (sync, connection), with the newest one's error."""

    connection_id: str
    dead: int
    newest_id: int
    newest_event_type: str
    newest_error: str | None = None
    newest_dead_at: datetime | None = None


class LastRun(BaseModel):
    """What the sync state says about one (sync, connection)'s runs."""

    connection_id: str
    last_success_at: datetime | None = None
    last_mode: str | None = None
    last_error: str | None = None


class Health:
    """The health figures of one store (``store.health``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def inbox_backlog(
        self, sync: str, connection_id: str | None = None, *, now: datetime | None = None
    ) -> list[PartitionBacklog]:
        """Pending events of ``sync`` per connection (one connection if given); connections with none
        are absent."""
        now = now or utcnow()
        is_due = inbox.c.next_attempt_at.is_(None) | (inbox.c.next_attempt_at <= now)
        query = (
            select(
                inbox.c.connection_id,
                func.count(),
                func.sum(case((inbox.c.attempts > 0, 1), else_=0)),
                func.sum(case((is_due, 1), else_=0)),
                func.min(inbox.c.received_at),
                func.min(case((is_due, func.coalesce(inbox.c.next_attempt_at, inbox.c.received_at)), else_=None)),
            )
            # Pending events are the work queue's rows (revision 0007), whatever the inbox holds besides.
            .select_from(inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id))
            .where(inbox_pending.c.sync == sync)
            .group_by(inbox.c.connection_id)
            .order_by(inbox.c.connection_id)
        )
        if connection_id is not None:
            query = query.where(inbox_pending.c.connection_id == connection_id)
        with unavailable_as_store_error(), self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            PartitionBacklog(
                connection_id=row[0],
                pending=int(row[1]),
                retrying=int(row[2] or 0),
                due=int(row[3] or 0),
                oldest_pending_received_at=_aware(row[4]),
                oldest_due_since=_aware(row[5]),
            )
            for row in rows
        ]

    def dead_letters(self, sync: str, connection_id: str | None = None) -> list[PartitionDeadLetters]:
        """Dead-lettered events of ``sync`` per connection, each with its newest dead event."""
        counts = (
            select(inbox.c.connection_id, func.count(), func.max(inbox.c.id))
            .where(PARKED, inbox.c.status == "dead", inbox.c.sync == sync)
            .group_by(inbox.c.connection_id)
            .order_by(inbox.c.connection_id)
        )
        if connection_id is not None:
            counts = counts.where(inbox.c.connection_id == connection_id)
        with unavailable_as_store_error(), self._engine.connect() as conn:
            grouped = conn.execute(counts).all()
            if not grouped:
                return []
            # Primary-key lookups of the newest dead event of each connection.
            newest = {
                row.id: row
                for row in conn.execute(
                    select(inbox.c.id, inbox.c.event_type, inbox.c.last_error, inbox.c.processed_at).where(
                        inbox.c.id.in_([int(row[2]) for row in grouped])
                    )
                )
            }
        result = []
        for connection, count, newest_id in grouped:
            row = newest[int(newest_id)]
            result.append(
                PartitionDeadLetters(
                    connection_id=connection,
                    dead=int(count),
                    newest_id=int(newest_id),
                    newest_event_type=row.event_type,
                    newest_error=(row.last_error or "")[:MAX_ERROR_CHARS] or None,
                    newest_dead_at=_aware(row.processed_at),
                )
            )
        return result

    def last_runs(self, sync: str) -> dict[str, LastRun]:
        """The run bookkeeping of every connection of ``sync`` that has run at least once."""
        query = select(
            sync_state.c.connection_id, sync_state.c.last_success_at, sync_state.c.last_mode, sync_state.c.last_error
        ).where(sync_state.c.sync == sync)
        with unavailable_as_store_error(), self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            row.connection_id: LastRun(
                connection_id=row.connection_id,
                last_success_at=row.last_success_at,
                last_mode=row.last_mode,
                last_error=row.last_error,
            )
            for row in rows
        }


def _aware(value: datetime | str | None) -> datetime | None:
    """Aggregates bypass the column type, so SQLite hands back naive text: make it aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
