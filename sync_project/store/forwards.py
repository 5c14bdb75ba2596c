"""The forwarding queue: verified webhook deliveries to pass on to the customer's app, with their state.

Forwards are made *from the inbox*, so an event is forwarded only after the receiver committed it,
and the receiver does nothing more for forwarding than it does anyway. A forwarder reads the inbox
forward by id (:meth:`Forwards.enqueue`) and turns each event into one forward per connection it
routes to: one row per (provider, event key, connection), however many syncs subscribe to the
event, so the customer gets each event once per connection. Which inbox rows:

- routed rows (``pending``, ``done``, ``dead``): to their connection;
- ``ignored`` rows (no sync subscribes to the type): routed now, with the receiver's routing, to
  the connections of their account; with none, forwarded without a connection;
- ``unroutable`` rows: not yet. ``inbox replay --status unroutable`` routes them into new rows
  once their connection exists, and those are forwarded then.

Reading by id needs care, because ids are handed out when a transaction inserts and become
visible when it commits: on Postgres a transaction holding id 9 can commit after one holding 10,
and a reader that moved past 10 would never see 9. So the cursor never moves past a *gap* (an id
not seen yet) until that gap has stayed open for ``settle_s``; meanwhile the gap is re-read on every
scan and whatever fills it is forwarded. (Gaps that never fill are normal: ``ON CONFLICT DO
NOTHING`` and rollbacks use up sequence values.) The cost is bounded: one range query per open gap.

Delivery state, per forward: ``pending`` (due at ``next_attempt_at``), ``delivered``, or ``dead``
after ``max_attempts`` failures (replayable). A claim leases a row (moves ``next_attempt_at`` past
the attempt's timeout) instead of holding a transaction open over HTTP, so a forwarder that dies
mid-delivery leaves the row due again after the lease: at-least-once, deduplicated by the
consumer on ``webhook-id``.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from pydantic import BaseModel
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sync_project.core.clock import utcnow
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.inbox import MAX_ERROR_CHARS, retry_delay
from sync_project.store.routing import ConnectionSnapshot, connections_for
from sync_project.store.schema import forwarder_state, forwards, inbox

ForwardStatus = Literal["pending", "delivered", "dead"]
FORWARD_STATUSES: tuple[str, ...] = get_args(ForwardStatus)
StartAt = Literal["now", "beginning"]

DEFAULT_STATE_NAME = "default"
DEFAULT_SETTLE_S = 30.0
#: Gap ranges re-read per query (each is one ``BETWEEN`` of an ``OR``).
_GAPS_PER_QUERY = 200
_ID_CHUNK = 5000


class Forward(BaseModel):
    """One event to forward to one connection (``connection_id`` '' for none)."""

    id: int
    inbox_id: int
    provider: str
    event_key: str
    connection_id: str
    account_id: str | None = None
    event_type: str
    payload: dict[str, Any]
    received_at: datetime
    status: ForwardStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` of every attempt of this forward."""
        return f"fwd_{self.id}"


class ForwardStats(BaseModel):
    counts: dict[str, int]
    oldest_pending_age_s: float | None = None
    inbox_cursor: int | None = None


