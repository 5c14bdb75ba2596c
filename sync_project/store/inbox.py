"""The inbox: webhook events as the receiver committed them, until a webhook run has applied them.

One row per (provider, event key, sync, connection): a delivery fans out to every sync that
subscribes to its event type and every connection its account routes to, and a redelivery of the
same event hits the unique key and is stored once. Statuses:

- ``pending``: waiting for a webhook run of its (sync, connection); after a handler failure it
  waits until ``next_attempt_at`` (exponential backoff).
- ``done``: applied, marked in the same transaction as the merge it caused.
- ``dead``: the handler failed ``max_attempts`` times; ``last_error`` says why; replayable.
- ``unroutable``: no connection has its account id yet (``connection_id`` ''); replayable.
- ``routed``: an unroutable row that a replay routed (its pending copies carry on).
- ``ignored``: no sync subscribes to its event type (``sync`` ''); kept so nothing is silently lost.
- ``orphaned``: it was pending when its connection was removed (``connections remove``); kept, and
  pending again when a connection of that id is added back (or ``inbox replay --status orphaned``).

Layout (revision 0007). The receiver writes an inbox row once; the hot path never changes it. The
work queue and the acknowledgements are two narrow tables beside it:

- ``inbox_pending`` (id, sync, connection_id): one row per pending event. Claims (``FOR UPDATE
  SKIP LOCKED`` on Postgres) and the sensor read its index, which holds only work not done, so
  they cost the same with ten million done events as with none.
- ``inbox_done`` (id, processed_at): one row per applied event. The merge's transaction deletes
  the event's ``inbox_pending`` row and inserts this one: the acknowledgement writes two small
  rows instead of a new copy of a ~1 kB row and an entry in each of its indexes.

The status a reader sees is derived: ``done`` if the id is in ``inbox_done``, else the stored
status (``pending`` rows are exactly those in ``inbox_pending``). Retries, dead letters and
replays change the stored row as before: they are rare. Failure, dead-lettering and replay keep
both tables in step in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from pydantic import BaseModel
from sqlalchemy import bindparam, case, delete, func, insert, literal, null, select, text, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sync_project.core.clock import utcnow
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.leases import Lease, check_lease
from sync_project.store.routing import ConnectionLookup, connections_for
from sync_project.store.schema import UtcDateTime, connections, inbox, inbox_done, inbox_pending
from sync_project.store.wakeup import _CHANNEL_SQL, notify_inserted

InboxStatus = Literal["pending", "done", "dead", "unroutable", "ignored", "routed", "orphaned"]
INBOX_STATUSES: tuple[str, ...] = get_args(InboxStatus)
ReplayableStatus = Literal["dead", "unroutable", "orphaned"]

DEFAULT_MAX_ATTEMPTS = 8
#: Ids per UPDATE ... IN (...): well under SQLite's bound-parameter limit.
_ID_CHUNK = 5000
#: Unroutable rows re-routed per transaction by a replay.
_REPLAY_CHUNK = 1000
#: Error text kept per event: enough for a traceback's last lines, bounded so a row stays small.
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True, slots=True)
class RoutedEvent:
    """One inbox row to be: an event of a verified delivery, routed to one (sync, connection).

    ``status`` follows from the routing (``ignored`` without a sync, ``unroutable`` without a
    connection, else ``pending``) and is checked against it, so a row can never claim to be pending
    for no connection. Strings are bounded by the column sizes and may not hold NUL (Postgres
    rejects it), so a bad event fails here (``ValueError``, a 400 at the receiver), and not in the
    middle of a group commit.

    A plain dataclass checked in ``__post_init__``, not a pydantic model: the receiver's commit
    thread builds one per event, and pydantic's validators were a quarter of that thread's CPU.
    ``payload_json`` is the payload as the inbox stores it; the receiver passes the text its intake
    already serialised (``receiver.intake.check_storable``) instead of having it encoded twice.
    """

    event_key: str
    event_type: str
    payload: dict[str, Any]
    account_id: str | None = None
    sync: str = ""
    connection_id: str = ""
    status: InboxStatus | None = None
    payload_json: str = ""

    def __post_init__(self) -> None:
        expected = _routing_status(self.sync, self.connection_id)
        if self.status is None:
            object.__setattr__(self, "status", expected)
        elif self.status != expected:
            raise ValueError(
                f"status {self.status!r} contradicts the routing (sync={self.sync!r}, "
                f"connection_id={self.connection_id!r}): expected {expected!r}"
            )
        _check_column("event_key", self.event_key, 255, required=True)
        _check_column("event_type", self.event_type, 255)
        if self.account_id is not None:
            _check_column("account_id", self.account_id, 255)
        _check_column("sync", self.sync, 128)
        _check_column("connection_id", self.connection_id, 255)
        if not isinstance(self.payload, dict):
            raise ValueError(f"payload: a JSON object is required, not {type(self.payload).__name__}")
        if not self.payload_json:
            try:
                text = json.dumps(self.payload, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(f"payload is not JSON: {error}") from None
            object.__setattr__(self, "payload_json", text)


def _check_column(name: str, value: Any, max_chars: int, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name}: text is required, not {type(value).__name__}")
    if required and not value:
        raise ValueError(f"{name}: should have at least 1 character")
    if len(value) > max_chars:
        raise ValueError(f"{name}: should have at most {max_chars} characters")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")


def _routing_status(sync: str, connection_id: str) -> InboxStatus:
    if not sync:
        return "ignored"
    if not connection_id:
        return "unroutable"
    return "pending"


@dataclass(slots=True)
class ReceiveResult:
    """What one delivery added: rows stored, and rows that were already there (redeliveries).

    A dataclass: the receiver's commit thread makes one per delivery and counts into it."""

    stored: int = 0
    duplicates: int = 0


class InboxEvent(BaseModel):
    """One inbox row as stored."""

    id: int
    provider: str
    event_key: str
    sync: str
    connection_id: str
    account_id: str | None = None
    event_type: str
    payload: dict[str, Any]
    status: InboxStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    received_at: datetime
    processed_at: datetime | None = None


class ClaimedEvent:
    """One claimed inbox row, as a webhook run needs it.

    A plain slotted object, not a model: a run claims thousands of rows a second, and validating
    each again would cost more than the rest of the claim (the receiver validated them on the way
    in, as :class:`RoutedEvent`).
    """

    __slots__ = (
        "id",
        "provider",
        "event_key",
        "sync",
        "connection_id",
        "account_id",
        "event_type",
        "payload",
        "attempts",
    )

    def __init__(
        self,
        id: int,  # noqa: A002 - the column's name
        provider: str,
        event_key: str,
        sync: str,
        connection_id: str,
        account_id: str | None,
        event_type: str,
        payload: dict[str, Any],
        attempts: int,
    ) -> None:
        self.id = id
        self.provider = provider
        self.event_key = event_key
        self.sync = sync
        self.connection_id = connection_id
        self.account_id = account_id
        self.event_type = event_type
        self.payload = payload
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"ClaimedEvent(id={self.id}, event_key={self.event_key!r}, event_type={self.event_type!r})"


class DuePartition(BaseModel):
    """A (sync, connection) with pending events that are due now.

    ``max_id`` and ``attempts`` change whenever the work does (new events; a retry after a
    failure), so a sensor can derive a run key from them that Dagster has never seen.
    """

    sync: str
    connection_id: str
    max_id: int
    pending: int
    attempts: int
    #: The latest retry or replay time among the due events (None if none was ever retried).
    requeued_at: datetime | None = None


class InboxStats(BaseModel):
    counts: dict[str, int]
    oldest_pending_age_s: float | None = None
    oldest_pending_received_at: datetime | None = None


class ConnectionInboxStats(BaseModel):
    """The events of one (provider, connection) by status; ``connection_id`` '' gathers the
    events that route to no connection (unroutable, and ignored ones of no sync)."""

    provider: str
    connection_id: str
    counts: dict[str, int]
    oldest_pending_received_at: datetime | None = None


def retry_delay(attempts: int, *, base_delay_s: float = 1.0, max_delay_s: float = 3600.0) -> timedelta:
    """Backoff after the ``attempts``-th failure: ``base * 2**attempts`` seconds, capped (1 h)."""
    return timedelta(seconds=min(base_delay_s * 2.0 ** min(attempts, 62), max_delay_s))