class Forwards:
    """The forwarding queue of one store. One instance per forwarder process: it keeps the gaps
    it is waiting on in memory (a restart just re-reads from the stored cursor)."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str = DEFAULT_STATE_NAME,
        settle_s: float = DEFAULT_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle_s < 0:
            raise ValueError("settle_s must not be negative")
        self._engine = engine
        self._name = name
        self._settle_s = settle_s
        self._clock = clock
        self._high: int | None = None
        self._written_cursor: int | None = None
        self._gaps: dict[tuple[int, int], float] = {}

    # -- from the inbox -------------------------------------------------------------------------

    def enqueue(self, *, limit: int = 1000, start_at: StartAt = "now", now: datetime | None = None) -> int:
        """Turn inbox rows not read yet into forwards; returns how many forwards were created.

        ``start_at`` applies once, when this store has never forwarded: ``now`` forwards what
        arrives from now on (turning forwarding on does not replay history at the customer),
        ``beginning`` forwards everything the inbox still holds.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        now = now or utcnow()
        with unavailable_as_store_error(), self._engine.begin() as conn:
            cursor = self._lock_cursor(conn, start_at)
            if self._high is None or cursor != self._written_cursor:
                # First scan, or another forwarder moved the cursor: read on from where it stands.
                self._high, self._gaps = cursor, {}
            rows = self._read_gaps(conn)
            fresh = conn.execute(_inbox_rows().where(inbox.c.id > self._high).order_by(inbox.c.id).limit(limit)).all()
            seen_at = self._clock()
            expected = self._high + 1
            for row in fresh:
                if row.id > expected:
                    self._gaps[(expected, row.id - 1)] = seen_at
                expected = row.id + 1
            if fresh:
                self._high = fresh[-1].id
            created = _insert_forwards(conn, [*rows, *fresh], now)
            for gap, first_seen in list(self._gaps.items()):
                if seen_at - first_seen >= self._settle_s:
                    del self._gaps[gap]
            new_cursor = min(low for low, _ in self._gaps) - 1 if self._gaps else self._high
            if new_cursor != cursor:
                conn.execute(
                    update(forwarder_state)
                    .where(forwarder_state.c.name == self._name)
                    .values(inbox_cursor=new_cursor, updated_at=now)
                )
            self._written_cursor = new_cursor
        return created

    @property
    def open_gaps(self) -> int:
        """Id ranges this instance is still waiting on (see the module docstring)."""
        return len(self._gaps)

    # -- delivery -------------------------------------------------------------------------------

    def claim(self, *, limit: int = 50, lease_s: float = 60.0, now: datetime | None = None) -> list[Forward]:
        """Due pending forwards, oldest first, leased for ``lease_s`` (see the module docstring)."""
        now = now or utcnow()
        with unavailable_as_store_error(), self._engine.begin() as conn:
            query = (
                select(forwards).where(forwards.c.status == "pending", _due(now)).order_by(forwards.c.id).limit(limit)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            claimed = _forwards(conn.execute(query))
            if claimed:
                conn.execute(
                    update(forwards)
                    .where(forwards.c.id.in_([f.id for f in claimed]))
                    .values(next_attempt_at=now + timedelta(seconds=lease_s))
                )
        return claimed

    def mark_delivered(self, forward_id: int, *, now: datetime | None = None) -> None:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            conn.execute(
                update(forwards)
                .where(forwards.c.id == forward_id, forwards.c.status == "pending")
                .values(
                    status="delivered",
                    attempts=forwards.c.attempts + 1,
                    delivered_at=now or utcnow(),
                    next_attempt_at=None,
                    last_error=None,
                )
            )

    def mark_failed(
        self,
        forward_id: int,
        error: str,
        *,
        max_attempts: int,
        base_delay_s: float = 2.0,
        max_delay_s: float = 3600.0,
        now: datetime | None = None,
    ) -> ForwardStatus:
        """Count a failed attempt: due again after a backoff, or ``dead`` after ``max_attempts``."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = now or utcnow()
        with unavailable_as_store_error(), self._engine.begin() as conn:
            row = conn.execute(
                select(forwards.c.status, forwards.c.attempts).where(forwards.c.id == forward_id)
            ).first()
            if row is None:
                raise LookupError(f"no forward with id {forward_id}")
            if row.status != "pending":
                return row.status
            attempts = row.attempts + 1
            values: dict[str, Any] = {"attempts": attempts, "last_error": error[:MAX_ERROR_CHARS]}
            if attempts >= max_attempts:
                values.update(status="dead", next_attempt_at=None)
            else:
                delay = retry_delay(attempts - 1, base_delay_s=base_delay_s, max_delay_s=max_delay_s)
                values.update(next_attempt_at=now + delay)
            conn.execute(update(forwards).where(forwards.c.id == forward_id).values(**values))
            return values.get("status", "pending")

    # -- operators ------------------------------------------------------------------------------

    def stats(self, *, now: datetime | None = None) -> ForwardStats:
        now = now or utcnow()
        with unavailable_as_store_error(), reading(self._engine) as conn:
            counts = dict.fromkeys(FORWARD_STATUSES, 0)
            for status, count in conn.execute(select(forwards.c.status, func.count()).group_by(forwards.c.status)):
                counts[status] = int(count)
            oldest = conn.execute(
                select(func.min(forwards.c.created_at)).where(forwards.c.status == "pending")
            ).scalar()
            cursor = conn.execute(
                select(forwarder_state.c.inbox_cursor).where(forwarder_state.c.name == self._name)
            ).scalar()
        return ForwardStats(
            counts=counts,
            oldest_pending_age_s=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
            inbox_cursor=cursor,
        )

    def list(self, *, status: ForwardStatus | None = None, after_id: int = 0, limit: int = 1000) -> list[Forward]:
        query = select(forwards).where(forwards.c.id > after_id).order_by(forwards.c.id).limit(limit)
        if status is not None:
            query = query.where(forwards.c.status == status)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return _forwards(conn.execute(query))

    def replay_dead(self) -> int:
        """Make dead forwards pending again, with no attempts; returns how many."""
        with unavailable_as_store_error(), self._engine.begin() as conn:
            return conn.execute(
                update(forwards)
                .where(forwards.c.status == "dead")
                .values(status="pending", attempts=0, next_attempt_at=None)
            ).rowcount

    def purge(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        """Delete delivered forwards created more than ``older_than`` ago; returns how many.

        A kept row is what stops a redelivered event from being forwarded twice, so keep them as
        long as the inbox keeps its rows.
        """
        if older_than <= timedelta(0):
            raise ValueError("older_than must be positive")
        cutoff = (now or utcnow()) - older_than
        purged = 0
        while True:
            with unavailable_as_store_error(), self._engine.begin() as conn:
                ids = select(forwards.c.id).where(forwards.c.status == "delivered", forwards.c.created_at < cutoff)
                removed = conn.execute(
                    delete(forwards).where(forwards.c.id.in_(ids.limit(_ID_CHUNK).scalar_subquery()))
                ).rowcount
            purged += removed
            if removed < _ID_CHUNK:
                return purged

    # -- internals ------------------------------------------------------------------------------

    def _lock_cursor(self, conn: Connection, start_at: StartAt) -> int:
        """The stored cursor, locked for this transaction (one scanner at a time); created on first use."""
        query = select(forwarder_state.c.inbox_cursor).where(forwarder_state.c.name == self._name)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        cursor = conn.execute(query).scalar()
        if cursor is not None:
            return int(cursor)
        if start_at == "now":
            start = int(conn.execute(select(func.coalesce(func.max(inbox.c.id), 0))).scalar_one())
        elif start_at == "beginning":
            start = 0
        else:
            raise ValueError(f"start_at must be 'now' or 'beginning', not {start_at!r}")
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(
            dialect_insert(forwarder_state)
            .values(name=self._name, inbox_cursor=start, updated_at=utcnow())
            .on_conflict_do_nothing(index_elements=[forwarder_state.c.name])
        )
        # A concurrent first start may have won the insert: read what is stored.
        return int(conn.execute(query).scalar_one())

    def _read_gaps(self, conn: Connection) -> builtins.list[Any]:  # `list` is the method above
        gaps = sorted(self._gaps)
        rows: list[Any] = []
        for start in range(0, len(gaps), _GAPS_PER_QUERY):
            ranges = [inbox.c.id.between(low, high) for low, high in gaps[start : start + _GAPS_PER_QUERY]]
            rows.extend(conn.execute(_inbox_rows().where(or_(*ranges))).all())
        return rows


def _inbox_rows() -> Any:
    return select(
        inbox.c.id,
        inbox.c.provider,
        inbox.c.event_key,
        inbox.c.connection_id,
        inbox.c.account_id,
        inbox.c.event_type,
        inbox.c.payload,
        inbox.c.status,
        inbox.c.received_at,
    )


def _insert_forwards(conn: Connection, rows: Sequence[Any], now: datetime) -> int:
    """One forward per (provider, event key, connection) of ``rows``; existing ones are kept."""
    routable = [row for row in rows if row.status not in ("unroutable", "routed")]
    to_route = {(row.provider, row.account_id) for row in routable if row.status == "ignored"}
    snapshot = ConnectionSnapshot.load(conn, to_route) if to_route else None
    values: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in sorted(routable, key=lambda r: r.id):
        if row.status == "ignored":
            assert snapshot is not None
            targets = [c.connection_id for c in connections_for(snapshot, row.provider, row.account_id)] or [""]
        else:
            targets = [row.connection_id]
        for connection_id in targets:
            values.setdefault(
                (row.provider, row.event_key, connection_id),
                {
                    "inbox_id": row.id,
                    "provider": row.provider,
                    "event_key": row.event_key,
                    "connection_id": connection_id,
                    "account_id": row.account_id,
                    "event_type": row.event_type,
                    "payload": row.payload,
                    "received_at": row.received_at,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_error": None,
                    "created_at": now,
                    "delivered_at": None,
                },
            )
    if not values:
        return 0
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(forwards)
        .on_conflict_do_nothing(index_elements=[forwards.c.provider, forwards.c.event_key, forwards.c.connection_id])
        .returning(forwards.c.id)
    )
    return len(conn.execute(statement, list(values.values())).all())


def _due(now: datetime) -> Any:
    return or_(forwards.c.next_attempt_at.is_(None), forwards.c.next_attempt_at <= now)


def _forwards(result: Iterable[Any]) -> list[Forward]:
    found = []
    for row in result:
        values = dict(row._mapping)
        values["payload"] = json.loads(values["payload"])
        found.append(Forward.model_validate(values))
    return found


__all__ = ["FORWARD_STATUSES", "Forward", "ForwardStats", "ForwardStatus", "Forwards"]