class Inbox:
    """Reads and writes of the inbox table (see the module docstring for the statuses)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- the receiver -------------------------------------------------------------------------

    def receive(self, provider: str, events: Sequence[RoutedEvent]) -> ReceiveResult:
        """Commit one delivery's events; a redelivered event is counted, not stored again."""
        return self.receive_many([(provider, events)])[0]

    def receive_many(self, deliveries: Sequence[tuple[str, Sequence[RoutedEvent]]]) -> list[ReceiveResult]:
        """Commit several deliveries in one transaction (the receiver's group commit)."""
        with unavailable_as_store_error(), self._engine.begin() as conn:
            return insert_events(conn, deliveries)

    def insert(self, conn: Connection, deliveries: Sequence[tuple[str, Sequence[RoutedEvent]]]) -> list[ReceiveResult]:
        """:meth:`receive_many` in ``conn``'s transaction (a receiver routes and inserts in one)."""
        return insert_events(conn, deliveries)

    def answers(self) -> None:
        """One read of the inbox on a connection of its own, the receiver's probe: on SQLite the
        transaction takes the write lock (BEGIN IMMEDIATE), as a delivery's does, so a database
        too busy to accept deliveries does not answer either. Raises ``StoreError`` otherwise."""
        with unavailable_as_store_error(), self._engine.connect() as conn:
            conn.execute(select(inbox.c.id).limit(1)).all()

    # -- the sensor ---------------------------------------------------------------------------

    def due_partitions(self, *, limit: int = 500, now: datetime | None = None) -> list[DuePartition]:
        """The (sync, connection) pairs with due pending events, oldest first, at most ``limit``."""
        now = now or utcnow()
        query = (
            select(
                inbox_pending.c.sync,
                inbox_pending.c.connection_id,
                func.max(inbox_pending.c.id),
                func.count(),
                func.coalesce(func.sum(inbox.c.attempts), 0),
                func.max(inbox.c.next_attempt_at),
            )
            .select_from(inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id))
            .where(_due(now))
            .group_by(inbox_pending.c.sync, inbox_pending.c.connection_id)
            .order_by(func.min(inbox_pending.c.id))
            .limit(limit)
        )
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [
                DuePartition(sync=s, connection_id=c, max_id=int(m), pending=int(n), attempts=int(a), requeued_at=r)
                for s, c, m, n, a, r in conn.execute(query)
            ]

    def high_water_mark(self) -> int:
        """The newest inbox id (0 when empty)."""
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return int(conn.execute(select(func.coalesce(func.max(inbox.c.id), 0))).scalar_one())

    # -- webhook runs ---------------------------------------------------------------------------

    def claim(
        self, conn: Connection, sync: str, connection_id: str, *, limit: int = 1000, now: datetime | None = None
    ) -> list[ClaimedEvent]:
        """The due pending events of (sync, connection), oldest first, locked in ``conn``'s transaction.

        Call it inside the records writer's transaction and mark the events done there too: the
        merge and the acknowledgement commit together, and a crash rolls both back. On Postgres the
        events' ``inbox_pending`` rows are locked ``FOR UPDATE SKIP LOCKED`` (narrow rows: the wide
        inbox rows are not written, not even by the lock); on SQLite the writer already holds the
        database write lock (``BEGIN IMMEDIATE``).
        """
        query = (
            select(*_CLAIMED)
            .select_from(inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id))
            .where(
                inbox_pending.c.sync == sync,
                inbox_pending.c.connection_id == connection_id,
                _due(now or utcnow()),
            )
            .order_by(inbox_pending.c.id)
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=inbox_pending)
        loads = json.loads
        return [
            ClaimedEvent(row[0], row[1], row[2], row[3], row[4], row[5], row[6], loads(row[7]), row[8])
            for row in conn.execute(query)
        ]

    def mark_done(self, conn: Connection, ids: Sequence[int], *, now: datetime | None = None) -> None:
        """Acknowledge applied events inside the caller's (the merge's) transaction.

        Their ``inbox_pending`` rows go, an ``inbox_done`` row each comes; the inbox rows are not
        touched. Only events still pending are acknowledged (the caller claimed them, so all are).
        """
        now = now or utcnow()
        unique = sorted(set(ids))
        for start in range(0, len(unique), _ID_CHUNK):
            chunk = unique[start : start + _ID_CHUNK]
            if conn.dialect.name == "postgresql":
                # One statement, one array parameter: no per-id placeholders to render or plan.
                conn.execute(_ACK_POSTGRES, {"ids": chunk, "now": now})
                continue
            else:
                # SQLite: the writer holds the database write lock, so what is pending now stays so.
                removed = list(conn.execute(select(inbox_pending.c.id).where(inbox_pending.c.id.in_(chunk))).scalars())
                conn.execute(delete(inbox_pending).where(inbox_pending.c.id.in_(chunk)))
            if removed:
                conn.execute(insert(inbox_done), [{"id": row_id, "processed_at": now} for row_id in removed])

    def mark_failed(
        self,
        event_id: int,
        error: str,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        now: datetime | None = None,
        base_delay_s: float = 1.0,
        lease: Lease | None = None,
    ) -> InboxStatus:
        """Count a failed attempt: retry later with backoff, or dead-letter after ``max_attempts``.

        Its own transaction, after the run's merge transaction committed or rolled back, fenced by
        the draining run's ``lease`` like its merges. Returns the event's new status (unchanged if it
        was no longer pending, e.g. replayed meanwhile).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = now or utcnow()
        with unavailable_as_store_error(), self._engine.begin() as conn:
            if lease is not None:
                check_lease(conn, lease)
            # The queue row first: it is what a claim locks, so a batch still holding the event
            # finishes before its failure is counted.
            queued = select(inbox_pending.c.id).where(inbox_pending.c.id == event_id)
            if conn.dialect.name == "postgresql":
                queued = queued.with_for_update()
            is_pending = conn.execute(queued).first() is not None
            row = conn.execute(
                select(_STATUS, inbox.c.attempts).select_from(_WITH_DONE).where(inbox.c.id == event_id)
            ).first()
            if row is None:
                raise LookupError(f"no inbox event with id {event_id}")
            if not is_pending:
                return row[0]
            attempts = row.attempts + 1
            values: dict[str, Any] = {"attempts": attempts, "last_error": error[:MAX_ERROR_CHARS]}
            if attempts >= max_attempts:
                values.update(status="dead", next_attempt_at=None, processed_at=now)
                conn.execute(delete(inbox_pending).where(inbox_pending.c.id == event_id))
            else:
                values.update(next_attempt_at=now + retry_delay(attempts, base_delay_s=base_delay_s))
            conn.execute(update(inbox).where(inbox.c.id == event_id).values(**values))
            return values.get("status", "pending")

    # -- operators ----------------------------------------------------------------------------

    def stats(self, *, now: datetime | None = None) -> InboxStats:
        """Counts by status (every status, zeros included) and the age of the oldest pending event."""
        now = now or utcnow()
        with unavailable_as_store_error(), reading(self._engine) as conn:
            counts = dict.fromkeys(INBOX_STATUSES, 0)
            # The parked statuses through their partial index; pending and done by their tables.
            parked = select(inbox.c.status, func.count()).where(PARKED).group_by(inbox.c.status)
            for status, count in conn.execute(parked):
                counts[status] = int(count)
            counts["pending"] = int(conn.execute(select(func.count()).select_from(inbox_pending)).scalar_one())
            counts["done"] = int(conn.execute(select(func.count()).select_from(inbox_done)).scalar_one())
            oldest = conn.execute(
                select(func.min(inbox.c.received_at)).select_from(
                    inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id)
                )
            ).scalar()
        return InboxStats(
            counts=counts,
            oldest_pending_received_at=oldest,
            oldest_pending_age_s=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
        )

    def stats_by_connection(self, *, provider: str | None = None) -> list[ConnectionInboxStats]:
        """:meth:`stats` per (provider, connection), every status counted (zeros included).

        One grouped pass over the inbox, as :meth:`stats` makes: cheap while finished events are
        purged on schedule (``sync-project inbox purge``), a scan of them otherwise.
        """
        query = select(
            inbox.c.provider, inbox.c.connection_id, inbox.c.status, func.count(), func.min(inbox.c.received_at)
        ).group_by(inbox.c.provider, inbox.c.connection_id, inbox.c.status)
        if provider is not None:
            query = query.where(inbox.c.provider == provider)
        found: dict[tuple[str, str], ConnectionInboxStats] = {}
        with unavailable_as_store_error(), reading(self._engine) as conn:
            rows = conn.execute(query).all()
        for provider_name, connection_id, status, count, oldest in rows:
            key = (provider_name, connection_id)
            if key not in found:
                found[key] = ConnectionInboxStats(
                    provider=provider_name, connection_id=connection_id, counts=dict.fromkeys(INBOX_STATUSES, 0)
                )
            found[key].counts[status] = int(count)
            if status == "pending":
                found[key].oldest_pending_received_at = _aware(oldest)
        return [found[key] for key in sorted(found)]

    def replay(self, status: ReplayableStatus, *, connections: ConnectionLookup, provider: str | None = None) -> int:
        """Make ``dead``, ``unroutable`` or ``orphaned`` events pending again; returns how many
        became pending.

        Dead events restart with no attempts. Unroutable events are routed again, by the routing
        the receiver uses, to the connections that now exist: new pending rows (a copy that is
        already there is not duplicated), and the unroutable row becomes ``routed``. Rows that
        still route nowhere stay unroutable. Orphaned events become pending where a connection of
        their id exists again (adding it back does this by itself); the others stay orphaned.
        """
        if status == "dead":
            return self._replay_dead(provider)
        if status == "unroutable":
            return self._replay_unroutable(connections, provider)
        if status == "orphaned":
            with unavailable_as_store_error(), self._engine.begin() as conn:
                return restore_orphaned(conn, provider=provider)
        raise ValueError(f"cannot replay status {status!r}; expected 'dead', 'unroutable' or 'orphaned'")

    def orphan_unregistered(self, provider: str, connection_id: str) -> int:
        """End the pending events of a connection that does not exist (any more): ``orphaned``.

        For events a receiver routed from a connections snapshot taken just before the connection
        was removed (the inbox sensor calls this). Checked in the same transaction, so a
        connection added meanwhile keeps its events pending; returns how many were orphaned."""
        with unavailable_as_store_error(), self._engine.begin() as conn:
            return orphan_pending(conn, provider, connection_id, only_if_unregistered=True)

    def purge(
        self,
        older_than: timedelta,
        *,
        statuses: Sequence[InboxStatus] = ("done", "ignored", "routed"),
        now: datetime | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete finished rows received more than ``older_than`` ago; returns how many.

        A kept row is also what recognises a redelivery as a duplicate, so keep rows for longer
        than providers redeliver (Stripe retries for 3 days, GitHub redelivers by hand for 3).
        A redelivery of a purged event is stored and applied again; the merge guards make a copy
        older than what the store holds a no-op (identical) or stale (``skipped_stale``).
        Pending, dead, unroutable and orphaned rows are never purged by default: they are work
        not done. ``limit`` stops after about that many rows (a whole chunk at a time): the
        automatic retention spreads a backlog over runs instead of holding one up.
        """
        return sum(self.purge_chunks(older_than, statuses=statuses, now=now, limit=limit))

    def purgeable(
        self,
        older_than: timedelta,
        *,
        statuses: Sequence[InboxStatus] = ("done", "ignored", "routed"),
        now: datetime | None = None,
    ) -> int:
        """How many rows :meth:`purge` would delete now (one counting pass: for a progress bar)."""
        cutoff = (now or utcnow()) - _check_purge(older_than, statuses)
        total = 0
        with unavailable_as_store_error(), reading(self._engine) as conn:
            if "done" in statuses and self._oldest_done_before(conn, cutoff):
                total += int(
                    conn.execute(
                        select(func.count())
                        .select_from(inbox_done.outerjoin(inbox, inbox.c.id == inbox_done.c.id))
                        .where(inbox.c.received_at.is_(None) | (inbox.c.received_at < cutoff))
                    ).scalar_one()
                )
            if "pending" in statuses:
                total += int(
                    conn.execute(
                        select(func.count())
                        .select_from(inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id))
                        .where(inbox.c.received_at < cutoff)
                    ).scalar_one()
                )
            parked = [status for status in statuses if status not in ("done", "pending")]
            if parked:
                total += int(
                    conn.execute(
                        select(func.count()).where(PARKED, inbox.c.status.in_(parked), inbox.c.received_at < cutoff)
                    ).scalar_one()
                )
        return total

    def purge_chunks(
        self,
        older_than: timedelta,
        *,
        statuses: Sequence[InboxStatus] = ("done", "ignored", "routed"),
        now: datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[int]:
        """:meth:`purge`, one committed chunk at a time: yields the rows each chunk deleted."""
        cutoff = (now or utcnow()) - _check_purge(older_than, statuses)
        left = limit
        parts: list[Callable[[datetime], Iterator[int]]] = []
        if "done" in statuses:
            parts.append(self._purge_done)
        if "pending" in statuses:
            parts.append(self._purge_pending)
        parked = [status for status in statuses if status not in ("done", "pending")]
        if parked:
            parts.append(lambda cutoff: self._purge_parked(cutoff, parked))
        for part in parts:
            for removed in part(cutoff):
                if removed:
                    yield removed
                if left is not None:
                    left -= removed
                    if left <= 0:
                        return

    def _purge_parked(self, cutoff: datetime, parked: Sequence[str]) -> Iterator[int]:
        while True:
            # Bounded deletes: short transactions, so receivers and runs never wait long.
            with unavailable_as_store_error(), self._engine.begin() as conn:
                ids = select(inbox.c.id).where(PARKED, inbox.c.status.in_(parked), inbox.c.received_at < cutoff)
                removed = int(
                    conn.execute(delete(inbox).where(inbox.c.id.in_(ids.limit(_ID_CHUNK).scalar_subquery()))).rowcount
                )
            yield removed
            if removed < _ID_CHUNK:
                return

    def _purge_pending(self, cutoff: datetime) -> Iterator[int]:
        """Only when asked for by name: pending events are work not done."""
        while True:
            with unavailable_as_store_error(), self._engine.begin() as conn:
                ids = list(
                    conn.execute(
                        select(inbox_pending.c.id)
                        .select_from(inbox_pending.join(inbox, inbox.c.id == inbox_pending.c.id))
                        .where(inbox.c.received_at < cutoff)
                        .limit(_ID_CHUNK)
                    ).scalars()
                )
                conn.execute(delete(inbox_pending).where(inbox_pending.c.id.in_(ids)))
                removed = int(conn.execute(delete(inbox).where(inbox.c.id.in_(ids))).rowcount)
            yield removed
            if len(ids) < _ID_CHUNK:
                return

    @staticmethod
    def _oldest_done_before(conn: Connection, cutoff: datetime) -> bool:
        """Whether the oldest acknowledgement (by id, so by receipt) may be past ``cutoff``."""
        oldest = conn.execute(
            select(inbox.c.received_at)
            .select_from(inbox_done.join(inbox, inbox.c.id == inbox_done.c.id))
            .order_by(inbox_done.c.id)
            .limit(1)
        ).scalar()
        return oldest is None or oldest < cutoff

    def _purge_done(self, cutoff: datetime) -> Iterator[int]:
        """Delete done events received before ``cutoff`` with their acknowledgements, in chunks
        taken in id order off ``inbox_done``.

        Ids follow receipt, so the walk stops at the first chunk that ends with a younger event:
        a purge costs what it removes, not the size of the inbox. (A replayed unroutable event's
        copies have new ids and the original's receipt time; they go once their neighbours do.)
        """
        after_id = 0
        with unavailable_as_store_error(), reading(self._engine) as conn:
            if not self._oldest_done_before(conn, cutoff):
                return  # the common case of the automatic retention: one index probe
        while True:
            with unavailable_as_store_error(), self._engine.begin() as conn:
                chunk = conn.execute(
                    select(inbox_done.c.id, inbox.c.received_at)
                    .select_from(inbox_done.outerjoin(inbox, inbox.c.id == inbox_done.c.id))
                    .where(inbox_done.c.id > after_id)
                    .order_by(inbox_done.c.id)
                    .limit(_ID_CHUNK)
                ).all()
                if not chunk:
                    return
                after_id = chunk[-1][0]
                # An acknowledgement whose row is gone (deleted by hand) goes too.
                old = [row_id for row_id, received_at in chunk if received_at is None or received_at < cutoff]
                removed = 0
                if old:
                    removed = int(conn.execute(delete(inbox).where(inbox.c.id.in_(old))).rowcount)
                    conn.execute(delete(inbox_done).where(inbox_done.c.id.in_(old)))
            yield removed
            newest = chunk[-1][1]
            if len(chunk) < _ID_CHUNK or (newest is not None and newest >= cutoff):
                return

    def events(
        self,
        *,
        status: InboxStatus | None = None,
        provider: str | None = None,
        sync: str | None = None,
        connection_id: str | None = None,
        event_key: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[InboxEvent]:
        """Inbox rows in id order, filtered (for the CLI, tests and debugging)."""
        query = _with_status(select(*_VIEW).select_from(_WITH_DONE), status)
        query = query.where(inbox.c.id > after_id).order_by(inbox.c.id).limit(limit)
        for column, value in (
            (inbox.c.provider, provider),
            (inbox.c.sync, sync),
            (inbox.c.connection_id, connection_id),
            (inbox.c.event_key, event_key),
        ):
            if value is not None:
                query = query.where(column == value)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return _events(conn.execute(query))

    def count(
        self,
        *,
        status: InboxStatus | None = None,
        provider: str | None = None,
        sync: str | None = None,
        connection_id: str | None = None,
    ) -> int:
        if status == "pending" and provider is None:
            base = select(func.count()).select_from(inbox_pending)
            for column, value in ((inbox_pending.c.sync, sync), (inbox_pending.c.connection_id, connection_id)):
                if value is not None:
                    base = base.where(column == value)
            with unavailable_as_store_error(), reading(self._engine) as conn:
                return int(conn.execute(base).scalar_one())
        query = _with_status(select(func.count()).select_from(_WITH_DONE), status)
        for column, value in (
            (inbox.c.provider, provider),
            (inbox.c.sync, sync),
            (inbox.c.connection_id, connection_id),
        ):
            if value is not None:
                query = query.where(column == value)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return int(conn.execute(query).scalar_one())

    def get(self, event_id: int) -> InboxEvent:
        with unavailable_as_store_error(), reading(self._engine) as conn:
            found = _events(conn.execute(select(*_VIEW).select_from(_WITH_DONE).where(inbox.c.id == event_id)))
        if not found:
            raise LookupError(f"no inbox event with id {event_id}")
        return found[0]

    # -- internals ----------------------------------------------------------------------------

    def _replay_dead(self, provider: str | None) -> int:
        statement = (
            update(inbox)
            .where(inbox.c.status == "dead")
            # Due now, and a requeue time the sensor has not seen: Dagster run keys are permanent,
            # and the replayed work must not look like the work whose runs already happened.
            .values(status="pending", attempts=0, next_attempt_at=utcnow(), processed_at=None)
            .returning(inbox.c.id, inbox.c.sync, inbox.c.connection_id)
        )
        if provider is not None:
            statement = statement.where(inbox.c.provider == provider)
        with unavailable_as_store_error(), self._engine.begin() as conn:
            queued = [{"id": i, "sync": s, "connection_id": c} for i, s, c in conn.execute(statement)]
            if queued:
                conn.execute(insert(inbox_pending), queued)
            return len(queued)

    def _replay_unroutable(self, connections: ConnectionLookup, provider: str | None) -> int:
        became_pending = 0
        after_id = 0
        while True:
            rows = self.events(status="unroutable", provider=provider, after_id=after_id, limit=_REPLAY_CHUNK)
            if not rows:
                return became_pending
            after_id = rows[-1].id
            # Routing reads the connections table: once per account, outside the write transaction.
            targets: dict[tuple[str, str | None], list[str]] = {}
            for row in rows:
                key = (row.provider, row.account_id)
                if key not in targets:
                    found = connections_for(connections, row.provider, row.account_id)
                    targets[key] = [c.connection_id for c in found]
            routable = [row for row in rows if targets[(row.provider, row.account_id)]]
            if not routable:
                continue
            with unavailable_as_store_error(), self._engine.begin() as conn:
                # Only rows still unroutable now: a concurrent replay may have routed some already.
                still = {
                    row_id
                    for (row_id,) in conn.execute(
                        select(inbox.c.id).where(
                            inbox.c.id.in_([row.id for row in routable]), inbox.c.status == "unroutable"
                        )
                    )
                }
                copies: list[tuple[str, RoutedEvent, datetime]] = []
                for row in routable:
                    if row.id not in still:
                        continue
                    for connection_id in targets[(row.provider, row.account_id)]:
                        event = RoutedEvent(
                            event_key=row.event_key,
                            event_type=row.event_type,
                            account_id=row.account_id,
                            payload=row.payload,
                            sync=row.sync,
                            connection_id=connection_id,
                        )
                        copies.append((row.provider, event, row.received_at))
                became_pending += _insert_rows(conn, copies)
                if still:
                    conn.execute(
                        update(inbox)
                        .where(inbox.c.id.in_(sorted(still)), inbox.c.status == "unroutable")
                        .values(status="routed", processed_at=utcnow())
                    )


def orphan_pending(conn: Connection, provider: str, connection_id: str, *, only_if_unregistered: bool = False) -> int:
    """In ``conn``'s transaction: the pending events of (``provider``, ``connection_id``) leave the
    work queue and read ``orphaned`` (kept with their payload and attempts; see the module
    docstring). Returns how many.

    The queue rows are deleted first, each returning its id: a drain batch holding one (Postgres
    row lock) commits it as done before this sees it, so an applied event is never orphaned."""
    owned = (
        select(inbox.c.id)
        .where(inbox.c.id == inbox_pending.c.id, inbox.c.provider == provider, inbox.c.connection_id == connection_id)
        .exists()
    )
    statement = delete(inbox_pending).where(inbox_pending.c.connection_id == connection_id, owned)
    if only_if_unregistered:
        statement = statement.where(~_connection_exists(literal(provider), literal(connection_id)))
    ids = sorted(conn.execute(statement.returning(inbox_pending.c.id)).scalars())
    for start in range(0, len(ids), _ID_CHUNK):
        conn.execute(
            update(inbox)
            .where(inbox.c.id.in_(ids[start : start + _ID_CHUNK]))
            .values(status="orphaned", next_attempt_at=None, processed_at=utcnow())
        )
    return len(ids)


def restore_orphaned(conn: Connection, *, provider: str | None = None, connection_id: str | None = None) -> int:
    """In ``conn``'s transaction: orphaned events whose connection exists (again) become pending,
    due now under a requeue time the inbox sensor has not seen (its run keys are permanent)."""
    statement = (
        update(inbox)
        .where(inbox.c.status == "orphaned", _connection_exists(inbox.c.provider, inbox.c.connection_id))
        .values(status="pending", next_attempt_at=utcnow(), processed_at=None)
        .returning(inbox.c.id, inbox.c.sync, inbox.c.connection_id)
    )
    if provider is not None:
        statement = statement.where(inbox.c.provider == provider)
    if connection_id is not None:
        statement = statement.where(inbox.c.connection_id == connection_id)
    queued = [{"id": i, "sync": s, "connection_id": c} for i, s, c in conn.execute(statement)]
    if queued:
        conn.execute(insert(inbox_pending), queued)
        notify_inserted(conn, {(row["sync"], row["connection_id"]) for row in queued})
    return len(queued)


def _connection_exists(provider: Any, connection_id: Any) -> Any:
    return (
        select(connections.c.connection_id)
        .where(connections.c.provider == provider, connections.c.connection_id == connection_id)
        .exists()
    )


def insert_events(
    conn: Connection, deliveries: Sequence[tuple[str, Sequence[RoutedEvent]]], *, received_at: datetime | None = None
) -> list[ReceiveResult]:
    """Insert the rows of several deliveries in ``conn``'s transaction, with true per-delivery counts.

    ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` reports which rows are new. A row that two
    deliveries of the same batch share (a provider retrying while the first is still being
    committed) is attributed to the first; the later one counts it as a duplicate.
    """
    received_at = received_at or utcnow()
    results = [ReceiveResult() for _ in deliveries]
    owner: dict[tuple[str, str, str, str], int] = {}
    rows: list[tuple[str, RoutedEvent, datetime]] = []
    for index, (provider, events) in enumerate(deliveries):
        for event in events:
            key = (provider, event.event_key, event.sync, event.connection_id)
            if key in owner:
                results[index].duplicates += 1
                continue
            owner[key] = index
            rows.append((provider, event, received_at))
    inserted, notified = _insert_returning(conn, rows, notify=True)
    if not notified:
        # Wakes the partitions' drainers when this transaction commits (Postgres; see store/wakeup.py).
        notify_inserted(conn, {(sync, connection_id) for _, _, sync, connection_id in inserted})
    for key, index in owner.items():
        if key in inserted:
            results[index].stored += 1
        else:
            results[index].duplicates += 1
    return results


def _insert_rows(conn: Connection, rows: Sequence[tuple[str, RoutedEvent, datetime]]) -> int:
    return len(_insert_returning(conn, rows)[0])


#: Rows per INSERT statement on Postgres (the receiver's batches are rarely bigger).
_INSERT_CHUNK = 1000
#: The Postgres insert as SQL text, per (row count, notifying): rendered once, then reused with no
#: compilation (SQLAlchemy re-rendered a multi-row VALUES for every batch: 15 % of the commit
#: thread). One statement inserts the rows, queues the pending ones and, notifying, sends
#: notify_inserted's wake-ups (one per partition inserted into, in order, on the store's channel,
#: delivered at commit): one round trip per batch instead of two.
_POSTGRES_INSERTS: dict[tuple[int, bool], str] = {}
_POSTGRES_INSERT = (
    "WITH ins AS (INSERT INTO inbox (provider, event_key, sync, connection_id, account_id, event_type, payload, "
    "status, attempts, received_at) VALUES {values} "
    "ON CONFLICT (provider, event_key, sync, connection_id) DO NOTHING "
    "RETURNING id, provider, event_key, sync, connection_id, status), "
    "queued AS (INSERT INTO inbox_pending (id, sync, connection_id) "
    "SELECT id, sync, connection_id FROM ins WHERE status = 'pending') "
    "{woken}SELECT provider, event_key, sync, connection_id FROM ins{with_woken}"
)
_POSTGRES_WOKEN = (
    f"woken AS (SELECT count(pg_notify({_CHANNEL_SQL}, p.sync || '|' || p.connection_id)) AS n "
    "FROM (SELECT DISTINCT sync, connection_id FROM ins ORDER BY sync, connection_id) AS p) "
)


def _postgres_insert(count: int, notify: bool) -> str:
    statement = _POSTGRES_INSERTS.get((count, notify))
    if statement is None:
        statement = _POSTGRES_INSERT.format(
            values=",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,0,%s)"] * count),
            # Only a data-modifying CTE runs unreferenced: the one-row join makes the notify run.
            woken=", " + _POSTGRES_WOKEN if notify else "",
            with_woken=" CROSS JOIN woken" if notify else "",
        )
        _POSTGRES_INSERTS[(count, notify)] = statement
    return statement


def _insert_returning(
    conn: Connection, rows: Sequence[tuple[str, RoutedEvent, datetime]], *, notify: bool = False
) -> tuple[set[tuple[str, str, str, str]], bool]:
    """The keys inserted, and whether their wake-ups were sent too (``notify`` on psycopg2)."""
    if not rows:
        return set(), False
    # In arrival order: ids are the order a webhook run applies events in.
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2":
        inserted: set[tuple[str, str, str, str]] = set()
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            parameters: list[Any] = []
            for provider, event, received_at in chunk:
                parameters += (
                    provider, event.event_key, event.sync, event.connection_id, event.account_id,
                    event.event_type, event.payload_json, event.status, received_at,
                )  # fmt: skip
            result = conn.exec_driver_sql(_postgres_insert(len(chunk), notify), tuple(parameters))
            inserted.update(tuple(row) for row in result)
        return inserted, notify
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(inbox)
        .on_conflict_do_nothing(
            index_elements=[inbox.c.provider, inbox.c.event_key, inbox.c.sync, inbox.c.connection_id]
        )
        .returning(inbox.c.id, inbox.c.provider, inbox.c.event_key, inbox.c.sync, inbox.c.connection_id, inbox.c.status)
    )
    parameters = [
        {
            "provider": provider,
            "event_key": event.event_key,
            "sync": event.sync,
            "connection_id": event.connection_id,
            "account_id": event.account_id,
            "event_type": event.event_type,
            "payload": event.payload_json,
            "status": event.status,
            "attempts": 0,
            "next_attempt_at": None,
            "last_error": None,
            "received_at": received_at,
            "processed_at": None,
        }
        for provider, event, received_at in rows
    ]
    inserted = set()
    queued: list[dict[str, Any]] = []
    for row_id, provider, event_key, sync, connection_id, status in conn.execute(statement, parameters):
        inserted.add((provider, event_key, sync, connection_id))
        if status == "pending":
            queued.append({"id": row_id, "sync": sync, "connection_id": connection_id})
    if queued:
        conn.execute(insert(inbox_pending), queued)
    return inserted, False


def _check_purge(older_than: timedelta, statuses: Sequence[str]) -> timedelta:
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    unknown = set(statuses) - set(INBOX_STATUSES)
    if unknown:
        raise ValueError(f"unknown status(es) {sorted(unknown)}; expected some of {list(INBOX_STATUSES)}")
    return older_than


def _aware(value: datetime | str | None) -> datetime | None:
    """Aggregates bypass the column type, so SQLite hands back naive text: make it aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _due(now: datetime) -> Any:
    return inbox.c.next_attempt_at.is_(None) | (inbox.c.next_attempt_at <= now)


_ACK_POSTGRES = text(
    "WITH acked AS (DELETE FROM inbox_pending WHERE id = ANY(:ids) RETURNING id) "
    "INSERT INTO inbox_done (id, processed_at) SELECT id, :now FROM acked"
).bindparams(bindparam("now", type_=UtcDateTime))

#: The rows of the partial status index: what is neither queued nor done (see schema.inbox). A
#: query on a parked status states it as well, as literal SQL: SQLite uses a partial index only
#: when the query's WHERE holds the index's own condition, constants and all (``status = 'dead'``
#: alone, or ``NOT IN (?, ?)`` with bound values, scans the whole inbox).
PARKED = text("inbox.status NOT IN ('pending', 'done')")
#: An inbox row beside its acknowledgement, if any: what the derived status reads.
_WITH_DONE = inbox.outerjoin(inbox_done, inbox_done.c.id == inbox.c.id)
_IS_DONE = inbox_done.c.id.is_not(None)
_STATUS = case((_IS_DONE, literal("done")), else_=inbox.c.status).label("status")
#: Every inbox column, with the status, processed_at and next_attempt_at a done event has.
_VIEW = [
    *(column for column in inbox.c if column.name not in ("status", "processed_at", "next_attempt_at")),
    _STATUS,
    type_coerce(case((_IS_DONE, null()), else_=inbox.c.next_attempt_at), UtcDateTime).label("next_attempt_at"),
    type_coerce(func.coalesce(inbox_done.c.processed_at, inbox.c.processed_at), UtcDateTime).label("processed_at"),
]
_CLAIMED = [
    inbox.c.id,
    inbox.c.provider,
    inbox.c.event_key,
    inbox.c.sync,
    inbox.c.connection_id,
    inbox.c.account_id,
    inbox.c.event_type,
    inbox.c.payload,
    inbox.c.attempts,
]


def _with_status(query: Any, status: InboxStatus | None) -> Any:
    """``query`` (over ``_WITH_DONE``) narrowed to rows that read as ``status``."""
    if status is None:
        return query
    if status == "done":
        return query.where(_IS_DONE)
    if status == "pending":
        return query.where(inbox.c.id.in_(select(inbox_pending.c.id)))
    return query.where(inbox.c.status == status, ~_IS_DONE)


def _events(result: Any) -> list[InboxEvent]:
    """Rows of ``SELECT inbox.*`` as events (a webhook run claims thousands a second: keep it lean)."""
    names = list(result.keys())
    payload_at = names.index("payload")
    events = []
    for row in result:
        values = list(row)
        values[payload_at] = json.loads(values[payload_at])
        events.append(InboxEvent.model_validate(dict(zip(names, values, strict=True))))
    return events


__all__ = [
    "INBOX_STATUSES",
    "ConnectionInboxStats",
    "DuePartition",
    "Inbox",
    "InboxEvent",
    "InboxStats",
    "InboxStatus",
    "ClaimedEvent",
    "ReceiveResult",
    "RoutedEvent",
    "insert_events",
    "orphan_pending",
    "restore_orphaned",
    "retry_delay",
]
